"""Refunds, disputes and currency through signed webhooks: one cap per payment, the dispute
hold apart from an operator's suspension, and credit only for what was ordered in USD."""

from __future__ import annotations

import uuid

import pytest

from billing.accounts import locked_account
from billing.units import CENT, DOLLAR
from models import BillingAccount, CreditEntry, StripePayment, database, utcnow
from tests.conftest import SERVICE_HEADERS
from tests.ledger_checks import assert_ledger_invariants
from tests.stripe_events import (
    charge,
    dispute,
    invoice,
    link_customer,
    post,
    subscription,
    top_up_intent,
    top_up_session,
)

pytestmark = pytest.mark.usefixtures("stripe_mode")

ORDER = 10 * DOLLAR
KRW_SESSION = {
    "cents": 13500,
    "currency": "krw",
    "conversion": {
        "amount_subtotal": 1000,
        "amount_total": 1000,
        "fx_rate": "13.5",
        "source_currency": "usd",
    },
}


def credits(client, org) -> dict:
    return client.get(f"/v1/billing/{org.id}/credits", headers=org.owner).json()


def settings(client, org) -> dict:
    return client.get(f"/v1/organizations/{org.id}/billing", headers=org.owner).json()


def spend(client, org, cents: int = 1):
    usage = {
        "category": "api_call",
        "quantity": 1,
        "unitCostDecimillicents": cents * CENT,
        "referenceId": f"spend-{uuid.uuid4().hex[:8]}",
    }
    return client.post(
        f"/v1/service/organizations/{org.id}/usage", json=usage, headers=SERVICE_HEADERS
    )


def reversed_total(org_id: str) -> int:
    with database.connection_context():
        assert_ledger_invariants(org_id)
        return -sum(
            e.amount
            for e in CreditEntry.select().where(
                (CreditEntry.organization == org_id)
                & CreditEntry.entry_type.in_(("refund", "dispute"))
            )
        )


def payment_row(payment_id: str) -> StripePayment:
    with database.connection_context():
        return StripePayment.get_by_id(payment_id)


@pytest.fixture
def paid_top_up(client, org):
    link_customer(org.id)
    r = post(
        client,
        "checkout.session.completed",
        top_up_session(org.id, amount_decimillicents=ORDER),
    )
    assert r.status_code == 200, r.text
    assert credits(client, org)["creditsBalanceDecimillicents"] == ORDER
    return org


def test_lost_dispute_after_full_refund_takes_nothing_more(client, paid_top_up):
    org = paid_top_up
    with database.connection_context():
        from billing import ledger

        with locked_account(org.id) as account:
            ledger.grant(account, 50 * DOLLAR, "adjustment", reason="other credit")
    post(client, "charge.refunded", charge(org.id, refunded_cents=1000))
    post(client, "charge.dispute.closed", dispute(status="lost"))
    post(client, "charge.refunded", charge(org.id, refunded_cents=1000))
    assert reversed_total(org.id) == ORDER
    assert credits(client, org)["creditsBalanceDecimillicents"] == 50 * DOLLAR


def test_partial_refund_and_lost_dispute_share_one_cap(client, paid_top_up):
    org = paid_top_up
    post(client, "charge.refunded", charge(org.id, refunded_cents=400))
    post(client, "charge.dispute.closed", dispute(status="lost", amount=1000))
    assert reversed_total(org.id) == ORDER
    assert payment_row("pi_topup_1").reversed_amount == ORDER


def test_refund_reported_before_the_grant_applies_when_it_is_credited(client, org):
    link_customer(org.id)
    post(client, "charge.refunded", charge(org.id, refunded_cents=300))
    assert credits(client, org)["creditsBalanceDecimillicents"] == 0
    post(client, "checkout.session.completed", top_up_session(org.id, amount_decimillicents=ORDER))
    assert credits(client, org)["creditsBalanceDecimillicents"] == 700 * CENT
    assert reversed_total(org.id) == 300 * CENT


def test_refund_of_a_subscription_invoice_leaves_the_welcome_credit(client, org):
    link_customer(org.id)
    post(client, "customer.subscription.created", subscription(org.id))
    post(client, "invoice.paid", invoice(org.id, inv="in_first", pi="pi_invoice_1"))
    assert credits(client, org)["creditsBalanceDecimillicents"] == 20 * DOLLAR
    post(
        client,
        "charge.refunded",
        charge(org.id, refunded_cents=2000, amount=2000, pi="pi_invoice_1", charge_id="ch_inv"),
    )
    post(
        client,
        "charge.dispute.closed",
        dispute(status="lost", amount=2000, pi="pi_invoice_1", charge_id="ch_inv"),
    )
    assert credits(client, org)["creditsBalanceDecimillicents"] == 20 * DOLLAR


# --- disputes hold spending ----------------------------------------------------------------


