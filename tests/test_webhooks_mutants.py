"""Webhook rules the mutation run of `billing/webhooks.py` found unchecked: what each event
records (its outcome and the processed flag Stripe sees), which attempt or payment it
settles, and which reference the money carries. Each test goes through `webhooks.receive`
with a signed event in Stripe's shape."""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from typing import Any

import pytest
from peewee import IntegrityError
from prometheus_client import REGISTRY

from billing import ledger, webhooks
from billing.accounts import locked_account
from billing.errors import Conflict, InvalidRequest
from billing.organizations import create_organization
from billing.units import CENT, DOLLAR
from models import (
    AutoRechargeRequest,
    BillingAccount,
    CreditEntry,
    StripeDispute,
    StripePayment,
    StripeSubscription,
    WebhookEvent,
    database,
    utcnow,
)
from models import (
    CheckoutSession as StoredSession,
)
from tests.ledger_checks import auto_recharge_on
from tests.stripe_events import (
    charge,
    customer_of,
    deliver,
    dispute,
    event_id,
    invoice,
    link_customer,
    signed,
    subscription,
    subscription_session,
    top_up_intent,
    top_up_session,
)
from tests.stripe_fakes import stripe_object

pytestmark = pytest.mark.usefixtures("stripe_webhooks_only")


def receive(event_type: str, obj: dict[str, Any], **kwargs: Any) -> webhooks.WebhookResult:
    return deliver(*signed(event_type, obj, **kwargs))


def stored(result: webhooks.WebhookResult) -> WebhookEvent:
    with database.connection_context():
        return WebhookEvent.get_by_id(result.event_id)


def outcome_of(event_type: str, obj: dict[str, Any], **kwargs: Any) -> str:
    result = receive(event_type, obj, **kwargs)
    return str(stored(result).outcome)


def counted(event_type: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "billing_webhook_events_total", {"event_type": event_type, "result": result}
    )
    return value or 0.0


def entries(org_id: str, entry_type: str) -> list[CreditEntry]:
    with database.connection_context():
        return list(
            CreditEntry.select().where(
                (CreditEntry.organization == org_id) & (CreditEntry.entry_type == entry_type)
            )
        )


def account(org_id: str) -> BillingAccount:
    with database.connection_context():
        return BillingAccount.get_by_id(org_id)


# --- replays ------------------------------------------------------------------------------


def test_a_replay_reports_what_the_first_delivery_did_and_counts_as_a_duplicate(org):
    link_customer(org.id)
    body, signature = signed("payment_intent.succeeded", top_up_intent(org.id, ordered=10 * DOLLAR))
    before = counted("payment_intent.succeeded", "duplicate")
    first = deliver(body, signature)
    again = deliver(body, signature)
    assert (first.processed, first.idempotent) == (True, False)
    assert (again.event_id, again.processed, again.idempotent) == (first.event_id, True, True)
    assert counted("payment_intent.succeeded", "duplicate") == before + 1


def test_a_replayed_ignored_event_stays_unprocessed(org):
    body, signature = signed("customer.tax_id.created", {"id": "txi_1", "object": "tax_id"})
    before = counted("customer.tax_id.created", "duplicate")
    deliver(body, signature)
    again = deliver(body, signature)
    assert (again.processed, again.idempotent) == (False, True)
    assert counted("customer.tax_id.created", "duplicate") == before + 1


# --- invoices -------------------------------------------------------------------------------


def test_the_first_paid_invoice_grants_the_welcome_credit_under_its_payment(org):
    link_customer(org.id)
    first = receive("invoice.paid", invoice(org.id, inv="in_1", pi="pi_inv_1"))
    second = receive("invoice.paid", invoice(org.id, inv="in_2", pi="pi_inv_2"))
    assert stored(first).outcome == "invoice paid; welcome credit granted"
    assert stored(second).outcome == "invoice paid"
    [welcome] = entries(org.id, "welcome_grant")
    assert (welcome.amount, welcome.reference_id) == (20 * DOLLAR, "pi_inv_1")


def test_an_invoice_without_a_payment_intent_references_itself(org):
    link_customer(org.id)
    receive("invoice.paid", invoice(org.id, inv="in_only", pi=None))
    [welcome] = entries(org.id, "welcome_grant")
    assert welcome.reference_id == "in_only"


def test_a_zero_invoice_grants_no_welcome_credit(org):
    link_customer(org.id)
    result = receive("invoice.paid", invoice(org.id, inv="in_trial", paid_cents=0))
    assert stored(result).outcome == "invoice paid (nothing charged)"
    assert entries(org.id, "welcome_grant") == []
    assert account(org.id).welcome_credit_granted_at is None


def test_a_one_cent_invoice_is_a_paid_one(org):
    link_customer(org.id)
    receive("invoice.paid", invoice(org.id, inv="in_cent", paid_cents=1))
    assert [e.amount for e in entries(org.id, "welcome_grant")] == [20 * DOLLAR]


def test_an_invoice_without_lines_takes_the_plan_of_the_subscription(org):
    link_customer(org.id)
    receive("customer.subscription.created", subscription(org.id, price="price_agency"))
    receive("invoice.paid", invoice(org.id, inv="in_nolines") | {"lines": None})
    assert [e.amount for e in entries(org.id, "welcome_grant")] == [45 * DOLLAR]


# --- auto-recharge reports ------------------------------------------------------------------


