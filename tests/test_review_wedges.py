"""Review of issue 11 ("nothing wedges"): breaks found on PostgreSQL, each shown by a test that
failed before its fix.

- an Idempotency-Key owner that lost its lease (slow, not dead) and then fails must not drop
  the claim its taker now holds: a third retry would otherwise run the work alongside the
  taker;
- the worker settling an auto-recharge attempt and the webhook reporting the same payment
  must not deadlock (they locked the attempt and the account in opposite orders);
- debits refused while auto-recharge is on but no card is saved must not enqueue attempts
  that fail and turn auto-recharge off, so that the card saved later is never charged.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest

from billing import accounts, auto_recharge, idempotency, ledger, recharge_policy, webhooks
from billing.accounts import locked_account
from billing.config import get_settings
from billing.errors import Conflict, PaymentRequired
from billing.stripe_gateway import ChargeOutcome
from billing.units import DOLLAR
from models import AutoRechargeRequest, BillingAccount, CreditEntry, database, is_postgres, utcnow
from tests.conftest import SERVICE_HEADERS
from tests.stripe_fakes import ScriptedGateway

# --- an Idempotency-Key owner that lost its lease -----------------------------------------


def _in_thread(target: Any, results: dict[str, Any], name: str) -> threading.Thread:
    def run() -> None:
        with database.connection_context():
            try:
                results[name] = target()
            except BaseException as exc:  # recorded for the test to assert on
                results[name] = exc

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread


@pytest.mark.parametrize("round_", range(3))
def test_a_slow_owner_that_fails_keeps_its_takers_claim(db, clock, round_):
    """The first request outlives its lease; a retry takes the claim over and works; the
    first then fails. A third retry must still see the claim in progress (409), not run the
    work a second time alongside the taker."""
    scope, key, body = f"review:{uuid.uuid4()}", "k-slow", {"n": 1}
    lease = get_settings().idempotency_lease_seconds
    first_working, release_first = threading.Event(), threading.Event()
    taker_working, release_taker = threading.Event(), threading.Event()
    ran: list[str] = []

    def first_work() -> dict[str, Any]:
        ran.append("first")
        first_working.set()
        release_first.wait(30)
        raise RuntimeError("the first request failed late")

    def taker_work() -> dict[str, Any]:
        ran.append("taker")
        taker_working.set()
        release_taker.wait(30)
        return {"by": "taker"}

    results: dict[str, Any] = {}
    first = _in_thread(lambda: idempotency.run_once(scope, key, body, first_work), results, "1")
    assert first_working.wait(30)
    clock.advance(seconds=lease + 1)  # the first is slow, not dead: its lease runs out
    taker = _in_thread(lambda: idempotency.run_once(scope, key, body, taker_work), results, "2")
    assert taker_working.wait(30)
    release_first.set()
    first.join(30)
    assert isinstance(results["1"], RuntimeError)

    def third_work() -> dict[str, Any]:
        ran.append("third")
        return {"by": "third"}

    with database.connection_context(), pytest.raises(Conflict, match="in progress"):
        idempotency.run_once(scope, key, body, third_work)
    release_taker.set()
    taker.join(30)
    assert results["2"] == {"by": "taker"}
    assert ran == ["first", "taker"]
    with database.connection_context():
        assert idempotency.run_once(scope, key, body, third_work) == {"by": "taker"}


# --- worker and webhook settling one attempt ----------------------------------------------


class _EventsAsSent:
    """A gateway whose events are already verified (the signature is not what is tested)."""

    local = False

    def verify_event(self, payload: bytes, signature: str) -> dict[str, Any]:
        return dict(json.loads(payload))


def _attempt_in_flight(org_id: str) -> AutoRechargeRequest:
    now = utcnow()
    attempt = AutoRechargeRequest.create(
        id=str(uuid.uuid4()),
        organization=org_id,
        amount=20 * DOLLAR,
        status="processing",
        attempts=1,
        created_at=now,
        updated_at=now,
        next_attempt_at=now,
        lease_expires_at=now,
    )
    BillingAccount.update(auto_recharge_in_flight_id=attempt.id).where(
        BillingAccount.organization == org_id
    ).execute()
    return attempt


@pytest.mark.parametrize("round_", range(3))
def test_worker_and_webhook_settling_one_payment_do_not_deadlock(org, monkeypatch, round_):
    """The worker records the success it got back from Stripe (attempt row, then the account's
    in-flight slot) while Stripe's payment_intent.succeeded webhook for the same payment is
    applied (account row, then attempt row). Neither may fail."""
    if not is_postgres():
        pytest.skip("row locks: SQLite serializes every write transaction")
    with database.connection_context():
        attempt = _attempt_in_flight(org.id)
    intent_id = f"pi_{uuid.uuid4().hex[:16]}"
    worker_holds_attempt, webhook_holds_account = threading.Event(), threading.Event()
    release = recharge_policy.release_in_flight
    attempt_for = auto_recharge._attempt_for

    def slow_release(account: BillingAccount, attempt_id: str) -> None:
        if threading.current_thread().name == "worker":
            worker_holds_attempt.set()
            webhook_holds_account.wait(5)  # the webhook gets this far, or cannot (fixed)
        release(account, attempt_id)

    def noted_attempt_for(*args: Any) -> Any:
        found = attempt_for(*args)
        if threading.current_thread().name == "webhook":
            webhook_holds_account.set()
        return found

    monkeypatch.setattr(recharge_policy, "release_in_flight", slow_release)
    monkeypatch.setattr(auto_recharge, "_attempt_for", noted_attempt_for)
    event = {
        "id": f"evt_{uuid.uuid4().hex}",
        "type": "payment_intent.succeeded",
        "created": 1,
        "data": {
            "object": {
                "id": intent_id,
                "object": "payment_intent",
                "amount": 2000,
                "amount_received": 2000,
                "status": "succeeded",
                "metadata": {
                    "organization_id": org.id,
                    "kind": "auto_recharge",
                    "attempt_id": attempt.id,
                },
            }
        },
    }
    payload = json.dumps(event).encode()
    results: dict[str, Any] = {}

    def worker_records_success() -> str:  # as the worker's outcome does: one unit of work
        with locked_account(org.id) as account:
            return auto_recharge.payment_succeeded(account, intent_id, 20 * DOLLAR, attempt.id)

    worker = _in_thread(worker_records_success, results, "worker")
    assert worker_holds_attempt.wait(30)
    webhook = _in_thread(
        lambda: webhooks.receive(payload, "t=1,v1=x", _EventsAsSent()),  # type: ignore[arg-type]
        results,
        "webhook",
    )
    worker.join(60)
    webhook.join(60)
    assert not isinstance(results["worker"], BaseException), results["worker"]
    assert not isinstance(results["webhook"], BaseException), results["webhook"]
    with database.connection_context():
        assert AutoRechargeRequest.get_by_id(attempt.id).status == "succeeded"
        account = BillingAccount.get_by_id(org.id)
        assert account.auto_recharge_in_flight_id is None
        assert account.credits_balance == 20 * DOLLAR  # granted once
        assert CreditEntry.select().where(CreditEntry.organization == org.id).count() == 1


# --- refusals with no card saved ------------------------------------------------------------


def test_refusals_before_a_card_is_saved_never_turn_auto_recharge_off(org, conn, clock):
    """Auto-recharge is switched on before any card is saved, and debits are refused across
    several cooldowns. Saving the card must then recharge: the refusals may not have spent
    the failure budget on attempts that had nothing to charge."""
    settings = get_settings()
    with locked_account(org.id) as account:
        ledger.grant(account, DOLLAR, "top_up", reason="seed")
    accounts.update_settings(
        org.id,
        {
            "auto_recharge_enabled": True,
            "auto_recharge_threshold": 5 * DOLLAR,
            "auto_recharge_amount": 20 * DOLLAR,
        },
    )
    gateway = ScriptedGateway(
        lambda attempt_id: ChargeOutcome("succeeded", f"pi_{attempt_id.replace('-', '')[:20]}")
    )
    for _ in range(settings.auto_recharge_max_failures + 1):
        with pytest.raises(PaymentRequired), locked_account(org.id) as account:
            ledger.debit(account, 50 * DOLLAR)
        auto_recharge.drain(gateway, settings)  # type: ignore[arg-type]
        clock.advance(seconds=settings.auto_recharge_cooldown_seconds + 1)
    account = BillingAccount.get_by_id(org.id)
    assert account.auto_recharge_enabled, account.auto_recharge_disabled_reason
    assert account.auto_recharge_failure_count == 0
    BillingAccount.update(stripe_customer_id="cus_review").where(
        BillingAccount.organization == org.id
    ).execute()
    with locked_account(org.id) as account:
        auto_recharge.remember_payment_method(account, "pm_review_card")
    assert auto_recharge.drain(gateway, settings) == 1  # type: ignore[arg-type]
    assert len(gateway.charged) == 1
    assert BillingAccount.get_by_id(org.id).credits_balance == 21 * DOLLAR


# --- content types are case-insensitive -----------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["APPLICATION/JSON", "Application/Json", "application/JSON; charset=utf-8"],
)
def test_a_json_body_in_any_letter_case_is_read(client, org, content_type):
    """RFC 9110: media types are case-insensitive. The middleware accepted these, and
    Connexion then handed the handler raw bytes: a 500 for every POST and PATCH."""
    ledger_seed(org.id)
    body = {"category": "api_call", "quantity": 1, "unitCostDecimillicents": 1, "referenceId": "u"}
    r = client.post(
        f"/v1/service/organizations/{org.id}/usage",
        content=json.dumps(body).encode(),
        headers={**SERVICE_HEADERS, "Content-Type": content_type},
    )
    assert r.status_code == 200, r.text
    patched = client.patch(
        f"/v1/organizations/{org.id}/billing",
        content=json.dumps({"usageCapDecimillicents": 5 * DOLLAR}).encode(),
        headers={**org.owner, "Content-Type": content_type},
    )
    assert patched.status_code == 200, patched.text
    bad = client.post(
        f"/v1/service/organizations/{org.id}/reservations",
        content=b"{",
        headers={**SERVICE_HEADERS, "Content-Type": content_type},
    )
    assert bad.status_code == 400, bad.text


def ledger_seed(org_id: str) -> None:
    with database.connection_context(), locked_account(org_id) as account:
        ledger.grant(account, 5 * DOLLAR, "top_up", reason="seed")


# --- one caller's Idempotency-Key is not another's Stripe key --------------------------------


def test_two_admins_with_one_idempotency_key_get_distinct_stripe_keys(client, org, stripe_mode):
    """Idempotency-Keys are the caller's (the replay scope names the user), but the Stripe key
    was `top-up:{org}:{key}`: a second admin who happened to pick the same key sent Stripe
    the first admin's key with other parameters, which real Stripe refuses for 24 hours
    (idempotency_error: every retry a 5xx), or, with the same body, was handed the other
    admin's session."""
    key = "top-up-1"
    owner = client.post(
        f"/v1/billing/{org.id}/top-up",
        json=TOP_UP,
        headers={**org.owner, "Idempotency-Key": key},
    )
    assert owner.status_code == 200, owner.text
    admin = client.post(
        f"/v1/billing/{org.id}/top-up",
        json={**TOP_UP, "amountDecimillicents": 20 * DOLLAR},
        headers={**org.admin, "Idempotency-Key": key},
    )
    assert admin.status_code == 200, admin.text
    sent = [k for k in stripe_mode.idempotency_keys if k and k.startswith("top-up")]
    assert len(sent) == 2 and len(set(sent)) == 2, sent
    checkout = {
        "organizationId": org.id,
        "subscriptionPlan": "pro",
        "successUrl": "https://example.com/ok",
        "cancelUrl": "https://example.com/no",
    }
    for caller in (org.owner, org.admin):
        r = client.post(
            "/v1/billing/checkout", json=checkout, headers={**caller, "Idempotency-Key": key}
        )
        assert r.status_code == 200, r.text
    sent = [k for k in stripe_mode.idempotency_keys if k and k.startswith("checkout")]
    assert len(sent) == 2 and len(set(sent)) == 2, sent


