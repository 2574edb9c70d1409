"""Shared steps of the subscription-checkout tests: open one over HTTP, read a row's status,
the organization's customer, and the fixture front's subscription sessions."""

from __future__ import annotations

from models import BillingAccount, CheckoutSession, connection

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


def customer_of(org_id: str) -> str:
    with connection():
        return str(BillingAccount.get_by_id(org_id).stripe_customer_id)


def subscription_sessions(front, *statuses: str) -> list[str]:
    """The fixture front's subscription sessions in these Stripe statuses."""
    with front._lock:
        return [
            i
            for i, s in front.sessions.items()
            if s.get("mode") == "subscription" and s["status"] in statuses
        ]
