"""Issue 11, failures 4-8: nothing a caller sends, and no crashed process, wedges an
organization.

- the longest legal path ids, subjects and keys fit the idempotency table (on PostgreSQL,
  which enforces column lengths);
- an Idempotency-Key whose process died is taken over once its lease expires;
- at zero balance, a refused debit (and a new payment method) re-evaluates auto-recharge;
- the rate limiter keys a bearer caller by its verified subject, and takes the client address
  TRUSTED_PROXY_COUNT entries from the right of X-Forwarded-For;
- a body with a missing or non-JSON Content-Type is a 400 problem, never a 500.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import pytest

from billing import accounts, auto_recharge, ledger
from billing.accounts import locked_account
from billing.config import get_settings
from billing.organizations import add_member, create_organization
from billing.units import DOLLAR
from models import AutoRechargeRequest, BillingAccount, IdempotencyRecord, database, utcnow
from tests.conftest import SERVICE_HEADERS, token_for

LONGEST_SUB = "u" * 255  # billing.auth accepts subjects up to 255 characters
LONGEST_KEY = "K" * 255  # the contract's maxLength for Idempotency-Key
TOP_UP = {
    "amountDecimillicents": 10 * DOLLAR,
    "successUrl": "https://example.com/ok",
    "cancelUrl": "https://example.com/no",
}


def _funded(org_id: str, amount: int = 50 * DOLLAR) -> None:
    with database.connection_context(), locked_account(org_id) as account:
        ledger.grant(account, amount, "top_up", reason="seed")


# --- 4. fixed-size idempotency scopes -----------------------------------------------------


def test_finalize_with_the_longest_key_fits(client, org):
    _funded(org.id)
    base = f"/v1/service/organizations/{org.id}/reservations"
    held = client.post(
        base,
        json={"amountDecimillicents": DOLLAR, "referenceId": "job-1"},
        headers={**SERVICE_HEADERS, "Idempotency-Key": LONGEST_KEY},
    )
    assert held.status_code == 200, held.text
    rid = held.json()["id"]
    headers = {**SERVICE_HEADERS, "Idempotency-Key": LONGEST_KEY}
    done = client.post(
        f"{base}/{rid}/finalize", json={"actualAmountDecimillicents": DOLLAR}, headers=headers
    )
    assert done.status_code == 200, done.text
    again = client.post(
        f"{base}/{rid}/finalize", json={"actualAmountDecimillicents": DOLLAR}, headers=headers
    )
    assert again.status_code == 200 and again.json() == done.json()
    other = client.post(
        f"{base}/{rid}/finalize", json={"actualAmountDecimillicents": 2}, headers=headers
    )
    assert other.status_code == 409
    released = client.post(f"{base}/{rid}/release", headers=headers)
    assert released.status_code in (200, 409), released.text  # never a 500


def test_top_up_and_portal_for_the_longest_subject_fit(client):
    with database.connection_context():
        organization = create_organization("long subject")
        add_member(organization.id, LONGEST_SUB, "owner", "o@example.com")
    headers = {
        "Authorization": f"Bearer {token_for(LONGEST_SUB)}",
        "Idempotency-Key": LONGEST_KEY,
    }
    first = client.post(f"/v1/billing/{organization.id}/top-up", json=TOP_UP, headers=headers)
    assert first.status_code == 200, first.text
    again = client.post(f"/v1/billing/{organization.id}/top-up", json=TOP_UP, headers=headers)
    assert again.json() == first.json()
    portal = client.post(
        "/v1/billing/portal",
        json={"organizationId": organization.id, "returnUrl": "https://example.com/r"},
        headers=headers,
    )
    assert portal.status_code == 200, portal.text
    with database.connection_context():
        assert all(len(r.scope) <= 100 for r in IdempotencyRecord.select())


# --- 5. an Idempotency-Key whose process died -----------------------------------------


def _abandoned_claim(scope: str, key: str, body: object, lease_expired: bool) -> None:
    """The row a process leaves when it dies between claiming a key and finishing."""
    from billing import idempotency

    now = utcnow()
    IdempotencyRecord.create(
        scope=idempotency.scope_digest(scope),
        idempotency_key=key,
        fingerprint=idempotency.fingerprint(body),
        lease_expires_at=now + dt.timedelta(seconds=-1 if lease_expired else 600),
    )


def test_a_dead_claim_is_taken_over_once_its_lease_expires(client, org):
    _funded(org.id)
    body = {"amountDecimillicents": DOLLAR, "referenceId": "job-dead"}
    url = f"/v1/service/organizations/{org.id}/reservations"
    with database.connection_context():
        _abandoned_claim(f"service:createReservation:{org.id}", "k-dead", body, True)
        _abandoned_claim(f"service:createReservation:{org.id}", "k-alive", body, False)
    headers = {**SERVICE_HEADERS, "Idempotency-Key": "k-alive"}
    assert client.post(url, json=body, headers=headers).status_code == 409  # still leased
    headers = {**SERVICE_HEADERS, "Idempotency-Key": "k-dead"}
    other = client.post(url, json={**body, "amountDecimillicents": 2}, headers=headers)
    assert other.status_code == 409  # a different body never takes the claim over
    taken = client.post(url, json=body, headers=headers)
    assert taken.status_code == 200, taken.text
    replay = client.post(url, json=body, headers=headers)
    assert replay.status_code == 200 and replay.json() == taken.json()
    with database.connection_context():
        assert BillingAccount.get_by_id(org.id).reserved_credits == DOLLAR


# --- 6. at zero balance, auto-recharge restarts ----------------------------------------


def _arm_with_card(org_id: str) -> None:
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
    BillingAccount.update(
        stripe_customer_id="cus_local", stripe_payment_method_id="pm_local_card"
    ).where(BillingAccount.organization == org_id).execute()


def _past_cooldown(org_id: str) -> None:
    hour_ago = utcnow() - dt.timedelta(hours=1)
    AutoRechargeRequest.update(created_at=hour_ago).execute()
    BillingAccount.update(auto_recharge_last_requested_at=hour_ago).where(
        BillingAccount.organization == org_id
    ).execute()


def test_a_refused_debit_enqueues_a_recharge(client, org):
    with database.connection_context():
        _arm_with_card(org.id)
        # Spending everything in one go leaves no debit that "crossed" the threshold later.
        with locked_account(org.id) as account:
            ledger.debit(account, 10 * DOLLAR)
        AutoRechargeRequest.update(status="failed", completed_at=utcnow()).execute()
        BillingAccount.update(auto_recharge_in_flight_id=None).execute()
        _past_cooldown(org.id)
    r = client.post(
        f"/v1/service/organizations/{org.id}/usage",
        json={
            "category": "api_call",
            "quantity": 1,
            "unitCostDecimillicents": DOLLAR,
            "referenceId": "u-refused",
        },
        headers=SERVICE_HEADERS,
    )
    assert r.status_code == 402
    with database.connection_context():
        pending = list(AutoRechargeRequest.select().where(AutoRechargeRequest.status == "pending"))
        assert len(pending) == 1
        # A second refusal while that one is in flight adds nothing.
        with pytest.raises(Exception, match="credits"):
            ledger.reserve(org.id, DOLLAR, reference_id="r-refused")
        assert (
            AutoRechargeRequest.select().where(AutoRechargeRequest.status == "pending").count() == 1
        )
        from billing.stripe_gateway import get_gateway

        assert auto_recharge.drain(get_gateway(), get_settings()) == 1
        assert BillingAccount.get_by_id(org.id).credits_balance == 20 * DOLLAR
        with locked_account(org.id) as account:
            ledger.debit(account, DOLLAR)  # spending works again


def test_a_refusal_respects_the_cooldown(org, conn):
    _arm_with_card(org.id)
    with locked_account(org.id) as account:
        ledger.debit(account, 6 * DOLLAR)  # crosses the threshold: one request
    AutoRechargeRequest.update(status="failed", completed_at=utcnow()).execute()
    BillingAccount.update(auto_recharge_in_flight_id=None).execute()
    with pytest.raises(Exception, match="credits"), locked_account(org.id) as account:
        ledger.debit(account, 50 * DOLLAR)
    assert AutoRechargeRequest.select().count() == 1  # within the cooldown


def test_a_new_payment_method_enqueues_a_recharge(org, conn):
    _arm_with_card(org.id)
    BillingAccount.update(stripe_payment_method_id=None).execute()
    with locked_account(org.id) as account:
        ledger.debit(account, 6 * DOLLAR)  # below the threshold, but no card: nothing to charge
    from billing.stripe_gateway import get_gateway

    assert AutoRechargeRequest.select().count() == 0
    with locked_account(org.id) as account:
        auto_recharge.remember_payment_method(account, "pm_new_card")
    assert AutoRechargeRequest.select().where(AutoRechargeRequest.status == "pending").count() == 1
    auto_recharge.drain(get_gateway(), get_settings())
    assert BillingAccount.get_by_id(org.id).credits_balance == 24 * DOLLAR


# --- 7. rate-limit identity ----------------------------------------------------------------


@pytest.fixture
def limited_app(db):
    from handlers.app import create_app

    def make(**overrides):
        settings = get_settings().model_copy(
            update={
                "rate_limit_ip": "1000/minute",
                "rate_limit_principal": "3/minute",
                **overrides,
            }
        )
        return create_app(settings)

    return make


@pytest.mark.parametrize("scheme", ["Bearer   ", "bearer ", "BEARER\t"])
def test_respelled_bearer_shares_the_callers_budget(limited_app, org, scheme):
    url = f"/v1/billing/{org.id}/credits"
    token = org.owner["Authorization"].split(" ", 1)[1]
    with limited_app().test_client() as client:
        for _ in range(3):
            assert client.get(url, headers=org.owner).status_code == 200
        again = client.get(url, headers={"Authorization": f"{scheme}{token}"})
        assert again.status_code == 429


def test_a_fresh_token_for_the_same_subject_shares_the_budget(limited_app, org):
    url = f"/v1/billing/{org.id}/credits"
    user = f"owner-{uuid.uuid4().hex[:6]}"
    with database.connection_context():
        add_member(org.id, user, "owner", None)
    with limited_app().test_client() as client:
        for ttl in (3600, 3601, 3602):
            headers = {"Authorization": f"Bearer {token_for(user, ttl=ttl)}"}
            assert client.get(url, headers=headers).status_code == 200
        headers = {"Authorization": f"Bearer {token_for(user, ttl=3603)}"}
        assert client.get(url, headers=headers).status_code == 429


def test_spoofed_forwarded_for_does_not_buy_a_new_budget(limited_app, org):
    url = f"/v1/billing/{org.id}/credits"
    with limited_app(rate_limit_ip="3/minute", trusted_proxy_count=1).test_client() as client:
        for n in range(3):
            spoof = {"X-Forwarded-For": f"10.0.0.{n}, 203.0.113.7"}
            assert client.get(url, headers={**org.owner, **spoof}).status_code == 200
        spoof = {"X-Forwarded-For": "10.9.9.9, 203.0.113.7"}
        assert client.get(url, headers={**org.admin, **spoof}).status_code == 429
        other_client = {"X-Forwarded-For": "10.9.9.9, 198.51.100.1"}
        assert client.get(url, headers={**org.admin, **other_client}).status_code == 200


def test_trusted_proxy_count_is_validated(monkeypatch):
    from billing.config import ConfigError, load_settings

    monkeypatch.setenv("TRUSTED_PROXY_COUNT", "-1")
    with pytest.raises(ConfigError, match="TRUSTED_PROXY_COUNT"):
        load_settings()
    monkeypatch.delenv("TRUSTED_PROXY_COUNT")
    monkeypatch.setenv("TRUST_FORWARDED_FOR", "true")  # the deprecated switch: one proxy
    assert load_settings().trusted_proxy_count == 1


# --- 8. content types ----------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_a_body_without_a_json_content_type_is_a_400(client, org, method, content_type):
    if method == "PATCH":
        url, body = f"/v1/organizations/{org.id}/billing", {"usageCapDecimillicents": 5}
    else:
        url, body = f"/v1/billing/{org.id}/top-up", TOP_UP
    headers = dict(org.owner)
    if content_type:
        headers["Content-Type"] = content_type
    r = client.request(method, url, content=json.dumps(body).encode(), headers=headers)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "BadRequest"


def test_a_service_body_without_content_type_is_a_400(client, org):
    url = f"/v1/service/organizations/{org.id}/reservations"
    body = json.dumps({"amountDecimillicents": 1, "referenceId": "x"}).encode()
    r = client.post(url, content=body, headers=SERVICE_HEADERS)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "BadRequest"


def test_stripe_idempotency_keys_stay_within_stripes_limit(client, org, stripe_mode):
    """`top-up:{org}:{Idempotency-Key}` can reach 299 characters; Stripe takes at most 255."""
    headers = {**org.owner, "Idempotency-Key": LONGEST_KEY}
    first = client.post(f"/v1/billing/{org.id}/top-up", json=TOP_UP, headers=headers)
    assert first.status_code == 200, first.text
    sent = [k for k in stripe_mode.idempotency_keys if k and k.startswith("top-up")]
    assert sent and all(len(k) <= 255 for k in sent)
    other = {**org.owner, "Idempotency-Key": LONGEST_KEY[:-1] + "L"}
    client.post(f"/v1/billing/{org.id}/top-up", json=TOP_UP, headers=other)
    sent = [k for k in stripe_mode.idempotency_keys if k and k.startswith("top-up")]
    assert len(set(sent)) == 2  # distinct caller keys stay distinct Stripe keys


@pytest.mark.parametrize("round_", range(5))
def test_concurrent_takeovers_of_a_dead_claim_run_the_work_once(app, org, round_):
    """Eight retries race to take over one expired claim: one wins and does the work (one
    checkout session); the others answer 409 "in progress" or the winner's stored response."""
    import threading

    import jwt

    from models import CheckoutSession

    token = org.owner["Authorization"].split()[1]
    owner_id = jwt.decode(token, options={"verify_signature": False})["sub"]
    scope = f"user:{owner_id}:top-up:{org.id}"
    with database.connection_context():
        _abandoned_claim(scope, "k-race", TOP_UP, True)
    barrier = threading.Barrier(8)
    answers: list[tuple[int, Any]] = []

    def retry() -> None:
        with app.test_client() as c:
            barrier.wait()
            r = c.post(
                f"/v1/billing/{org.id}/top-up",
                json=TOP_UP,
                headers={**org.owner, "Idempotency-Key": "k-race"},
            )
            answers.append((r.status_code, r.json()))

    threads = [threading.Thread(target=retry) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted({status for status, _ in answers}) in ([200], [200, 409]), answers
    assert len({json.dumps(body) for status, body in answers if status == 200}) == 1
    with database.connection_context():
        assert CheckoutSession.select().where(CheckoutSession.organization == org.id).count() == 1