def attempt_in_flight(org_id: str, *, pi: str | None = None) -> AutoRechargeRequest:
    """An attempt a worker claimed; `pi` None: it died before it learned the PaymentIntent."""
    now = utcnow()
    with database.connection_context():
        return AutoRechargeRequest.create(
            id=str(uuid.uuid4()),
            organization=org_id,
            amount=20 * DOLLAR,
            status="processing",
            attempts=1,
            stripe_payment_intent_id=pi,
            created_at=now,
            updated_at=now,
            next_attempt_at=now,
        )


def recharge_intent(org_id: str, pi: str, attempt_id: str | None, **fields: Any) -> dict[str, Any]:
    metadata = {"organization_id": org_id, "kind": "auto_recharge"}
    if attempt_id is not None:
        metadata["attempt_id"] = attempt_id
    return stripe_object("payment_intent", id=pi, metadata=metadata, **fields)


def reloaded(attempt: AutoRechargeRequest) -> AutoRechargeRequest:
    with database.connection_context():
        return AutoRechargeRequest.get_by_id(attempt.id)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ({"code": "card_declined"}, "the payment failed: card_declined"),
        (None, "the payment failed: failed"),
        ({"code": None}, "the payment failed: failed"),
    ],
)
def test_a_failed_recharge_is_settled_by_its_attempt_id_with_the_cards_reason(org, error, reason):
    attempt = attempt_in_flight(org.id)  # the PaymentIntent id was never recorded
    intent = recharge_intent(
        org.id,
        "pi_failed_1",
        attempt.id,
        status="requires_payment_method",
        last_payment_error=error,
    )
    result = receive("payment_intent.payment_failed", intent)
    assert stored(result).outcome == "auto-recharge failed"
    failed = reloaded(attempt)
    assert (failed.status, failed.failure_reason) == ("failed", reason)
    assert failed.stripe_payment_intent_id == "pi_failed_1"


def test_a_failed_payment_that_is_no_recharge_is_only_recorded(org):
    link_customer(org.id)
    attempt = attempt_in_flight(org.id, pi="pi_top_up_failed")
    intent = top_up_intent(org.id, pi="pi_top_up_failed") | {"status": "requires_payment_method"}
    result = receive("payment_intent.payment_failed", intent)
    assert (result.processed, stored(result).outcome) == (True, "payment failure recorded")
    assert reloaded(attempt).status == "processing"


def test_a_challenge_is_stored_on_the_attempt_its_metadata_names(org):
    attempt = attempt_in_flight(org.id)
    intent = recharge_intent(
        org.id, "pi_3ds_1", attempt.id, status="requires_action", client_secret="pi_3ds_1_secret"
    )
    result = receive("payment_intent.requires_action", intent)
    assert stored(result).outcome == "auto-recharge requires action"
    challenged = reloaded(attempt)
    assert challenged.status == "requires_action"
    assert (challenged.stripe_payment_intent_id, challenged.client_secret) == (
        "pi_3ds_1",
        "pi_3ds_1_secret",
    )


def test_a_challenge_on_a_payment_that_is_no_recharge_is_ignored(org):
    link_customer(org.id)
    intent = top_up_intent(org.id, pi="pi_top_up_3ds") | {"status": "requires_action"}
    result = receive("payment_intent.requires_action", intent)
    assert (result.processed, stored(result).outcome) == (False, "ignored")


def test_a_top_up_reporting_only_its_amount_is_credited(org):
    """`amount_received` is absent from some payloads; `amount` is then what was paid."""
    link_customer(org.id)
    intent = top_up_intent(org.id, cents=1000, ordered=10 * DOLLAR) | {"amount_received": None}
    result = receive("payment_intent.succeeded", intent)
    assert stored(result).outcome == "top-up granted"
    assert [e.amount for e in entries(org.id, "top_up")] == [10 * DOLLAR]


# --- refunds and disputes: which payment they name ------------------------------------------


def top_up_paid(org_id: str, pi: str, *, charge_id: str | None) -> None:
    """A $10 top-up paid by PaymentIntent `pi`, whose charge Stripe names (or not)."""
    intent = top_up_intent(org_id, pi=pi, ordered=10 * DOLLAR) | {"latest_charge": charge_id}
    assert outcome_of("payment_intent.succeeded", intent) == "top-up granted"


def payment(payment_id: str) -> StripePayment:
    with database.connection_context():
        return StripePayment.get_by_id(payment_id)


def test_a_refund_of_a_charge_without_a_payment_intent_finds_the_payment_by_its_charge(org):
    link_customer(org.id)
    top_up_paid(org.id, "pi_by_charge", charge_id="ch_by_charge")
    refund = charge(org.id, refunded_cents=1000, pi=None, charge_id="ch_by_charge")
    assert outcome_of("charge.refunded", refund) == f"refund: reversed {10 * DOLLAR}"
    [entry] = entries(org.id, "refund")
    assert (entry.amount, entry.reference_id) == (-10 * DOLLAR, "ch_by_charge")
    assert account(org.id).credits_balance == 0


def test_a_refund_names_its_payment_by_the_payment_intent_before_the_charge(org):
    """Stripe names both; the PaymentIntent decides, even when the charge id is also known
    (here as another payment's charge)."""
    link_customer(org.id)
    top_up_paid(org.id, "pi_other", charge_id="ch_other")
    top_up_paid(org.id, "pi_named", charge_id="ch_named")
    refund = charge(org.id, refunded_cents=500, pi="pi_named", charge_id="ch_other")
    assert outcome_of("charge.refunded", refund) == f"refund: reversed {5 * DOLLAR}"
    assert (payment("pi_named").reversed_amount, payment("pi_other").reversed_amount) == (
        5 * DOLLAR,
        0,
    )


