"""Checkout, top-up and portal in Stripe mode: the real `stripe` library against localstripe
(customers) and Stripe's fixture shapes (Checkout, Portal), asserting what was sent."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import stripe

from billing.units import DOLLAR
from models import BillingAccount, CheckoutSession, database
from tests.stripe_fakes import API_KEY

URLS = {"successUrl": "https://app.example.com/ok", "cancelUrl": "https://app.example.com/no"}


def test_subscription_checkout_sends_plan_and_org(client, org, stripe_mode):
    r = client.post(
        "/v1/billing/checkout",
        json={"organizationId": org.id, "subscriptionPlan": "agency", **URLS},
        headers=org.owner,
    )
    assert r.status_code == 200, r.text
    assert r.json()["id"].startswith("cs_test_")
    assert r.json()["url"].startswith("https://checkout.stripe.com/")
    [sent] = stripe_mode.sent("POST", "/v1/checkout/sessions")
    assert sent["mode"] == "subscription"
    assert sent["client_reference_id"] == org.id
    assert sent["metadata"]["organization_id"] == org.id
    assert sent["subscription_data"]["metadata"]["organization_id"] == org.id
    assert sent["line_items"]["0"]["price"] == "price_agency"
    assert sent["success_url"] == URLS["successUrl"]
    # The customer is real in localstripe and carries the organization id.
    with database.connection_context():
        customer_id = BillingAccount.get_by_id(org.id).stripe_customer_id
        assert CheckoutSession.get_by_id(r.json()["id"]).kind == "subscription"
    assert sent["customer"] == customer_id
    client_ = stripe.StripeClient(API_KEY, base_addresses={"api": stripe_mode.backend})
    assert client_.v1.customers.retrieve(customer_id).metadata["organization_id"] == org.id


def test_top_up_sends_amount_in_cents_and_metadata(client, org, stripe_mode):
    r = client.post(
        f"/v1/billing/{org.id}/top-up",
        json={"amountDecimillicents": 25 * DOLLAR, **URLS},
        headers=org.admin,
    )
    assert r.status_code == 200, r.text
    [sent] = stripe_mode.sent("POST", "/v1/checkout/sessions")
    assert sent["mode"] == "payment"
    assert sent["line_items"]["0"]["price_data"]["unit_amount"] == "2500"
    assert sent["payment_intent_data"]["metadata"]["kind"] == "top_up"
    assert sent["payment_intent_data"]["metadata"]["organization_id"] == org.id
    assert sent["payment_intent_data"]["setup_future_usage"] == "off_session"
    # No credits on session creation: only when Stripe says the money arrived.
    assert (
        client.get(f"/v1/billing/{org.id}/credits", headers=org.owner).json()[
            "creditsBalanceDecimillicents"
        ]
        == 0
    )


def test_portal_reuses_the_customer(client, org, stripe_mode):
    for _ in range(2):
        r = client.post(
            "/v1/billing/portal",
            json={"organizationId": org.id, "returnUrl": "https://app.example.com/billing"},
            headers=org.owner,
        )
        assert r.status_code == 200, r.text
        assert r.json()["url"].startswith("https://billing.stripe.com/")
    assert len(stripe_mode.sent("POST", "/v1/customers")) == 1
    sent = stripe_mode.sent("POST", "/v1/billing_portal/sessions")
    assert len(sent) == 2 and sent[0]["return_url"] == "https://app.example.com/billing"


def test_concurrent_first_calls_use_one_customer(client, org, stripe_mode):
    """No lock is held around Stripe, so concurrent first calls may each ask for the customer;
    they all send the organization's idempotency key (Stripe answers one customer), and the
    first recorded id is the one every session uses."""

    def start(_):
        return client.post(
            f"/v1/billing/{org.id}/top-up",
            json={"amountDecimillicents": DOLLAR, **URLS},
            headers=org.owner,
        ).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(start, range(8)))
    assert statuses == [200] * 8
    customer_keys = {
        key
        for (method, path, _), key in zip(
            stripe_mode.requests, stripe_mode.idempotency_keys, strict=True
        )
        if (method, path) == ("POST", "/v1/customers")
    }
    assert customer_keys == {f"customer:{org.id}"}
    sessions = stripe_mode.sent("POST", "/v1/checkout/sessions")
    assert len(sessions) == 8
    with database.connection_context():
        recorded = BillingAccount.get_by_id(org.id).stripe_customer_id
    assert {s["customer"] for s in sessions} == {recorded}


def test_stripe_outage_is_a_clear_problem_and_writes_nothing(client, org, stripe_mode):
    stripe_mode.fail_with = 503
    r = client.post(
        "/v1/billing/checkout",
        json={"organizationId": org.id, "subscriptionPlan": "pro", **URLS},
        headers=org.owner,
    )
    assert r.status_code == 500
    body = r.json()
    assert body["code"] == "InternalError" and "payment provider" in body["detail"]
    assert "Traceback" not in r.text and "injected" not in r.text
    with database.connection_context():
        assert BillingAccount.get_by_id(org.id).stripe_customer_id is None
        assert CheckoutSession.select().count() == 0


def test_dev_complete_local_is_404_in_stripe_mode(client, org, stripe_mode):
    r = client.post(f"/v1/billing/{org.id}/dev/complete-local", headers=org.owner)
    assert r.status_code == 404