TOP_UP = {
    "amountDecimillicents": 10 * DOLLAR,
    "successUrl": "https://example.com/ok",
    "cancelUrl": "https://example.com/no",
}


# --- the rate limiter keys the credential the request is served as ---------------------------


@pytest.fixture
def limited_app(db):
    from handlers.app import create_app

    def make(**overrides: Any) -> Any:
        settings = get_settings().model_copy(
            update={"rate_limit_ip": "1000/minute", "rate_limit_principal": "3/minute", **overrides}
        )
        return create_app(settings)

    return make


def test_a_second_authorization_header_does_not_buy_a_new_budget(limited_app, org):
    """The request is authenticated with its first Authorization header; the limiter read the
    last one. A spent caller adding `Authorization: Bearer junk` after its own token was
    served as itself and counted as an unverified client, whose budget is per address."""
    url = f"/v1/billing/{org.id}/credits"
    with limited_app(trusted_proxy_count=1).test_client() as client:
        for n in range(3):
            forwarded = {"X-Forwarded-For": f"198.51.100.{n}"}
            assert client.get(url, headers={**org.owner, **forwarded}).status_code == 200
        for n in range(3, 6):
            headers = [
                ("Authorization", org.owner["Authorization"]),
                ("Authorization", "Bearer junk"),
                ("X-Forwarded-For", f"198.51.100.{n}"),
            ]
            assert client.get(url, headers=headers).status_code == 429
