"""HTTP benchmark (not a test): our server under gunicorn vs a bare Starlette baseline.

    python -m scripts.bench [--seconds 10] [--connections 32] [--database sqlite|postgres]

Both run under gunicorn with the same worker count over the same seeded database (SQLite by
default; `--database postgres` uses its own database `billing_bench_api` on the local PostgreSQL,
or BENCH_POSTGRES_URL), on loopback, driven by wrk (Debian package `wrk`). Prints requests/s,
p50 and p99 for GET credits, GET credits/history, POST usage (a fresh reference per request)
and POST webhooks (a signed, already-stored event: the idempotent path), and for the baseline's
GET credits and POST usage, with the ratios ours/baseline (throughput and p99) measured in the
same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import stripe

from scripts.local_server import BIN, ROOT, LocalServer, free_port, postgres_database

WEBHOOK_SECRET = "whsec_bench_secret"


def wrk(
    url: str, seconds: int, connections: int, headers: dict[str, str], script: str | None = None
) -> dict[str, float]:
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    if script:
        command += ["-s", script]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rate,
        "p50": ms("50"),
        "p99": ms("99"),
        "errors": float(non2xx[1]) if non2xx else 0.0,
    }


def _webhook_script(tmp: str, body: str) -> str:
    signature = stripe.WebhookSignature.generate_signature_header(body, WEBHOOK_SECRET)
    path = Path(tmp) / "webhook.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Stripe-Signature"] = "{signature}"\n'
    )
    return str(path)


def _usage_script(tmp: str, name: str, token: str) -> str:
    """POST usage with a fresh referenceId per request (each wrk thread counts on its own)."""
    path = Path(tmp) / f"usage-{name}.lua"
    path.write_text(
        "local counter = 0\n"
        "local threads = 0\n"
        "function setup(thread) threads = threads + 1; thread:set('tid', threads) end\n"
        "function request()\n"
        "  counter = counter + 1\n"
        '  local body = \'{"category": "api_call", "quantity": 1, "unitCostDecimillicents": 1, \'\n'
        f"    .. '\"referenceId\": \"{name}-' .. tostring(tid) .. '-' .. counter .. '\"}}'\n"
        "  return wrk.format('POST', nil, {['Content-Type'] = 'application/json', "
        f"['X-Service-Token'] = '{token}'}}, body)\n"
        "end\n"
    )
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts.bench")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args(argv)
    database_url = None
    if args.database == "postgres":
        database_url = os.environ.get("BENCH_POSTGRES_URL") or postgres_database(
            "billing_bench_api"
        )
        if database_url is None:
            print("no PostgreSQL reachable", file=sys.stderr)
            return 2
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install wrk", file=sys.stderr)
        return 2
    env = {
        "RATE_LIMIT_ENABLED": "false",
        "RESPONSE_VALIDATION": "false",
        "STRIPE_SECRET_KEY": "sk_test_bench_unused",
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "BILLING_LOCAL_MODE": "false",
    }
    rows: list[tuple[str, dict[str, float]]] = []
    with LocalServer(database_url, workers=args.workers, extra_env=env) as server:
        # Stripe keys are only used to verify webhooks here; nothing calls Stripe.
        auth = {"Authorization": f"Bearer {server.token}"}
        org = server.organization_id
        base = server.base_url
        event = json.dumps(
            {
                "id": "evt_bench_1",
                "object": "event",
                "type": "customer.created",
                "created": int(time.time()),
                "data": {"object": {"id": "cus_x"}},
            }
        )
        script = _webhook_script(server.tmp, event)
        port = free_port()
        baseline = subprocess.Popen(
            [
                str(BIN / "gunicorn"),
                "-c",
                "gunicorn.conf.py",
                "-b",
                f"127.0.0.1:{port}",
                "scripts.bench_baseline:app",
            ],
            cwd=ROOT,
            env=server.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/billing/{org}/credits")
                except urllib.error.HTTPError:
                    break
                except OSError:
                    time.sleep(0.1)
            usage_path = f"/v1/service/organizations/{org}/usage"
            run = f"{int(time.time())}"
            targets = [
                (
                    "baseline GET credits",
                    f"http://127.0.0.1:{port}/v1/billing/{org}/credits",
                    auth,
                    None,
                ),
                ("ours GET credits", f"{base}/v1/billing/{org}/credits", auth, None),
                (
                    "baseline POST usage",
                    f"http://127.0.0.1:{port}{usage_path}",
                    {},
                    _usage_script(server.tmp, f"base{run}", server.service_token),
                ),
                (
                    "ours POST usage",
                    f"{base}{usage_path}",
                    {},
                    _usage_script(server.tmp, f"ours{run}", server.service_token),
                ),
                (
                    "ours GET credits/history",
                    f"{base}/v1/billing/{org}/credits/history",
                    auth,
                    None,
                ),
                ("ours POST webhooks", f"{base}/v1/webhooks/stripe", {}, script),
            ]
            for _name, url, headers, lua in targets:  # warm-up, not measured
                wrk(url, 2, args.connections, headers, lua)
            # Rounds interleave the targets, and the table shows medians: this shared 2-core
            # machine drifts by 20% or more between runs of the very same server.
            samples: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in targets}
            for _ in range(args.rounds):
                for name, url, headers, lua in targets:
                    samples[name].append(wrk(url, args.seconds, args.connections, headers, lua))
            for name, runs in samples.items():
                rows.append(
                    (name, {key: statistics.median(r[key] for r in runs) for key in runs[0]})
                )
        finally:
            baseline.terminate()
            baseline.wait(timeout=30)
    print(
        f"\n{args.database}, {args.connections} connections, {args.workers} workers, "
        f"median of {args.rounds} interleaved rounds of {args.seconds}s; "
        f"load {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'target':<28}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'non-2xx':>9}"
        f"{'vs base':>9}{'p99/base':>9}"
    )
    baselines = {name.split(" ", 1)[1]: r for name, r in rows if name.startswith("baseline")}
    for name, r in rows:
        base_row = baselines.get(name.split(" ", 1)[1])
        ratio = f"{r['rps'] / base_row['rps']:>9.2f}" if base_row else f"{'':>9}"
        p99 = f"{r['p99'] / base_row['p99']:>9.2f}" if base_row else f"{'':>9}"
        print(
            f"{name:<28}{r['rps']:>10.0f}{r['p50']:>10.2f}{r['p99']:>10.2f}"
            f"{r['errors']:>9.0f}{ratio}{p99}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
