"""Review of the round-trip-free pool checkout (models.db._PostgresqlDatabase._is_closed, 8363c64).

A readable socket is what a connection the server ended looks like only *after* its backend
has acted on the end: between the moment the server decides (pg_terminate_backend has
signalled the backend, an idle_session_timeout has fired) and the moment the backend's FATAL
and EOF reach the socket, the connection polls as healthy. Peewee's `SELECT 1` was immune to
that window: the ping reaches a backend whose end is already pending, fails, and the pool
replaces the connection. Without it the pool hands the dead connection to a request, whose
first statement fails (HTTP 500), and, when that happens after a Stripe call, whose
Idempotency-Key claim cannot be dropped either.

The window is as wide as the backend's way to a CPU: microseconds on an idle server, more on a
busy one. The tests make it a quarter of a second by pausing the backend (SIGSTOP, then SIGCONT
by a timer) before telling it to end, when the backend is a process of this host they may
signal; with Peewee's own check (`SELECT 1`) all three pass, the ping simply waiting for it.

Each test checks the money as well: a request that failed wrote nothing, none applied twice,
and no transaction was left open on the server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import peewee
import psycopg2
import pytest

from billing import checkout, ledger
from billing.accounts import locked_account
from billing.errors import Conflict
from billing.idempotency import run_once
from billing.stripe_gateway import StripeGateway
from models import (
    CheckoutSession,
    CreditEntry,
    CreditEntryType,
    IdempotencyRecord,
    connection,
    database,
)
from tests.ledger_checks import assert_ledger_invariants

pytestmark = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL", "").startswith("postgres"),
    reason="SQLite connections are per thread, not pooled",
)

ROUNDS = 6
SEED = 100_000
COST = 300


@pytest.fixture
def observer(db) -> Iterator[psycopg2.extensions.connection]:
    """A connection outside the pool, for the server's side: ending backends, reading state."""
    watcher = psycopg2.connect(os.environ["TEST_DATABASE_URL"])
    watcher.autocommit = True
    try:
        yield watcher
    finally:
        watcher.close()


@pytest.fixture
def funded(org):
    with database.connection_context(), locked_account(org.id) as account:
        ledger.grant(account, SEED, CreditEntryType.top_up, reason="seed")
    return org


def _warm_idle_connection() -> None:
    """Leave at least one used, idle connection in the pool (as any served request does)."""
    with connection():
        database.execute_sql("SELECT 1").fetchone()


def _backend_process(conn: psycopg2.extensions.connection) -> int | None:
    """The pid of `conn`'s backend if it is a process of this host this test may pause (the
    server's own processes, seen as root or as the postgres user), else None. Matched on the
    client port its process title names, so no other process can be mistaken for it."""
    pid = conn.get_backend_pid()
    try:
        with socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM) as sock:
            port = sock.getsockname()[1]
        with open(f"/proc/{pid}/cmdline", "rb") as title:
            name = title.read().decode(errors="replace")
        if not name.startswith("postgres:") or f"({port})" not in name:
            return None
        os.kill(pid, 0)
    except (OSError, IndexError):
        return None
    return pid


@pytest.fixture
def end_idle_pooled_connections(
    observer: psycopg2.extensions.connection,
) -> Iterator[Callable[[], list[int]]]:
    """What an operator's `pg_terminate_backend` (or a fast shutdown, a failover script) does
    to the pool's idle connections: the server is told to end them, and pg_terminate_backend
    says it did. The backends act on it as soon as they get a CPU: on a busy database server
    that takes a while, here a quarter of a second (each is paused before it is told, and
    resumed by a timer; where it cannot be paused, the end races the next checkout, which the
    round-trip-free check loses in 25-75% of tries on this 2-core machine under load)."""
    paused: list[int] = []
    timers: list[threading.Timer] = []

    def resume(pid: int) -> None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)

    def end() -> list[int]:
        pool = database.obj
        with pool._pool_lock:
            idle = [conn for _, _, conn in pool._connections if not conn.closed]
            pids = [conn.get_backend_pid() for conn in idle]
            local = [_backend_process(conn) for conn in idle]
        assert pids, "the pool has no idle connection to end"
        with observer.cursor() as cursor:
            for pid, process in zip(pids, local, strict=True):
                if process is not None:
                    os.kill(process, signal.SIGSTOP)
                    paused.append(process)
                    timers.append(threading.Timer(0.25, resume, (process,)))
                    timers[-1].start()
                cursor.execute("SELECT pg_terminate_backend(%s)", (pid,))
                assert cursor.fetchone() == (True,)
        return pids

    try:
        yield end
    finally:
        for timer in timers:
            timer.cancel()
        for pid in paused:
            resume(pid)


def _open_transactions(watcher: psycopg2.extensions.connection) -> int:
    with watcher.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state LIKE 'idle in transaction%%' AND pid <> pg_backend_pid()"
        )
        return int(cursor.fetchone()[0])


def _assert_money_consistent(org_id: str, served: int) -> None:
    with database.connection_context():
        account = assert_ledger_invariants(org_id)
        debits = CreditEntry.select().where(CreditEntry.amount < 0).count()
    assert debits == served, (debits, served)  # each served call applied once, no failed one
    assert account.credits_balance == SEED - COST * served


