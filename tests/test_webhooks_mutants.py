"""Webhook rules the mutation run of `billing/webhooks.py` found unchecked: what each event
records (its outcome and the processed flag Stripe sees), which attempt or payment it
settles, and which reference the money carries. Each test goes through `webhooks.receive`
with a signed event in Stripe's shape."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from prometheus_client import REGISTRY

from billing import webhooks
from billing.units import DOLLAR
from models import (
    AutoRechargeRequest,
    BillingAccount,
    CreditEntry,
    WebhookEvent,
    database,
    utcnow,
)
from tests.stripe_events import (
    deliver,
    invoice,
    link_customer,
    signed,
    subscription,
    top_up_intent,
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