def test_open_dispute_holds_spending_until_won(client, paid_top_up):
    org = paid_top_up
    assert spend(client, org).status_code == 200
    post(client, "charge.dispute.created", dispute(status="needs_response"))
    held = credits(client, org)
    assert held["isSuspended"] is True and held["suspendedAt"] is not None
    assert settings(client, org)["suspendedAt"] == held["suspendedAt"]
    refused = spend(client, org)
    assert refused.status_code == 402, refused.text
    post(client, "charge.dispute.closed", dispute(status="won"))
    assert credits(client, org)["suspendedAt"] is None
    assert spend(client, org).status_code == 200
    assert reversed_total(org.id) == 0


def test_lost_dispute_reverses_and_lifts_the_hold(client, paid_top_up):
    org = paid_top_up
    post(client, "charge.dispute.created", dispute(status="needs_response"))
    post(client, "charge.dispute.closed", dispute(status="lost"))
    post(client, "charge.dispute.closed", dispute(status="lost"))  # a new event, same state
    after = credits(client, org)
    assert after["suspendedAt"] is None and after["creditsBalanceDecimillicents"] == 0
    assert reversed_total(org.id) == ORDER


def test_dispute_closed_before_created_never_holds(client, paid_top_up):
    org = paid_top_up
    post(client, "charge.dispute.closed", dispute(status="won"), created=2_000_000_000)
    post(client, "charge.dispute.created", dispute(status="needs_response"), created=1_000)
    assert credits(client, org)["suspendedAt"] is None
    assert spend(client, org).status_code == 200


def test_dispute_hold_and_operator_suspension_are_separate(client, paid_top_up):
    org = paid_top_up
    operator_time = utcnow().replace(microsecond=0)
    with database.connection_context():
        BillingAccount.update(suspended_at=operator_time).where(
            BillingAccount.organization == org.id
        ).execute()
    post(client, "charge.dispute.created", dispute(status="needs_response"))
    post(client, "charge.dispute.closed", dispute(status="won"))
    # Winning the dispute does not lift the operator's suspension.
    assert credits(client, org)["suspendedAt"] is not None
    assert spend(client, org).status_code == 402
    # And an operator's unsuspend does not lift another dispute's hold.
    post(client, "charge.dispute.created", dispute(status="needs_response", dispute_id="dp_2"))
    with database.connection_context():
        BillingAccount.update(suspended_at=None).where(
            BillingAccount.organization == org.id
        ).execute()
    assert credits(client, org)["suspendedAt"] is not None
    assert spend(client, org).status_code == 402
    post(client, "charge.dispute.closed", dispute(status="won", dispute_id="dp_2"))
    assert credits(client, org)["suspendedAt"] is None
    assert spend(client, org).status_code == 200


# --- currency -------------------------------------------------------------------------------


def test_adaptive_pricing_credits_the_usd_order_not_the_presentment_amount(client, org):
    link_customer(org.id)
    session = top_up_session(org.id, amount_decimillicents=ORDER, **KRW_SESSION)
    r = post(client, "checkout.session.completed", session)
    assert r.status_code == 200, r.text
    assert credits(client, org)["creditsBalanceDecimillicents"] == ORDER
    # A refund of half the KRW charge takes half of the USD credit.
    post(
        client,
        "charge.refunded",
        charge(org.id, refunded_cents=6750, amount=13500, currency="krw"),
    )
    assert reversed_total(org.id) == ORDER // 2


def test_lost_dispute_in_the_presentment_currency_reverses_its_share(client, org):
    link_customer(org.id)
    post(
        client,
        "checkout.session.completed",
        top_up_session(org.id, amount_decimillicents=ORDER, **KRW_SESSION),
    )
    post(client, "charge.dispute.closed", dispute(status="lost", amount=3375, currency="krw"))
    assert reversed_total(org.id) == ORDER // 4


@pytest.mark.parametrize(
    ("session_fields", "reason"),
    [
        ({"cents": 13500, "currency": "krw", "conversion": None}, "no USD amount"),
        ({"cents": 13500, "currency": "usd"}, "for an order of"),
        (
            {
                "cents": 13500,
                "currency": "krw",
                "conversion": {**KRW_SESSION["conversion"], "amount_total": 1350},
            },
            "for an order of",
        ),
        (
            {
                "cents": 1000,
                "currency": "eur",
                "conversion": {**KRW_SESSION["conversion"], "source_currency": "eur"},
            },
            "no USD amount",
        ),
    ],
)
def test_a_payment_that_does_not_match_the_order_is_flagged_not_credited(
    client, org, session_fields, reason
):
    link_customer(org.id)
    session = top_up_session(org.id, amount_decimillicents=ORDER, **session_fields)
    r = post(client, "checkout.session.completed", session)
    assert r.status_code == 200, r.text
    assert credits(client, org)["creditsBalanceDecimillicents"] == 0
    row = payment_row("pi_topup_1")
    assert row.granted_amount == 0 and reason in (row.flagged_reason or "")
    # A later USD report of the same payment does not credit a flagged payment either.
    post(client, "payment_intent.succeeded", top_up_intent(org.id, ordered=ORDER))
    assert credits(client, org)["creditsBalanceDecimillicents"] == 0


