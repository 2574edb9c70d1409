"""A throwaway gunicorn server over a fresh database, for fuzzing, client tests and benches.

    with LocalServer() as server:
        server.base_url, server.organization_id, server.token, server.service_token

It seeds one organization with an owner (`token`) and credit, and serves in local billing mode
on a free loopback port. The database is a temporary SQLite file unless `database_url` is given.
The temporary directory (database, log) is removed on exit unless `keep_tmp` is set.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

_SEED = """
from billing import ledger
from billing.accounts import locked_account
from billing.auth import mint_user_token
from billing.config import get_settings
from billing.organizations import add_member, create_organization
from models import connect_database
from models.migrate import migrate
s = get_settings(); db = connect_database(s.database_url); migrate(db)
with db.connection_context():
    org = create_organization('Local server')
    add_member(org.id, 'local-owner', 'owner', 'owner@example.com')
    with locked_account(org.id) as account:
        ledger.grant(account, {credit}, 'adjustment', reason='seed')
print(org.id, mint_user_token('local-owner', s, None, 7200))
"""


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def postgres_database(name: str) -> str | None:
    """URL of a dedicated database on the local PostgreSQL (created if missing), or None
    when there is no PostgreSQL here. Scripts use their own database, never the tests'."""
    probe = subprocess.run(
        ["psql", PG_ADMIN, "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return None
    if probe.stdout.strip() != "1":
        subprocess.run(
            ["psql", PG_ADMIN, "-c", f"CREATE DATABASE {name}"], check=True, capture_output=True
        )
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalServer:
    def __init__(
        self,
        database_url: str | None = None,
        workers: int = 2,
        credit: int = 10**13,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.tmp = tempfile.mkdtemp(prefix="billing-server-")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.service_token = "local-service-token-0123456789"
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url or f"sqlite:///{self.tmp}/billing.sqlite3",
            "JWT_SECRET": "local-server-jwt-secret-long-enough-00000",
            "SERVICE_TOKEN": self.service_token,
            "BIND": f"127.0.0.1:{self.port}",
            "WEB_CONCURRENCY": str(workers),
            "BILLING_LOCAL_MODE": "true",
        }
        for name in ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET"):
            self.env.pop(name, None)
        self.env.update(extra_env or {})
        self.credit = credit
        self.organization_id = ""
        self.token = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[str] | None = None
        self.keep_tmp = False

    @property
    def log_path(self) -> str:
        return f"{self.tmp}/server.log"

    def __enter__(self) -> LocalServer:
        out = subprocess.check_output(
            [sys.executable, "-c", _SEED.format(credit=self.credit)],
            env=self.env,
            cwd=ROOT,
            text=True,
        )
        self.organization_id, self.token = out.split()
        self._log = open(self.log_path, "w")
        self._process = subprocess.Popen(
            [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "handlers.asgi:app"],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.base_url}/openapi.json", timeout=1)
                return self
            except OSError:
                if self._process.poll() is not None:
                    break
                time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the server did not start; see {self.log_path}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=30)
        if self._log is not None:
            self._log.close()
        if not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
