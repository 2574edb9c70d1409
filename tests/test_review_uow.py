"""Review of "one unit of work per use case" (locked_account), the prepared account reads and
the StrEnums, on PostgreSQL with real threads: breaks found, and the attacks that held.

Each race test runs `ROUNDS` rounds on fresh organizations, its threads released together by a
barrier; a round fails on any error (a deadlock is an error) or on a broken invariant.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg2
import pytest

from billing import (
    accounts,
    auto_recharge,
    checkout,
    ledger,
    local_billing,
    metering,
    operators,
    recharge_policy,
    webhooks,
)
from billing.config import get_settings
from billing.errors import InvalidRequest
from billing.organizations import create_organization
from billing.stripe_gateway import ChargeOutcome
from billing.units import CENT, DOLLAR
from models import (
    AttemptStatus,
    AutoRechargeRequest,
    BillingAccount,
    CheckoutSession,
    CheckoutStatus,
    CreditEntry,
    connection,
    database,
    is_postgres,
)
from tests import stripe_events as ev
from tests.ledger_checks import assert_ledger_invariants, auto_recharge_on

ROUNDS = int(os.environ.get("RACE_ROUNDS", "15"))


class _EventsAsSent:
    """A gateway whose signature check passes the event through."""

    local = False

    def verify_event(self, payload: bytes, signature: str) -> dict[str, Any]:
        return dict(json.loads(payload))


def _deliver(event_type: str, obj: dict[str, Any]) -> webhooks.WebhookResult:
    body, signature = ev.signed(event_type, obj)
    with connection():
        return webhooks.receive(body, signature, _EventsAsSent())  # type: ignore[arg-type]


def _new_org(credit: int = 50 * DOLLAR) -> str:
    with database.connection_context():
        org_id = create_organization(f"review {uuid.uuid4().hex[:6]}").id
        if credit:
            with accounts.locked_account(org_id) as account:
                ledger.grant(account, credit, "adjustment", reason="seed")
    ev.link_customer(org_id)
    return org_id


def _postgres_only() -> None:
    if not is_postgres():
        pytest.skip("the interleaving needs PostgreSQL's row locks and concurrent transactions")


def _together(*work: Callable[[], Any]) -> list[BaseException]:
    """Run each callable on its own thread and connection, released at once; their errors."""
    barrier = threading.Barrier(len(work))
    errors: list[BaseException] = []

    def run(fn: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            with connection():
                fn()
        except BaseException as exc:  # a deadlock or any 500 fails the round
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def _failed_rounds(round_fn: Callable[[], bool]) -> int:
    failures = sum(0 if round_fn() else 1 for _ in range(ROUNDS))
    print(f"{round_fn.__name__}: {failures}/{ROUNDS} rounds wrong")
    return failures


# --- break 1: the card saved by a top-up's payment asks for a recharge its own credit covers --


def _auto_recharge_without_card(org_id: str) -> None:
    """Auto-recharge configured (threshold $5, amount $20) before any card is on file."""
    auto_recharge_on(org_id, card=None)


@pytest.mark.usefixtures("conn")
@pytest.mark.parametrize("intent_first", [True, False], ids=["intent-first", "session-first"])
def test_a_top_up_paid_with_the_first_card_asks_for_no_recharge_its_credit_covers(intent_first):
    """Stripe sends payment_intent.succeeded and checkout.session.completed for one top-up, in
    either order. The intent saves the card (none was on file) and re-evaluates auto-recharge;
    it must do so on the balance the same event leaves, or a $10 top-up that lifts the balance
    above the $5 threshold also charges the card a $20 recharge, only when the intent comes
    first (reordered events must end in the same state)."""
    org_id = _new_org(credit=0)
    _auto_recharge_without_card(org_id)
    intent = ev.top_up_intent(org_id, pi="pi_first_card", ordered=10 * DOLLAR)
    session = ev.top_up_session(
        org_id, pi="pi_first_card", session_id="cs_first_card", amount_decimillicents=10 * DOLLAR
    )
    deliveries = [
        ("payment_intent.succeeded", intent),
        ("checkout.session.completed", session),
    ]
    for event_type, obj in deliveries if intent_first else reversed(deliveries):
        _deliver(event_type, obj)
    account = assert_ledger_invariants(org_id)
    assert account.credits_balance == 10 * DOLLAR
    assert account.stripe_payment_method_id == "pm_card_saved"
    assert AutoRechargeRequest.select().count() == 0
    assert account.auto_recharge_in_flight_id is None


@pytest.mark.usefixtures("conn")
def test_a_recharge_paid_with_a_new_card_asks_for_no_second_recharge():
    """An auto-recharge whose 3-D Secure challenge the customer completes with a new card
    (the saved one has been declining): the intent's success saves the new card and grants
    the recharge; the re-evaluation must see the granted credit, or it writes a second
    request that charges the card again."""
    org_id = _new_org(credit=0)
    auto_recharge_on(org_id, card="pm_declining", auto_recharge_failure_count=1)
    with accounts.locked_account(org_id) as account:
        attempt_id = recharge_policy.request_if_due(account)  # available $0 < $5
    assert attempt_id is not None
    # The worker met a challenge: the attempt waits for the customer, its slot is free.
    AutoRechargeRequest.update(
        status=AttemptStatus.requires_action, stripe_payment_intent_id="pi_3ds"
    ).where(AutoRechargeRequest.id == attempt_id).execute()
    BillingAccount.update(
        auto_recharge_in_flight_id=None, auto_recharge_last_requested_at=None
    ).where(BillingAccount.organization == org_id).execute()
    _deliver(
        "payment_intent.succeeded",
        {
            "id": "pi_3ds",
            "object": "payment_intent",
            "amount": 2000,
            "amount_received": 2000,
            "currency": "usd",
            "status": "succeeded",
            "payment_method": "pm_new_card",
            "customer": ev.customer_of(org_id),
            "metadata": {
                "organization_id": org_id,
                "kind": "auto_recharge",
                "attempt_id": attempt_id,
            },
        },
    )
    account = assert_ledger_invariants(org_id)
    assert account.credits_balance == 20 * DOLLAR
    assert account.stripe_payment_method_id == "pm_new_card"
    assert AutoRechargeRequest.get_by_id(attempt_id).status == AttemptStatus.succeeded
    assert AutoRechargeRequest.select().count() == 1  # no second charge on its way
    assert account.auto_recharge_in_flight_id is None


# --- break 2: dev/complete-local completes a session the customer canceled meanwhile --------


def _waiting_on_a_lock(watcher: Any, marker: str) -> bool:
    """Whether some backend is blocked on a lock in a statement that contains `marker`, read on
    `watcher`, a connection of its own outside the test's transactions."""
    with watcher.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database() AND query LIKE %s",
            (f"%{marker}%",),
        )
        return bool(cursor.fetchone()[0])


