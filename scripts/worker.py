"""Auto-recharge worker: drain the outbox and charge saved cards off-session.

    python -m scripts.worker            # loop, polling every WORKER_POLL_SECONDS (default 2)
    python -m scripts.worker --once     # drain what is pending and exit

Several workers may run at once: on PostgreSQL each claims requests with SKIP LOCKED. A claim
is a lease: a worker killed mid-charge leaves its request to be taken over once the lease
expires. SIGTERM (or Ctrl-C) lets the charge in hand finish, then the worker exits; nothing
new is claimed after the signal.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from billing.auto_recharge import drain, run_worker
from billing.config import ConfigError, get_settings
from billing.stripe_gateway import get_gateway
from models import connect_database, connection


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts.worker")
    parser.add_argument("--once", action="store_true")
    parser.add_argument("--poll", type=float, default=2.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = get_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    connect_database(settings.database_url, settings.db_pool_size)
    if args.once:
        with connection():
            handled = drain(get_gateway(), settings, limit=10_000)
        print(f"auto-recharge requests handled: {handled}")
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_worker(stop, get_gateway(), settings, args.poll)
    return 0


if __name__ == "__main__":
    sys.exit(main())
