"""Fuzz a running gunicorn server with the Schemathesis CLI, the way CI users run it.

    python -m scripts.fuzz [--max-examples 50] [--phases examples,coverage,fuzzing,stateful]

Starts gunicorn on a free loopback port over a fresh database (scripts.local_server; a
temporary SQLite file unless FUZZ_DATABASE_URL is set), seeded with an organization, an owner
token, the service credential, credit and one open reservation; runs `schemathesis run
--checks all` with `tests/contract/schemathesis.toml`; prints its summary, then the statuses
each operation answered (from the server's access log), and exits with Schemathesis' status.
The temporary directory is removed afterwards unless the run failed (its log is kept then).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import urllib.request

from scripts.local_server import BIN, ROOT, LocalServer


def _seed_reservation(server: LocalServer) -> str:
    """An open hold for releaseReservation to release: without it only stateful links could
    name a reservation, and a random id is always a 404."""
    request = urllib.request.Request(
        f"{server.base_url}/v1/service/organizations/{server.organization_id}/reservations",
        data=json.dumps({"amountDecimillicents": 1000, "referenceId": "fuzz-seed-hold"}).encode(),
        headers={"Content-Type": "application/json", "X-Service-Token": server.service_token},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.load(response)["id"])


def statuses_by_operation(log_path: str) -> dict[str, set[int]]:
    """operationId -> the statuses the server answered it with, from the JSON access log."""
    seen: dict[str, set[int]] = collections.defaultdict(set)
    with open(log_path) as log:
        for line in log:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("logger") == "billing.access":
                seen[str(entry.get("operation"))].add(int(entry.get("status", 0)))
    return dict(seen)


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
        env = {
            **server.env,
            "FUZZ_ORG_ID": server.organization_id,
            "FUZZ_RESERVATION_ID": _seed_reservation(server),
        }
        result = subprocess.run(command, env=env, cwd=server.tmp)
        print("statuses by operation:")
        for operation, statuses in sorted(statuses_by_operation(server.log_path).items()):
            print(f"  {operation}: {' '.join(str(s) for s in sorted(statuses))}")
        server.keep_tmp = result.returncode != 0
        if server.keep_tmp:
            print(f"server log: {server.log_path}")
        return result.returncode


if __name__ == "__main__":
    sys.exit(main())
