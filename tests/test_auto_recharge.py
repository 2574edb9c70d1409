"""Auto-recharge against localstripe: off-session PaymentIntents through the real library."""

from __future__ import annotations

import datetime as dt

import pytest
import stripe

from billing import accounts, ledger
from billing.accounts import locked_account
from billing.auto_recharge import drain
from billing.config import get_settings
from billing.stripe_gateway import get_gateway
from billing.units import DOLLAR
from models import AutoRechargeRequest, BillingAccount, CreditEntry, database, utcnow
from tests.ledger_checks import assert_ledger_invariants
from tests.stripe_fakes import API_KEY, event_body, signature_for, stripe_object

CARDS = {"ok": "4242424242424242", "declined": "4000000000000341", "3ds": "4000002760003184"}


def saved_card(backend: str, org_id: str, card: str) -> tuple[str, str]:
    """A localstripe customer with an attached card, linked to the organization."""
    client = stripe.StripeClient(API_KEY, base_addresses={"api": backend})
    customer = client.v1.customers.create(params={"metadata": {"organization_id": org_id}})
    method = client.v1.payment_methods.create(
        params={
            "type": "card",
            "card": {"number": CARDS[card], "exp_month": 12, "exp_year": 2030, "cvc": "123"},
        }
    )
    client.v1.payment_methods.attach(method.id, params={"customer": customer.id})
    BillingAccount.update(stripe_customer_id=customer.id, stripe_payment_method_id=method.id).where(
        BillingAccount.organization == org_id
    ).execute()
    return customer.id, method.id


def arm(org_id: str) -> None:
    """Credits, auto-recharge settings, and a debit that crosses the threshold."""
    with locked_account(org_id) as account:
        ledger.grant(account, 10 * DOLLAR, "top_up", reason="seed")
    accounts.update_settings(
        org_id,
        {
            "auto_recharge_enabled": True,
            "auto_recharge_threshold": 5 * DOLLAR,
            "auto_recharge_amount": 20 * DOLLAR,
        },
    )
    with locked_account(org_id) as account:
        ledger.debit(account, 6 * DOLLAR)


def rearm(org_id: str) -> None:
    """Let the cooldown pass and cross the threshold again."""
    for request in AutoRechargeRequest.select():
        request.created_at -= dt.timedelta(hours=1)
        request.save()
    BillingAccount.update(auto_recharge_last_requested_at=utcnow() - dt.timedelta(hours=1)).where(
        BillingAccount.organization == org_id
    ).execute()
    with locked_account(org_id) as account:
        ledger.debit(account, 1)


def report_intent(client, org_id, attempt, event_type, **fields):
    """Stripe reporting on the attempt's PaymentIntent by a signed webhook."""
    intent = stripe_object(
        "payment_intent",
        id=attempt.stripe_payment_intent_id,
        metadata={"organization_id": org_id, "kind": "auto_recharge", "attempt_id": attempt.id},
        **fields,
    )
    body = event_body(event_type, intent)
    return client.post(
        "/v1/webhooks/stripe",
        content=body,
        headers={"Stripe-Signature": signature_for(body), "Content-Type": "application/json"},
    )


PAID = {"amount": 2000, "amount_received": 2000, "status": "succeeded"}


@pytest.fixture
def conn_stripe(stripe_mode):
    with database.connection_context():
        yield stripe_mode


def test_successful_recharge_grants_once(org, conn_stripe):
    saved_card(conn_stripe.backend, org.id, "ok")
    arm(org.id)
    assert drain(get_gateway(), get_settings()) == 1
    attempt = AutoRechargeRequest.get()
    assert attempt.status == "succeeded" and attempt.stripe_payment_intent_id.startswith("pi_")
    [sent] = conn_stripe.sent("POST", "/v1/payment_intents")
    assert sent["amount"] == "2000" and sent["off_session"] == "true"
    assert sent["metadata"]["kind"] == "auto_recharge"
    account = assert_ledger_invariants(org.id)
    assert account.credits_balance == 24 * DOLLAR
    assert drain(get_gateway(), get_settings()) == 0  # nothing left


def test_recharge_webhook_after_worker_grants_nothing_more(client, org, conn_stripe):
    saved_card(conn_stripe.backend, org.id, "ok")
    arm(org.id)
    drain(get_gateway(), get_settings())
    attempt = AutoRechargeRequest.get()
    r = report_intent(client, org.id, attempt, "payment_intent.succeeded", **PAID)
    assert r.status_code == 200
    assert CreditEntry.select().where(CreditEntry.entry_type == "recharge").count() == 1


