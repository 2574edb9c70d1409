"""The database binding: SQLite by default, PostgreSQL when DATABASE_URL says so.

Every model binds to `database`, a proxy initialised once per process by `connect_database`.
Gunicorn workers each get their own pool (the proxy is initialised after fork in the app factory).
Writes that touch an organization's money go through `write_transaction`, opened once per use
case by its unit of work (`billing.accounts.locked_account`), which then locks the account row
(SELECT ... FOR UPDATE on PostgreSQL); on SQLite the transaction starts with BEGIN IMMEDIATE,
which takes the database's single writer lock up front, so concurrent writers queue instead of
failing or losing updates.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import select
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlparse

import peewee
import psycopg2.extensions
from playhouse.pool import PooledPostgresqlDatabase

database = peewee.DatabaseProxy()

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "busy_timeout": 30_000,
    "foreign_keys": 1,
    "synchronous": "normal",
}


class _SqliteDatabase(peewee.SqliteDatabase):
    """SQLite whose connection set-up survives other processes starting at the same moment.

    Switching a new file to WAL needs the database to itself, and SQLite answers "database is
    locked" at once, without its busy handler, when another connection is doing the same (the
    first start of several instances). The switch is retried briefly; after it, it is a no-op.
    """

    def _set_pragmas(self, conn: Any) -> None:
        for attempt in range(50):
            try:
                super()._set_pragmas(conn)  # type: ignore[misc]
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.05 + random.random() * 0.05)


class _BeginFirstCursor(psycopg2.extensions.cursor):
    """A cursor that sends its transaction's pending BEGIN in front of its statement.

    Every statement Peewee (or code using `database.cursor()`) runs goes through one of these,
    so the BEGIN cannot be skipped by a statement issued by hand, and the query log shows each
    statement as it was issued.
    """

    database: _PostgresqlDatabase

    def execute(self, query: Any, vars: Any = None) -> None:
        if not self.database._take_pending_begin():
            super().execute(query, vars)
        elif not isinstance(query, str):  # psycopg2.sql.Composable, bytes: BEGIN on its own
            super().execute("BEGIN")
            super().execute(query, vars)
        else:
            try:
                super().execute("BEGIN;" + query, vars)
            except BaseException:
                if self.connection.get_transaction_status() != _IDLE:
                    raise
                # BEGIN never ran: the driver refused the statement before sending it, or the
                # server rejected the message's syntax as a whole. Do what a BEGIN of its own
                # would have done, then fail the statement inside it, as it fails there.
                super().execute("BEGIN")
                super().execute(query, vars)

    def executemany(self, query: Any, vars_list: Any) -> None:
        if self.database._take_pending_begin():
            super().execute("BEGIN")
        super().executemany(query, vars_list)


_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE


class _PostgresqlDatabase(PooledPostgresqlDatabase):
    """PostgreSQL whose BEGIN travels with its transaction's first statement.

    Peewee sends BEGIN as a round trip of its own, so a use case cost BEGIN, the account lock,
    the write and COMMIT. Sent in front of the first statement instead ("BEGIN;SELECT ... FOR
    UPDATE", one simple-query message that PostgreSQL runs in order), it costs one lock, one
    write and the commit. A transaction that runs no statement sends neither BEGIN nor COMMIT.

    The pending BEGIN belongs to one connection's open transaction: the commit or rollback that
    ends it, or giving the connection back, drops it; it is only ever sent on the connection it
    was opened on. A statement that fails before BEGIN ran still leaves its transaction open,
    as a BEGIN of its own would have (`_BeginFirstCursor`).
    """

    def begin(self, isolation_level: Any = None) -> None:
        if self.is_closed() or isolation_level is not None or self._isolation_level:
            super().begin(isolation_level)
            return
        self._state.begin_pending = self._state.conn

    def _begin_is_pending(self) -> bool:
        """This thread's open transaction has not sent its BEGIN yet (on this connection)."""
        pending = getattr(self._state, "begin_pending", None)
        return pending is not None and pending is self._state.conn

    def _take_pending_begin(self) -> bool:
        pending = self._begin_is_pending()
        self._state.begin_pending = None
        return pending

    def cursor(self, named_cursor: Any = None) -> Any:
        if self.is_closed():  # Peewee connects (or refuses); nothing can be pending yet
            return super().cursor(named_cursor)
        cursor = self._state.conn.cursor(cursor_factory=_BeginFirstCursor)
        cursor.database = self
        return cursor

    def commit(self) -> None:
        if not self._take_pending_begin():
            super().commit()

    def rollback(self) -> None:
        if not self._take_pending_begin():
            super().rollback()

    def close(self) -> bool:
        closed = bool(super().close())  # refuses inside an open transaction, flag and all
        self._state.begin_pending = None
        return closed

    def _is_closed(self, conn: Any) -> bool:
        """The pool's check of an idle connection it is about to hand out: no round trip.

        Peewee's own check sends `SELECT 1` on every checkout, inside the pool's lock: one
        more round trip per request, and every thread's checkout queued behind it. Here a
        readable socket says the server ended the connection (its error message, then EOF, are
        waiting): it is closed and replaced. One the server ended a moment ago, before its end
        reached the socket, is found by its first statement instead, which `_execute_cursor`
        repeats on a fresh connection where that is safe.
        """
        if conn.closed:
            return True
        if conn.get_transaction_status() != _IDLE:
            # Check-in rolled back what was open; a connection that is still not idle cannot
            # be trusted (psycopg2's rollback() is a no-op in the autocommit mode Peewee uses).
            self._close_raw(conn)
            return True
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        if not poller.poll(0):
            return False
        self._close_raw(conn)  # the pool only drops it; close the socket too
        return True

    def _execute_cursor(self, sql: Any, params: Any, **cursor_options: Any) -> Any:
        """Run a statement; if the connection turns out dead (the server ended it while it sat
        in the pool) and repeating cannot apply anything twice, repeat it on a fresh one.

        Safe to repeat: a transaction's first statement (it travels with its BEGIN, so nothing
        of the transaction can have been committed) and a SELECT outside a transaction. Any
        other statement on a dead connection fails as it did.
        """
        opens_transaction = self._begin_is_pending()
        repeatable = opens_transaction or (not self.in_transaction() and _is_select(sql))
        for attempt in range(_DEAD_CONNECTION_RETRIES + 1):
            try:
                return super()._execute_cursor(sql, params, **cursor_options)
            except (peewee.OperationalError, peewee.InterfaceError):
                dead = self._state.conn
                retry = repeatable and attempt < _DEAD_CONNECTION_RETRIES
                if not retry or dead is None or not dead.closed:
                    raise
                self._replace_dead_connection(dead, begin=opens_transaction)
        raise AssertionError("unreachable")

    def _replace_dead_connection(self, dead: Any, *, begin: bool) -> None:
        """Give the dead connection up and put a fresh one from the pool in its place, under
        the same open contexts (and the same pending BEGIN, if the transaction had one)."""
        self._close(dead, close_conn=True)
        fresh = self._connect()
        self._initialize_connection(fresh)
        self._state.conn = fresh
        self._state.closed = False
        self._state.begin_pending = fresh if begin else None
        log.warning("a pooled PostgreSQL connection was dead; the statement ran on a fresh one")


# A connection the server ended shows on its first statement; the pool may hold more such
# (they all ended at once), so the repeat takes the next, up to this many times.
_DEAD_CONNECTION_RETRIES = 3


def _is_select(sql: Any) -> bool:
    """A plain SELECT (a psycopg2 Composable or bytes is not read, so not repeated)."""
    return isinstance(sql, str) and sql.lstrip()[:6].upper() == "SELECT"


def make_database(url: str, pool_size: int = 10) -> peewee.Database:
    """Build (not open) the database object that `url` names."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if path != ":memory:":
            folder = os.path.dirname(path)
            if folder:
                os.makedirs(folder, exist_ok=True)
        return _SqliteDatabase(path, pragmas=SQLITE_PRAGMAS, timeout=30)
    parsed = urlparse(url)
    if parsed.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"unsupported database URL scheme: {parsed.scheme!r}")
    return _PostgresqlDatabase(
        (parsed.path or "/").lstrip("/") or "postgres",
        user=parsed.username,
        password=parsed.password,
        host=parsed.hostname or "127.0.0.1",
        port=parsed.port or 5432,
        max_connections=pool_size,
        stale_timeout=300,
        timeout=30,
        connect_timeout=5,
        autorollback=True,
    )


def connect_database(url: str, pool_size: int = 10) -> peewee.Database:
    """Point the proxy at the database `url` names and return it."""
    db = make_database(url, pool_size)
    database.initialize(db)
    return db


@contextmanager
def using_database(url: str) -> Iterator[peewee.Database]:
    """Point the models at another database for a block, then back (for scripts run
    in-process, such as the soak check, that must not leave the proxy moved)."""
    previous = database.obj
    db = make_database(url)
    database.initialize(db)
    try:
        with db.connection_context():
            yield db
    finally:
        if isinstance(db, PooledPostgresqlDatabase):
            db.close_all()
        database.initialize(previous)


def is_postgres() -> bool:
    return isinstance(database.obj, peewee.PostgresqlDatabase)


SelectT = TypeVar("SelectT", bound="peewee.ModelSelect[Any]")


def locked(query: SelectT, **options: bool) -> SelectT:
    """`query` with SELECT ... FOR UPDATE on PostgreSQL (SQLite's writer lock covers it)."""
    return query.for_update(**options) if is_postgres() else query


_rollback_hooks: contextvars.ContextVar[list[Callable[[], None]] | None] = contextvars.ContextVar(
    "rollback_hooks", default=None
)
log = logging.getLogger("models.db")


def after_rollback(hook: Callable[[], None]) -> None:
    """Run `hook` once the outermost `write_transaction` has rolled back, outside it.

    For work a refusal must cause although the refusal undoes its transaction (a debit
    refused for lack of credit still requests an auto-recharge, in a short transaction of
    its own). Outside a write transaction there is nothing to roll back: it runs at once.
    """
    hooks = _rollback_hooks.get()
    if hooks is None:
        hook()
    else:
        hooks.append(hook)


# SQLite writers of this process queue here before BEGIN IMMEDIATE: a thread that finds the
# writer lock taken would otherwise poll in SQLite's busy handler, which sleeps for milliseconds
# at a time (a tenth of the throughput with 8 threads). Other processes still meet busy_timeout.
_sqlite_writer = threading.Lock()


@contextmanager
def write_transaction() -> Iterator[None]:
    """A transaction that may move money: serialized on SQLite, row-locked by callers on PG."""
    outermost = _rollback_hooks.get() is None
    token = _rollback_hooks.set([]) if outermost else None
    try:
        with _atomic():
            yield
    except BaseException:
        if token is not None:
            hooks = _rollback_hooks.get() or []
            _rollback_hooks.reset(token)
            token = None
            for hook in hooks:
                hook()
        raise
    finally:
        if token is not None:
            _rollback_hooks.reset(token)


@contextmanager
def _atomic() -> Iterator[None]:
    db = database.obj
    if isinstance(db, peewee.SqliteDatabase) and not db.in_transaction():
        with _sqlite_writer, db.atomic(lock_type="IMMEDIATE"):
            yield
    else:
        with db.atomic():
            yield


@contextmanager
def connection() -> Iterator[None]:
    """Hold one connection for a unit of work and give it back (to the pool) afterwards.

    SQLite connections are per thread and cheap to keep: a worker thread keeps its own open
    instead of reopening the file (and re-running the pragmas) on every request.
    """
    db = database.obj
    if isinstance(db, peewee.SqliteDatabase):
        db.connect(reuse_if_open=True)
        yield
        return
    if db.is_closed():
        db.connect()
        try:
            yield
        finally:
            db.close()
    else:
        yield


@contextmanager
def connection_released() -> Iterator[None]:
    """Give this thread's pooled connection back while it waits on the network (a Stripe
    call), then take one again: requests stuck on a hanging Stripe must not hold every
    connection of the pool and starve the debits of every organization.

    Only between transactions (inside one, the connection holds its state and locks); a no-op
    on SQLite, whose connections are per thread and not pooled.
    """
    db = database.obj
    if not isinstance(db, PooledPostgresqlDatabase) or db.is_closed() or db.in_transaction():
        yield
        return
    # close() forgets the open connection contexts (peewee keeps them per connection state);
    # they are put back so that their exits still find them.
    contexts = list(db._state.ctx)
    db.close()
    try:
        yield
    finally:
        db.connect(reuse_if_open=True)
        db._state.ctx.extend(contexts)