def test_a_debit_right_after_the_server_ended_the_idle_pooled_connections_is_served(
    funded, observer, end_idle_pooled_connections
):
    """The server ends the pool's idle connections (an operator's pg_terminate_backend, a
    fast shutdown, a failover script) and pg_terminate_backend has returned true; the next
    unit of work (what a usage request runs inside `connection()`) must get a live one."""
    outcomes = []
    rounds = ROUNDS
    for i in range(rounds):
        _warm_idle_connection()
        end_idle_pooled_connections()
        try:
            with connection(), locked_account(funded.id) as account:
                ledger.debit(account, COST, reason=f"call-{i}")
            outcomes.append("served")
        except Exception as exc:
            outcomes.append(type(exc).__name__)
    served = outcomes.count("served")
    _assert_money_consistent(funded.id, served)  # failing debits fail cleanly ...
    assert _open_transactions(observer) == 0
    # ... but they fail: the ended connection was handed out
    assert served == rounds, f"{rounds - served} of {rounds} debits failed: {outcomes}"


class _EndedDuringStripeCall:
    """A Stripe gateway whose calls go through the real `StripeGateway._call` (and so through
    `connection_released`); while the top-up session is being created, the server ends the
    pool's idle connections, among them the one this request just gave back."""

    local = False

    def __init__(self, end_idle_pooled_connections: Callable[[], list[int]]) -> None:
        self.end_idle_pooled_connections = end_idle_pooled_connections
        self.sessions = 0

    def create_customer(self, organization_id: str, email: str | None) -> str:
        return str(
            StripeGateway._call(lambda params, options: "cus_review", {}, f"c:{organization_id}")
        )

    def create_top_up_checkout(self, organization_id: str, *args: Any) -> Any:
        from billing.stripe_gateway import SessionInfo

        def stripe_answers(params: Any, options: Any) -> SessionInfo:
            self.end_idle_pooled_connections()  # meanwhile, on the database server
            self.sessions += 1
            session = f"cs_review_{uuid.uuid4().hex[:12]}"
            return SessionInfo(session, f"https://checkout.stripe.com/c/pay/{session}")

        return StripeGateway._call(stripe_answers, {}, args[-1])


def _top_up_request(org_id: str, key: str, gateway: Any) -> str:
    """What POST /v1/billing/{org}/top-up runs (handlers.sessions.create_top_up_session)
    inside its `connection()`, with an Idempotency-Key: its outcome, as the client sees it."""
    body: dict[str, Any] = {
        "amountDecimillicents": 10_000_000,
        "successUrl": "https://app.example.com/ok",
        "cancelUrl": "https://app.example.com/cancel",
    }

    def work() -> dict[str, Any]:
        info = checkout.start_top_up(
            org_id, body["amountDecimillicents"], body["successUrl"], body["cancelUrl"],
            gateway, f"review:{key}",
        )  # fmt: skip
        return {"id": info.id, "url": info.url}

    try:
        with connection():
            run_once(f"user:review-admin:top-up:{org_id}", key, body, work)
        return "200"
    except Conflict:
        return "409"
    except (peewee.OperationalError, peewee.InterfaceError):
        return "500"


def test_a_top_up_whose_released_connection_the_server_ended_during_the_stripe_call(
    org, observer, end_idle_pooled_connections
):
    """`connection_released` gives the connection back around the Stripe call; the server
    ends it meanwhile. Taking one again must not hand back the ended one: Stripe has created
    the session, and the request must record it; with the ended connection it cannot, and it
    cannot drop its Idempotency-Key claim either, so the client's retry is refused as
    "in progress" (409) for the whole lease (120 s by default)."""
    gateway = _EndedDuringStripeCall(end_idle_pooled_connections)
    outcomes = []
    rounds = ROUNDS
    for i in range(rounds):
        _warm_idle_connection()
        first = _top_up_request(org.id, f"top-up-{i}", gateway)
        retry = _top_up_request(org.id, f"top-up-{i}", gateway)
        outcomes.append((first, retry))
    with database.connection_context():
        recorded = CheckoutSession.select().count()
        stuck_claims = (
            IdempotencyRecord.select().where(IdempotencyRecord.response_body.is_null()).count()
        )
    assert _open_transactions(observer) == 0
    served = outcomes.count(("200", "200"))
    assert (served, recorded, stuck_claims) == (rounds, gateway.sessions, 0), (
        f"{rounds - served} of {rounds} top-ups failed: {outcomes}; Stripe created"
        f" {gateway.sessions} sessions, {recorded} recorded; {stuck_claims} claims stuck"
    )


def test_idle_session_timeout_firing_between_checkout_and_first_statement(funded, observer):
    """Sessions with idle_session_timeout (what `ALTER ROLE/DATABASE ... SET
    idle_session_timeout`, as managed PostgreSQL services and DBAs set it, gives every session;
    set here on the pool's own session only, so as to touch nothing else): a pooled connection
    taken shortly before its timeout fires polls healthy, and the request's first statement, a
    moment later, meets the ended session. A `SELECT 1` at checkout resets the server's idle
    timer (or finds the session ended, and the pool replaces it)."""
    timeout_ms = 400
    database.obj.close_all()
    outcomes = []
    for i in range(ROUNDS):
        with connection():  # the connection's last statement: its idle timer starts
            database.execute_sql(f"SET idle_session_timeout = {timeout_ms}")
        time.sleep(timeout_ms / 1000 - 0.02)  # taken back 20 ms before the timeout fires
        try:
            with connection():
                time.sleep(0.04)  # the request's own work before its first statement
                with locked_account(funded.id) as account:
                    ledger.debit(account, COST, reason=f"call-{i}")
            outcomes.append("served")
        except Exception as exc:
            outcomes.append(type(exc).__name__)
    database.obj.close_all()
    _assert_money_consistent(funded.id, outcomes.count("served"))
    assert _open_transactions(observer) == 0
    assert outcomes.count("served") == ROUNDS, (
        f"{ROUNDS - outcomes.count('served')} of {ROUNDS} debits failed: {outcomes}"
    )
