"""Migration 0006 gives every existing credit entry its own UUID, on SQLite and PostgreSQL.

The earlier migrations run on a scratch database (a fresh SQLite file, or a scratch schema of
TEST_DATABASE_URL on PostgreSQL), rows are written the way the old code wrote them, then 0006
runs and every row must have a distinct version-4 UUID under a unique index.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import peewee
import pytest

from models.db import make_database
from models.migrate import _statements, available_migrations

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
TARGET = "0006_public_ids_and_operators"
ROWS = 300


@pytest.fixture
def scratch(tmp_path) -> Iterator[tuple[peewee.Database, str]]:
    url = os.environ.get("TEST_DATABASE_URL", "")
    if url.startswith("postgres"):
        db = make_database(url)
        db.connect()
        db.execute_sql("DROP SCHEMA IF EXISTS backfill_scratch CASCADE")
        db.execute_sql("CREATE SCHEMA backfill_scratch")
        db.execute_sql("SET search_path TO backfill_scratch")
        yield db, "postgres"
        db.execute_sql("SET search_path TO public")
        db.execute_sql("DROP SCHEMA backfill_scratch CASCADE")
        db.close()
    else:
        db = peewee.SqliteDatabase(str(tmp_path / "scratch.sqlite3"))
        db.connect()
        yield db, "sqlite"
        db.close()


def _run(db: peewee.Database, dialect: str, version: str) -> None:
    path = dict(available_migrations())[version]
    with db.atomic():
        for statement in _statements(path.read_text(), dialect):
            db.execute_sql(statement)


def test_backfill_gives_each_existing_entry_a_distinct_uuid(scratch):
    db, dialect = scratch
    versions = [v for v, _ in available_migrations()]
    assert TARGET in versions
    for version in versions[: versions.index(TARGET)]:
        _run(db, dialect, version)
    p = db.param
    db.execute_sql(
        f"INSERT INTO organizations (id, name, created_at) VALUES ({p}, {p}, CURRENT_TIMESTAMP)",
        ("00000000-0000-4000-8000-000000000001", "Old org"),
    )
    for i in range(ROWS):
        db.execute_sql(
            "INSERT INTO credit_entries (organization_id, entry_type, amount, reason, "
            f"balance_after, created_at) VALUES ({p}, 'adjustment', 1, NULL, {p}, "
            "CURRENT_TIMESTAMP)",
            ("00000000-0000-4000-8000-000000000001", i + 1),
        )
    _run(db, dialect, TARGET)
    ids = [row[0] for row in db.execute_sql("SELECT public_id FROM credit_entries")]
    assert len(ids) == ROWS
    assert all(isinstance(v, str) and UUID.match(v) for v in ids), ids[:3]
    assert len(set(ids)) == ROWS
    # The unique index holds: a duplicate is refused.
    with pytest.raises(peewee.IntegrityError), db.atomic():
        db.execute_sql(f"UPDATE credit_entries SET public_id = {p}", (ids[0],))