def test_declines_turn_auto_recharge_off_after_three(org, conn_stripe):
    saved_card(conn_stripe.backend, org.id, "declined")
    arm(org.id)
    for attempt in range(3):
        if attempt:
            rearm(org.id)
        assert drain(get_gateway(), get_settings()) == 1
    statuses = [a.status for a in AutoRechargeRequest.select()]
    assert statuses == ["failed"] * 3
    account = BillingAccount.get_by_id(org.id)
    assert account.auto_recharge_enabled is False
    assert "failed" in account.auto_recharge_disabled_reason
    assert CreditEntry.select().where(CreditEntry.entry_type == "recharge").count() == 0
    rearm(org.id)  # disabled: no new request
    assert AutoRechargeRequest.select().count() == 3


def test_cooldown_prevents_a_second_request(org, conn_stripe):
    saved_card(conn_stripe.backend, org.id, "declined")
    arm(org.id)
    drain(get_gateway(), get_settings())
    with locked_account(org.id) as account:
        ledger.debit(account, 1)  # still below threshold, but within the cooldown
    assert AutoRechargeRequest.select().count() == 1


def test_3ds_challenge_is_surfaced_then_cleared(client, org, conn_stripe):
    saved_card(conn_stripe.backend, org.id, "3ds")
    arm(org.id)
    drain(get_gateway(), get_settings())
    attempt = AutoRechargeRequest.get()
    assert attempt.status == "requires_action"
    r = client.get(f"/v1/billing/{org.id}/auto-recharge/requires-action", headers=org.admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["attemptId"] == attempt.id
    assert body["stripePaymentIntentId"] == attempt.stripe_payment_intent_id
    assert body["clientSecret"].startswith(attempt.stripe_payment_intent_id)
    assert body["amountDecimillicents"] == 20 * DOLLAR
    assert (
        client.get(
            f"/v1/billing/{org.id}/auto-recharge/requires-action", headers=org.member
        ).status_code
        == 403
    )
    # The customer authenticates; Stripe reports success by webhook.
    report_intent(client, org.id, attempt, "payment_intent.succeeded", **PAID)
    assert (
        client.get(f"/v1/billing/{org.id}/auto-recharge/requires-action", headers=org.admin).json()
        is None
    )
    assert BillingAccount.get_by_id(org.id).credits_balance == 24 * DOLLAR


def test_3ds_failure_clears_the_challenge(client, org, conn_stripe):
    saved_card(conn_stripe.backend, org.id, "3ds")
    arm(org.id)
    drain(get_gateway(), get_settings())
    attempt = AutoRechargeRequest.get()
    report_intent(
        client,
        org.id,
        attempt,
        "payment_intent.payment_failed",
        status="requires_payment_method",
        last_payment_error={"code": "payment_intent_authentication_failure"},
    )
    assert (
        client.get(f"/v1/billing/{org.id}/auto-recharge/requires-action", headers=org.owner).json()
        is None
    )
    assert AutoRechargeRequest.get().status == "failed"


def test_provider_outage_requeues(org, conn_stripe):
    saved_card(conn_stripe.backend, org.id, "ok")
    arm(org.id)
    conn_stripe.fail_with = 500
    assert drain(get_gateway(), get_settings(), limit=1) == 1
    assert AutoRechargeRequest.get().status == "pending"
    assert AutoRechargeRequest.get().next_attempt_at > AutoRechargeRequest.get().created_at
    assert drain(get_gateway(), get_settings()) == 0  # backing off: not due yet
    conn_stripe.fail_with = None
    AutoRechargeRequest.update(next_attempt_at=AutoRechargeRequest.created_at).execute()
    drain(get_gateway(), get_settings())
    assert AutoRechargeRequest.get().status == "succeeded"
    assert BillingAccount.get_by_id(org.id).credits_balance == 24 * DOLLAR


def _new_card(backend: str, customer_id: str) -> str:
    client = stripe.StripeClient(API_KEY, base_addresses={"api": backend})
    method = client.v1.payment_methods.create(
        params={
            "type": "card",
            "card": {"number": CARDS["ok"], "exp_month": 11, "exp_year": 2031, "cvc": "123"},
        }
    )
    client.v1.payment_methods.attach(method.id, params={"customer": customer_id})
    return str(method.id)


def card_saved_during_the_backoff(backend: str, customer_id: str, org_id: str) -> str:
    """The organization saves another card while its attempt waits; the attempt is due now."""
    card = _new_card(backend, customer_id)
    BillingAccount.update(stripe_payment_method_id=card).where(
        BillingAccount.organization == org_id
    ).execute()
    AutoRechargeRequest.update(next_attempt_at=AutoRechargeRequest.created_at).execute()
    return card


def test_a_retry_settles_by_the_charge_whose_answer_was_lost(org, conn_stripe):
    """The first charge reached Stripe and went through, but its answer was lost; while the
    attempt waits out its backoff, the organization saves another card. The retry finds the
    first PaymentIntent (by the attempt id in its metadata) and settles by it: one charge,
    granted once, nothing sent again. Sent again with the newly saved card, it was a different
    request under the same key, which Stripe refuses (idempotency_error)."""
    customer_id, first_card = saved_card(conn_stripe.backend, org.id, "ok")
    arm(org.id)
    conn_stripe.lose_next_answer = True
    assert drain(get_gateway(), get_settings(), limit=1) == 1
    attempt = AutoRechargeRequest.get()
    assert attempt.status == "pending"  # a broken connection reads as an outage
    assert attempt.stripe_payment_method_id == first_card
    card_saved_during_the_backoff(conn_stripe.backend, customer_id, org.id)
    drain(get_gateway(), get_settings())
    attempt = AutoRechargeRequest.get()
    assert attempt.status == "succeeded", attempt.failure_reason
    charges = conn_stripe.sent("POST", "/v1/payment_intents")
    assert [c["payment_method"] for c in charges] == [first_card]
    assert attempt.stripe_payment_intent_id is not None
    assert BillingAccount.get_by_id(org.id).credits_balance == 24 * DOLLAR
    assert CreditEntry.select().where(CreditEntry.entry_type == "recharge").count() == 1
    assert_ledger_invariants(org.id)


def test_a_retry_that_finds_no_charge_sends_the_first_request_again(org, conn_stripe):
    """An outage kept the first request from Stripe, then another card was saved: the retry
    finds no PaymentIntent of the attempt and repeats the first request, same key, same card."""
    customer_id, first_card = saved_card(conn_stripe.backend, org.id, "ok")
    arm(org.id)
    conn_stripe.fail_with = 503
    assert drain(get_gateway(), get_settings(), limit=1) == 1
    conn_stripe.fail_with = None
    BillingAccount.update(
        stripe_payment_method_id=_new_card(conn_stripe.backend, customer_id)
    ).where(BillingAccount.organization == org.id).execute()
    AutoRechargeRequest.update(next_attempt_at=AutoRechargeRequest.created_at).execute()
    drain(get_gateway(), get_settings())
    assert AutoRechargeRequest.get().status == "succeeded"
    charges = conn_stripe.sent("POST", "/v1/payment_intents")
    assert [c["payment_method"] for c in charges] == [first_card, first_card]
    assert len(set(conn_stripe.idempotency_keys[-3:]) - {None}) == 1
    assert BillingAccount.get_by_id(org.id).credits_balance == 24 * DOLLAR


def test_a_charge_stripe_refuses_to_repeat_fails_the_attempt_at_once(org, conn_stripe):
    """Should a retry ever differ from its first request, Stripe's idempotency_error is the
    same on every retry: the attempt fails at once (uncounted: not the customer's doing) and
    frees the organization's slot, instead of backing off until its attempts are spent."""
    saved_card(conn_stripe.backend, org.id, "ok")
    arm(org.id)
    conn_stripe.fail_with = 503
    drain(get_gateway(), get_settings(), limit=1)
    conn_stripe.fail_with = None
    attempt = AutoRechargeRequest.get()
    AutoRechargeRequest.update(next_attempt_at=AutoRechargeRequest.created_at).execute()
    # Stripe holds a result for the attempt's key, for other parameters, and no PaymentIntent.
    conn_stripe.remember(f"auto-recharge:{attempt.id}", "POST", "/v1/payment_intents", {})
    assert drain(get_gateway(), get_settings()) == 1
    attempt = AutoRechargeRequest.get()
    assert (attempt.status, attempt.failure_kind) == ("failed", "transient")
    assert "other parameters" in attempt.failure_reason
    account = BillingAccount.get_by_id(org.id)
    assert account.auto_recharge_failure_count == 0
    assert account.auto_recharge_in_flight_id is None