def test_a_refund_records_its_charge_on_the_payment_so_a_dispute_of_the_charge_finds_it(org):
    """A top-up credited by its Checkout Session learns its charge id from the refund."""
    link_customer(org.id)
    session = top_up_session(org.id, pi="pi_session", amount_decimillicents=10 * DOLLAR)
    assert outcome_of("checkout.session.completed", session) == "top-up granted"
    assert payment("pi_session").charge_id is None
    refund = charge(org.id, refunded_cents=400, pi="pi_session", charge_id="ch_session")
    assert outcome_of("charge.refunded", refund) == f"refund: reversed {4 * DOLLAR}"
    assert payment("pi_session").charge_id == "ch_session"
    lost = dispute(status="lost", pi=None, charge_id="ch_session", dispute_id="dp_session")
    assert outcome_of("charge.dispute.closed", lost) == f"dispute lost: reversed {6 * DOLLAR}"
    assert account(org.id).credits_balance == 0


def test_a_refund_of_a_charge_with_no_payment_of_ours_reverses_nothing(org):
    link_customer(org.id)
    top_up_paid(org.id, "pi_kept", charge_id="ch_kept")
    refund = charge(org.id, refunded_cents=1000, pi=None, charge_id="ch_unknown")
    assert outcome_of("charge.refunded", refund) == (
        "refund of a charge with no payment of ours: nothing to reverse"
    )
    assert entries(org.id, "refund") == []
    assert account(org.id).credits_balance == 10 * DOLLAR


def test_a_refund_before_the_payment_reports_that_it_bought_nothing_yet(org):
    link_customer(org.id)
    early = charge(org.id, refunded_cents=1000, pi="pi_late", charge_id="ch_late")
    assert outcome_of("charge.refunded", early) == "refund: the payment bought no credits (yet)"
    assert payment("pi_late").refunded_share > 0
    top_up_paid(org.id, "pi_late", charge_id="ch_late")
    assert account(org.id).credits_balance == 0  # the refund applied when it was credited


def test_a_second_refund_of_a_refunded_payment_reverses_nothing_more(org):
    link_customer(org.id)
    top_up_paid(org.id, "pi_twice", charge_id="ch_twice")
    refund = charge(org.id, refunded_cents=1000, pi="pi_twice", charge_id="ch_twice")
    assert outcome_of("charge.refunded", refund) == f"refund: reversed {10 * DOLLAR}"
    assert outcome_of("charge.refunded", refund) == "refund: reversed 0"


def test_a_lost_dispute_of_a_charge_without_a_payment_intent_finds_the_payment(org):
    link_customer(org.id)
    top_up_paid(org.id, "pi_disputed", charge_id="ch_disputed")
    opened = dispute(status="needs_response", pi=None, charge_id="ch_disputed", dispute_id="dp_c")
    assert outcome_of("charge.dispute.created", opened) == "dispute opened: spending held"
    lost = dispute(status="lost", pi=None, charge_id="ch_disputed", dispute_id="dp_c")
    assert outcome_of("charge.dispute.closed", lost) == f"dispute lost: reversed {10 * DOLLAR}"
    with database.connection_context():
        row = StripeDispute.get_by_id("dp_c")
    assert (row.payment_id, row.is_open) == ("pi_disputed", False)


def test_a_dispute_names_its_payment_by_the_payment_intent_before_the_charge(org):
    link_customer(org.id)
    top_up_paid(org.id, "pi_d_other", charge_id="ch_d_other")
    top_up_paid(org.id, "pi_d_named", charge_id="ch_d_named")
    lost = dispute(status="lost", pi="pi_d_named", charge_id="ch_d_other", dispute_id="dp_p")
    assert outcome_of("charge.dispute.closed", lost) == f"dispute lost: reversed {10 * DOLLAR}"
    assert (payment("pi_d_named").reversed_amount, payment("pi_d_other").reversed_amount) == (
        10 * DOLLAR,
        0,
    )


# --- payments in another currency, and the card a payment saves ---------------------------


def test_an_auto_recharge_settled_in_another_currency_is_flagged_in_the_log_not_credited(
    org, caplog
):
    attempt = attempt_in_flight(org.id, pi="pi_eur_recharge")
    intent = recharge_intent(
        org.id, "pi_eur_recharge", attempt.id, amount=2000, amount_received=2000, currency="eur"
    )
    with caplog.at_level(logging.WARNING, logger="billing.webhooks"):
        result = receive("payment_intent.succeeded", intent)
    assert stored(result).outcome == "auto-recharge flagged, not credited: settled in eur"
    assert "auto-recharge pi_eur_recharge settled in eur: not credited" in caplog.messages
    assert entries(org.id, "recharge") == []
    assert account(org.id).credits_balance == 0


