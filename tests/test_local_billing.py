"""Local billing mode end to end over HTTP: subscribe, top up, auto-recharge, no Stripe."""

from __future__ import annotations

import pytest

from billing.auto_recharge import drain
from billing.config import get_settings
from billing.stripe_gateway import get_gateway
from billing.units import DOLLAR
from models import AutoRechargeRequest, BillingAccount, CreditEntry, database
from tests.conftest import SERVICE_HEADERS
from tests.ledger_checks import assert_ledger_invariants

URLS = {"successUrl": "https://app.example.com/ok", "cancelUrl": "https://app.example.com/no"}


@pytest.fixture(autouse=True)
def local_mode():
    get_gateway.cache_clear()
    assert get_settings().local_billing
    yield
    get_gateway.cache_clear()


def complete(client, org):
    return client.post(f"/v1/billing/{org.id}/dev/complete-local", headers=org.owner)


def test_subscribe_grants_welcome_credit_once(client, org):
    r = client.post(
        "/v1/billing/checkout",
        json={"organizationId": org.id, "subscriptionPlan": "pro", **URLS},
        headers=org.admin,
    )
    assert r.status_code == 200, r.text
    assert r.json()["id"].startswith("cs_local_") and r.json()["url"].startswith("http")
    # Nothing is granted on redirect/creation, only on completion.
    assert (
        client.get(f"/v1/billing/{org.id}/credits", headers=org.member).json()[
            "creditsBalanceDecimillicents"
        ]
        == 0
    )
    done = complete(client, org)
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["subscriptionStatus"] == "active" and body["isSubscribed"] is True
    assert body["subscriptionPlan"] == "pro"
    assert body["creditsBalanceDecimillicents"] == 20 * DOLLAR
    assert complete(client, org).status_code == 404  # no open session left
    # A second subscription checkout while one is active is a 409 (a plan change goes through
    # the portal), and it grants nothing.
    second = client.post(
        "/v1/billing/checkout",
        json={"organizationId": org.id, "subscriptionPlan": "agency", **URLS},
        headers=org.owner,
    )
    assert second.status_code == 409, second.text
    assert complete(client, org).status_code == 404
    again = client.get(f"/v1/organizations/{org.id}/billing", headers=org.owner).json()
    assert again["subscriptionPlan"] == "pro"
    # An unpaid or paused subscription still bills (or resumes): a second one is a 409 too;
    # once canceled, a new checkout is allowed.
    for status, expected in (("unpaid", 409), ("paused", 409), ("canceled", 200)):
        with database.connection_context():
            BillingAccount.update(subscription_status=status).where(
                BillingAccount.organization == org.id
            ).execute()
        r = client.post(
            "/v1/billing/checkout",
            json={"organizationId": org.id, "subscriptionPlan": "agency", **URLS},
            headers=org.owner,
        )
        assert r.status_code == expected, (status, r.text)
    assert again["creditsBalanceDecimillicents"] == 20 * DOLLAR


def test_top_up_then_history(client, org):
    r = client.post(
        f"/v1/billing/{org.id}/top-up",
        json={"amountDecimillicents": 5 * DOLLAR, **URLS},
        headers=org.owner,
    )
    assert r.status_code == 200, r.text
    complete(client, org)
    history = client.get(f"/v1/billing/{org.id}/credits/history", headers=org.member).json()
    assert [(i["entryType"], i["kind"], i["amountDecimillicents"]) for i in history["items"]] == [
        ("purchase", "top_up", 5 * DOLLAR)
    ]
    assert history["items"][0]["referenceId"] == r.json()["id"]


@pytest.mark.parametrize("amount", [99_999, 5_000_000_001, 150_001])
def test_top_up_bounds(client, org, amount):
    r = client.post(
        f"/v1/billing/{org.id}/top-up",
        json={"amountDecimillicents": amount, **URLS},
        headers=org.owner,
    )
    assert r.status_code == 400
    assert complete(client, org).status_code == 404


