"""Taking a pooled PostgreSQL connection costs no round trip, and still never hands out one the
server has ended (models.db._PostgresqlDatabase._is_closed).

What the server saw is read from the server (`pg_stat_activity`, over a connection of its own),
so a ping sent by any layer, Peewee's pool included, would show.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import psycopg2
import pytest

from models import connection, database

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
    with observer.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            if cursor.fetchone() == (0,):
                break
            time.sleep(0.02)
    with connection():
        assert database.execute_sql("SELECT 41 + 1").fetchone() == (42,)
        assert _backend_pid() != pid
    assert ended.closed  # its socket was closed, not just dropped from the pool