def test_a_top_up_intent_in_another_currency_is_recorded_for_the_checkout_to_decide(org):
    link_customer(org.id)
    intent = top_up_intent(
        org.id, pi="pi_krw", cents=13500, currency="krw", ordered=10 * DOLLAR
    ) | {"latest_charge": "ch_krw"}
    result = receive("payment_intent.succeeded", intent)
    assert stored(result).outcome == "top-up paid in krw: the checkout session decides the credit"
    row = payment("pi_krw")
    assert (row.kind, row.ordered_amount, row.granted_amount) == ("top_up", 10 * DOLLAR, 0)
    assert (row.charged_currency, row.charged_amount, row.charge_id) == ("krw", 13500, "ch_krw")
    assert entries(org.id, "top_up") == []


def recharge_due(org_id: str, *, card: str | None) -> None:
    """Auto-recharge on, nothing in flight, the balance below its threshold; `card` on file."""
    link_customer(org_id)
    with database.connection_context():
        auto_recharge_on(org_id, card=card)


def recharge_requests(org_id: str) -> int:
    with database.connection_context():
        return (
            AutoRechargeRequest.select().where(AutoRechargeRequest.organization == org_id).count()
        )


@pytest.mark.parametrize(
    ("on_file", "paid_with", "requested"),
    [("pm_card_saved", "pm_card_saved", 0), ("pm_card_saved", None, 0), (None, "pm_card_saved", 1)],
)
def test_only_a_payment_that_saves_a_new_card_reconsiders_auto_recharge(
    org, on_file, paid_with, requested
):
    recharge_due(org.id, card=on_file)
    intent = stripe_object(
        "payment_intent",
        id="pi_other_purchase",
        amount=500,
        amount_received=500,
        currency="usd",
        metadata={"organization_id": org.id},
        payment_method=paid_with,
    )
    result = receive("payment_intent.succeeded", intent)
    assert stored(result).outcome == "payment recorded"
    assert account(org.id).stripe_payment_method_id == "pm_card_saved"
    assert recharge_requests(org.id) == requested


# --- subscriptions: what an event's object says, and in which order events count -----------

T = 1_800_000_000  # 2027-01-15 08:00:00 UTC
DAY = 86_400


def at(day: int, hour: int) -> dt.datetime:
    """A naive UTC time in January/February 2027 (what the columns hold)."""
    return dt.datetime(2027, 1, 1, hour) + dt.timedelta(days=day - 1)


def sub_object(org_id: str, sub: str = "sub_fields", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": sub,
        "status": "active",
        "customer": customer_of(org_id),
        "metadata": {"organization_id": org_id},
        "created": T - DAY,
        "start_date": T,
        "ended_at": None,
        "cancel_at": None,
        "current_period_end": T + 30 * DAY,
        "default_payment_method": None,
        "items": {"object": "list", "data": [{"id": "si_1", "price": {"id": "price_pro"}}]},
    }
    return stripe_object("subscription", **(base | fields))


def subscription_row(sub: str) -> StripeSubscription:
    with database.connection_context():
        return StripeSubscription.get_by_id(sub)


