"""Auto-recharge claims are leases; Stripe errors are classified; the queue is fair.

- crash: a real worker process is SIGKILLed at random points across 20+ rounds while a slow
  (idempotency-honouring) fake Stripe answers; a fresh worker then converges: every request
  is settled, no attempt created a PaymentIntent twice, credits were granted once per
  payment, and the organization's auto-recharge keeps working;
- fairness: one organization's card fails permanently (Stripe 404 resource_missing) and is
  failed with a reason after one call; another's is charged;
- transient errors back off (the request is not due again at once) and stop at the cap,
  uncounted toward turning auto-recharge off;
- a webhook carrying the attempt id settles an attempt whose worker died before it learned
  the PaymentIntent id;
- SIGTERM: the worker finishes the charge in hand and stops.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

from billing import accounts, ledger
from billing.accounts import locked_account
from billing.auto_recharge import drain
from billing.config import get_settings
from billing.organizations import create_organization
from billing.stripe_gateway import get_gateway
from billing.units import DOLLAR
from models import AutoRechargeRequest, BillingAccount, CreditEntry, database, utcnow
from tests.ledger_checks import assert_ledger_invariants
from tests.stripe_fakes import (
    API_KEY,
    WEBHOOK_SECRET,
    event_body,
    forward,
    signature_for,
    stripe_object,
)
from tests.test_auto_recharge import saved_card

ROOT = Path(__file__).resolve().parents[1]
LEASE_SECONDS = 1
RESOURCE_MISSING = json.dumps(
    {
        "error": {
            "type": "invalid_request_error",
            "code": "resource_missing",
            "param": "payment_method",
            "message": "No such PaymentMethod: 'pm_detached_0000'",
        }
    }
).encode()


class IdempotentSlowStripe:
    """In front of the fixture front: answers slowly, and keeps Stripe's idempotency promise
    (a key seen before replays its first answer; a key in flight answers 409), which
    localstripe does not. Counts the PaymentIntents it lets through per idempotency key."""

    def __init__(self, upstream: str, backend: str) -> None:
        self.upstream = upstream
        self.backend = backend  # localstripe itself, for saving cards directly
        self.detached: set[str] = set()  # payment methods Stripe no longer knows
        self.delay = (0.0, 0.0)
        self.created: Counter[str] = Counter()  # idempotency key -> PaymentIntents created
        self.created_for_attempt: Counter[str] = Counter()  # metadata attempt_id -> created
        self.calls: Counter[str] = Counter()  # idempotency key -> create calls received
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.in_flight: set[str] = set()
        self.intent_arrived = threading.Event()
        self.hold: threading.Event | None = None  # when set: hold each create until released
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                key = self.headers.get("Idempotency-Key")
                creating = self.command == "POST" and self.path == "/v1/payment_intents"
                params = dict(parse_qsl(raw.decode(), keep_blank_values=True))
                if creating and key:
                    if params.get("payment_method") in outer.detached:
                        with outer.lock:
                            outer.calls[key] += 1
                        return self._send(404, RESOURCE_MISSING)
                    with outer.lock:
                        outer.calls[key] += 1
                        if key in outer.answers:
                            return self._send(*outer.answers[key])
                        if key in outer.in_flight:
                            error = {"error": {"type": "idempotency_error", "message": "in use"}}
                            return self._send(409, json.dumps(error).encode())
                        outer.in_flight.add(key)
                    outer.intent_arrived.set()
                    if outer.hold is not None:
                        outer.hold.wait(30)
                    time.sleep(random.uniform(*outer.delay))
                answer = forward(self, outer.upstream, raw, timeout=30)
                if creating and key:
                    with outer.lock:
                        if answer.status_code in (200, 402):  # a PaymentIntent was made
                            outer.created[key] += 1
                            outer.created_for_attempt[params.get("metadata[attempt_id]", "")] += 1
                            outer.answers[key] = (answer.status_code, answer.content)
                        outer.in_flight.discard(key)
                self._send(answer.status_code, answer.content)

            do_GET = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def intent_of(self, attempt_id: str) -> str | None:
        _, body = self.answers.get(f"auto-recharge:{attempt_id}", (0, b"{}"))
        data = json.loads(body)
        return data.get("id") or (data.get("error", {}).get("payment_intent") or {}).get("id")

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()


@pytest.fixture
def slow_stripe(stripe_mode, monkeypatch):
    front = IdempotentSlowStripe(stripe_mode.url, stripe_mode.backend)
    env = {
        "STRIPE_API_BASE": front.url,
        "AUTO_RECHARGE_LEASE_SECONDS": str(LEASE_SECONDS),
        # A lease must outlast the longest Stripe call (settings refuse it otherwise); the
        # front answers within 0.4s.
        "STRIPE_TIMEOUT_SECONDS": "0.9",
        "AUTO_RECHARGE_COOLDOWN_SECONDS": "0",
        "AUTO_RECHARGE_MAX_ATTEMPTS": "50",
        "AUTO_RECHARGE_RETRY_BASE_SECONDS": "0",
        "AUTO_RECHARGE_RETRY_MAX_SECONDS": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    get_gateway.cache_clear()
    with database.connection_context():
        yield front
    front.close()


def _worker(*args: str, log: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "JWT_SECRET": "worker-test-secret-that-is-long-enough-0001",
        "STRIPE_SECRET_KEY": API_KEY,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STRIPE_MAX_RETRIES": "0",
        "STRIPE_TIMEOUT_SECONDS": "0.9",  # under the 1s lease (settings insist)
        "LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "scripts.worker", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )


def _armed_orgs(backend: str, count: int, card: str = "ok") -> list[str]:
    orgs = []
    for n in range(count):
        org_id = create_organization(f"recharging {n}").id
        saved_card(backend, org_id, card)
        with locked_account(org_id) as account:
            ledger.grant(account, 10 * DOLLAR, "top_up", reason="seed")
        accounts.update_settings(
            org_id,
            {
                "auto_recharge_enabled": True,
                "auto_recharge_threshold": 5 * DOLLAR,
                "auto_recharge_amount": 20 * DOLLAR,
            },
        )
        orgs.append(org_id)
    return orgs


def _spend_below_threshold(org_id: str) -> None:
    """Take available just under the threshold (enqueues unless one is in flight)."""
    account = BillingAccount.get_by_id(org_id)
    available = account.credits_balance - account.reserved_credits
    with locked_account(org_id) as account:
        ledger.debit(account, max(0, available - 5 * DOLLAR + 1))


def _assert_converged(front: IdempotentSlowStripe, orgs: list[str]) -> None:
    requests = list(AutoRechargeRequest.select())
    assert requests, "nothing was ever enqueued"
    for request in requests:
        assert request.status == "succeeded", (request.id, request.status, request.attempts)
        key = f"auto-recharge:{request.id}"
        assert front.created[key] <= 1, (key, front.created[key])
        assert request.stripe_payment_intent_id == front.intent_of(request.id)
    assert all(count == 1 for count in front.created.values()), front.created
    # Counted by the attempt id in the PaymentIntent's metadata, whatever key was sent:
    assert set(front.created_for_attempt) == {r.id for r in requests}
    assert all(n == 1 for n in front.created_for_attempt.values()), front.created_for_attempt
    recharges = list(CreditEntry.select().where(CreditEntry.entry_type == "recharge"))
    assert len(recharges) == len(requests)
    assert len({entry.reference_id for entry in recharges}) == len(recharges)
    for org_id in orgs:
        account = assert_ledger_invariants(org_id)
        assert account.auto_recharge_in_flight_id is None
        assert account.auto_recharge_enabled


def test_workers_killed_at_random_points_converge(slow_stripe):
    front = slow_stripe
    front.delay = (0.05, 0.4)
    rng = random.Random(11)
    orgs = _armed_orgs(front.backend, 3)
    killed_mid_charge = 0
    for round_number in range(22):
        for org_id in orgs:
            _spend_below_threshold(org_id)
        before = sum(front.calls.values())
        worker = _worker("--poll", "0.05")
        if round_number % 2:
            # Half the kills wait for the worker's first charge to reach Stripe and land within
            # it (however long a loaded machine takes to start the worker) ...
            deadline = time.monotonic() + 60
            while sum(front.calls.values()) == before and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            # ... and half land anywhere (the import takes part of this).
            time.sleep(rng.uniform(0.5, 2.5))
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        killed_mid_charge += any(front.in_flight) or sum(front.calls.values()) > before
    # Every claim a dead worker left is due again once its lease has expired.
    time.sleep(LEASE_SECONDS + 0.2)
    assert (
        AutoRechargeRequest.select()
        .where(
            AutoRechargeRequest.status == "processing",
            AutoRechargeRequest.lease_expires_at > utcnow(),
        )
        .count()
        == 0
    )
    while front.in_flight:  # the fake finishes what the dead workers started
        time.sleep(0.05)
    with tempfile.TemporaryFile() as log:
        fresh = _worker("--once", log=log)
        if fresh.wait(120) != 0:
            log.seek(0)
            pytest.fail(log.read().decode()[-2000:])
    _assert_converged(front, orgs)
    assert killed_mid_charge >= 5  # the kills did land while charges were under way
    # Auto-recharge keeps working for every organization.
    before = AutoRechargeRequest.select().count()
    for org_id in orgs:
        _spend_below_threshold(org_id)
    assert AutoRechargeRequest.select().count() == before + len(orgs)
    assert drain(get_gateway(), get_settings()) == len(orgs)
    _assert_converged(front, orgs)


def test_sigterm_finishes_the_charge_in_hand_and_stops(slow_stripe):
    front = slow_stripe
    front.hold = threading.Event()
    orgs = _armed_orgs(front.backend, 2)
    for org_id in orgs:
        _spend_below_threshold(org_id)
    worker = _worker("--poll", "0.05")
    try:
        assert front.intent_arrived.wait(60), "the worker never charged"
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the signal is delivered while the charge is in Stripe's hands
        front.hold.set()
        assert worker.wait(60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    statuses = sorted(r.status for r in AutoRechargeRequest.select())
    assert statuses == ["pending", "succeeded"], statuses
    untouched = AutoRechargeRequest.get(AutoRechargeRequest.status == "pending")
    assert untouched.attempts == 0
    assert sum(front.calls.values()) == 1


def _payment_intent_calls(front, attempt_id: str) -> int:
    return front.calls[f"auto-recharge:{attempt_id}"]


def test_a_permanent_refusal_fails_once_and_does_not_starve_others(slow_stripe):
    front = slow_stripe
    [broken, healthy] = _armed_orgs(front.backend, 2)
    # The broken organization's saved card was detached: Stripe answers 404 resource_missing.
    front.detached.add("pm_detached_0000")
    BillingAccount.update(stripe_payment_method_id="pm_detached_0000").where(
        BillingAccount.organization == broken
    ).execute()
    _spend_below_threshold(broken)
    _spend_below_threshold(healthy)  # enqueued after the broken one
    for _ in range(5):
        drain(get_gateway(), get_settings())
    failed = AutoRechargeRequest.get(AutoRechargeRequest.organization == broken)
    charged = AutoRechargeRequest.get(AutoRechargeRequest.organization == healthy)
    assert charged.status == "succeeded"
    assert BillingAccount.get_by_id(healthy).credits_balance == 5 * DOLLAR - 1 + 20 * DOLLAR
    assert failed.status == "failed" and failed.failure_kind == "permanent"
    assert "resource_missing" in failed.failure_reason
    assert failed.attempts == 1 and _payment_intent_calls(front, failed.id) == 1
    assert BillingAccount.get_by_id(broken).auto_recharge_failure_count == 1


def test_transient_errors_back_off_and_stop_at_the_cap(slow_stripe, monkeypatch, stripe_mode):
    monkeypatch.setenv("AUTO_RECHARGE_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("AUTO_RECHARGE_RETRY_BASE_SECONDS", "60")
    monkeypatch.setenv("AUTO_RECHARGE_RETRY_MAX_SECONDS", "600")
    get_settings.cache_clear()
    get_gateway.cache_clear()
    front = slow_stripe
    [flaky, healthy] = _armed_orgs(front.backend, 2)
    _spend_below_threshold(flaky)
    stripe_mode.fail_with = 503
    assert drain(get_gateway(), get_settings()) == 1
    request = AutoRechargeRequest.get(AutoRechargeRequest.organization == flaky)
    assert request.status == "pending" and request.attempts == 1
    assert request.next_attempt_at >= utcnow() + dt.timedelta(seconds=29)  # backing off
    stripe_mode.fail_with = None
    _spend_below_threshold(healthy)
    assert drain(get_gateway(), get_settings()) == 1  # only the healthy one is due
    assert AutoRechargeRequest.get(AutoRechargeRequest.organization == healthy).status == (
        "succeeded"
    )
    stripe_mode.fail_with = 503
    for _ in range(5):
        AutoRechargeRequest.update(next_attempt_at=utcnow()).where(
            AutoRechargeRequest.status == "pending"
        ).execute()
        drain(get_gateway(), get_settings())
    request = AutoRechargeRequest.get(AutoRechargeRequest.organization == flaky)
    assert request.status == "failed" and request.failure_kind == "transient"
    # three claims, each reaching Stripe: the first charged; the later two met the outage
    # when they looked for that charge
    assert request.attempts == 3 and _payment_intent_calls(front, request.id) == 1
    assert len(stripe_mode.sent("GET", "/v1/payment_intents")) == 2
    account = BillingAccount.get_by_id(flaky)
    assert account.auto_recharge_enabled and account.auto_recharge_failure_count == 0
    assert account.auto_recharge_in_flight_id is None


def test_a_webhook_settles_an_attempt_by_its_id(client, slow_stripe):
    """The worker died after Stripe declined but before it recorded anything: the attempt is
    `processing` with no PaymentIntent id; the webhook names it by the metadata's attempt id."""
    front = slow_stripe
    [org_id] = _armed_orgs(front.backend, 1)
    _spend_below_threshold(org_id)
    attempt = AutoRechargeRequest.get()
    AutoRechargeRequest.update(
        status="processing", attempts=1, lease_expires_at=utcnow() + dt.timedelta(hours=1)
    ).execute()
    intent = stripe_object(
        "payment_intent",
        id="pi_never_recorded",
        status="requires_payment_method",
        last_payment_error={"code": "card_declined"},
        metadata={"organization_id": org_id, "kind": "auto_recharge", "attempt_id": attempt.id},
    )
    body = event_body("payment_intent.payment_failed", intent)
    r = client.post(
        "/v1/webhooks/stripe",
        content=body,
        headers={"Stripe-Signature": signature_for(body), "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    settled = AutoRechargeRequest.get()
    assert settled.status == "failed" and "card_declined" in settled.failure_reason
    assert settled.stripe_payment_intent_id == "pi_never_recorded"
    assert BillingAccount.get_by_id(org_id).auto_recharge_in_flight_id is None
    _spend_below_threshold(org_id)  # the organization can be recharged again
    assert AutoRechargeRequest.select().where(AutoRechargeRequest.status == "pending").count() == 1
