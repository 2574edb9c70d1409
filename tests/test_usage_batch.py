"""POST /v1/service/usage/batch: up to 1,000 events, in order, each idempotent by reference.

Results come back one per event (recorded | duplicate | refused | conflict); a request invalid as
a whole writes nothing; concurrent batches over overlapping organizations neither deadlock nor
lose an update; the usage summary equals a recount from the records.
"""

from __future__ import annotations

import json
import os
import random
import threading
from collections import Counter

import pytest

from billing import ledger, metering
from billing.accounts import locked_account
from billing.audit import ledger_problems
from billing.organizations import create_organization
from billing.usage import current_month, summarize_usage
from models import ALL_MODELS, BillingAccount, UsageRecord, database, utcnow
from tests.conftest import SERVICE_HEADERS

URL = "/v1/service/usage/batch"


def event(org_id: str, ref: str, quantity: int = 1, unit_cost: int = 100, **extra) -> dict:
    return {
        "organizationId": org_id,
        "category": extra.pop("category", "api_call"),
        "quantity": quantity,
        "unitCostDecimillicents": unit_cost,
        "referenceId": ref,
        **extra,
    }


def post(client, events) -> object:
    return client.post(URL, json={"events": events}, headers=SERVICE_HEADERS)


def statuses(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [r["status"] for r in response.json()["results"]]


@pytest.fixture
def orgs(db):
    with database.connection_context():
        ids = [create_organization(f"batch-{i}").id for i in range(3)]
        with locked_account(ids[0]) as account:
            ledger.grant(account, 10_000, "top_up", reason="seed")
        with locked_account(ids[1]) as account:
            ledger.grant(account, 10_000, "top_up", reason="seed")
        BillingAccount.update(usage_cap=500).where(BillingAccount.organization == ids[1]).execute()
    return ids


def snapshot() -> dict[str, list[tuple]]:
    with database.connection_context():
        return {
            model._meta.table_name: sorted(tuple(map(str, row)) for row in model.select().tuples())
            for model in ALL_MODELS
        }


def test_mixed_outcomes_in_request_order(client, orgs):
    rich, capped, broke = orgs
    with database.connection_context():
        metering.record_usage(rich, "api_call", 2, 100, "before")
    r = post(
        client,
        [
            event(rich, "a1", 3),  # recorded: 300
            event(rich, "before", 2),  # duplicate of the single record
            event(rich, "before", 5),  # conflict: same reference, other values
            event(capped, "c1", 4),  # recorded: 400 of the 500 cap
            event(capped, "c2", 2),  # refused: 600 > cap
            event(capped, "c3", 1),  # recorded: 500, exactly the cap
            event(broke, "b1", 1),  # refused: no credits
            event(rich, "a1", 3),  # duplicate inside the batch
            event(rich, "a1", 4),  # conflict inside the batch
            event(rich, "free", 1, 0),  # recorded: zero cost
        ],
    )
    assert statuses(r) == [
        "recorded",
        "duplicate",
        "conflict",
        "recorded",
        "refused",
        "recorded",
        "refused",
        "duplicate",
        "conflict",
        "recorded",
    ]
    results = r.json()["results"]
    assert results[0]["usage"]["availableDecimillicents"] == 10_000 - 200 - 300
    assert results[1]["usage"]["referenceId"] == "before" and results[1]["usage"]["replayed"]
    assert "usage" not in results[2] and "other values" in results[2]["detail"]
    assert results[4]["reason"] == "usage_cap" and "usage" not in results[4]
    assert results[6]["reason"] == "insufficient_credits"
    assert results[7]["usage"]["id"] == results[0]["usage"]["id"]
    assert [x["referenceId"] for x in results] == [
        "a1", "before", "before", "c1", "c2", "c3", "b1", "a1", "a1", "free"
    ]  # fmt: skip
    with database.connection_context():
        balances = {o: BillingAccount.get_by_id(o).credits_balance for o in orgs}
        assert balances == {rich: 10_000 - 500, capped: 10_000 - 500, broke: 0}
        assert BillingAccount.get_by_id(capped).month_spend == 500
        assert UsageRecord.select().count() == 5
        for org_id in orgs:
            assert ledger_problems(org_id) == []


def test_a_refusal_does_not_stop_the_events_after_it(client, orgs):
    rich = orgs[0]
    results = statuses(post(client, [event(rich, "big", 1, 20_000), event(rich, "small", 1, 10)]))
    assert results == ["refused", "recorded"]
    # A refused reference was not recorded: it may be sent again and recorded.
    assert statuses(post(client, [event(rich, "big", 1, 10)])) == ["recorded"]


def test_the_same_batch_twice_applies_once(client, orgs):
    rich, capped, _ = orgs
    events = [event(rich, f"r{i}", i + 1, 10) for i in range(20)] + [event(capped, "x", 1)]
    first = post(client, events)
    assert set(statuses(first)) == {"recorded"}
    before = snapshot()
    again = post(client, events)
    assert set(statuses(again)) == {"duplicate"}
    assert [x["usage"]["id"] for x in again.json()["results"]] == [
        x["usage"]["id"] for x in first.json()["results"]
    ]
    assert snapshot() == before


def test_single_records_and_batches_share_references(client, orgs):
    rich = orgs[0]
    assert statuses(post(client, [event(rich, "shared", 2)])) == ["recorded"]
    single = client.post(
        f"/v1/service/organizations/{rich}/usage",
        json={"category": "api_call", "quantity": 2, "unitCostDecimillicents": 100,
              "referenceId": "shared"},
        headers=SERVICE_HEADERS,
    )  # fmt: skip
    assert single.status_code == 200 and single.json()["replayed"] is True
    other = client.post(
        f"/v1/service/organizations/{rich}/usage",
        json={"category": "api_call", "quantity": 3, "unitCostDecimillicents": 100,
              "referenceId": "shared"},
        headers=SERVICE_HEADERS,
    )  # fmt: skip
    assert other.status_code == 409


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"events": []}',
        b'{"events": {}}',
        b'{"other": 1}',
        "too many",
        "bad category at the end",
        "bad quantity in the middle",
        "unknown field",
        "metadata too big",
        "unknown organization",
        "bad organization id",
        "cost overflows",
    ],
)
def test_an_invalid_batch_writes_nothing(client, orgs, body):
    rich = orgs[0]
    good = [event(rich, f"ok{i}") for i in range(10)]
    bodies = {
        "too many": {"events": [event(rich, f"m{i}") for i in range(1001)]},
        "bad category at the end": {"events": [*good, event(rich, "z", category="nope")]},
        "bad quantity in the middle": {"events": [*good[:5], event(rich, "z", 0), *good[5:]]},
        "unknown field": {"events": [*good, {**event(rich, "z"), "extra": 1}]},
        "metadata too big": {"events": [*good, event(rich, "z", metadata={"k": "x" * 5000})]},
        "unknown organization": {
            "events": [*good, event("00000000-0000-4000-8000-000000000000", "z")]
        },
        "bad organization id": {"events": [*good, event("not-a-uuid", "z")]},
        "cost overflows": {"events": [*good, event(rich, "z", 2**62, 4)]},
    }
    raw = body if isinstance(body, bytes) else json.dumps(bodies[body]).encode()
    before = snapshot()
    r = client.post(
        URL, content=raw, headers={**SERVICE_HEADERS, "Content-Type": "application/json"}
    )
    assert r.status_code in (400, 404), r.text
    assert r.status_code == (404 if body == "unknown organization" else 400)
    assert r.headers["content-type"].startswith("application/problem+json")
    assert snapshot() == before


