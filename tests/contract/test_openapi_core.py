"""A second, independent validator: openapi-core checks real exchanges with the app.

Connexion validates with its own code; openapi-core reads the spec its own way. A walk through
the main flows (including error answers) is validated request and response, so a drift that one
library tolerates is still caught by the other.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
from openapi_core import Config, OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from billing.units import DOLLAR
from scripts.local_server import ROOT
from tests.conftest import SERVICE_HEADERS

OPENAPI = OpenAPI.from_file_path(
    str(ROOT / "openapi.yaml"),
    config=Config(extra_media_type_deserializers={"application/problem+json": json.loads}),
)
URLS = {"successUrl": "https://app.example.com/ok", "cancelUrl": "https://app.example.com/no"}


class Recorder:
    """Wraps the test client; validates every exchange with openapi-core."""

    def __init__(self, client) -> None:
        self.client = client
        self.validated = 0

    def __call__(self, method: str, expect: int, url: str, **kwargs):
        """Send, check the status is `expect`, and validate both sides with openapi-core."""
        response = self.client.request(method, url, **kwargs)
        assert response.status_code == expect, (method, url, response.text)
        parts = urlsplit(str(response.request.url))
        headers = {k.title(): v for k, v in response.request.headers.items()}
        request = MockRequest(
            "http://testserver",
            method.lower(),
            parts.path,
            args=dict(item.split("=", 1) for item in parts.query.split("&") if item),
            headers=headers,
            data=response.request.content or None,
            content_type=response.request.headers.get("content-type", "application/json"),
        )
        OPENAPI.validate_request(request)
        OPENAPI.validate_response(
            request,
            MockResponse(
                response.content,
                response.status_code,
                headers=dict(response.headers),
                content_type=response.headers["content-type"],
            ),
        )
        self.validated += 1
        return response


@pytest.fixture
def call(client):
    return Recorder(client)


def test_main_flows_validate_with_openapi_core(call, org):
    base = f"/v1/billing/{org.id}"
    call("GET", 200, f"/v1/organizations/{org.id}/billing", headers=org.owner)
    call(
        "PATCH",
        200,
        f"/v1/organizations/{org.id}/billing",
        headers=org.owner,
        json={"usageCapDecimillicents": 10**9, "billingEmail": "a@example.com"},
    )
    call(
        "POST",
        200,
        "/v1/billing/checkout",
        headers=org.owner,
        json={"organizationId": org.id, "subscriptionPlan": "pro", **URLS},
    )
    call("POST", 200, f"{base}/dev/complete-local", headers=org.owner)
    call(
        "POST",
        200,
        f"{base}/top-up",
        headers=org.owner,
        json={"amountDecimillicents": 10**7, **URLS},
    )
    call("POST", 200, f"{base}/dev/complete-local", headers=org.owner)
    call(
        "POST",
        200,
        "/v1/billing/portal",
        headers=org.owner,
        json={"organizationId": org.id, "returnUrl": "https://app.example.com"},
    )
    usage = call(
        "POST",
        200,
        f"/v1/service/organizations/{org.id}/usage",
        headers=SERVICE_HEADERS,
        json={
            "category": "api_call",
            "quantity": 2,
            "unitCostDecimillicents": 5,
            "referenceId": "core-1",
        },
    )
    assert usage.status_code == 200
    hold = call(
        "POST",
        200,
        f"/v1/service/organizations/{org.id}/reservations",
        headers=SERVICE_HEADERS,
        json={"amountDecimillicents": 50, "referenceId": "h1"},
    )
    call(
        "POST",
        200,
        f"/v1/service/organizations/{org.id}/reservations/{hold.json()['id']}/finalize",
        headers=SERVICE_HEADERS,
        json={"actualAmountDecimillicents": 20},
    )
    credits = call("GET", 200, f"{base}/credits", headers=org.member).json()
    # $20 welcome credit + $1 top-up - 10 of usage - 20 finalized, with nothing held.
    assert credits["creditsBalanceDecimillicents"] == 20 * DOLLAR + DOLLAR - 10 - 20
    assert credits["reservedCreditsDecimillicents"] == 0
    first = call("GET", 200, f"{base}/credits/history", headers=org.member, params={"limit": "2"})
    call(
        "GET",
        200,
        f"{base}/credits/history",
        headers=org.member,
        params={"limit": "2", "cursor": first.json()["cursor"]},
    )
    call(
        "GET",
        200,
        f"/v1/organizations/{org.id}/usage",
        headers=org.member,
        params={"category": "api_call"},
    )
    call("GET", 200, f"{base}/no-cap-reminder", headers=org.member)
    call("POST", 200, f"{base}/no-cap-reminder/dismiss", headers=org.member)
    call("GET", 200, f"{base}/auto-recharge/requires-action", headers=org.admin)
    # Problems are part of the contract too.
    call("GET", 404, f"{base}/credits", headers=org.outsider)
    call(
        "PATCH",
        403,
        f"/v1/organizations/{org.id}/billing",
        headers=org.member,
        json={"usageCapDecimillicents": 1},
    )
    call(
        "POST",
        402,
        f"/v1/service/organizations/{org.id}/usage",
        headers=SERVICE_HEADERS,
        json={
            "category": "api_call",
            "quantity": 1,
            "unitCostDecimillicents": 9 * 10**9,
            "referenceId": "core-2",
        },
    )
    assert call.validated == 20
