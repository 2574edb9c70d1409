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
// The platform's clients read `message` and `_tag`.
check(tooBig.error?._tag === "BadRequest" && tooBig.error?.message === tooBig.error?.detail, "message/_tag");

// The directory and operators, with the service credential.
const service = createClient<paths>({
  baseUrl,
  headers: { "X-Service-Token": process.env.SERVICE_TOKEN! },
});
const newOrg = "5f0c6a2e-8d1b-4c3a-9e7f-0a1b2c3d4e5f";
const org = { path: { organizationId: newOrg } };
const made = await service.PUT("/v1/service/organizations/{organizationId}", {
  params: org,
  body: { name: "TS org" },
});
check(made.data?.name === "TS org", "put organization");
const member = await service.PUT("/v1/service/organizations/{organizationId}/members/{userId}", {
  params: { path: { organizationId: newOrg, userId: "ts-admin" } },
  body: { role: "admin", email: "ts@example.com" },
});
check(member.data?.role === "admin", "put member");
const grant = await service.POST("/v1/service/organizations/{organizationId}/credit-adjustments", {
  params: { ...org, header: { "Idempotency-Key": "ts-goodwill-1" } },
  body: { amountDecimillicents: 20_000_000, reason: "goodwill" },
});
check(grant.data?.entry.entryType === "adjustment" && grant.data?.availableDecimillicents === 20_000_000, "adjust credits");
for (const category of ["text_generation", "image_generation", "video_generation", "storage"] as const) {
  const used = await service.POST("/v1/service/organizations/{organizationId}/usage", {
    params: org,
    body: { category, quantity: 2, unitCostDecimillicents: 1_000, referenceId: `ts-${category}` },
  });
  check(used.data?.category === category, `record ${category}`);
}
const suspended = await service.POST("/v1/service/organizations/{organizationId}/suspend", {
  params: org,
  body: { reason: "check" },
});
check(suspended.data?.isSuspended === true, "suspend");
const refused = await service.POST("/v1/service/organizations/{organizationId}/usage", {
  params: org,
  body: { category: "storage", quantity: 1, unitCostDecimillicents: 1, referenceId: "ts-refused" },
});
check(refused.response.status === 402 && refused.error?._tag === "PaymentRequired", "402 while suspended");
await service.POST("/v1/service/organizations/{organizationId}/unsuspend", { params: org, body: { reason: "ok" } });
const audit = await service.GET("/v1/service/organizations/{organizationId}/audit", { params: org });
check(audit.data?.sound === true && audit.data?.entryCount === 5, "audit");
const removed = await service.DELETE("/v1/service/organizations/{organizationId}/members/{userId}", {
  params: { path: { organizationId: newOrg, userId: "ts-admin" } },
});
check(removed.data?.removed === true, "remove member");
const hist = await client.GET("/v1/billing/{organizationId}/credits/history", { params });
check((hist.data?.items ?? []).every((i) => typeof i.reason === "string" && i.id.length === 36), "history ids and reasons");

console.log("typescript client flow ok");
