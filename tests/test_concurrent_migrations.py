"""Several instances starting at once each run `scripts.migrate`: every migration applies
exactly once and every runner succeeds (PostgreSQL takes turns on an advisory lock; SQLite's
writer lock serializes the DDL)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import pytest

from models.db import make_database
from models.migrate import available_migrations

ROOT = Path(__file__).resolve().parents[1]
RUNNERS = 4


@pytest.fixture
def fresh_database_url(tmp_path):
    """An empty database of the kind the suite runs on, dropped afterwards."""
    base = os.environ.get("TEST_DATABASE_URL")
    if not base:
        yield f"sqlite:///{tmp_path}/migrations.sqlite3"
        return
    name = f"migrations_{uuid.uuid4().hex[:12]}"
    admin = make_database(base)
    admin.connect()
    admin.execute_sql(f"CREATE DATABASE {name}")
    admin.close()
    yield urlunparse(urlparse(base)._replace(path=f"/{name}"))
    admin.connect()
    admin.execute_sql(f"DROP DATABASE IF EXISTS {name}")
    admin.close()


# Each runner imports everything first, then waits for the starting gun, so the migrations
# really overlap instead of running one after another as the processes happen to start.
RUNNER = """
import sys, time
from pathlib import Path
from scripts import migrate
gun = Path(sys.argv[1])
while not gun.exists():
    time.sleep(0.001)
sys.exit(migrate.main())
"""


def test_concurrent_migrate_runs_apply_each_version_once(fresh_database_url, tmp_path):
    env = {**os.environ, "DATABASE_URL": fresh_database_url}
    gun = tmp_path / "go"
    runners = [
        subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(gun)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(RUNNERS)
    ]
    time.sleep(3)  # let every runner finish importing (a start-up wait, not a measurement)
    gun.touch()
    outputs = [(runner.wait(timeout=120), runner.stdout.read()) for runner in runners]
    assert [code for code, _ in outputs] == [0] * RUNNERS, outputs
    # Each version was applied by exactly one runner; the others found nothing pending.
    applied_by = [out for _, out in outputs if "none pending" not in out]
    versions = [v for v, _ in available_migrations()]
    reported = [v for out in applied_by for v in versions if v in out]
    assert sorted(reported) == sorted(versions), outputs
    db = make_database(fresh_database_url)
    with db.connection_context():
        rows = [r[0] for r in db.execute_sql("SELECT version FROM schema_migrations")]
        assert sorted(rows) == sorted(versions)
