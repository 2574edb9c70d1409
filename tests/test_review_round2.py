"""Outside review, round 2: b4e0729 (dead pooled connections), c580385 (auto-recharge grants
through credit_payment), 0828d6a (pinned card, idempotency_error), df7145e (lease >= call).

Each test fails on the code as reviewed, for a defect that costs money or holds it.
"""

from __future__ import annotations

import datetime as dt

import pytest
import stripe

from billing import ledger
from billing.accounts import locked_account
from billing.auto_recharge import _backoff, drain
from billing.config import get_settings
from billing.stripe_gateway import get_gateway
from billing.units import DOLLAR
from models import AutoRechargeRequest, BillingAccount, database
from tests.stripe_fakes import API_KEY
from tests.test_auto_recharge import arm, card_saved_during_the_backoff, saved_card


@pytest.fixture
def conn_stripe(stripe_mode):
    """Stripe mode against localstripe behind the fixture front, on the test's connection."""
    with database.connection_context():
        yield stripe_mode


def _succeeded_charges(backend: str, customer_id: str) -> list[str]:
    """The PaymentIntents Stripe itself holds as succeeded for this customer."""
    client = stripe.StripeClient(API_KEY, base_addresses={"api": backend})
    intents = client.v1.payment_intents.list(params={"limit": 100})
    return [
        i.id
        for i in intents.auto_paging_iter()  # a shared localstripe holds other tests' too
        if i.status == "succeeded" and i.customer == customer_id
    ]


def test_an_attempt_in_flight_across_migration_0008_is_charged_twice_after_a_card_change(
    org, conn_stripe
):
    """0828d6a, migration 0008 ("Attempts in flight pin at their next claim"): an attempt whose
    first claim ran on the release before 0008 has a NULL pin, so its next claim pins the card
    saved NOW, not the card its first claim charged. If the card changed during the backoff
    (the very case the commit is about), the retry is another request under the same key;
    Stripe answers idempotency_error, the attempt fails at once and frees the slot, and the
    charge that did go through is never settled by the worker; the next crossing (the balance is
    still low: that payment was never credited) charges the customer again with a fresh key."""
    customer_id, _first_card = saved_card(conn_stripe.backend, org.id, "ok")
    arm(org.id)
    conn_stripe.lose_next_answer = True  # the first charge goes through; its answer is lost
    assert drain(get_gateway(), get_settings(), limit=1) == 1
    # The first claim ran before 0008: the column the migration added is NULL for this attempt.
    AutoRechargeRequest.update(stripe_payment_method_id=None).execute()
    card_saved_during_the_backoff(conn_stripe.backend, customer_id, org.id)
    drain(get_gateway(), get_settings())
    attempt = AutoRechargeRequest.get()
    # The cooldown passes; the next debit finds the balance below the threshold still.
    BillingAccount.update(auto_recharge_last_requested_at=dt.datetime(2000, 1, 1)).where(
        BillingAccount.organization == org.id
    ).execute()
    with locked_account(org.id) as account:
        ledger.debit(account, 1)
    drain(get_gateway(), get_settings())
    charges = _succeeded_charges(conn_stripe.backend, customer_id)
    balance = BillingAccount.get_by_id(org.id).credits_balance
    assert (attempt.status, len(charges)) == ("succeeded", 1), (
        f"first attempt {attempt.status} ({attempt.failure_reason}); Stripe holds "
        f"{len(charges)} succeeded charges of {20 * DOLLAR} for one threshold crossing; "
        f"balance {balance}"
    )


STRIPE_KEY_RETENTION = 24 * 3600  # Stripe prunes idempotency keys once they are 24 hours old


def test_settings_let_an_attempt_retry_after_stripe_forgot_its_key_and_charge_again(
    org, conn_stripe, monkeypatch
):
    """0828d6a/df7145e: "every claim of one request charges with the same Stripe idempotency
    key ... so a takeover never charges twice" holds only while Stripe remembers the key, and
    Stripe prunes keys 24 hours old: a request with a pruned key is a new request. The settings
    check (df7145e) bounds the leases by the Stripe call, but not the retry schedule by the key's
    life: AUTO_RECHARGE_RETRY_MAX_SECONDS=86400 (its upper bound) with
    AUTO_RECHARGE_MAX_ATTEMPTS=16 (the defaults stop after about an hour) puts the later
    retries of an attempt more than 24 hours after its first charge, even with the shortest
    jitter. A first charge that went through with its answer lost is then charged
    again by a retry (Stripe, having forgotten the key, creates a second PaymentIntent)."""
    monkeypatch.setenv("AUTO_RECHARGE_RETRY_MAX_SECONDS", "86400")  # its documented bound
    monkeypatch.setenv("AUTO_RECHARGE_MAX_ATTEMPTS", "16")
    get_settings.cache_clear()
    settings = get_settings()  # accepted at start-up
    # The earliest the k-th claim can run after the first (every backoff at its 50% jitter).
    earliest, claim = 0.0, 1
    with monkeypatch.context() as patched:
        patched.setattr("billing.auto_recharge.random.uniform", lambda low, high: low)
        while earliest <= STRIPE_KEY_RETENTION and claim < settings.auto_recharge_max_attempts:
            earliest += _backoff(settings, claim)
            claim += 1
    assert earliest > STRIPE_KEY_RETENTION and claim <= settings.auto_recharge_max_attempts

    customer_id, _ = saved_card(conn_stripe.backend, org.id, "ok")
    arm(org.id)
    conn_stripe.lose_next_answer = True  # the first charge goes through; its answer is lost
    assert drain(get_gateway(), get_settings(), limit=1) == 1
    # The outage lasts: claims 2 .. claim-1 meet it (their requests never reach Stripe). When
    # claim number `claim` runs, the first charge is more than 24 hours old: Stripe has pruned
    # the key (the front forgets it, as Stripe does).
    conn_stripe._answered.clear()
    first_claim_at = AutoRechargeRequest.get().created_at - dt.timedelta(seconds=earliest)
    AutoRechargeRequest.update(
        attempts=claim - 1, created_at=first_claim_at, next_attempt_at=first_claim_at
    ).execute()
    drain(get_gateway(), get_settings())
    charges = _succeeded_charges(conn_stripe.backend, customer_id)
    attempt = AutoRechargeRequest.get()
    assert len(charges) == 1, (
        f"claim {claim} of an attempt {earliest / 3600:.1f} h old resent a pruned key: Stripe "
        f"holds {len(charges)} succeeded charges {charges} for attempt {attempt.status}; "
        f"balance {BillingAccount.get_by_id(org.id).credits_balance}"
    )
