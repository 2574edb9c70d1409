"""Ledger benchmark (not a test): our debits beside the raw-SQL floor, measured in the same run.

    python -m scripts.bench_ledger [--debits 2000] [--threads 8] [--only floor,cap,batch]

Three parts, each printing ratios against a baseline measured in the same run:
- floor: a debit (`locked_account`, `ledger.debit`) on one hot organization and across 100,
  beside the same debit as raw SQL (one conditional UPDATE ... RETURNING plus the entry
  INSERT, one commit), same threads;
- cap: single debits per second with a usage cap set, at 0, 100,000 and 1,000,000 charges in
  the organization's month (history written with bulk SQL); the rate should stay flat;
- batch (PostgreSQL): `POST /v1/service/usage/batch` end to end over HTTP (gunicorn, batches of
  1,000) across 100 organizations and for one, beside a raw-SQL batch floor on one connection
  (lock the accounts in id order, multi-row INSERTs of entries and records, one multi-row
  balance UPDATE, commit).

SQLite runs on a temporary file; PostgreSQL when reachable (BENCH_POSTGRES_URL, default: its own
database `billing_bench`, whose public schema it resets; the HTTP part uses that URL with the
suffix `_http`). The machine is shared: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sqlite3
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import peewee
import psycopg2
import psycopg2.extras
from playhouse.pool import PooledDatabase

from billing import ledger
from billing.accounts import locked_account
from billing.organizations import create_organization
from models import (
    BillingAccount,
    CreditEntryType,
    connect_database,
    connection,
    database,
    utcnow,
)
from models.migrate import migrate
from scripts.local_server import LocalServer, postgres_database

CREDIT = 10**15


def _prepare(url: str, orgs: int) -> list[str]:
    if isinstance(database.obj, PooledDatabase):
        database.obj.close_all()
    db = connect_database(url, pool_size=64)
    if isinstance(db, peewee.PostgresqlDatabase):
        with db.connection_context():
            db.execute_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    migrate(db)
    with db.connection_context():
        ids = [create_organization(f"bench-{i}").id for i in range(orgs)]
        for org_id in ids:
            with locked_account(org_id) as account:
                ledger.grant(account, CREDIT, CreditEntryType.top_up, reason="bench seed")
    return ids


def _debit(org_id: str) -> None:
    """One debit as a use case makes it: its unit of work, then the ledger's rule."""
    with locked_account(org_id) as account:
        ledger.debit(account, 1)


def _threads(work: Callable[[int], None], threads: int, count: int) -> float:
    """Run work(i) for i in range(count) over `threads` threads; return operations per second."""
    barrier = threading.Barrier(threads)

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(t, count, threads):
            work(i)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    return count / (time.perf_counter() - start)


# --- the raw-SQL floor of one debit ---------------------------------------------------------

_FLOOR_UPDATE = (
    "UPDATE billing_accounts SET credits_balance = credits_balance - {p}, updated_at = {p} "
    "WHERE organization_id = {p} AND credits_balance - reserved_credits >= {p} "
    "RETURNING credits_balance"
)
_FLOOR_INSERT = (
    "INSERT INTO credit_entries (organization_id, entry_type, amount, reason, balance_after, "
    "created_at) VALUES ({p}, 'charge', {p}, 'floor', {p}, {p})"
)


def _floor_debit(connect: Callable[[], Any], placeholder: str) -> Callable[[str], None]:
    local = threading.local()
    update = _FLOOR_UPDATE.format(p=placeholder)
    insert = _FLOOR_INSERT.format(p=placeholder)

    def debit(org_id: str) -> None:
        if not hasattr(local, "conn"):
            local.conn = connect()
        conn = local.conn
        cur = conn.cursor()
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        if placeholder == "?":
            cur.execute("BEGIN IMMEDIATE")
        cur.execute(update, (1, now, org_id, 1))
        (balance,) = cur.fetchone()
        cur.execute(insert, (org_id, -1, balance, now))
        if placeholder == "?":
            cur.execute("COMMIT")
        else:
            conn.commit()

    return debit


