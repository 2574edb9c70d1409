"""Taking a pooled PostgreSQL connection costs no round trip, and still never hands out one the
server has ended (models.db._PostgresqlDatabase._is_closed).

What the server saw is read from the server (`pg_stat_activity`, over a connection of its own),
so a ping sent by any layer, Peewee's pool included, would show.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import peewee
import psycopg2
import pytest

from models import connection, database, write_transaction

pytestmark = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL", "").startswith("postgres"),
    reason="SQLite connections are per thread, not pooled",
)


@pytest.fixture
def observer(db) -> Iterator[psycopg2.extensions.connection]:
    """A connection outside the pool, to ask the server what the pool's connections did."""
    watcher = psycopg2.connect(os.environ["TEST_DATABASE_URL"])
    watcher.autocommit = True
    database.obj.close_all()  # one pooled connection from here on: the one the test makes
    try:
        yield watcher
    finally:
        watcher.close()


def _last_statement(watcher: psycopg2.extensions.connection, pid: int) -> str:
    with watcher.cursor() as cursor:
        cursor.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,))
        row = cursor.fetchone()
    assert row is not None, f"backend {pid} is gone"
    return str(row[0])


def _backend_pid() -> int:
    return int(database.connection().get_backend_pid())


def test_taking_an_idle_connection_from_the_pool_sends_nothing(observer):
    with connection():
        first = _backend_pid()
        database.execute_sql("SELECT 'the last statement before going back to the pool'")
    with connection():
        again = _backend_pid()
        seen = _last_statement(observer, again)
    assert again == first  # the same pooled connection, taken a second time
    assert seen == "SELECT 'the last statement before going back to the pool'"


def test_a_connection_the_server_ended_is_replaced_not_handed_out(observer):
    with connection():
        ended = database.connection()
        pid = _backend_pid()
    _end_backend(observer, pid)
    with connection():
        assert database.execute_sql("SELECT 41 + 1").fetchone() == (42,)
        assert _backend_pid() != pid
    assert ended.closed  # its socket was closed, not just dropped from the pool


def _end_backend(watcher: psycopg2.extensions.connection, pid: int) -> None:
    """The server ends the backend `pid` (as a restart or an operator would) and it is gone."""
    with watcher.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            if cursor.fetchone() == (0,):
                return
            time.sleep(0.02)
    raise AssertionError(f"backend {pid} did not end")


def test_a_select_on_a_connection_found_dead_runs_on_a_fresh_one(observer):
    with connection():
        pid = _backend_pid()
        _end_backend(observer, pid)
        assert database.execute_sql("SELECT 6 * 7").fetchone() == (42,)
        assert _backend_pid() != pid


def test_a_transaction_whose_first_statement_finds_the_connection_dead_runs_on_a_fresh_one(
    observer,
):
    with connection():
        pid = _backend_pid()
        _end_backend(observer, pid)
        with write_transaction():
            database.execute_sql("INSERT INTO pool_scratch (note) VALUES ('first statement')")
        assert _backend_pid() != pid
    # ... and it is still a transaction there: what it wrote goes with its rollback
    with connection(), pytest.raises(RuntimeError):
        _end_backend(observer, _backend_pid())
        with write_transaction():
            database.execute_sql("INSERT INTO pool_scratch (note) VALUES ('rolled back')")
            raise RuntimeError("the use case fails after its first statement")
    assert _scratch(observer) == ["first statement"]


def test_a_write_that_may_have_applied_is_not_repeated(observer):
    """Outside a transaction a write commits as it runs: on a dead connection it fails (it
    might have applied before the connection died), it is never sent again. Nor is a
    transaction's later statement: what came before it in the transaction is gone."""
    with connection():
        _end_backend(observer, _backend_pid())
        with pytest.raises((peewee.OperationalError, peewee.InterfaceError)):
            database.execute_sql("INSERT INTO pool_scratch (note) VALUES ('autocommit')")
    refused = pytest.raises((peewee.OperationalError, peewee.InterfaceError))
    with connection(), refused, write_transaction():
        database.execute_sql("INSERT INTO pool_scratch (note) VALUES ('in a transaction')")
        _end_backend(observer, _backend_pid())
        database.execute_sql("INSERT INTO pool_scratch (note) VALUES ('its second')")
    assert _scratch(observer) == []


def _scratch(watcher: psycopg2.extensions.connection) -> list[str]:
    with watcher.cursor() as cursor:
        cursor.execute("SELECT note FROM pool_scratch ORDER BY id")
        return [row[0] for row in cursor.fetchall()]


@pytest.fixture(autouse=True)
def pool_scratch(observer) -> Iterator[None]:
    with observer.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS pool_scratch (id serial, note text)")
        cursor.execute("TRUNCATE pool_scratch")
    yield
    with observer.cursor() as cursor:
        cursor.execute("DROP TABLE pool_scratch")
