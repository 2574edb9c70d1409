"""Shared steps of the subscription-checkout tests: open one over HTTP, read a row's status."""

from __future__ import annotations

from models import CheckoutSession, connection

URLS = {"successUrl": "https://app.example.com/ok", "cancelUrl": "https://app.example.com/no"}


def open_checkout(client, org, headers=None, key=None):
    """POST /v1/billing/checkout for the pro plan, as the owner unless `headers` say who."""
    headers = dict(headers or org.owner)
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(
        "/v1/billing/checkout",
        json={"organizationId": org.id, "subscriptionPlan": "pro", **URLS},
        headers=headers,
    )


def session_status(session_id: str) -> str:
    with connection():
        return str(CheckoutSession.get_by_id(session_id).status)