def test_service_token_is_required(client, orgs):
    r = client.post(URL, json={"events": [event(orgs[0], "x")]})
    assert r.status_code == 401
    assert snapshot()["usage_records"] == []


def _recount(org_id: str, category: str) -> tuple[int, int]:
    start, end = current_month(utcnow())
    rows = UsageRecord.select().where(
        (UsageRecord.organization == org_id)
        & (UsageRecord.category == category)
        & (UsageRecord.created_at >= start)
        & (UsageRecord.created_at < end)
    )
    return sum(r.quantity for r in rows), sum(r.cost for r in rows)


ROUNDS = int(os.environ.get("BATCH_RACE_ROUNDS", "5"))
THREADS = 6


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_concurrent_batches_over_overlapping_orgs(db, round_):
    """Threads send batches whose events touch the same organizations in different orders.

    The accounts are locked in sorted order, so no batch deadlocks (PostgreSQL would abort one
    with a deadlock error otherwise); afterwards each balance is exactly the seed minus each
    distinct reference's cost once, and the audit is clean.
    """
    rng = random.Random(round_)
    with database.connection_context():
        org_ids = [create_organization(f"c{round_}-{i}").id for i in range(8)]
        for org_id in org_ids:
            with locked_account(org_id) as account:
                ledger.grant(account, 10**9, "top_up", reason="seed")
    # Each thread: 3 batches; references overlap across threads (the same event sent twice).
    plans = []
    for _t in range(THREADS):
        batches = []
        for _b in range(3):
            events = []
            for _ in range(60):
                org_id = rng.choice(org_ids)
                ref = f"ref-{rng.randrange(120)}"
                events.append(metering.UsageEvent(org_id, "api_call", len(ref), 7, ref, None))
            batches.append(events)
        plans.append(batches)
    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []
    outcomes: list[list[metering.EventOutcome]] = []

    def worker(batches) -> None:
        try:
            with database.connection_context():
                barrier.wait()
                for events in batches:
                    outcomes.append(metering.record_usage_batch(events))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    distinct = {(e.organization_id, e.reference_id): e.cost for p in plans for b in p for e in b}
    recorded = Counter(s.value for batch in outcomes for s in (o.status for o in batch))
    assert recorded["recorded"] == len(distinct)
    assert recorded["refused"] == recorded["conflict"] == 0
    with database.connection_context():
        for org_id in org_ids:
            spent = sum(cost for (o, _), cost in distinct.items() if o == org_id)
            account = BillingAccount.get_by_id(org_id)
            assert account.credits_balance == 10**9 - spent
            assert account.month_spend == spent
            assert ledger_problems(org_id) == []
            summary = summarize_usage(org_id, "api_call", *current_month(utcnow()))
            assert (summary.total_quantity, summary.total_cost) == _recount(org_id, "api_call")
    assert len(outcomes) == THREADS * 3
