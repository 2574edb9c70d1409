"""Versioned migrations: `models/migrations/NNNN_name.sql`, applied in order, once each.

The same files run on SQLite and PostgreSQL; the dialect differences are written as tokens:
`{pk}` (the auto-increment primary key) and `{uuid}` (an expression making a random version-4
UUID string, for backfills). Each file runs in one transaction together with its row in
`schema_migrations`, so a failed migration leaves nothing behind. On PostgreSQL an advisory lock
makes concurrent runners (several instances starting at once) take turns; on SQLite the
writer lock does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import peewee

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_ADVISORY_LOCK_ID = 0x6B11_1A9E
_PK = {
    "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "postgres": "BIGSERIAL PRIMARY KEY",
}
_UUID = {
    # SQLite has no UUID function: assemble a version-4 (variant 10xx) UUID from random bytes.
    "sqlite": (
        "lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' || "
        "substr(hex(randomblob(2)), 2) || '-' || substr('89ab', 1 + (abs(random()) % 4), 1) || "
        "substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6)))"
    ),
    "postgres": "gen_random_uuid()::text",
}


def available_migrations() -> list[tuple[str, Path]]:
    files = sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    return [(f.stem, f) for f in files]


def _statements(sql: str, dialect: str) -> list[str]:
    sql = re.sub(r"--[^\n]*", "", sql).replace("{pk}", _PK[dialect])
    sql = sql.replace("{uuid}", _UUID[dialect])
    return [s.strip() for s in sql.split(";") if s.strip()]


def applied_migrations(db: peewee.Database) -> set[str]:
    if not db.table_exists("schema_migrations"):
        return set()
    return {row[0] for row in db.execute_sql("SELECT version FROM schema_migrations")}


@contextmanager
def _migration_transaction(db: peewee.Database) -> Iterator[None]:
    """A transaction that no other migrator runs beside: PostgreSQL takes the advisory lock
    first thing; SQLite begins IMMEDIATE (a deferred one would deadlock upgrading its read
    lock against another runner and fail with "database is locked")."""
    if isinstance(db, peewee.PostgresqlDatabase):
        with db.atomic():
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_ADVISORY_LOCK_ID,))
            yield
    else:
        with db.atomic(lock_type="IMMEDIATE"):
            yield


def migrate(db: peewee.Database) -> list[str]:
    """Apply every pending migration; return the versions applied now."""
    dialect = "postgres" if isinstance(db, peewee.PostgresqlDatabase) else "sqlite"
    applied_now: list[str] = []
    with db.connection_context():
        with _migration_transaction(db):
            db.execute_sql(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version VARCHAR(100) PRIMARY KEY, applied_at TIMESTAMP NOT NULL "
                "DEFAULT CURRENT_TIMESTAMP)"
            )
        for version, path in available_migrations():
            with _migration_transaction(db):
                if version in applied_migrations(db):
                    continue
                for statement in _statements(path.read_text(), dialect):
                    db.execute_sql(statement)
                db.execute_sql(
                    f"INSERT INTO schema_migrations (version) VALUES ({db.param})", (version,)
                )
                applied_now.append(version)
    return applied_now
