// End-to-end flow with a client generated from openapi.yaml (types by openapi-typescript,
// calls by openapi-fetch). Exits non-zero on the first broken expectation.
import createClient from "openapi-fetch";
import type { paths } from "./generated/schema.js";

const baseUrl = process.env.BASE_URL!;
const orgId = process.env.ORG_ID!;
const client = createClient<paths>({
  baseUrl,
  headers: { Authorization: `Bearer ${process.env.TOKEN}` },
});

function check(condition: boolean, message: string): void {
  if (!condition) {
    console.error(`FAILED: ${message}`);
    process.exit(1);
  }
}

const params = { path: { organizationId: orgId } };

const settings = await client.GET("/v1/organizations/{organizationId}/billing", { params });
check(settings.response.status === 200 && settings.data !== undefined, "read settings");

const patched = await client.PATCH("/v1/organizations/{organizationId}/billing", {
  params,
  body: { billingEmail: "ts@example.com", usageCapDecimillicents: 123_000_000 },
});
check(patched.data?.billingEmail === "ts@example.com", "patch settings");
check(patched.data?.usageCapDecimillicents === 123_000_000, "patch usage cap");

const credits = await client.GET("/v1/billing/{organizationId}/credits", { params });
check(typeof credits.data?.availableDecimillicents === "number", "read credits");

const history = await client.GET("/v1/billing/{organizationId}/credits/history", {
  params: { ...params, query: { limit: "5" } },
});
check(Array.isArray(history.data?.items) && history.data!.items.length <= 5, "read history");

const missing = await client.GET("/v1/billing/{organizationId}/credits", {
  params: { path: { organizationId: "00000000-0000-4000-8000-000000000000" } },
});
check(missing.response.status === 404 && missing.error?.code === "NotFound", "404 problem");

const tooBig = await client.POST("/v1/billing/{organizationId}/top-up", {
  params,
  body: { amountDecimillicents: 1, successUrl: "https://x.example.com", cancelUrl: "https://x.example.com" },
});
check(tooBig.response.status === 400 && tooBig.error?.code === "BadRequest", "400 problem");

console.log("typescript client flow ok");