def test_completing_locally_never_pays_a_session_canceled_meanwhile(monkeypatch):
    """`complete_local_checkout` finds the newest open session and completes it; a Cancel on
    the page (`local_billing.cancel`, the session's lock only) that commits between the two
    must win or wait: a session the customer saw canceled is never paid afterwards."""
    _postgres_only()
    watcher = psycopg2.connect(os.environ["TEST_DATABASE_URL"])
    watcher.autocommit = True
    real_keep_card = checkout.keep_local_card
    picked = threading.Event()
    canceled: dict[str, CheckoutSession] = {}
    cancel_done = threading.Event()

    def keep_card_after_cancel(account: BillingAccount) -> None:
        picked.set()
        # Let the cancel run to its end, or until it waits on a lock this unit holds.
        while not cancel_done.is_set() and not _waiting_on_a_lock(watcher, "checkout_sessions"):
            cancel_done.wait(0.01)
        real_keep_card(account)

    monkeypatch.setattr(checkout, "keep_local_card", keep_card_after_cancel)

    def one_round() -> bool:
        picked.clear()
        cancel_done.clear()
        org_id = _new_org(credit=0)
        session_id = f"cs_local_{uuid.uuid4().hex}"
        with database.connection_context():
            CheckoutSession.create(
                id=session_id,
                organization=org_id,
                kind="top_up",
                amount=5 * DOLLAR,
                url="http://local/checkout",
            )

        def complete() -> None:
            checkout.complete_local_checkout(org_id)

        def cancel() -> None:
            picked.wait()
            try:
                canceled["session"] = local_billing.cancel(session_id)
            finally:
                cancel_done.set()

        errors = _together(complete, cancel)
        with database.connection_context():
            stored = CheckoutSession.get_by_id(session_id)
            balance = assert_ledger_invariants(org_id).credits_balance
        seen_by_customer = canceled["session"].status
        return (
            not errors
            and stored.status == seen_by_customer
            and balance == (5 * DOLLAR if stored.status == CheckoutStatus.completed else 0)
        )

    try:
        assert _failed_rounds(one_round) == 0
    finally:
        watcher.close()


