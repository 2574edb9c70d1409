"""Fuzz a running gunicorn server with the Schemathesis CLI, the way CI users run it.

    python -m scripts.fuzz [--max-examples 50] [--phases examples,coverage,fuzzing,stateful]

Starts gunicorn on a free loopback port over a fresh database (scripts.local_server; a
temporary SQLite file unless FUZZ_DATABASE_URL is set), seeded with an organization, an owner
token, the service credential and credit; runs `schemathesis run --checks all` with
`tests/contract/schemathesis.toml`; prints its summary and exits with its status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from scripts.local_server import BIN, ROOT, LocalServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts.fuzz")
    parser.add_argument("--max-examples", type=int, default=50)
    parser.add_argument("--phases", default="examples,coverage,fuzzing,stateful")
    # One worker: CPython 3.11 can crash compiling code from two threads at once
    # ("AST constructor recursion depth mismatch"), which Schemathesis does in its coverage phase.
    parser.add_argument("--workers", default="1")
    args = parser.parse_args(argv)
    # Limits stay on but out of reach: 429s are tested on their own, not by the fuzzer.
    extra = {
        "RESPONSE_VALIDATION": "true",
        "RATE_LIMIT_IP": "1000000/minute",
        "RATE_LIMIT_PRINCIPAL": "1000000/minute",
    }
    with LocalServer(os.environ.get("FUZZ_DATABASE_URL"), extra_env=extra) as server:
        command = [
            str(BIN / "schemathesis"),
            "--config-file",
            str(ROOT / "tests/contract/schemathesis.toml"),
            "run",
            f"{server.base_url}/openapi.json",
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
            f"Authorization: Bearer {server.token}",
            "-H",
            f"X-Service-Token: {server.service_token}",
        ]
        env = {**server.env, "FUZZ_ORG_ID": server.organization_id}
        result = subprocess.run(command, env=env, cwd=server.tmp)
        print(f"server log: {server.log_path}")
        return result.returncode


if __name__ == "__main__":
    sys.exit(main())
