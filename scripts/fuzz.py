"""Fuzz a running gunicorn server with the Schemathesis CLI, the way CI users run it.

    python -m scripts.fuzz [--max-examples 50] [--phases examples,coverage,fuzzing,stateful]

Starts gunicorn on a free loopback port over a fresh database (a temporary SQLite file unless
FUZZ_DATABASE_URL is set), seeds an organization with an owner token, the service credential
and some credit, runs `schemathesis run --checks all` with `tests/contract/schemathesis.toml`,
prints its summary and exits with its status.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _seed(env: dict[str, str]) -> tuple[str, str]:
    code = (
        "from billing.auth import mint_user_token\n"
        "from billing.config import get_settings\n"
        "from billing import ledger\n"
        "from billing.organizations import add_member, create_organization\n"
        "from models import connect_database\n"
        "from models.migrate import migrate\n"
        "s = get_settings(); db = connect_database(s.database_url); migrate(db)\n"
        "with db.connection_context():\n"
        "    org = create_organization('Fuzz')\n"
        "    add_member(org.id, 'fuzz-owner', 'owner', 'fuzz@example.com')\n"
        "    ledger.grant(org.id, 10**13, 'adjustment', 'fuzz seed')\n"
        "print(org.id, mint_user_token('fuzz-owner', s, None, 7200))\n"
    )
    out = subprocess.check_output([sys.executable, "-c", code], env=env, cwd=ROOT, text=True)
    org_id, token = out.split()
    return org_id, token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts.fuzz")
    parser.add_argument("--max-examples", type=int, default=50)
    parser.add_argument("--phases", default="examples,coverage,fuzzing,stateful")
    parser.add_argument("--workers", default="2")
    args = parser.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="billing-fuzz-")
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": os.environ.get("FUZZ_DATABASE_URL", f"sqlite:///{tmp}/fuzz.sqlite3"),
        "JWT_SECRET": "fuzz-jwt-secret-that-is-long-enough-000000",
        "SERVICE_TOKEN": "fuzz-service-token-0123456789",
        "RESPONSE_VALIDATION": "true",
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "2",
        "BILLING_LOCAL_MODE": "true",
    }
    for name in ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET"):
        env.pop(name, None)
    org_id, token = _seed(env)
    log = open(f"{tmp}/server.log", "w")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen(
        [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "handlers.asgi:app"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/openapi.json", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        command = [
            str(BIN / "schemathesis"),
            "--config-file",
            str(ROOT / "tests/contract/schemathesis.toml"),
            "run",
            f"{base}/openapi.json",
            "--checks",
            "all",
            "--phases",
            args.phases,
            "--max-examples",
            str(args.max_examples),
            "--workers",
            args.workers,
            "--seed",
            os.environ.get("FUZZ_SEED", "20261127"),
            "-H",
            f"Authorization: Bearer {token}",
            "-H",
            f"X-Service-Token: {env['SERVICE_TOKEN']}",
        ]
        result = subprocess.run(command, env={**env, "FUZZ_ORG_ID": org_id}, cwd=tmp)
        print(f"server log: {tmp}/server.log")
        return result.returncode
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
