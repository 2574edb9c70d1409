"""Concurrent debits against one organization: no lost update, no overdraft.

1,000 debits from 16 threads, each thread with its own connection, against an organization
holding exactly enough credit for 600 of them. Runs on whichever database the suite uses
(row locks on PostgreSQL, the writer lock on SQLite).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from billing import ledger, metering
from billing.accounts import locked_account
from billing.errors import PaymentRequired
from models import CreditEntry, UsageRecord, database
from tests.ledger_checks import assert_ledger_invariants

THREADS = 16
DEBITS = 1_000
AMOUNT = 7_000
AFFORDABLE = 600


def _run_concurrently(org_id: str, operation) -> tuple[int, int]:
    barrier = threading.Barrier(THREADS)

    def worker(indexes: range) -> tuple[int, int]:
        ok = refused = 0
        with database.connection_context():
            barrier.wait(timeout=60)
            for i in indexes:
                try:
                    operation(org_id, i)
                    ok += 1
                except PaymentRequired:
                    refused += 1
        return ok, refused

    chunks = [range(t, DEBITS, THREADS) for t in range(THREADS)]
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(worker, chunks))
    return sum(r[0] for r in results), sum(r[1] for r in results)


def test_concurrent_debits_never_overdraw_or_lose_updates(org):
    with database.connection_context(), locked_account(org.id) as account:
        ledger.grant(account, AMOUNT * AFFORDABLE, "top_up", reason="seed")

    def debit(organization_id: str, i: int) -> None:
        with locked_account(organization_id) as account:
            ledger.debit(account, AMOUNT, reason=str(i))

    ok, refused = _run_concurrently(org.id, debit)
    assert ok == AFFORDABLE
    assert refused == DEBITS - AFFORDABLE
    with database.connection_context():
        account = assert_ledger_invariants(org.id)
        assert account.credits_balance == 0
        assert CreditEntry.select().where(CreditEntry.amount < 0).count() == AFFORDABLE


def test_concurrent_usage_with_duplicate_references_charges_each_once(org):
    """Every reference is sent twice, from different threads: each is charged once."""
    with database.connection_context(), locked_account(org.id) as account:
        ledger.grant(account, AMOUNT * AFFORDABLE, "top_up", reason="seed")

    def record(o: str, i: int) -> None:
        metering.record_usage(o, "api_call", 1, AMOUNT, f"ref-{i // 2}")

    ok, refused = _run_concurrently(org.id, record)
    with database.connection_context():
        records = UsageRecord.select().count()
        assert records == DEBITS // 2  # 500 distinct references, all affordable
        account = assert_ledger_invariants(org.id)
        assert account.credits_balance == AMOUNT * (AFFORDABLE - records)
    assert ok == DEBITS and refused == 0
