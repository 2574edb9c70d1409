"""Service-to-service operations over HTTP: credential, 402 guards, Idempotency-Key."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from billing import ledger
from billing.accounts import locked_account
from models import CreditEntry, IdempotencyRecord, UsageRecord, database
from tests.conftest import SERVICE_HEADERS


def usage_url(org_id):
    return f"/v1/service/organizations/{org_id}/usage"


def hold_url(org_id, rid=None, action=None):
    base = f"/v1/service/organizations/{org_id}/reservations"
    return base if rid is None else f"{base}/{rid}/{action}"


@pytest.fixture
def funded(org):
    with database.connection_context(), locked_account(org.id) as account:
        ledger.grant(account, 10_000, "top_up", reason="seed")
    return org


USAGE = {
    "category": "api_call",
    "quantity": 3,
    "unitCostDecimillicents": 100,
    "referenceId": "call-1",
    "metadata": {"path": "/x"},
}


def test_record_usage_debits_and_shows_in_usage_and_history(client, funded, clock):
    r = client.post(usage_url(funded.id), json=USAGE, headers=SERVICE_HEADERS)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["costDecimillicents"] == 300 and body["availableDecimillicents"] == 9_700
    assert body["replayed"] is False
    again = client.post(usage_url(funded.id), json=USAGE, headers=SERVICE_HEADERS).json()
    assert again["replayed"] is True and again["id"] == body["id"]
    summary = client.get(
        f"/v1/organizations/{funded.id}/usage",
        params={"category": "api_call"},
        headers=funded.member,
    ).json()
    assert summary["totalCostDecimillicents"] == 300
    history = client.get(f"/v1/billing/{funded.id}/credits/history", headers=funded.member).json()
    assert history["items"][0]["entryType"] == "usage"
    assert history["items"][0]["amountDecimillicents"] == -300
    assert history["items"][0]["referenceId"] == "call-1"


def test_service_ops_need_the_service_credential(client, funded):
    for headers in ({}, {"X-Service-Token": "wrong"}, funded.owner):
        r = client.post(usage_url(funded.id), json=USAGE, headers=headers)
        assert r.status_code == 401, headers
    with database.connection_context():
        assert UsageRecord.select().count() == 0


def test_insufficient_credit_is_402_problem(client, funded):
    r = client.post(usage_url(funded.id), json={**USAGE, "quantity": 101}, headers=SERVICE_HEADERS)
    assert r.status_code == 402
    assert r.json()["code"] == "PaymentRequired"
    assert "credits" in r.json()["detail"]


def test_usage_cap_over_http(client, funded, clock):
    client.patch(
        f"/v1/organizations/{funded.id}/billing",
        json={"usageCapDecimillicents": 250},
        headers=funded.owner,
    )
    r = client.post(usage_url(funded.id), json=USAGE, headers=SERVICE_HEADERS)
    assert r.status_code == 402 and "cap" in r.json()["detail"]
    client.patch(
        f"/v1/organizations/{funded.id}/billing",
        json={"usageCapDecimillicents": None},
        headers=funded.owner,
    )
    assert client.post(usage_url(funded.id), json=USAGE, headers=SERVICE_HEADERS).status_code == 200


def test_unknown_org_is_404(client, funded):
    r = client.post(usage_url(str(uuid.uuid4())), json=USAGE, headers=SERVICE_HEADERS)
    assert r.status_code == 404


@pytest.mark.parametrize(
    "bad",
    [
        {**USAGE, "quantity": 0},
        {**USAGE, "quantity": 1.0},
        {**USAGE, "unitCostDecimillicents": -1},
        {**USAGE, "category": "other"},
        {**USAGE, "referenceId": ""},
        {**USAGE, "referenceId": "has space"},
        {**USAGE, "extra": 1},
        {**USAGE, "quantity": 2**62, "unitCostDecimillicents": 4},
        {k: v for k, v in USAGE.items() if k != "referenceId"},
    ],
)
def test_bad_usage_is_400_and_writes_nothing(client, funded, bad):
    r = client.post(usage_url(funded.id), json=bad, headers=SERVICE_HEADERS)
    assert r.status_code == 400, r.text
    with database.connection_context():
        assert UsageRecord.select().count() == 0
        assert CreditEntry.select().count() == 1


def test_reservation_flow_over_http(client, funded):
    r = client.post(
        hold_url(funded.id),
        json={"amountDecimillicents": 4_000, "referenceId": "job"},
        headers=SERVICE_HEADERS,
    )
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    assert r.json()["availableDecimillicents"] == 6_000
    credits = client.get(f"/v1/billing/{funded.id}/credits", headers=funded.member).json()
    assert credits["reservedCreditsDecimillicents"] == 4_000
    r = client.post(
        hold_url(funded.id, rid, "finalize"),
        json={"actualAmountDecimillicents": 1_500},
        headers=SERVICE_HEADERS,
    )
    assert r.json()["status"] == "finalized" and r.json()["availableDecimillicents"] == 8_500
    r = client.post(hold_url(funded.id, rid, "release"), headers=SERVICE_HEADERS)
    assert r.status_code == 409
    r = client.post(hold_url(funded.id, str(uuid.uuid4()), "release"), headers=SERVICE_HEADERS)
    assert r.status_code == 404


def test_idempotency_key_replays_and_conflicts(client, funded):
    headers = {**SERVICE_HEADERS, "Idempotency-Key": "key-1"}
    first = client.post(usage_url(funded.id), json=USAGE, headers=headers)
    replay = client.post(usage_url(funded.id), json=USAGE, headers=headers)
    assert first.status_code == replay.status_code == 200
    assert replay.json() == first.json()  # the stored response, replayed is still false
    other = client.post(usage_url(funded.id), json={**USAGE, "quantity": 4}, headers=headers)
    assert other.status_code == 409 and other.json()["code"] == "Conflict"
    with database.connection_context():
        assert UsageRecord.select().count() == 1


def test_failed_request_frees_its_key(client, funded):
    headers = {**SERVICE_HEADERS, "Idempotency-Key": "key-2"}
    big = {**USAGE, "quantity": 1_000}
    assert client.post(usage_url(funded.id), json=big, headers=headers).status_code == 402
    with database.connection_context():
        with locked_account(funded.id) as account:
            ledger.grant(account, 100_000, "top_up", reason="more")
        assert IdempotencyRecord.select().count() == 0
    assert client.post(usage_url(funded.id), json=big, headers=headers).status_code == 200


def test_concurrent_same_key_does_the_work_once(client, funded, monkeypatch):
    """The key alone dedupes: the first request's work is held open until every other
    request with the same key has answered, so they can only see the claim in progress."""
    from handlers import service

    headers = {**SERVICE_HEADERS, "Idempotency-Key": "key-3"}
    body = {**USAGE, "referenceId": "concurrent"}
    calls: list[int] = []
    others_done = threading.Event()
    real = service.metering.record_usage

    def slow_record_usage(*args, **kwargs):
        calls.append(1)
        others_done.wait(timeout=30)
        return real(*args, **kwargs)

    monkeypatch.setattr(service.metering, "record_usage", slow_record_usage)

    def send(_):
        return client.post(usage_url(funded.id), json=body, headers=headers)

    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(send, 0)
        while not calls:  # the first request holds the claim
            time.sleep(0.01)
        rest = list(pool.map(send, range(15)))
        others_done.set()
        winner = first.result()
    assert winner.status_code == 200
    assert [r.status_code for r in rest] == [409] * 15
    assert all("in progress" in r.json()["detail"] for r in rest)
    assert len(calls) == 1
    replay = client.post(usage_url(funded.id), json=body, headers=headers)
    assert replay.status_code == 200 and replay.json() == winner.json()
    assert len(calls) == 1
    with database.connection_context():
        assert UsageRecord.select().count() == 1
        assert CreditEntry.select().where(CreditEntry.amount < 0).count() == 1