# --- attacks that held: lock order under the new unit of work (PostgreSQL, real threads) -----


class _SucceedingGateway:
    local = False

    def charge_off_session(
        self, organization_id: str, customer: str, method: str, amount: int, attempt_id: str
    ) -> ChargeOutcome:
        return ChargeOutcome("succeeded", _intent_of(attempt_id))


def _intent_of(attempt_id: str) -> str:
    return f"pi_{attempt_id.replace('-', '')[:20]}"


def _recharge_pending(org_id: str) -> str:
    """A pending auto-recharge request of $20 (threshold $5, a card on file)."""
    with database.connection_context():
        auto_recharge_on(org_id, card="pm_review")
        with accounts.locked_account(org_id) as account:
            attempt_id = recharge_policy.request_if_due(account, refused=True)
    assert attempt_id is not None
    return attempt_id


def _recharge_intent(org_id: str, attempt_id: str, event: str = "succeeded") -> dict[str, Any]:
    return {
        "id": _intent_of(attempt_id),
        "object": "payment_intent",
        "amount": 2000,
        "amount_received": 2000 if event == "succeeded" else 0,
        "currency": "usd",
        "status": event,
        "payment_method": "pm_review",
        "customer": ev.customer_of(org_id),
        "last_payment_error": {"code": "card_declined"} if event == "failed" else None,
        "metadata": {"organization_id": org_id, "kind": "auto_recharge", "attempt_id": attempt_id},
    }


def _pay_unless_canceled(session_id: str) -> None:
    try:
        local_billing.pay(session_id)
    except InvalidRequest as exc:  # the Cancel came first: "this checkout was canceled"
        assert "canceled" in exc.detail


def test_everything_on_one_organization_at_once_neither_deadlocks_nor_breaks_the_ledger():
    """Every writer of one organization released together, round after round: `pay` (account,
    then session) against its Cancel (session) and a webhook top-up reading the stored session;
    a refund webhook against an operator's adjustment; usage batches over [org, other] and
    [other, org] against single records; a reservation; the worker's claim and outcome against
    the webhook settling the same attempt. No deadlock, no error, every invariant kept."""
    _postgres_only()
    gateway = _SucceedingGateway()

    def one_round() -> bool:
        org_id, other_id = _new_org(), _new_org()
        tag = org_id[:8]
        local_id = f"cs_local_{uuid.uuid4().hex}"
        with database.connection_context():
            CheckoutSession.create(
                id=local_id, organization=org_id, kind="top_up", amount=5 * DOLLAR, url="http://l"
            )
            CheckoutSession.create(
                id=f"cs_{tag}",
                organization=org_id,
                kind="top_up",
                amount=10 * DOLLAR,
                url="http://s",
            )
        _deliver(
            "checkout.session.completed",
            ev.top_up_session(
                org_id,
                pi=f"pi_old_{tag}",
                session_id=f"cs_old_{tag}",
                amount_decimillicents=10 * DOLLAR,
            ),
        )
        attempt_id = _recharge_pending(org_id)

        def batch(ids: list[str], ref: str) -> None:
            events = [metering.usage_event(o, "storage", 1, CENT, f"{ref}:{o}") for o in ids]
            metering.record_usage_batch(events)

        errors = _together(
            lambda: _pay_unless_canceled(local_id),
            lambda: local_billing.cancel(local_id),
            lambda: _deliver(
                "checkout.session.completed",
                ev.top_up_session(
                    org_id,
                    pi=f"pi_new_{tag}",
                    session_id=f"cs_{tag}",
                    amount_decimillicents=10 * DOLLAR,
                ),
            ),
            lambda: _deliver(
                "charge.refunded",
                ev.charge(org_id, refunded_cents=400, pi=f"pi_old_{tag}", charge_id=f"ch_{tag}"),
            ),
            lambda: operators.adjust_credits(
                org_id, amount=-DOLLAR, reason="review", idempotency_key=f"adj-{tag}"
            ),
            lambda: batch([org_id, other_id], "b1"),
            lambda: batch([other_id, org_id], "b2"),
            lambda: metering.record_usage(org_id, "storage", 1, CENT, "single"),
            lambda: metering.record_usage(other_id, "storage", 1, CENT, "single"),
            lambda: ledger.reserve(org_id, DOLLAR, reference_id="hold"),
            lambda: auto_recharge.process_one(gateway, get_settings()),  # type: ignore[arg-type]
            lambda: _deliver("payment_intent.succeeded", _recharge_intent(org_id, attempt_id)),
        )
        with database.connection_context():
            account = assert_ledger_invariants(org_id)
            assert_ledger_invariants(other_id)
            session = CheckoutSession.get_by_id(local_id)
            recharges = CreditEntry.select().where(
                (CreditEntry.organization == org_id) & (CreditEntry.entry_type == "recharge")
            )
            local_top_ups = CreditEntry.select().where(CreditEntry.reference_id == local_id)
            attempt = AutoRechargeRequest.get_by_id(attempt_id)
        expected_local = 1 if session.status == CheckoutStatus.completed else 0
        ok = (
            not errors
            and [e.amount for e in recharges] == [20 * DOLLAR]
            and attempt.status == AttemptStatus.succeeded
            and account.auto_recharge_in_flight_id is None
            and account.auto_recharge_failure_count == 0
            and local_top_ups.count() == expected_local
        )
        if not ok:
            print(errors, session.status, list(recharges), attempt.status, account.__data__)
        return ok

    assert _failed_rounds(one_round) == 0


