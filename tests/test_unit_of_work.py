"""One unit of work per use case: each entry point opens exactly one write transaction and
locks its organization's account exactly once (issue 13, item 4).

Counted below the code under test, so the count holds whoever opens what: every
`write_transaction` goes through `models.db._atomic` (wrapped here), and every account lock is
a statement Peewee sends (`SELECT ... FOR UPDATE` on billing_accounts on PostgreSQL; on SQLite,
whose writer lock needs no row lock, the account read inside a write transaction).
Before the change, a welcome credit locked the account four times in five transactions, and a
refund, a top-up or an auto-recharge settlement through a webhook nested one per rule.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from billing import (
    accounts,
    auto_recharge,
    checkout,
    ledger,
    local_billing,
    metering,
    operators,
    webhooks,
)
from billing.config import get_settings
from billing.organizations import create_organization
from billing.stripe_gateway import ChargeOutcome
from billing.units import DOLLAR
from models import (
    AutoRechargeRequest,
    BillingAccount,
    CheckoutSession,
    CreditEntry,
    is_postgres,
)
from models import db as models_db
from tests import stripe_events as ev
from tests.ledger_checks import assert_ledger_invariants, auto_recharge_on

pytestmark = pytest.mark.usefixtures("conn")


@dataclass
class Counts:
    transactions: int = 0
    account_locks: int = 0


def _locks_accounts(sql: str) -> bool:
    """Whether a statement locks billing_accounts rows: one account (lock_account's own
    statement) or a batch's accounts in id order. On PostgreSQL a transaction's first statement
    carries its BEGIN (models.db._PostgresqlDatabase)."""
    sql = sql.removeprefix("BEGIN;")
    if '"billing_accounts"' not in sql or not sql.lstrip().upper().startswith("SELECT"):
        return False
    if is_postgres():
        return "FOR UPDATE" in sql
    # SQLite renders the lock as the plain account read: inside a write transaction (where
    # the writer lock is held), reading the account row again is what counts as a lock.
    return (sql == accounts._ACCOUNT_FOR_UPDATE.sql() and models_db.database.in_transaction()) or (
        " IN (" in sql and "ORDER BY" in sql
    )


class _Statements(logging.Handler):
    def __init__(self, counts: Counts) -> None:
        super().__init__(logging.DEBUG)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, tuple) and _locks_accounts(record.msg[0]):
            self.counts.account_locks += 1


@pytest.fixture
def counted(monkeypatch) -> Callable[[], Any]:
    """`with counted() as counts:` counts the write transactions opened (nested ones too) and
    the account locks taken inside the block."""
    real_atomic = models_db._atomic

    @contextmanager
    def measure() -> Iterator[Counts]:
        counts = Counts()

        @contextmanager
        def counting_atomic() -> Iterator[None]:
            counts.transactions += 1
            with real_atomic():
                yield

        monkeypatch.setattr(models_db, "_atomic", counting_atomic)
        try:
            with _peewee_log(_Statements(counts)):
                yield counts
        finally:
            monkeypatch.setattr(models_db, "_atomic", real_atomic)

    return measure


def _assert_one_unit(counts: Counts) -> None:
    assert (counts.transactions, counts.account_locks) == (1, 1), counts


def _seed(org_id: str, amount: int = 100 * DOLLAR) -> None:
    with accounts.locked_account(org_id) as account:
        ledger.grant(account, amount, "top_up", reason="seed", idempotency_ref=f"seed:{org_id}")


class _EventsAsSent:
    """A gateway whose signature check passes the event through (the webhook's own rules are
    what is counted, not Stripe's signature)."""

    local = False

    def verify_event(self, payload: bytes, signature: str) -> dict[str, Any]:
        return dict(json.loads(payload))


def _deliver(event_type: str, obj: dict[str, Any]) -> webhooks.WebhookResult:
    body, signature = ev.signed(event_type, obj)
    return webhooks.receive(body, signature, _EventsAsSent())  # type: ignore[arg-type]


# --- metering and reservations --------------------------------------------------------------


def test_a_usage_record_is_one_unit(org, counted):
    _seed(org.id)
    with counted() as counts:
        metering.record_usage(org.id, "api_call", 2, 100, "ref-1")
    _assert_one_unit(counts)


def test_a_batch_over_three_organizations_is_one_unit_with_one_lock_statement(org, counted):
    others = [create_organization(f"uow-{i}").id for i in range(2)]
    for org_id in (org.id, *others):
        _seed(org_id)
    events = [metering.usage_event(o, "api_call", 1, 100, f"r-{o}") for o in (org.id, *others)]
    with counted() as counts:
        outcomes = metering.record_usage_batch(events)
    assert [o.status for o in outcomes] == [metering.EventStatus.recorded] * 3
    _assert_one_unit(counts)


def test_reserve_finalize_and_release_are_one_unit_each(org, counted):
    _seed(org.id)
    with counted() as reserving:
        held = ledger.reserve(org.id, 5 * DOLLAR, reference_id="job-1")
    with counted() as finalizing:
        ledger.finalize_reservation(org.id, held.reservation.id, 3 * DOLLAR)
    other = ledger.reserve(org.id, DOLLAR, reference_id="job-2")
    with counted() as releasing:
        ledger.release_reservation(org.id, other.reservation.id)
    for counts in (reserving, finalizing, releasing):
        _assert_one_unit(counts)


@contextmanager
def _statements_sent() -> Iterator[list[str]]:
    """The SQL texts Peewee sends inside the block (a PostgreSQL transaction's first statement
    without the BEGIN it carries)."""
    texts: list[str] = []

    class Recording(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if isinstance(record.msg, tuple):
                texts.append(record.msg[0].removeprefix("BEGIN;"))

    with _peewee_log(Recording(logging.DEBUG)):
        yield texts


@contextmanager
def _peewee_log(handler: logging.Handler) -> Iterator[None]:
    """`handler` receives Peewee's query log (every statement it sends) inside the block."""
    logger = logging.getLogger("peewee")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_several_accounts_are_locked_in_one_statement_ordered_by_organization_id(org):
    """Concurrent batches over overlapping organizations cannot deadlock because each locks
    its accounts in the same order: the lock statement sorts by organization id, and
    PostgreSQL's FOR UPDATE locks the rows in the order the sort returns them. No run can show
    a deadlock here (PostgreSQL happens to return an IN-list's rows in id order, and SQLite
    has one writer lock), so the statement itself is checked: without its ORDER BY the rows
    would be locked in whatever order the plan returns them."""
    ids = {org.id, *(create_organization(f"lock-order-{i}").id for i in range(3))}
    with _statements_sent() as texts, accounts.locked_accounts(ids) as locked:
        order = list(locked)
    table = f'"{BillingAccount._meta.table_name}"'
    locks = [t for t in texts if table in t and " IN (" in t]
    assert len(locks) == 1, texts
    ordering = re.search(r"\bORDER BY (.*?)(?: FOR UPDATE)?$", locks[0])
    assert ordering is not None, locks[0]
    organization_id = BillingAccount.organization.column_name
    assert re.fullmatch(rf'"t\d+"\."{organization_id}"(?: ASC)?', ordering[1]), ordering[1]
    assert locks[0].endswith(" FOR UPDATE") == is_postgres()
    assert order == sorted(ids)


# --- operators and settings -----------------------------------------------------------------


@pytest.mark.parametrize("amount", [5 * DOLLAR, -5 * DOLLAR])
def test_an_operator_adjustment_is_one_unit(org, counted, amount):
    _seed(org.id)
    with counted() as counts:
        operators.adjust_credits(org.id, amount=amount, reason="goodwill", idempotency_key="k1")
    _assert_one_unit(counts)
    assert_ledger_invariants(org.id)


def test_suspending_and_a_settings_change_are_one_unit_each(org, counted):
    with counted() as suspending:
        operators.suspend(org.id, "fraud review")
    with counted() as updating:
        accounts.update_settings(org.id, {"usage_cap": 10 * DOLLAR})
    _assert_one_unit(suspending)
    _assert_one_unit(updating)


# --- subscriptions and checkout -------------------------------------------------------------


def test_plan_activation_with_its_welcome_credit_is_one_unit(org, counted):
    """Local activation: the card, the subscription state, the welcome credit and the
    auto-recharge reconsideration, in one transaction under one lock."""
    with counted() as counts:
        local_billing.activate_plan(org.id, "pro")
    _assert_one_unit(counts)
    account = assert_ledger_invariants(org.id)
    assert account.subscription_status == "active"
    assert account.welcome_credit_granted_at is not None
    assert account.credits_balance == 20 * DOLLAR  # the pro plan's welcome credit, once


def test_a_paid_invoice_with_its_welcome_credit_is_one_unit(org, counted):
    ev.link_customer(org.id)
    _deliver("customer.subscription.created", ev.subscription(org.id))
    with counted() as counts:
        _deliver("invoice.paid", ev.invoice(org.id, inv="in_1", pi="pi_inv_1"))
    _assert_one_unit(counts)
    account = assert_ledger_invariants(org.id)
    assert account.welcome_credit_granted_at is not None
    assert account.credits_balance == 20 * DOLLAR


def test_a_top_up_checkout_completion_is_one_unit(org, counted):
    ev.link_customer(org.id)
    with counted() as by_webhook:
        _deliver(
            "checkout.session.completed",
            ev.top_up_session(org.id, cents=1000, amount_decimillicents=10 * DOLLAR),
        )
    CheckoutSession.create(
        id=f"cs_local_{uuid.uuid4().hex}",
        organization=org.id,
        kind="top_up",
        amount=5 * DOLLAR,
        url="http://local/checkout",
    )
    with counted() as locally:
        checkout.complete_local_checkout(org.id)
    _assert_one_unit(by_webhook)
    _assert_one_unit(locally)
    assert assert_ledger_invariants(org.id).credits_balance == 15 * DOLLAR


# --- auto-recharge, refunds and disputes ----------------------------------------------------


class _SucceedingGateway:
    local = False

    def charge_off_session(
        self, organization_id: str, customer: str, method: str, amount: int, attempt_id: str
    ) -> ChargeOutcome:
        return ChargeOutcome("succeeded", f"pi_{attempt_id.replace('-', '')[:20]}")


def _recharge_due(org_id: str) -> None:
    auto_recharge_on(org_id, card="pm_uow", stripe_customer_id="cus_uow")
    with accounts.locked_account(org_id) as account:
        ledger.debit(account, DOLLAR)  # below the threshold: a request is written
    assert AutoRechargeRequest.select().count() == 1


def test_an_auto_recharge_settlement_by_the_worker_locks_the_account_once(org, counted):
    """The worker's outcome (grant, attempt settled, in-flight slot freed, failures reset) is
    one unit; its claim of the request is the queue's own short transaction, without the
    account lock."""
    _seed(org.id, 2 * DOLLAR)
    _recharge_due(org.id)
    with counted() as counts:
        status = auto_recharge.process_one(_SucceedingGateway(), get_settings())  # type: ignore[arg-type]
    assert status == "succeeded"
    assert (counts.transactions, counts.account_locks) == (2, 1), counts
    account = assert_ledger_invariants(org.id)
    assert account.credits_balance == 21 * DOLLAR and account.auto_recharge_in_flight_id is None


def test_an_auto_recharge_settlement_by_webhook_is_one_unit(org, counted):
    _seed(org.id, 2 * DOLLAR)
    _recharge_due(org.id)
    attempt = AutoRechargeRequest.get()
    intent = {
        "id": "pi_uow_recharge",
        "object": "payment_intent",
        "amount": 2000,
        "amount_received": 2000,
        "currency": "usd",
        "status": "succeeded",
        "payment_method": "pm_uow_new",
        "metadata": {"organization_id": org.id, "kind": "auto_recharge", "attempt_id": attempt.id},
    }
    with counted() as counts:
        _deliver("payment_intent.succeeded", intent)
    _assert_one_unit(counts)
    assert AutoRechargeRequest.get_by_id(attempt.id).status == "succeeded"
    assert assert_ledger_invariants(org.id).credits_balance == 21 * DOLLAR


def test_a_refund_reversal_and_a_lost_dispute_are_one_unit_each(org, counted):
    ev.link_customer(org.id)
    _deliver(
        "checkout.session.completed",
        ev.top_up_session(org.id, cents=1000, amount_decimillicents=10 * DOLLAR),
    )
    with counted() as refunding:
        _deliver("charge.refunded", ev.charge(org.id, refunded_cents=400))
    _deliver("charge.dispute.created", ev.dispute(status="needs_response", amount=600))
    with counted() as losing:
        _deliver("charge.dispute.closed", ev.dispute(status="lost", amount=600))
    _assert_one_unit(refunding)
    _assert_one_unit(losing)
    assert assert_ledger_invariants(org.id).credits_balance == 0
    reversals = CreditEntry.select().where(CreditEntry.entry_type.in_(["refund", "dispute"]))
    assert sorted(-e.amount for e in reversals) == [4 * DOLLAR, 6 * DOLLAR]


def test_the_counter_sees_a_nested_unit(org, counted):
    """The measure itself: a rule that opened its own unit inside the caller's would count."""
    with counted() as counts, accounts.locked_account(org.id), accounts.locked_account(org.id):
        pass
    assert (counts.transactions, counts.account_locks) == (2, 2), counts
