"""No Stripe call while a database lock or transaction is held (issue 11, failure 3).

While Stripe's `/v1/customers` hangs for one organization's first top-up, every debit — for
the other organizations and for that organization itself — completes while the call is
still hanging. Before the fix, the customer was created under the account's row lock (and,
on SQLite, the database's writer lock), so those debits waited for Stripe.

Outcomes, not timings: each debit records whether Stripe was still hanging when it finished.
A watchdog ends the hang after a while so that a regression fails instead of hanging.
"""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from billing import ledger
from billing.accounts import locked_account
from billing.config import get_settings
from billing.organizations import add_member, create_organization
from billing.stripe_gateway import get_gateway
from billing.units import DOLLAR
from models import BillingAccount, CheckoutSession, database
from tests.conftest import SERVICE_HEADERS, bearer

WATCHDOG_SECONDS = 20


class HangingCustomers:
    """A front for the fixture front: `POST /v1/customers` for `slow_org` (or, with
    `hang_path`, every POST to that path) hangs until released."""

    def __init__(self, upstream: str, slow_org: str, hang_path: str | None = None) -> None:
        self.arrived = threading.Event()
        self.arrivals = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.released_by_watchdog = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                fields = dict(parse_qsl(raw.decode(), keep_blank_values=True))
                if self.command == "POST" and (
                    self.path == hang_path
                    or (
                        self.path.startswith("/v1/customers")
                        and fields.get("metadata[organization_id]") == slow_org
                    )
                ):
                    with outer.lock:
                        outer.arrivals += 1
                    outer.arrived.set()
                    if not outer.release.wait(WATCHDOG_SECONDS):
                        outer.released_by_watchdog = True
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() in ("authorization", "content-type", "idempotency-key")
                }
                answer = httpx.request(
                    self.command, upstream + self.path, content=raw, headers=headers, timeout=30
                )
                self.send_response(answer.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def still_hanging(self) -> bool:
        return not (self.release.is_set() or self.released_by_watchdog)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def hanging(stripe_mode, monkeypatch):
    with database.connection_context():
        slow = create_organization("slow stripe")
        owner = f"owner-{slow.id[:8]}"
        add_member(slow.id, owner, "owner", "o@example.com")
    front = HangingCustomers(stripe_mode.url, slow.id)
    monkeypatch.setenv("STRIPE_API_BASE", front.url)
    monkeypatch.setenv("STRIPE_TIMEOUT_SECONDS", "60")
    get_settings.cache_clear()
    get_gateway.cache_clear()
    yield front, slow.id, bearer(owner)
    front.close()


def test_debits_complete_while_stripe_customers_hangs(app, hanging):
    front, slow_org, owner = hanging
    with database.connection_context():
        others = [create_organization(f"other {n}").id for n in range(4)]
        for org_id in [*others, slow_org]:
            with locked_account(org_id) as account:
                ledger.grant(account, 100 * DOLLAR, "top_up", reason="seed")
    top_up: dict[str, Any] = {}

    def first_top_up() -> None:
        with app.test_client() as top_up_client:
            top_up["response"] = top_up_client.post(
                f"/v1/billing/{slow_org}/top-up",
                json={
                    "amountDecimillicents": 10 * DOLLAR,
                    "successUrl": "https://example.com/ok",
                    "cancelUrl": "https://example.com/no",
                },
                headers=owner,
            )

    thread = threading.Thread(target=first_top_up)
    thread.start()
    assert front.arrived.wait(WATCHDOG_SECONDS), "the top-up never reached Stripe"

    finished_while_hanging = []
    with app.test_client() as client:
        for n, org_id in enumerate([*others, slow_org] * 2):
            r = client.post(
                f"/v1/service/organizations/{org_id}/usage",
                json={
                    "category": "api_call",
                    "quantity": 1,
                    "unitCostDecimillicents": DOLLAR,
                    "referenceId": f"during-hang-{n}",
                },
                headers=SERVICE_HEADERS,
            )
            finished_while_hanging.append((org_id, r.status_code, front.still_hanging()))
    still_hanging = not front.released_by_watchdog
    front.release.set()
    thread.join(60)

    assert all(status == 200 for _, status, _ in finished_while_hanging), finished_while_hanging
    assert still_hanging and all(during for *_, during in finished_while_hanging)
    assert top_up["response"].status_code == 200, top_up["response"].text
    with database.connection_context():
        for org_id in others:
            assert BillingAccount.get_by_id(org_id).credits_balance == 98 * DOLLAR
        slow_account = BillingAccount.get_by_id(slow_org)
        assert slow_account.credits_balance == 98 * DOLLAR
        assert slow_account.stripe_customer_id.startswith("cus_")
        assert CheckoutSession.select().where(CheckoutSession.organization == slow_org).count() == 1


def test_concurrent_first_calls_record_one_customer(app, stripe_mode, org):
    """Two first top-ups at once: both answer, one customer is recorded and used by both."""
    results = []

    def top_up(n: int) -> None:
        with app.test_client() as c:
            results.append(
                c.post(
                    f"/v1/billing/{org.id}/top-up",
                    json={
                        "amountDecimillicents": (n + 1) * DOLLAR,
                        "successUrl": "https://example.com/ok",
                        "cancelUrl": "https://example.com/no",
                    },
                    headers=org.owner,
                )
            )

    threads = [threading.Thread(target=top_up, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
    with database.connection_context():
        customer = BillingAccount.get_by_id(org.id).stripe_customer_id
    sessions = stripe_mode.sent("POST", "/v1/checkout/sessions")
    assert {s["customer"] for s in sessions} == {customer}


@pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL", "").startswith("postgres"),
    reason="the connection pool is PostgreSQL's (SQLite connections are per thread)",
)
def test_requests_hanging_on_stripe_do_not_take_the_pool(stripe_mode, monkeypatch, db):
    """More top-ups hang on Stripe than the pool has connections; debits still get one."""
    from handlers.app import create_app
    from models import connect_database

    with database.connection_context():
        org = create_organization("hanging checkouts")
        add_member(org.id, f"owner-{org.id[:8]}", "owner", None)
        with locked_account(org.id) as account:
            ledger.grant(account, 100 * DOLLAR, "top_up", reason="seed")
        BillingAccount.update(stripe_customer_id="cus_preset").execute()
    front = HangingCustomers(stripe_mode.url, "", hang_path="/v1/checkout/sessions")
    monkeypatch.setenv("STRIPE_API_BASE", front.url)
    monkeypatch.setenv("STRIPE_TIMEOUT_SECONDS", "60")
    get_settings.cache_clear()
    get_gateway.cache_clear()
    small_pool = create_app(get_settings().model_copy(update={"db_pool_size": 2}))
    owner = bearer(f"owner-{org.id[:8]}")
    hanging = []
    try:

        def top_up() -> None:
            with small_pool.test_client() as c:
                c.post(
                    f"/v1/billing/{org.id}/top-up",
                    json={
                        "amountDecimillicents": DOLLAR,
                        "successUrl": "https://example.com/ok",
                        "cancelUrl": "https://example.com/no",
                    },
                    headers=owner,
                )

        hanging = [threading.Thread(target=top_up) for _ in range(3)]
        for t in hanging:
            t.start()
        while front.arrivals < 2 and not front.release.wait(0.05):
            pass  # at least as many requests wait on Stripe as the pool has connections
        outcomes = []
        with small_pool.test_client() as client:
            for n in range(3):
                r = client.post(
                    f"/v1/service/organizations/{org.id}/usage",
                    json={
                        "category": "api_call",
                        "quantity": 1,
                        "unitCostDecimillicents": DOLLAR,
                        "referenceId": f"pool-{n}",
                    },
                    headers=SERVICE_HEADERS,
                )
                outcomes.append((r.status_code, front.still_hanging()))
        assert outcomes == [(200, True)] * 3, outcomes
    finally:
        front.close()
        for t in hanging:
            t.join(60)
        get_settings.cache_clear()
        connect_database(get_settings().database_url, get_settings().db_pool_size)
