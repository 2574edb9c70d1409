"""On PostgreSQL a unit of work costs one lock, one write and the commit: BEGIN travels with
the first statement (models.db._PostgresqlDatabase). What is sent is read at the driver, below
Peewee, so BEGIN and COMMIT are seen too. The pending BEGIN must never outlive its transaction:
a transaction that sends nothing leaves the connection idle, and a failure rolls back."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import peewee
import psycopg2.extensions
import pytest

from billing import ledger
from billing.accounts import locked_account
from billing.errors import PaymentRequired
from billing.organizations import create_organization
from models import CreditEntry, CreditEntryType, database, is_postgres, write_transaction
from models import db as models_db

pytestmark = [
    pytest.mark.usefixtures("conn"),
    pytest.mark.skipif(
        not os.environ.get("TEST_DATABASE_URL", "").startswith("postgres"),
        reason="SQLite has no BEGIN to merge (BEGIN IMMEDIATE takes its writer lock)",
    ),
]


@contextmanager
def sent() -> Iterator[list[str]]:
    """Every SQL text the database's cursors hand to the driver, in order (BEGIN included)."""
    texts: list[str] = []

    class Driver(psycopg2.extensions.cursor):
        def execute(self, query, vars=None):  # type: ignore[no-untyped-def]
            texts.append(query if isinstance(query, str) else repr(query))
            return super().execute(query, vars)

    class Recording(models_db._BeginFirstCursor, Driver):
        pass

    patch = pytest.MonkeyPatch()
    patch.setattr(models_db, "_BeginFirstCursor", Recording)
    try:
        yield texts
    finally:
        patch.undo()


def _funded() -> str:
    org = create_organization("Round trips")
    with locked_account(org.id) as account:
        ledger.grant(account, 1_000, CreditEntryType.adjustment, reason="seed")
    return org.id


def _status() -> int:
    return int(database.obj._state.conn.get_transaction_status())


def test_a_debit_is_one_lock_one_write_and_the_commit():
    assert is_postgres()
    org = _funded()
    with sent() as texts, locked_account(org) as account:
        ledger.debit(account, 10)
    assert len(texts) == 3
    assert texts[0].startswith("BEGIN;SELECT") and "FOR UPDATE" in texts[0]
    assert "INSERT INTO credit_entries" in texts[1]
    assert texts[2] == "COMMIT"
    assert _status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE


def test_a_transaction_that_sends_nothing_leaves_the_connection_idle():
    with sent() as texts:
        with write_transaction():
            pass
        assert texts == []
        with pytest.raises(RuntimeError), write_transaction():
            raise RuntimeError("before any statement")
        assert texts == []
    assert _status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE


def _committed_elsewhere(entry_id: int) -> bool:
    """Whether another connection sees the entry (i.e. it is committed, not in an open
    transaction of this one)."""
    import psycopg2

    other = psycopg2.connect(dbname=database.obj.database, **database.obj.connect_params)
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT 1 FROM credit_entries WHERE id = %s", (entry_id,))
            return cursor.fetchone() is not None
    finally:
        other.close()


@pytest.mark.parametrize(
    "abandon",
    [
        lambda: (_ for _ in ()).throw(RuntimeError("nothing sent")),
        lambda: database.execute_sql("SELECT no_such_column FROM billing_accounts"),
    ],
    ids=["before-any-statement", "first-statement-fails"],
)
def test_a_pending_begin_never_outlives_its_transaction(abandon: Callable[[], object]):
    """After a transaction ends without sending BEGIN (or fails on its first statement), the
    next statement outside any transaction is committed at once, not left in a transaction."""
    org = _funded()
    with pytest.raises((RuntimeError, peewee.ProgrammingError)), write_transaction():
        abandon()
    assert _status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    entry = CreditEntry.create(
        organization=org, entry_type="adjustment", amount=0, balance_after=1_000
    )
    assert _status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert _committed_elsewhere(entry.id)


def test_a_refused_debit_rolls_back_what_its_transaction_did():
    org = _funded()
    with sent() as texts, pytest.raises(PaymentRequired), locked_account(org) as account:
        ledger.debit(account, 400)
        ledger.debit(account, 700)  # 300 left: refused, the whole unit rolls back
    assert texts[0].startswith("BEGIN;SELECT")
    assert "ROLLBACK" in texts and "COMMIT" not in texts[: texts.index("ROLLBACK")]
    assert _status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert CreditEntry.select().where(CreditEntry.organization == org).count() == 1
