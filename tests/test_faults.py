"""Fault injection: Stripe failing in every way, the database failing mid-transaction, a
process killed inside a ledger transaction, and a storm of replayed webhooks."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import peewee
import pytest

from billing import ledger, metering
from billing.accounts import locked_account
from billing.config import get_settings
from billing.stripe_gateway import get_gateway
from billing.units import CENT
from models import (
    BillingAccount,
    CheckoutSession,
    CreditEntry,
    UsageRecord,
    WebhookEvent,
    database,
)
from tests.conftest import SERVICE_HEADERS
from tests.ledger_checks import assert_ledger_invariants
from tests.stripe_fakes import event_body, signature_for, stripe_object

URLS = {"successUrl": "https://app.example.com/ok", "cancelUrl": "https://app.example.com/no"}


@pytest.fixture
def retrying(stripe_mode, monkeypatch):
    """Stripe mode with 2 retries and a short timeout, as production would configure."""
    monkeypatch.setenv("STRIPE_MAX_RETRIES", "2")
    monkeypatch.setenv("STRIPE_TIMEOUT_SECONDS", "0.5")
    get_settings.cache_clear()
    get_gateway.cache_clear()
    yield stripe_mode
    get_settings.cache_clear()
    get_gateway.cache_clear()


def _checkout(client, org):
    return client.post(
        f"/v1/billing/{org.id}/top-up",
        json={"amountDecimillicents": 100 * CENT, **URLS},
        headers=org.owner,
    )


def _nothing_written(org):
    with database.connection_context():
        assert BillingAccount.get_by_id(org.id).stripe_customer_id is None
        assert CheckoutSession.select().count() == 0


@pytest.mark.parametrize(("status", "attempts"), [(500, 3), (503, 3), (429, 1), (409, 3)])
def test_stripe_errors_are_retried_as_configured_then_reported(
    client, org, retrying, status, attempts
):
    retrying.fail_with = status
    r = _checkout(client, org)
    # Stripe being down, busy or rate-limiting us is our outage, not the caller's mistake: a
    # 500 problem that says so (the contract has no 502/503), after the configured retries.
    assert r.status_code == 500, r.text
    assert r.json()["code"] == "InternalError"
    assert "payment provider" in r.json()["detail"]
    assert "Traceback" not in r.text and "injected" not in r.text
    assert len(retrying.sent("POST", "/v1/customers")) == attempts
    # Every retry reuses one idempotency key, so Stripe applies the create at most once.
    assert len(set(retrying.idempotency_keys)) == 1
    _nothing_written(org)


def test_stripe_timeout_is_a_clear_problem(client, org, retrying):
    retrying.delay = 1.5
    r = _checkout(client, org)
    assert r.status_code == 500
    assert "payment provider" in r.json()["detail"]
    assert len(retrying.sent("POST", "/v1/customers")) == 3
    _nothing_written(org)
    retrying.delay = 0
    assert _checkout(client, org).status_code == 200  # and it recovers


def test_database_failure_mid_transaction_leaves_nothing(client, org, monkeypatch):
    """The database fails on the debit's SECOND write, after the first one went through:
    the partial write must roll back with the rest."""
    with database.connection_context(), locked_account(org.id) as account:
        ledger.grant(account, 1000, "top_up", reason="seed")
    real_write = metering._write

    def fail_after_writing(*args, **kwargs):
        real_write(*args, **kwargs)  # the rows are written inside the transaction, then it dies
        raise peewee.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(metering, "_write", fail_after_writing)
    usage = {
        "category": "api_call",
        "quantity": 1,
        "unitCostDecimillicents": 300,
        "referenceId": "mid-failure",
    }
    r = client.post(
        f"/v1/service/organizations/{org.id}/usage", json=usage, headers=SERVICE_HEADERS
    )
    monkeypatch.undo()
    assert r.status_code == 500 and "database" in r.json()["detail"]
    monkeypatch.setattr(metering, "_write", real_write)
    with database.connection_context():
        account = assert_ledger_invariants(org.id)
        assert account.credits_balance == 1000
        assert CreditEntry.select().count() == 1  # the seed only
        assert UsageRecord.select().count() == 0
    retry = client.post(
        f"/v1/service/organizations/{org.id}/usage", json=usage, headers=SERVICE_HEADERS
    )
    assert retry.status_code == 200 and retry.json()["availableDecimillicents"] == 700


KILLER = """
import os, sys
from billing import ledger
from billing.accounts import locked_account
from models import connect_database
connect_database(sys.argv[1])
with locked_account(sys.argv[2]) as account:
    ledger.debit(account, 400, reason="doomed")
    os._exit(9)  # the process dies inside the transaction, before commit
"""


def test_process_killed_inside_a_ledger_transaction_leaves_no_partial_entry(org):
    with database.connection_context(), locked_account(org.id) as account:
        ledger.grant(account, 1000, "top_up", reason="seed")
    result = subprocess.run(
        [sys.executable, "-c", KILLER, get_settings().database_url, org.id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 9, result.stderr
    with database.connection_context():
        account = assert_ledger_invariants(org.id)
        assert account.credits_balance == 1000
        assert CreditEntry.select().count() == 1
        # The database is not left locked: the next debit goes through.
        with locked_account(org.id) as account:
            assert ledger.debit(account, 400).balance == 600


def test_replay_storm_applies_each_event_once(client, org, stripe_mode):
    """1,000 deliveries of 50 distinct events from 16 concurrent senders."""
    bodies = []
    for i in range(50):
        session = stripe_object(
            "checkout.session",
            id=f"cs_storm_{i}",
            mode="payment",
            client_reference_id=org.id,
            metadata={
                "organization_id": org.id,
                "kind": "top_up",
                "amount_decimillicents": str(100 * CENT),
            },
            amount_total=100,
            currency="usd",
            payment_status="paid",
            payment_intent=f"pi_storm_{i}",
        )
        bodies.append(event_body("checkout.session.completed", session, event_id=f"evt_storm_{i}"))
    deliveries = [bodies[i % 50] for i in range(1000)]

    def deliver(body):
        return client.post(
            "/v1/webhooks/stripe",
            content=body,
            headers={"Stripe-Signature": signature_for(body), "Content-Type": "application/json"},
        )

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(deliver, deliveries))
    assert [r.status_code for r in responses] == [200] * 1000
    assert sum(not r.json()["idempotent"] for r in responses) == 50
    with database.connection_context():
        assert WebhookEvent.select().count() == 50
        assert CreditEntry.select().count() == 50
        account = assert_ledger_invariants(org.id)
        assert account.credits_balance == 50 * 100 * CENT