@pytest.mark.parametrize("url", ["ftp://x.example.com", "javascript:alert(1)", "not a url", ""])
def test_session_urls_must_be_http(client, org, url):
    r = client.post(
        "/v1/billing/checkout",
        json={
            "organizationId": org.id,
            "subscriptionPlan": "pro",
            "successUrl": url,
            "cancelUrl": "https://ok.example.com",
        },
        headers=org.owner,
    )
    assert r.status_code == 400


def test_sessions_need_admin(client, org):
    assert (
        client.post(
            "/v1/billing/checkout",
            json={"organizationId": org.id, "subscriptionPlan": "pro", **URLS},
            headers=org.member,
        ).status_code
        == 403
    )
    assert (
        client.post(
            "/v1/billing/portal",
            json={"organizationId": org.id, "returnUrl": "https://x.example.com"},
            headers=org.member,
        ).status_code
        == 403
    )
    assert (
        client.post(
            "/v1/billing/portal",
            json={"organizationId": org.id, "returnUrl": "https://x.example.com"},
            headers=org.outsider,
        ).status_code
        == 404
    )
    assert complete(client, org).status_code == 404
    assert (
        client.post(f"/v1/billing/{org.id}/dev/complete-local", headers=org.member).status_code
        == 403
    )


def test_portal_and_customer_reuse(client, org):
    r1 = client.post(
        "/v1/billing/portal",
        json={"organizationId": org.id, "returnUrl": "https://x.example.com"},
        headers=org.owner,
    )
    assert r1.status_code == 200
    customer = client.get(f"/v1/organizations/{org.id}/billing", headers=org.owner).json()[
        "stripeCustomerId"
    ]
    client.post(
        f"/v1/billing/{org.id}/top-up",
        json={"amountDecimillicents": DOLLAR, **URLS},
        headers=org.owner,
    )
    assert (
        client.get(f"/v1/organizations/{org.id}/billing", headers=org.owner).json()[
            "stripeCustomerId"
        ]
        == customer
    )


def test_idempotency_key_on_top_up(client, org):
    headers = {**org.owner, "Idempotency-Key": "top-up-1"}
    body = {"amountDecimillicents": DOLLAR, **URLS}
    a = client.post(f"/v1/billing/{org.id}/top-up", json=body, headers=headers)
    b = client.post(f"/v1/billing/{org.id}/top-up", json=body, headers=headers)
    assert a.json() == b.json()
    c = client.post(
        f"/v1/billing/{org.id}/top-up",
        json={**body, "amountDecimillicents": 2 * DOLLAR},
        headers=headers,
    )
    assert c.status_code == 409


def test_auto_recharge_runs_in_local_mode(client, org):
    client.post(
        f"/v1/billing/{org.id}/top-up",
        json={"amountDecimillicents": DOLLAR, **URLS},
        headers=org.owner,
    )
    complete(client, org)
    client.patch(
        f"/v1/organizations/{org.id}/billing",
        json={
            "autoRechargeEnabled": True,
            "autoRechargeThresholdDecimillicents": DOLLAR // 2,
            "autoRechargeAmountDecimillicents": 3 * DOLLAR,
        },
        headers=org.owner,
    )
    r = client.post(
        f"/v1/service/organizations/{org.id}/usage",
        json={
            "category": "api_call",
            "quantity": 1,
            "unitCostDecimillicents": DOLLAR * 6 // 10,
            "referenceId": "big",
        },
        headers=SERVICE_HEADERS,
    )
    assert r.status_code == 200, r.text
    with database.connection_context():
        assert drain(get_gateway(), get_settings()) == 1
        assert AutoRechargeRequest.get().status == "succeeded"
        assert CreditEntry.select().where(CreditEntry.entry_type == "recharge").count() == 1
        assert_ledger_invariants(org.id)
    credits = client.get(f"/v1/billing/{org.id}/credits", headers=org.member).json()
    assert credits["creditsBalanceDecimillicents"] == DOLLAR * 34 // 10
    assert (
        client.get(f"/v1/billing/{org.id}/auto-recharge/requires-action", headers=org.owner).json()
        is None
    )
