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
from tests.ledger_checks import assert_ledger_invariants

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
    BillingAccount.update(
        auto_recharge_enabled=True,
        auto_recharge_threshold=5 * DOLLAR,
        auto_recharge_amount=20 * DOLLAR,
        stripe_payment_method_id=None,
    ).where(BillingAccount.organization == org_id).execute()


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
    BillingAccount.update(
        auto_recharge_enabled=True,
        auto_recharge_threshold=5 * DOLLAR,
        auto_recharge_amount=20 * DOLLAR,
        stripe_payment_method_id="pm_declining",
        auto_recharge_failure_count=1,
    ).where(BillingAccount.organization == org_id).execute()
    with accounts.locked_account(org_id) as account:
        attempt_id = recharge_policy.request_if_due(account)  # available $0 < $5
    assert attempt_id is not None
    # The worker met a challenge: the attempt waits for the customer, its slot is free.
    AutoRechargeRequest.update(
        status=AttemptStatus.requires_action, stripe_payment_intent_id="pi_3ds"
    ).where(AutoRechargeRequest.id == attempt_id).execute()
    BillingAccount.update(auto_recharge_in_flight_id=None, auto_recharge_last_requested_at=None).where(
        BillingAccount.organization == org_id
    ).execute()
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