@pytest.fixture
def local_time_not_utc(monkeypatch):
    """The server's local time zone is not UTC: Stripe's timestamps must not be read in it."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_time_not_utc")
def test_a_subscription_event_records_stripes_times_in_utc_and_its_card(org):
    link_customer(org.id)
    obj = sub_object(
        org.id,
        ended_at=T + 10 * DAY,
        cancel_at=T + 20 * DAY,
        default_payment_method="pm_sub_card",
        items={
            "object": "list",
            "data": [
                {"id": "si_1", "price": {"id": "price_agency"}, "current_period_end": T + 31 * DAY}
            ],
        },
    )
    result = receive("customer.subscription.created", obj, created=T + 3600)
    assert stored(result).outcome == "subscription active"
    row = subscription_row("sub_fields")
    assert (row.started_at, row.ends_at, row.current_period_end) == (
        at(15, 8),  # start_date
        at(25, 8),  # ended_at, before cancel_at
        at(45, 8),  # the subscription's own period end, before its item's
    )
    assert (row.subscription_created, row.plan, row.payment_method_id) == (
        T - DAY,
        "agency",
        "pm_sub_card",
    )
    assert account(org.id).stripe_payment_method_id == "pm_sub_card"


def test_a_subscription_without_an_end_or_a_period_end_takes_cancel_at_and_its_items(org):
    """Newer API versions carry the period end on the items only."""
    link_customer(org.id)
    obj = sub_object(
        org.id,
        created=None,
        cancel_at=T + 20 * DAY,
        current_period_end=None,
        items={
            "object": "list",
            "data": [
                {"id": "si_1", "price": {"id": "price_pro"}, "current_period_end": T + 31 * DAY}
            ],
        },
    )
    receive("customer.subscription.updated", obj, created=T + 3600)
    row = subscription_row("sub_fields")
    assert (row.ends_at, row.current_period_end) == (at(35, 8), at(46, 8))
    assert row.subscription_created == T  # no `created`: its start date


@pytest.mark.parametrize("items", [None, {"object": "list", "data": []}])
def test_a_subscription_without_items_takes_its_plan_from_its_metadata(org, items):
    link_customer(org.id)
    obj = sub_object(
        org.id,
        items=items,
        current_period_end=None,
        metadata={"organization_id": org.id, "plan": "agency"},
    )
    result = receive("customer.subscription.created", obj)
    assert stored(result).outcome == "subscription active"
    row = subscription_row("sub_fields")
    assert (row.plan, row.current_period_end) == ("agency", None)
    assert account(org.id).subscription_plan == "agency"


@pytest.mark.parametrize(
    ("price", "sub_plan", "plan"),
    [
        ({"id": "price_elsewhere", "lookup_key": "agency"}, None, "agency"),
        (
            {"id": "price_elsewhere", "lookup_key": None, "metadata": {"plan": "agency"}},
            None,
            "agency",
        ),
        ({"id": "price_elsewhere", "lookup_key": "gold"}, "try_me", "try_me"),
        ({"id": "price_elsewhere", "lookup_key": "enterprise"}, "enterprise", None),
    ],
    ids=["lookup key", "price metadata", "unknown lookup key", "unknown everywhere"],
)
def test_a_price_we_did_not_configure_names_its_plan_by_lookup_key_or_metadata(
    org, price, sub_plan, plan
):
    link_customer(org.id)
    metadata = {"organization_id": org.id} | ({"plan": sub_plan} if sub_plan else {})
    items = {"object": "list", "data": [{"id": "si_1", "price": price}]}
    receive("customer.subscription.created", sub_object(org.id, items=items, metadata=metadata))
    assert subscription_row("sub_fields").plan == plan


def test_a_deleted_subscription_is_canceled_whatever_its_object_says(org):
    link_customer(org.id)
    receive("customer.subscription.created", sub_object(org.id), created=T)
    result = receive("customer.subscription.deleted", sub_object(org.id), created=T + 60)
    assert stored(result).outcome == "subscription canceled"
    assert subscription_row("sub_fields").status == "canceled"


def test_events_of_the_same_second_follow_the_lifecycle_not_the_event_id(org):
    link_customer(org.id)
    active = sub_object(org.id, status="active")
    incomplete = sub_object(org.id, status="incomplete")
    receive("customer.subscription.updated", active, created=T, event_id="evt_a_active")
    result = receive(
        "customer.subscription.created", incomplete, created=T, event_id="evt_z_incomplete"
    )
    assert stored(result).outcome == "stale subscription update ignored"
    assert account(org.id).subscription_status == "active"


def test_a_newer_event_wins_over_a_later_lifecycle_status(org):
    link_customer(org.id)
    receive("customer.subscription.updated", sub_object(org.id, status="past_due"), created=T)
    result = receive(
        "customer.subscription.updated", sub_object(org.id, status="active"), created=T + 60
    )
    assert stored(result).outcome == "subscription active"
    assert account(org.id).subscription_status == "active"


def test_the_event_id_breaks_a_tie_of_second_and_status(org):
    link_customer(org.id)
    first = sub_object(org.id, metadata={"organization_id": org.id, "plan": "pro"}, items=None)
    second = sub_object(org.id, metadata={"organization_id": org.id, "plan": "agency"}, items=None)
    receive("customer.subscription.updated", first, created=T, event_id="evt_b")
    result = receive("customer.subscription.updated", second, created=T, event_id="evt_a")
    assert stored(result).outcome == "stale subscription update ignored"
    assert subscription_row("sub_fields").plan == "pro"


def test_a_subscription_of_another_organization_is_ignored(org):
    link_customer(org.id)
    receive("customer.subscription.created", sub_object(org.id, sub="sub_taken"), created=T)
    with database.connection_context():
        other = create_organization("other").id
    link_customer(other)
    result = receive(
        "customer.subscription.updated", sub_object(other, sub="sub_taken"), created=T + 60
    )
    assert stored(result).outcome == "subscription of another organization: ignored"
    assert subscription_row("sub_taken").organization_id == org.id
    assert account(other).stripe_subscription_id is None


@pytest.mark.parametrize(
    ("on_file", "subscription_card", "requested"),
    [(None, "pm_sub_card", 1), ("pm_card_saved", None, 0)],
)
def test_a_subscription_that_brings_a_card_reconsiders_auto_recharge(
    org, on_file, subscription_card, requested
):
    recharge_due(org.id, card=on_file)
    with database.connection_context():  # a returning subscriber: its welcome credit is spent
        BillingAccount.update(welcome_credit_granted_at=utcnow()).where(
            BillingAccount.organization == org.id
        ).execute()
    obj = sub_object(org.id, default_payment_method=subscription_card)
    assert outcome_of("customer.subscription.created", obj) == "subscription active"
    assert recharge_requests(org.id) == requested


@pytest.mark.parametrize(("threshold", "requested"), [(5 * DOLLAR, 0), (50 * DOLLAR, 1)])
def test_a_first_subscription_s_card_waits_for_the_welcome_credit(org, threshold, requested):
    """A first subscription brings a card before its first invoice is paid, and the welcome
    credit comes with that invoice: auto-recharge is reconsidered on the balance the welcome
    credit leaves (20 dollars for pro), not charged for a balance it is about to cover."""
    recharge_due(org.id, card=None)
    with database.connection_context():
        BillingAccount.update(auto_recharge_threshold=threshold).where(
            BillingAccount.organization == org.id
        ).execute()
    obj = sub_object(org.id, sub="sub_first", default_payment_method="pm_sub_card")
    assert outcome_of("customer.subscription.created", obj) == "subscription active"
    assert recharge_requests(org.id) == 0
    paid = invoice(org.id, inv="in_first_paid", sub="sub_first", pi="pi_first_invoice")
    assert outcome_of("invoice.paid", paid).endswith("welcome credit granted")
    assert account(org.id).credits_balance == 20 * DOLLAR
    assert recharge_requests(org.id) == requested


# --- top-up PaymentIntents -------------------------------------------------------------------


def test_a_top_up_intent_without_an_order_is_recorded_for_its_checkout_to_grant(org):
    link_customer(org.id)
    intent = top_up_intent(org.id, pi="pi_unordered", cents=1000) | {"latest_charge": "ch_unord"}
    result = receive("payment_intent.succeeded", intent)
    assert stored(result).outcome == "top-up payment recorded: the checkout session grants it"
    row = payment("pi_unordered")
    assert (row.organization_id, row.kind, row.ordered_amount, row.granted_amount) == (
        org.id,
        "top_up",
        None,
        0,
    )
    assert (row.charged_currency, row.charged_amount, row.charge_id) == ("usd", 1000, "ch_unord")
    session = top_up_session(org.id, pi="pi_unordered", amount_decimillicents=10 * DOLLAR)
    assert outcome_of("checkout.session.completed", session) == "top-up granted"
    assert account(org.id).credits_balance == 10 * DOLLAR


def test_a_one_cent_top_up_intent_is_credited(org):
    link_customer(org.id)
    intent = top_up_intent(org.id, pi="pi_cent", cents=1, ordered=CENT)
    assert outcome_of("payment_intent.succeeded", intent) == "top-up granted"
    assert account(org.id).credits_balance == CENT


def test_a_top_up_intent_that_received_nothing_is_only_recorded(org):
    link_customer(org.id)
    intent = top_up_intent(org.id, pi="pi_zero", cents=0, ordered=10 * DOLLAR)
    assert outcome_of("payment_intent.succeeded", intent) == "payment recorded"
    with database.connection_context():
        assert StripePayment.get_or_none(StripePayment.id == "pi_zero") is None
    assert account(org.id).credits_balance == 0


def test_a_top_up_intent_records_what_was_charged(org):
    link_customer(org.id)
    intent = top_up_intent(org.id, pi="pi_charged", cents=1000, ordered=10 * DOLLAR)
    assert outcome_of("payment_intent.succeeded", intent) == "top-up granted"
    row = payment("pi_charged")
    assert (row.ordered_amount, row.charged_currency, row.charged_amount, row.granted_amount) == (
        10 * DOLLAR,
        "usd",
        1000,
        10 * DOLLAR,
    )


def test_a_top_up_intent_that_does_not_match_its_order_is_flagged_not_credited(org):
    link_customer(org.id)
    intent = top_up_intent(org.id, pi="pi_short", cents=500, ordered=10 * DOLLAR)
    reason = "Stripe reports 500 USD cents for an order of 1000"
    assert outcome_of("payment_intent.succeeded", intent) == (
        f"top-up flagged, not credited: {reason}"
    )
    row = payment("pi_short")
    assert (row.flagged_reason, row.granted_amount) == (reason, 0)
    assert account(org.id).credits_balance == 0


def test_a_recharge_is_settled_by_the_attempt_its_metadata_names(org):
    attempt = attempt_in_flight(org.id)  # the worker died before it learned the PaymentIntent
    intent = recharge_intent(
        org.id, "pi_recharged", attempt.id, amount=2000, amount_received=2000, currency="usd"
    )
    receive("payment_intent.succeeded", intent)
    settled = reloaded(attempt)
    assert (settled.status, settled.stripe_payment_intent_id) == ("succeeded", "pi_recharged")
    assert [e.amount for e in entries(org.id, "recharge")] == [20 * DOLLAR]


# --- Checkout Sessions ----------------------------------------------------------------------


def test_a_subscription_checkout_reports_itself_and_credits_nothing(org):
    link_customer(org.id)
    session = subscription_session(org.id, sub="sub_from_checkout")
    assert outcome_of("checkout.session.completed", session) == "subscription checkout completed"
    assert account(org.id).credits_balance == 0


@pytest.mark.parametrize(
    ("currency", "named"), [("eur", "eur"), (None, "an unknown currency")], ids=["eur", "none"]
)
def test_a_checkout_settled_without_a_usd_amount_is_flagged_with_its_currency(org, currency, named):
    link_customer(org.id)
    session = top_up_session(
        org.id, pi="pi_no_usd", cents=920, currency="usd", amount_decimillicents=10 * DOLLAR
    ) | {"currency": currency}
    reason = f"settled in {named} with no USD amount"
    result = receive("checkout.session.completed", session)
    assert stored(result).outcome == f"top-up flagged, not credited: {reason}"
    assert payment("pi_no_usd").flagged_reason == reason
    assert account(org.id).credits_balance == 0


# --- what receiving an event records: the row, the log line, the counter ------------------


def test_a_processed_event_records_its_organization_logs_and_counts_its_outcome(org, caplog):
    link_customer(org.id)
    body, signature = signed(
        "payment_intent.succeeded", top_up_intent(org.id, pi="pi_logged", ordered=10 * DOLLAR)
    )
    before = counted("payment_intent.succeeded", "processed")
    with caplog.at_level(logging.INFO, logger="billing.webhooks"):
        result = deliver(body, signature)
    row = stored(result)
    assert (row.organization_id, row.event_type, row.outcome) == (
        org.id,
        "payment_intent.succeeded",
        "top-up granted",
    )
    assert row.processed_at is not None
    assert f"stripe event {event_id(body)} payment_intent.succeeded: top-up granted" in (
        caplog.messages
    )
    assert counted("payment_intent.succeeded", "processed") == before + 1


def test_an_ignored_event_is_stored_without_an_organization_and_counted_as_ignored(org):
    before = counted("customer.tax_id.created", "ignored")
    result = receive("customer.tax_id.created", {"id": "txi_2", "object": "tax_id"})
    row = stored(result)
    assert (row.organization_id, row.outcome, result.processed) == (None, "ignored", False)
    assert row.processed_at is not None
    assert counted("customer.tax_id.created", "ignored") == before + 1


def test_an_outcome_is_stored_cut_to_its_column(org):
    link_customer(org.id)
    status = "x" * 500
    session = top_up_session(org.id, pi="pi_long") | {"payment_status": status}
    result = receive("checkout.session.completed", session)
    assert stored(result).outcome == f"checkout not paid ({status}): no credit"[:500]


def test_an_event_naming_another_organizations_payment_is_refused_and_logged(org, caplog):
    link_customer(org.id)
    mine = top_up_session(org.id, pi="pi_shared", amount_decimillicents=10 * DOLLAR)
    assert outcome_of("checkout.session.completed", mine) == "top-up granted"
    with database.connection_context():
        other = create_organization("other").id
    link_customer(other)
    theirs = top_up_session(
        other, pi="pi_shared", session_id="cs_other", amount_decimillicents=10 * DOLLAR
    )
    with caplog.at_level(logging.WARNING, logger="billing.webhooks"):
        result = receive("checkout.session.completed", theirs)
    detail = "this payment belongs to another organization"
    assert (result.processed, stored(result).outcome) == (True, f"refused: {detail}")
    assert stored(result).organization_id == other
    assert f"stripe event {result.event_id} refused: {detail}" in caplog.messages
    assert account(other).credits_balance == 0


def test_only_the_completed_sessions_own_stored_order_counts(org):
    """Another session the organization opened (for $5) says nothing about this one, which
    we did not store: its metadata names the order."""
    link_customer(org.id)
    with database.connection_context():
        StoredSession.create(
            id="cs_earlier", organization=org.id, kind="top_up", amount=5 * DOLLAR, url="https://x"
        )
    session = top_up_session(
        org.id, pi="pi_meta", session_id="cs_unstored", amount_decimillicents=10 * DOLLAR
    )
    assert outcome_of("checkout.session.completed", session) == "top-up granted"
    assert account(org.id).credits_balance == 10 * DOLLAR


# --- which organization an event is for -----------------------------------------------------


def test_metadata_naming_no_organization_of_ours_gives_way_to_the_reference_id(org):
    session = top_up_session(org.id, pi="pi_ref", amount_decimillicents=10 * DOLLAR) | {
        "metadata": {"organization_id": "no-such-organization", "kind": "top_up"},
        "customer": None,
    }
    with database.connection_context():
        StoredSession.create(
            id="cs_test_topup", organization=org.id, kind="top_up", amount=10 * DOLLAR, url="x"
        )
    result = receive("checkout.session.completed", session)
    assert (stored(result).organization_id, stored(result).outcome) == (org.id, "top-up granted")
    assert account(org.id).credits_balance == 10 * DOLLAR


def test_an_event_naming_only_a_customer_is_for_that_customers_organization(org):
    link_customer(org.id)
    with database.connection_context():
        other = create_organization("other").id
    link_customer(other)
    obj = sub_object(other, sub="sub_by_customer", metadata={})
    result = receive("customer.subscription.created", obj)
    assert stored(result).organization_id == other
    assert account(other).stripe_subscription_id == "sub_by_customer"
    assert account(org.id).stripe_subscription_id is None


def legacy_top_up(org_id: str, pi: str) -> None:
    """A $10 top-up granted before payments were tracked: only its ledger entry names it."""
    with database.connection_context(), locked_account(org_id) as locked:
        ledger.grant(locked, 10 * DOLLAR, "top_up", reference_id=pi, idempotency_ref=f"topup:{pi}")


def anonymous_refund(pi: str, charge_id: str) -> dict[str, Any]:
    """A refund naming its PaymentIntent and charge only: no customer, no metadata."""
    return stripe_object(
        "charge",
        id=charge_id,
        payment_intent=pi,
        customer=None,
        amount=1000,
        amount_refunded=1000,
        currency="usd",
        refunded=True,
        metadata={},
    )


def test_a_refund_of_a_legacy_top_up_is_for_the_organization_its_grant_names(org):
    legacy_top_up(org.id, "pi_legacy")
    result = receive("charge.refunded", anonymous_refund("pi_legacy", "ch_legacy"))
    assert stored(result).organization_id == org.id
    assert stored(result).outcome == f"refund: reversed {10 * DOLLAR}"
    assert account(org.id).credits_balance == 0


def test_a_refund_of_a_payment_unknown_to_the_ledger_is_for_its_customer(org):
    legacy_top_up(org.id, "pi_legacy")  # another organization's entries name other payments
    with database.connection_context():
        other = create_organization("other").id
    link_customer(other)
    refund = charge(other, refunded_cents=1000, pi="pi_unknown", charge_id="ch_unknown")
    result = receive("charge.refunded", refund)
    assert stored(result).organization_id == other
    assert account(org.id).credits_balance == 10 * DOLLAR


def test_a_refund_naming_only_a_payment_intent_we_recorded_is_for_its_organization(org):
    """The payment is recorded (flagged, so no ledger entry names it) without its charge."""
    link_customer(org.id)
    session = top_up_session(org.id, pi="pi_flagged", amount_decimillicents=5 * DOLLAR)
    assert outcome_of("checkout.session.completed", session).startswith("top-up flagged")
    result = receive("charge.refunded", anonymous_refund("pi_flagged", "ch_flagged"))
    assert stored(result).organization_id == org.id
    assert stored(result).outcome == "refund: the payment bought no credits (yet)"


def test_a_handled_event_for_no_organization_of_ours_is_ignored(org):
    before = counted("customer.subscription.created", "ignored")
    obj = sub_object(org.id, sub="sub_stranger", metadata={}) | {"customer": "cus_stranger"}
    result = receive("customer.subscription.created", obj)
    assert (result.processed, stored(result).outcome, stored(result).organization_id) == (
        False,
        "ignored",
        None,
    )
    assert counted("customer.subscription.created", "ignored") == before + 1
    with database.connection_context():
        assert StripeSubscription.get_or_none(StripeSubscription.id == "sub_stranger") is None


def test_an_event_the_domain_refuses_leaves_no_row_and_touches_no_other_event(org):
    """A recharge of nothing is a 400: its own row goes; a processed event and another
    delivery still in flight (stored, not yet processed) stay."""
    processed = receive("customer.tax_id.created", {"id": "txi_3", "object": "tax_id"})
    with database.connection_context():
        WebhookEvent.create(
            id="evt_in_flight", event_type="invoice.paid", stripe_created=T, payload="{}"
        )
    intent = recharge_intent(org.id, "pi_nothing", None, amount=0, amount_received=0)
    body, signature = signed("payment_intent.succeeded", intent)
    with pytest.raises(InvalidRequest):
        deliver(body, signature)
    with database.connection_context():
        left = {e.id for e in WebhookEvent.select()}
    assert left == {processed.event_id, "evt_in_flight"}
    assert account(org.id).credits_balance == 0


def test_an_event_stored_but_never_processed_is_processed_when_stripe_retries(org):
    """The first delivery died after storing the event: the retry applies it."""
    link_customer(org.id)
    body, signature = signed(
        "payment_intent.succeeded", top_up_intent(org.id, pi="pi_retried", ordered=10 * DOLLAR)
    )
    with database.connection_context():
        WebhookEvent.create(
            id=event_id(body),
            event_type="payment_intent.succeeded",
            stripe_created=T,
            payload=body.decode(),
        )
    result = deliver(body, signature)
    assert (result.processed, result.idempotent) == (True, False)
    assert stored(result).outcome == "top-up granted"
    assert account(org.id).credits_balance == 10 * DOLLAR


# --- the order in our metadata, and what a flagged or repeated top-up reports ---------------


@pytest.mark.parametrize(
    ("text", "cents", "outcome"),
    [
        ("1000000000000000", 10**10, "top-up granted"),  # 10**15, 16 digits: the largest
        ("1000000000000001", 10**10, "flagged: no order on record for this payment"),
        ("00000000100000000", 1000, "flagged: no order on record for this payment"),  # 17
        ("0", 1000, "flagged: no order on record for this payment"),
        ("1", 1000, "flagged: Stripe reports 1000 USD cents for an order of 0"),
    ],
)
def test_the_ordered_amount_in_metadata_is_a_bounded_positive_integer(org, text, cents, outcome):
    link_customer(org.id)
    session = top_up_session(org.id, pi="pi_meta_amount", cents=cents)
    session["metadata"]["amount_decimillicents"] = text
    expected = outcome.replace("flagged: ", "top-up flagged, not credited: ")
    assert outcome_of("checkout.session.completed", session) == expected


def test_a_flagged_top_up_is_logged(org, caplog):
    link_customer(org.id)
    intent = top_up_intent(org.id, pi="pi_short_logged", cents=500, ordered=10 * DOLLAR)
    with caplog.at_level(logging.WARNING, logger="billing.webhooks"):
        receive("payment_intent.succeeded", intent)
    reason = "Stripe reports 500 USD cents for an order of 1000"
    assert f"top-up pi_short_logged flagged, not credited: {reason}" in caplog.messages


def test_the_second_report_of_a_granted_top_up_says_it_was_already_granted(org):
    link_customer(org.id)
    top_up_paid(org.id, "pi_reported_twice", charge_id=None)
    session = top_up_session(org.id, pi="pi_reported_twice", amount_decimillicents=10 * DOLLAR)
    assert outcome_of("checkout.session.completed", session) == "top-up already granted"
    assert account(org.id).credits_balance == 10 * DOLLAR


def test_an_integrity_error_while_applying_is_a_conflict_that_leaves_the_event_to_retry(
    org, monkeypatch
):
    """Another delivery recorded the same Stripe object meanwhile (simulated): a 409, so
    Stripe retries; nothing is applied and the event stays unprocessed."""
    link_customer(org.id)

    def recorded_meanwhile(*args: Any, **kwargs: Any) -> str:
        raise IntegrityError("duplicate key value violates unique constraint")

    monkeypatch.setattr(webhooks, "record_subscription_event", recorded_meanwhile)
    body, signature = signed("customer.subscription.created", sub_object(org.id))
    with pytest.raises(Conflict) as refused:
        deliver(body, signature)
    assert refused.value.detail == "another event recorded this Stripe object at the same time"
    with database.connection_context():
        assert WebhookEvent.get_by_id(event_id(body)).processed_at is None
