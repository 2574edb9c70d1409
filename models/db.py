"""The database binding: SQLite by default, PostgreSQL when DATABASE_URL says so.

Every model binds to `database`, a proxy initialised once per process by `connect_database`.
Gunicorn workers each get their own pool (the proxy is initialised after fork in the app factory).
Writes that touch an organization's money go through `write_transaction`: on PostgreSQL the
caller then locks the account row (SELECT ... FOR UPDATE); on SQLite the transaction starts
with BEGIN IMMEDIATE, which takes the database's single writer lock up front, so concurrent
writers queue instead of failing or losing updates.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlparse

import peewee
from playhouse.pool import PooledPostgresqlDatabase

database = peewee.DatabaseProxy()

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "busy_timeout": 30_000,
    "foreign_keys": 1,
    "synchronous": "normal",
}


def make_database(url: str, pool_size: int = 10) -> peewee.Database:
    """Build (not open) the database object that `url` names."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if path != ":memory:":
            folder = os.path.dirname(path)
            if folder:
                os.makedirs(folder, exist_ok=True)
        return peewee.SqliteDatabase(path, pragmas=SQLITE_PRAGMAS, timeout=30)
    parsed = urlparse(url)
    if parsed.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"unsupported database URL scheme: {parsed.scheme!r}")
    return PooledPostgresqlDatabase(
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


# SQLite writers of this process queue here before BEGIN IMMEDIATE: a thread that finds the
# writer lock taken would otherwise poll in SQLite's busy handler, which sleeps for milliseconds
# at a time (a tenth of the throughput with 8 threads). Other processes still meet busy_timeout.
_sqlite_writer = threading.Lock()


@contextmanager
def write_transaction() -> Iterator[None]:
    """A transaction that may move money: serialized on SQLite, row-locked by callers on PG."""
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
