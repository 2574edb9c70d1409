"""The contract documents what consumers meet on the wire: the X-Request-Id and RateLimit-*
headers on every response, the 401 challenge, one SubscriptionPlan enum, and no repeats."""

from __future__ import annotations

import pytest

from tests.contract.test_spec import _resolve, load_spec, spec_operations

SPEC = load_spec()
COMMON = {"X-Request-Id", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"}


@pytest.mark.parametrize(
    "op",
    [
        pytest.param(op, id=op["operationId"])
        for _m, _p, op, _ in spec_operations(SPEC, include_extensions=True)
    ],
)
def test_every_response_documents_the_common_headers(op):
    for status, raw in op["responses"].items():
        response = _resolve(SPEC, raw)
        assert set(response.get("headers", {})) >= COMMON, (op["operationId"], status)


def test_401_documents_its_challenge():
    unauthorized = SPEC["components"]["responses"]["Unauthorized"]
    assert unauthorized["headers"]["WWW-Authenticate"]["required"] is True
    for credential in ("bearer token", "X-Service-Token", "Stripe-Signature"):
        assert credential in unauthorized["description"]


def test_429_documents_retry_after():
    assert "Retry-After" in SPEC["components"]["responses"]["TooManyRequests"]["headers"]


def test_info_description_has_no_repeated_paragraph():
    paragraphs = [p.strip() for p in SPEC["info"]["description"].split("\n\n") if p.strip()]
    assert len(paragraphs) == len(set(paragraphs))


def test_nullable_plan_reuses_the_one_plan_enum():
    plan = SPEC["components"]["schemas"]["BillingSettings"]["properties"]["subscriptionPlan"]
    refs = [item["$ref"] for item in plan["anyOf"]]
    assert refs == ["#/components/schemas/SubscriptionPlan", "#/components/schemas/NoValue"]
    assert SPEC["components"]["schemas"]["NoValue"]["enum"] == [None]


def test_local_mode_webhook_400_is_documented():
    op = SPEC["paths"]["/v1/webhooks/stripe"]["post"]
    assert "local billing mode" in op["description"] and "400" in op["description"]
