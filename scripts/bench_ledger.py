"""Ledger benchmark (not a test): debits per second on one hot organization and across many.

    python -m scripts.bench_ledger [--debits 2000] [--threads 8]

Runs on SQLite (a temporary file) and, when reachable, PostgreSQL (BENCH_POSTGRES_URL, default:
its own database `billing_bench`, whose public schema it resets). Prints one table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import peewee
from playhouse.pool import PooledDatabase

from billing import ledger
from billing.organizations import create_organization
from models import connect_database, database
from models.migrate import migrate
from scripts.local_server import postgres_database


def _prepare(url: str, orgs: int, per_org_credit: int) -> list[str]:
    db = connect_database(url, pool_size=64)
    if isinstance(db, peewee.PostgresqlDatabase):
        with db.connection_context():
            db.execute_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    migrate(db)
    with db.connection_context():
        ids = [create_organization(f"bench-{i}").id for i in range(orgs)]
        for org_id in ids:
            ledger.grant(org_id, per_org_credit, "top_up", "bench seed")
    return ids


def _run(org_ids: list[str], debits: int, threads: int) -> float:
    barrier = threading.Barrier(threads)

    def worker(t: int) -> None:
        with database.connection_context():
            barrier.wait()
            for i in range(t, debits, threads):
                ledger.debit(org_ids[i % len(org_ids)], 1)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    return debits / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--debits", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    targets = [("sqlite", f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3")]
    pg = os.environ.get("BENCH_POSTGRES_URL") or postgres_database("billing_bench")
    if pg:
        targets.append(("postgresql", pg))
    else:
        print("PostgreSQL not reachable; SQLite only")
    print(f"{'database':<12}{'shape':<14}{'threads':>8}{'debits':>8}{'debits/s':>12}")
    for name, url in targets:
        for shape, orgs in (("one hot org", 1), ("100 orgs", 100)):
            ids = _prepare(url, orgs, 10**12)
            rate = _run(ids, args.debits, args.threads)
            print(f"{name:<12}{shape:<14}{args.threads:>8}{args.debits:>8}{rate:>12.0f}")
        if isinstance(database.obj, PooledDatabase):
            database.obj.close_all()


if __name__ == "__main__":
    main()