def _raw_connect(url: str) -> Callable[[], Any]:
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]

        def sqlite_connect() -> Any:
            conn = sqlite3.connect(path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=wal")
            conn.execute("PRAGMA synchronous=normal")
            return conn

        return sqlite_connect
    return lambda: psycopg2.connect(url)


def bench_floor(targets: list[tuple[str, str]], debits: int, threads: int) -> None:
    print(f"\n== one debit: ours vs the raw-SQL floor ({threads} threads, {debits} debits)")
    print(f"{'database':<12}{'shape':<14}{'floor/s':>10}{'ours/s':>10}{'ratio':>8}")
    for name, url in targets:
        for shape, orgs in (("one hot org", 1), ("100 orgs", 100)):
            ids = _prepare(url, orgs)
            floor = _floor_debit(_raw_connect(url), "?" if name == "sqlite" else "%s")

            def at_floor(
                i: int, floor: Callable[[str], None] = floor, ids: list[str] = ids
            ) -> None:
                floor(ids[i % len(ids)])

            floor_rate = _threads(at_floor, threads, debits)

            def ours(i: int, ids: list[str] = ids) -> None:
                with connection():  # the app's per-request connection (kept open on SQLite)
                    _debit(ids[i % len(ids)])

            ours_rate = _threads(ours, threads, debits)
            print(
                f"{name:<12}{shape:<14}{floor_rate:>10.0f}{ours_rate:>10.0f}"
                f"{ours_rate / floor_rate:>8.2f}"
            )


# --- a capped organization's debit rate as its month grows ------------------------------------


def _add_history(url: str, org_id: str, rows: int) -> None:
    """`rows` charges in the organization's current month, in bulk SQL."""
    now = utcnow()
    if url.startswith("sqlite"):
        sql = (
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO credit_entries (organization_id, entry_type, amount, reason, "
            "balance_after, created_at) SELECT ?, 'charge', -1, 'history', 0, ? FROM n"
        )
        params: tuple[Any, ...] = (rows, org_id, now)
    else:
        sql = (
            "INSERT INTO credit_entries (organization_id, entry_type, amount, reason, "
            "balance_after, created_at) SELECT %s, 'charge', -1, 'history', 0, %s "
            "FROM generate_series(1, %s)"
        )
        params = (org_id, now, rows)
    with database.connection_context(), database.atomic():
        database.execute_sql(sql, params)


def bench_cap(targets: list[tuple[str, str]], debits: int) -> None:
    print(f"\n== capped debits as the month grows (1 thread, {debits} debits per point)")
    print(f"{'database':<12}{'entries':>10}{'debits/s':>10}{'vs 0':>8}")
    for name, url in targets:
        (org_id,) = _prepare(url, 1)
        with database.connection_context():
            BillingAccount.update(usage_cap=CREDIT).execute()
        first = 0.0
        have = 0
        for size in (0, 100_000, 1_000_000):
            _add_history(url, org_id, size - have) if size > have else None
            have = size
            if not url.startswith("sqlite"):
                with database.connection_context():
                    database.execute_sql("ANALYZE credit_entries")

            def one(_i: int, org_id: str = org_id) -> None:
                with connection():
                    _debit(org_id)

            rate = _threads(one, 1, debits)
            first = first or rate
            print(f"{name:<12}{size:>10}{rate:>10.0f}{rate / first:>8.2f}")


# --- batch ingestion over HTTP vs a raw-SQL batch floor ---------------------------------------


def _events(org_ids: list[str], count: int, tag: str) -> list[dict[str, Any]]:
    return [
        {
            "organizationId": org_ids[i % len(org_ids)],
            "category": "api_call",
            "quantity": 1 + i % 7,
            "unitCostDecimillicents": 100,
            "referenceId": f"{tag}-{i}",
        }
        for i in range(count)
    ]


def _floor_batch(conn: Any, events: list[dict[str, Any]]) -> None:
    """The same events as raw SQL in one transaction: the least any implementation must do."""
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    cur = conn.cursor()
    ids = sorted({e["organizationId"] for e in events})
    cur.execute(
        "SELECT organization_id, credits_balance FROM billing_accounts "
        "WHERE organization_id = ANY(%s) ORDER BY organization_id FOR UPDATE",
        (ids,),
    )
    balance = dict(cur.fetchall())
    entries, costs = [], []
    for e in events:
        cost = e["quantity"] * e["unitCostDecimillicents"]
        balance[e["organizationId"]] -= cost
        costs.append(cost)
        entries.append(
            (
                e["organizationId"],
                "charge",
                -cost,
                balance[e["organizationId"]],
                e["referenceId"],
                now,
            )
        )
    returned = psycopg2.extras.execute_values(
        cur,
        "INSERT INTO credit_entries (organization_id, entry_type, amount, balance_after, "
        "reference_id, created_at) VALUES %s RETURNING id",
        entries,
        page_size=len(entries),
        fetch=True,
    )
    psycopg2.extras.execute_values(
        cur,
        "INSERT INTO usage_records (organization_id, category, quantity, unit_cost, cost, "
        "reference_id, credit_entry_id, created_at) VALUES %s",
        [
            (
                e["organizationId"],
                e["category"],
                e["quantity"],
                e["unitCostDecimillicents"],
                cost,
                e["referenceId"],
                entry_id,
                now,
            )
            for e, cost, (entry_id,) in zip(events, costs, returned, strict=True)
        ],
        page_size=len(events),
    )
    psycopg2.extras.execute_values(
        cur,
        "UPDATE billing_accounts SET credits_balance = v.balance FROM (VALUES %s) "
        "AS v(id, balance) WHERE organization_id = v.id",
        list(balance.items()),
        page_size=len(balance),
    )
    conn.commit()


def _post(url: str, token: str, events: list[dict[str, Any]]) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps({"events": events}).encode(),
        headers={"Content-Type": "application/json", "X-Service-Token": token},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        body = json.loads(response.read())
    bad = [r for r in body["results"] if r["status"] != "recorded"]
    if bad:
        raise RuntimeError(f"unexpected results: {bad[:3]}")


def bench_batch(pg_url: str, batches: int, clients: int, rounds: int) -> None:
    """Rounds alternate the floor and ours on the same database (the server stays up), and the
    table shows medians: this shared machine drifts by half between consecutive runs."""
    http_url = postgres_database(pg_url.rsplit("/", 1)[1] + "_http")
    assert http_url is not None
    print(
        f"\n== batch ingestion, PostgreSQL, batches of 1,000: HTTP ({clients} clients, 2 workers) "
        f"vs raw SQL (1 connection); median of {rounds} alternating rounds of {batches} batches"
    )
    print(f"{'shape':<14}{'floor ev/s':>12}{'ours ev/s':>12}{'ratio':>8}")
    env = {"RATE_LIMIT_ENABLED": "false", "RESPONSE_VALIDATION": "false"}
    for shape, orgs in (("100 orgs", 100), ("one org", 1)):
        ids = _prepare(http_url, orgs)
        if isinstance(database.obj, PooledDatabase):
            database.obj.close_all()
        conn = psycopg2.connect(http_url)
        samples: list[tuple[float, float]] = []
        with LocalServer(database_url=http_url, workers=2, extra_env=env) as server:
            url = f"{server.base_url}/v1/service/usage/batch"
            _post(url, server.service_token, _events(ids, 1000, "warm"))
            for r in range(rounds):
                start = time.perf_counter()
                for b in range(batches):
                    _floor_batch(conn, _events(ids, 1000, f"floor-{r}-{b}"))
                floor_rate = batches * 1000 / (time.perf_counter() - start)
                payloads = [_events(ids, 1000, f"http-{r}-{b}") for b in range(batches)]

                def send(
                    i: int,
                    url: str = url,
                    token: str = server.service_token,
                    payloads: list[list[dict[str, Any]]] = payloads,
                ) -> None:
                    _post(url, token, payloads[i])

                samples.append((floor_rate, _threads(send, clients, batches) * 1000))
        conn.close()
        floor_rate = statistics.median(f for f, _ in samples)
        ours_rate = statistics.median(o for _, o in samples)
        ratio = statistics.median(o / f for f, o in samples)
        print(f"{shape:<14}{floor_rate:>12.0f}{ours_rate:>12.0f}{ratio:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--debits", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--cap-debits", type=int, default=500)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="floor,cap,batch")
    parser.add_argument("--no-sqlite", action="store_true")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    targets = [] if args.no_sqlite else [("sqlite", f"sqlite:///{tempfile.mkdtemp()}/b.sqlite3")]
    pg = os.environ.get("BENCH_POSTGRES_URL") or postgres_database("billing_bench")
    if pg:
        targets.append(("postgresql", pg))
    else:
        print("PostgreSQL not reachable; SQLite only")
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    if "floor" in parts:
        bench_floor(targets, args.debits, args.threads)
    if "cap" in parts:
        bench_cap(targets, args.cap_debits)
    if "batch" in parts and pg:
        bench_batch(pg, args.batches, args.clients, args.rounds)
    if isinstance(database.obj, PooledDatabase):
        database.obj.close_all()


if __name__ == "__main__":
    main()