def test_a_decline_webhook_racing_the_workers_claim_and_success_settles_once():
    """The worker claims and charges an attempt while Stripe reports a decline for the same
    attempt (an earlier try): whichever settles last, the recharge is granted once, the attempt
    ends succeeded or failed with a matching failure count, and the in-flight slot is free."""
    _postgres_only()
    gateway = _SucceedingGateway()

    def one_round() -> bool:
        org_id = _new_org(credit=0)
        attempt_id = _recharge_pending(org_id)
        errors = _together(
            lambda: auto_recharge.process_one(gateway, get_settings()),  # type: ignore[arg-type]
            lambda: _deliver(
                "payment_intent.payment_failed", _recharge_intent(org_id, attempt_id, "failed")
            ),
        )
        with database.connection_context():
            account = assert_ledger_invariants(org_id)
            attempt = AutoRechargeRequest.get_by_id(attempt_id)
            granted = account.credits_balance
        consistent = (attempt.status, granted, account.auto_recharge_failure_count) in {
            (AttemptStatus.succeeded, 20 * DOLLAR, 0),  # the success settled last
            (AttemptStatus.failed, 0, 1),  # the decline settled first; the worker found none
        }
        if errors or not consistent:
            print(errors, attempt.status, granted, account.auto_recharge_failure_count)
        return not errors and consistent and account.auto_recharge_in_flight_id is None

    assert _failed_rounds(one_round) == 0


def test_concurrent_declines_count_every_failure_and_concurrent_first_cards_keep_the_first():
    """count_failure and remember_payment_method used to be conditional UPDATEs; they now write
    through the locked account. Declines of three attempts reported together must count three
    (the limit: auto-recharge turns off), and two first cards reported together must leave
    exactly one of them saved (a saved, non-failing card is never replaced)."""
    _postgres_only()
    limit = get_settings().auto_recharge_max_failures

    def one_round() -> bool:
        org_id = _new_org(credit=0)
        first_attempt = _recharge_pending(org_id)
        attempts = [first_attempt]
        with database.connection_context():
            for _ in range(limit - 1):
                attempts.append(str(uuid.uuid4()))
                AutoRechargeRequest.create(
                    id=attempts[-1], organization=org_id, amount=20 * DOLLAR, status="processing"
                )
            BillingAccount.update(stripe_payment_method_id=None).where(
                BillingAccount.organization == org_id
            ).execute()
        cards = [f"pm_first_{i}" for i in range(2)]
        errors = _together(
            *(
                lambda a=a: _deliver(
                    "payment_intent.payment_failed", _recharge_intent(org_id, a, "failed")
                )
                for a in attempts
            ),
            *(
                lambda c=c: _deliver(
                    "payment_intent.succeeded",
                    {
                        **ev.top_up_intent(org_id, pi=f"pi_{c}_{org_id[:8]}", cents=0),
                        "payment_method": c,
                    },
                )
                for c in cards
            ),
        )
        with database.connection_context():
            account = assert_ledger_invariants(org_id)
            failed = AutoRechargeRequest.select().where(
                (AutoRechargeRequest.organization == org_id)
                & (AutoRechargeRequest.status == "failed")
            )
        ok = (
            not errors
            and failed.count() == limit
            and account.auto_recharge_failure_count == limit
            and account.auto_recharge_enabled is False
            and account.auto_recharge_in_flight_id is None
            and account.stripe_payment_method_id in cards
        )
        if not ok:
            print(errors, failed.count(), account.__data__)
        return ok

    assert _failed_rounds(one_round) == 0
