"""Stripe webhooks with real signatures: verification, exactly-once, order, money effects."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from billing.units import CENT, DOLLAR
from models import BillingAccount, CreditEntry, WebhookEvent, database
from tests.conftest import SERVICE_HEADERS
from tests.ledger_checks import assert_ledger_invariants
from tests.stripe_fakes import event_body, signature_for, stripe_object

URL = "/v1/webhooks/stripe"


def post(client, body: bytes, signature: str | None = None):
    headers = {"Content-Type": "application/json"}
    headers["Stripe-Signature"] = signature if signature is not None else signature_for(body)
    return client.post(URL, content=body, headers=headers)


def deliver(client, body: bytes) -> dict:
    """Send a signed event that must be accepted and processed as new (not ignored, not a
    replay): a test that then checks "nothing changed" is only meaningful if it was."""
    r = post(client, body)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["processed"] is True and result["idempotent"] is False, result
    return result


def link_customer(org_id: str, customer: str = "cus_test_1") -> str:
    with database.connection_context():
        BillingAccount.update(stripe_customer_id=customer).where(
            BillingAccount.organization == org_id
        ).execute()
    return customer


def balance(client, org) -> int:
    return client.get(f"/v1/billing/{org.id}/credits", headers=org.owner).json()[
        "creditsBalanceDecimillicents"
    ]


def top_up_session(org_id, cents=1000, pi="pi_topup_1", paid=True):
    return stripe_object(
        "checkout.session",
        id="cs_test_topup",
        mode="payment",
        client_reference_id=org_id,
        metadata={
            "organization_id": org_id,
            "kind": "top_up",
            "amount_decimillicents": str(cents * CENT),
        },
        amount_total=cents,
        currency="usd",
        payment_status="paid" if paid else "unpaid",
        payment_intent=pi,
        customer="cus_test_1",
    )


def top_up_intent(org_id, cents=1000, pi="pi_topup_1"):
    return stripe_object(
        "payment_intent",
        id=pi,
        amount=cents,
        amount_received=cents,
        currency="usd",
        status="succeeded",
        metadata={
            "organization_id": org_id,
            "kind": "top_up",
            "amount_decimillicents": str(cents * CENT),
        },
        customer="cus_test_1",
        payment_method="pm_card_saved",
    )


# --- verification ---------------------------------------------------------------------


def test_valid_event_is_processed(client, org, stripe_mode):
    body = event_body("checkout.session.completed", top_up_session(org.id))
    r = post(client, body)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["processed"] is True and result["idempotent"] is False
    assert result["eventId"] == json.loads(body)["id"]
    assert balance(client, org) == 1000 * CENT


@pytest.mark.parametrize("case", ["wrong_secret", "tampered", "stale", "garbage", "future"])
def test_bad_signatures_are_400_and_store_nothing(client, org, stripe_mode, case):
    body = event_body("checkout.session.completed", top_up_session(org.id))
    signature = {
        "wrong_secret": lambda: signature_for(body, "whsec_other"),
        "tampered": lambda: signature_for(body),
        "stale": lambda: signature_for(body, timestamp=int(time.time()) - 301),
        "garbage": lambda: "not-a-signature",
        "future": lambda: signature_for(body, timestamp=int(time.time()) + 3600),
    }[case]()
    sent = (
        body.replace(b'"amount_total": 1000', b'"amount_total": 999999')
        if case == "tampered"
        else body
    )
    r = post(client, sent, signature)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "BadRequest"
    with database.connection_context():
        assert WebhookEvent.select().count() == 0
    assert balance(client, org) == 0


def test_missing_signature_is_401_and_stores_nothing(client, org, stripe_mode):
    body = event_body("checkout.session.completed", top_up_session(org.id))
    r = client.post(URL, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    with database.connection_context():
        assert WebhookEvent.select().count() == 0


def test_webhooks_refused_in_local_mode(client, org):
    body = event_body("checkout.session.completed", top_up_session(org.id))
    assert post(client, body).status_code == 400


# --- exactly once ---------------------------------------------------------------------


def test_replay_20_times_concurrently_has_one_effect(client, org, stripe_mode):
    body = event_body("checkout.session.completed", top_up_session(org.id))
    signature = signature_for(body)
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: post(client, body, signature), range(20)))
    assert [r.status_code for r in results] == [200] * 20
    assert sum(not r.json()["idempotent"] for r in results) == 1
    assert balance(client, org) == 1000 * CENT
    with database.connection_context():
        assert WebhookEvent.select().count() == 1
        assert CreditEntry.select().count() == 1


def test_checkout_and_payment_intent_for_one_top_up_grant_once(client, org, stripe_mode):
    link_customer(org.id)
    deliver(client, event_body("payment_intent.succeeded", top_up_intent(org.id)))
    deliver(client, event_body("checkout.session.completed", top_up_session(org.id)))
    assert balance(client, org) == 1000 * CENT
    # The card that paid becomes the saved payment method for auto-recharge.
    settings = client.get(f"/v1/organizations/{org.id}/billing", headers=org.owner).json()
    assert settings["stripePaymentMethodId"] == "pm_card_saved"


def test_unpaid_checkout_grants_nothing(client, org, stripe_mode):
    r = post(client, event_body("checkout.session.completed", top_up_session(org.id, paid=False)))
    assert r.status_code == 200
    assert balance(client, org) == 0


def test_unknown_type_is_stored_and_acknowledged(client, org, stripe_mode):
    body = event_body("customer.tax_id.created", {"id": "txi_1", "object": "tax_id"})
    r = post(client, body)
    assert r.status_code == 200
    assert r.json()["processed"] is False
    with database.connection_context():
        assert (
            WebhookEvent.get_by_id(json.loads(body)["id"]).event_type == "customer.tax_id.created"
        )
    assert post(client, body).json()["idempotent"] is True


# --- subscriptions --------------------------------------------------------------------


def subscription(org_id, status, price="price_pro", period_end=1_900_000_000):
    return stripe_object(
        "subscription",
        id="sub_test_1",
        status=status,
        customer="cus_test_1",
        metadata={"organization_id": org_id},
        start_date=1_800_000_000,
        ended_at=None,
        cancel_at=None,
        current_period_end=period_end,
        items={"object": "list", "data": [{"id": "si_1", "price": {"id": price}}]},
    )


def test_out_of_order_subscription_updates(client, org, stripe_mode):
    now = int(time.time())
    deliver(
        client,
        event_body(
            "customer.subscription.updated",
            subscription(org.id, "past_due", "price_agency"),
            created=now,
        ),
    )
    older = post(
        client,
        event_body(
            "customer.subscription.created", subscription(org.id, "active"), created=now - 60
        ),
    )
    assert older.status_code == 200
    settings = client.get(f"/v1/organizations/{org.id}/billing", headers=org.owner).json()
    assert settings["subscriptionStatus"] == "past_due"
    assert settings["subscriptionPlan"] == "agency"
    assert settings["isSubscribed"] is True
    assert settings["stripeSubscriptionId"] == "sub_test_1"
    deliver(
        client,
        event_body(
            "customer.subscription.deleted", subscription(org.id, "canceled"), created=now + 60
        ),
    )
    settings = client.get(f"/v1/organizations/{org.id}/billing", headers=org.owner).json()
    assert settings["subscriptionStatus"] == "canceled" and settings["isSubscribed"] is False


def invoice(org_id, paid_cents=2000, pi="pi_invoice_1", inv_id="in_test_1", created=1_800_000_000):
    return stripe_object(
        "invoice",
        id=inv_id,
        created=created,
        subscription="sub_test_1",
        customer="cus_test_1",
        amount_paid=paid_cents,
        payment_intent=pi,
        metadata={},
        lines={"object": "list", "data": [{"price": {"id": "price_pro"}}]},
    )


def test_first_paid_invoice_grants_welcome_credit_once(client, org, stripe_mode):
    link_customer(org.id)
    deliver(client, event_body("invoice.payment_succeeded", invoice(org.id)))
    deliver(
        client, event_body("invoice.payment_succeeded", invoice(org.id, pi="pi_2", inv_id="in_2"))
    )
    assert balance(client, org) == 20 * DOLLAR


def test_payment_failure_blocks_spending_until_paid(client, org, stripe_mode):
    link_customer(org.id)
    deliver(client, event_body("invoice.payment_succeeded", invoice(org.id)))
    deliver(
        client,
        event_body("invoice.payment_failed", invoice(org.id, 0, None, "in_f", 1_800_000_100)),
    )
    credits = client.get(f"/v1/billing/{org.id}/credits", headers=org.owner).json()
    assert credits["paymentGracePeriodEndsAt"] is not None
    usage = {
        "category": "api_call",
        "quantity": 1,
        "unitCostDecimillicents": 1,
        "referenceId": "after-failure",
    }
    r = client.post(
        f"/v1/service/organizations/{org.id}/usage", json=usage, headers=SERVICE_HEADERS
    )
    assert r.status_code == 402
    # An invoice at least as new as the failed one is paid: the grace period ends.
    deliver(
        client,
        event_body(
            "invoice.payment_succeeded", invoice(org.id, 2000, "pi_3", "in_3", 1_800_000_200)
        ),
    )
    assert (
        client.post(
            f"/v1/service/organizations/{org.id}/usage", json=usage, headers=SERVICE_HEADERS
        ).status_code
        == 200
    )


# --- refunds and disputes ---------------------------------------------------------------


def charge(org_id, refunded_cents, pi="pi_topup_1"):
    return stripe_object(
        "charge",
        id="ch_test_1",
        payment_intent=pi,
        customer="cus_test_1",
        amount=1000,
        amount_refunded=refunded_cents,
        metadata={},
    )


def test_refund_after_partial_spend_reverses_at_most_what_remains(client, org, stripe_mode):
    link_customer(org.id)
    deliver(client, event_body("checkout.session.completed", top_up_session(org.id)))
    spend = {
        "category": "api_call",
        "quantity": 1,
        "unitCostDecimillicents": 700 * CENT,
        "referenceId": "spend",
    }
    assert (
        client.post(
            f"/v1/service/organizations/{org.id}/usage", json=spend, headers=SERVICE_HEADERS
        ).status_code
        == 200
    )
    deliver(client, event_body("charge.refunded", charge(org.id, 1000)))
    assert balance(client, org) == 0  # 300 remained; 300 reversed, not 1000
    deliver(client, event_body("charge.refunded", charge(org.id, 1000)))  # a new event, same state
    assert balance(client, org) == 0
    with database.connection_context():
        refunds = list(CreditEntry.select().where(CreditEntry.entry_type == "refund"))
        assert [e.amount for e in refunds] == [-300 * CENT]
        assert_ledger_invariants(org.id)


def test_partial_refunds_add_up(client, org, stripe_mode):
    link_customer(org.id)
    deliver(client, event_body("checkout.session.completed", top_up_session(org.id)))
    deliver(client, event_body("charge.refunded", charge(org.id, 200)))
    deliver(client, event_body("charge.refunded", charge(org.id, 500)))
    assert balance(client, org) == 500 * CENT


def dispute(status):
    return stripe_object(
        "dispute",
        id="dp_1",
        charge="ch_test_1",
        payment_intent="pi_topup_1",
        amount=1000,
        status=status,
    )


@pytest.mark.parametrize(
    ("status", "expected"), [("lost", 0), ("won", 1000 * CENT), ("needs_response", 1000 * CENT)]
)
def test_disputes(client, org, stripe_mode, status, expected):
    link_customer(org.id)
    deliver(client, event_body("checkout.session.completed", top_up_session(org.id)))
    if status == "needs_response":  # an opened dispute changes nothing
        deliver(client, event_body("charge.dispute.created", dispute(status)))
    else:
        deliver(client, event_body("charge.dispute.closed", dispute(status)))
    assert balance(client, org) == expected
