"""Soak run (bounded, loopback only): reads, debits and webhooks against gunicorn with several
workers, then every invariant checked against the database.

    python -m scripts.soak [--seconds 30] [--max-requests 20000] [--threads 16] [--workers 3]

Uses PostgreSQL when reachable (database `billing_soak` on 127.0.0.1:5432, created if missing;
SOAK_DATABASE_URL overrides), SQLite otherwise. The server runs in Stripe mode only to verify
webhook signatures; nothing calls Stripe. Prints requests served, answers by status, and the
invariant results; exits non-zero on any 5xx or broken invariant.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import stripe
from peewee import fn

from billing.audit import ledger_problems
from billing.units import CENT
from models import CreditEntry, UsageRecord, WebhookEvent
from models.db import using_database
from scripts.local_server import LocalServer, postgres_database

WEBHOOK_SECRET = "whsec_soak_secret"
EVENTS = 30
TOP_UP_CENTS = 500
USAGE_COST = 3 * CENT


def default_database() -> str | None:
    return os.environ.get("SOAK_DATABASE_URL") or postgres_database("billing_soak")


def _event(org_id: str, i: int) -> bytes:
    session = {
        "id": f"cs_soak_{i}",
        "object": "checkout.session",
        "mode": "payment",
        "client_reference_id": org_id,
        "payment_status": "paid",
        "amount_total": TOP_UP_CENTS,
        "currency": "usd",
        "payment_intent": f"pi_soak_{org_id[:8]}_{i}",
        # What was ordered, as our own session metadata carries it (credited only if it agrees).
        "metadata": {
            "organization_id": org_id,
            "kind": "top_up",
            "amount_decimillicents": str(TOP_UP_CENTS * 100_000),
        },
    }
    event = {
        "id": f"evt_soak_{org_id[:8]}_{i}",
        "object": "event",
        "created": int(time.time()),
        "type": "checkout.session.completed",
        "data": {"object": session},
    }
    return json.dumps(event).encode()


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="scripts.soak")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-requests", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args(argv)

    database_url = default_database()
    env = {
        "STRIPE_SECRET_KEY": "sk_test_soak_unused",
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "BILLING_LOCAL_MODE": "false",
        "RATE_LIMIT_ENABLED": "false",
        "LOG_LEVEL": "WARNING",
    }
    seed_credit = 10**6 * CENT
    statuses: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    charged: set[str] = set()
    delivered: set[int] = set()
    lock = threading.Lock()
    sent = 0

    with LocalServer(
        database_url, workers=args.workers, credit=seed_credit, extra_env=env
    ) as server:
        org = server.organization_id
        user = {"Authorization": f"Bearer {server.token}"}
        service = {"X-Service-Token": server.service_token}
        events = [_event(org, i) for i in range(EVENTS)]
        deadline = time.monotonic() + args.seconds

        def worker(seed: int) -> None:
            nonlocal sent
            rng = random.Random(seed)
            with httpx.Client(base_url=server.base_url, timeout=30) as http:
                while time.monotonic() < deadline:
                    with lock:
                        if sent >= args.max_requests:
                            return
                        sent += 1
                    roll = rng.random()
                    if roll < 0.35:
                        kind, r = (
                            "GET credits",
                            http.get(f"/v1/billing/{org}/credits", headers=user),
                        )
                    elif roll < 0.5:
                        kind, r = (
                            "GET history",
                            http.get(
                                f"/v1/billing/{org}/credits/history",
                                headers=user,
                                params={"limit": "50"},
                            ),
                        )
                    elif roll < 0.85:
                        # One in five usage calls repeats a reference: it must charge once.
                        ref = (
                            rng.choice(sorted(charged))
                            if charged and rng.random() < 0.2
                            else uuid.uuid4().hex
                        )
                        kind, r = (
                            "POST usage",
                            http.post(
                                f"/v1/service/organizations/{org}/usage",
                                headers=service,
                                json={
                                    "category": "api_call",
                                    "quantity": 1,
                                    "unitCostDecimillicents": USAGE_COST,
                                    "referenceId": ref,
                                },
                            ),
                        )
                        if r.status_code == 200:
                            with lock:
                                charged.add(ref)
                    else:
                        i = rng.randrange(EVENTS)
                        body = events[i]
                        signature = stripe.WebhookSignature.generate_signature_header(
                            body.decode(), WEBHOOK_SECRET
                        )
                        kind, r = (
                            "POST webhook",
                            http.post(
                                "/v1/webhooks/stripe",
                                content=body,
                                headers={
                                    "Stripe-Signature": signature,
                                    "Content-Type": "application/json",
                                },
                            ),
                        )
                        if r.status_code == 200:
                            with lock:
                                delivered.add(i)
                    with lock:
                        statuses[kind][r.status_code] += 1

        started = time.monotonic()
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(worker, range(args.threads)))
        elapsed = time.monotonic() - started

    with using_database(database_url or server.env["DATABASE_URL"]):
        problems = ledger_problems(org)
        records = UsageRecord.select().where(UsageRecord.organization == org).count()
        top_ups = (
            CreditEntry.select()
            .where((CreditEntry.organization == org) & (CreditEntry.entry_type == "top_up"))
            .count()
        )
        stored_events = WebhookEvent.select().where(WebhookEvent.organization_id == org).count()
        balance = (
            CreditEntry.select(fn.SUM(CreditEntry.amount))
            .where(CreditEntry.organization == org)
            .scalar()
        )
    expected_balance = (
        seed_credit + len(delivered) * TOP_UP_CENTS * CENT - len(charged) * USAGE_COST
    )
    checks = {
        "ledger invariants (balance = sum, balance_after chain, reserved, available)": (
            not problems
        ),
        f"usage records = distinct charged references ({records} = {len(charged)})": records
        == len(charged),
        f"top-up credits = distinct events delivered ({top_ups} = {len(delivered)})": top_ups
        == len(delivered)
        == stored_events,
        f"balance = seed + top-ups - usage ({balance} = {expected_balance})": balance
        == expected_balance,
        # A run where every request was refused would pass every equality above.
        f"work was done ({len(charged)} usage charges, {len(delivered)} top-up events, "
        f"{statuses['GET credits'][200]} balance reads)": min(
            len(charged), len(delivered), statuses["GET credits"][200]
        )
        > 0,
    }
    total = sum(sum(c.values()) for c in statuses.values())
    server_errors = sum(n for c in statuses.values() for s, n in c.items() if s >= 500)
    print(
        f"database: {'postgresql' if database_url else 'sqlite'}, {args.workers} workers, "
        f"{args.threads} client threads, {elapsed:.1f}s"
    )
    print(f"requests served: {total} ({total / elapsed:.0f}/s)")
    for kind in sorted(statuses):
        print(f"  {kind:<14} " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses[kind].items())))
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    for problem in problems:
        print(f"    {problem}")
    print(f"5xx answers: {server_errors}")
    return 0 if all(checks.values()) and server_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