def test_a_top_up_with_no_order_on_record_is_flagged(client, org):
    link_customer(org.id)
    post(client, "checkout.session.completed", top_up_session(org.id))
    assert credits(client, org)["creditsBalanceDecimillicents"] == 0
    assert payment_row("pi_topup_1").flagged_reason == "no order on record for this payment"


def test_the_stored_order_wins_over_metadata(client, org):
    link_customer(org.id)
    with database.connection_context():
        from models import CheckoutSession

        CheckoutSession.create(
            id="cs_test_topup", organization=org.id, kind="top_up", amount=ORDER, url="https://x"
        )
    # Metadata says $1000, the stored session says $10 and Stripe settled $10: $10 is credited.
    session = top_up_session(org.id, amount_decimillicents=1000 * DOLLAR)
    post(client, "checkout.session.completed", session)
    assert credits(client, org)["creditsBalanceDecimillicents"] == ORDER


def test_a_payment_intent_in_another_currency_waits_for_the_checkout(client, org):
    link_customer(org.id)
    post(
        client,
        "payment_intent.succeeded",
        top_up_intent(org.id, cents=13500, currency="krw", ordered=ORDER),
    )
    assert credits(client, org)["creditsBalanceDecimillicents"] == 0
    session = top_up_session(org.id, amount_decimillicents=ORDER, **KRW_SESSION)
    post(client, "checkout.session.completed", session)
    assert credits(client, org)["creditsBalanceDecimillicents"] == ORDER


def test_a_payment_already_tied_to_another_organization_is_refused_not_a_conflict(client, org):
    from billing.organizations import create_organization

    link_customer(org.id)
    post(client, "checkout.session.completed", top_up_session(org.id, amount_decimillicents=ORDER))
    with database.connection_context():
        other = create_organization("other").id
    link_customer(other)
    r = post(
        client, "checkout.session.completed", top_up_session(other, amount_decimillicents=ORDER)
    )
    assert r.status_code == 200, r.text
    with database.connection_context():
        assert BillingAccount.get_by_id(other).credits_balance == 0
        assert payment_row("pi_topup_1").organization_id == org.id


def _recharge_attempt(org_id: str, amount: int) -> str:
    """An auto-recharge attempt in flight, as the worker leaves it before Stripe answers."""
    from models import AutoRechargeRequest

    with database.connection_context():
        attempt = AutoRechargeRequest.create(
            id=str(uuid.uuid4()), organization=org_id, amount=amount, status="processing"
        )
    return str(attempt.id)


def _recharge_intent(org_id: str, attempt_id: str, cents: int) -> dict:
    intent = top_up_intent(org_id, cents=cents, pi="pi_recharge_1")
    intent["metadata"] = {
        "organization_id": org_id,
        "kind": "auto_recharge",
        "attempt_id": attempt_id,
        "amount_decimillicents": str(cents * CENT),
    }
    return intent


@pytest.mark.parametrize("reporter", ["webhook", "worker"])
def test_a_recharge_refunded_before_its_grant_is_taken_back_when_granted(client, org, reporter):
    """Stripe delivers events in no fixed order: a refund of an auto-recharge can arrive before
    the success that grants it. The refund is remembered on the payment and taken back right
    after the grant, whichever reports the success (the webhook or the worker); the grant is
    still a recharge (not a top-up) under its own reference, made once."""
    from billing import auto_recharge

    link_customer(org.id)
    attempt_id = _recharge_attempt(org.id, 20 * DOLLAR)
    refund = charge(org.id, refunded_cents=2000, amount=2000, pi="pi_recharge_1")
    assert post(client, "charge.refunded", refund).status_code == 200
    assert credits(client, org)["creditsBalanceDecimillicents"] == 0
    if reporter == "webhook":
        intent = _recharge_intent(org.id, attempt_id, 2000)
        assert post(client, "payment_intent.succeeded", intent).status_code == 200
    else:
        with database.connection_context(), locked_account(org.id) as account:
            auto_recharge.payment_succeeded(account, "pi_recharge_1", 20 * DOLLAR, attempt_id)
    assert reversed_total(org.id) == 20 * DOLLAR
    assert credits(client, org)["creditsBalanceDecimillicents"] == 0
    with database.connection_context():
        grants = list(CreditEntry.select().where(CreditEntry.reference_id == "pi_recharge_1"))
        assert [(e.entry_type, e.amount) for e in grants] == [("recharge", 20 * DOLLAR)]
        assert grants[0].idempotency_ref == "recharge:pi_recharge_1"
    assert payment_row("pi_recharge_1").kind == "auto_recharge"
