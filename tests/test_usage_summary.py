"""GET usage: sums per category over a half-open period, current month by default."""

from __future__ import annotations

import datetime as dt

import pytest

from billing import ledger, metering
from billing.accounts import locked_account
from models import database
from tests.conftest import MID_MONTH


def url(org_id: str) -> str:
    return f"/v1/organizations/{org_id}/usage"


@pytest.fixture
def usage(org, clock):
    with database.connection_context():
        with locked_account(org.id) as account:
            ledger.grant(account, 10**9, "adjustment", reason="seed")
        # Recorded in January 2020 (record, entry and daily rollup alike), before the others.
        clock.set(dt.datetime(2020, 1, 15))
        metering.record_usage(org.id, "api_call", 7, 1, "u-old")
        clock.set(MID_MONTH)
        metering.record_usage(org.id, "api_call", 3, 100, "u1")
        metering.record_usage(org.id, "api_call", 2, 100, "u2")
        metering.record_usage(org.id, "workflow_execution", 1, 999, "u3")
    return org


def test_default_period_is_current_month(client, usage):
    r = client.get(url(usage.id), params={"category": "api_call"}, headers=usage.member)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["totalQuantity"] == 5
    assert body["totalCostDecimillicents"] == 500
    assert body["periodStart"] == "2026-11-01T00:00:00Z"  # the clock's month
    assert body["periodEnd"] == "2026-12-01T00:00:00Z"
    assert body["category"] == "api_call"
    assert body["organizationId"] == usage.id


def test_explicit_period(client, usage):
    r = client.get(
        url(usage.id),
        params={
            "category": "api_call",
            "periodStart": "2020-01-01T00:00:00Z",
            "periodEnd": "2020-02-01T00:00:00+00:00",
        },
        headers=usage.member,
    )
    assert r.status_code == 200
    assert r.json()["totalQuantity"] == 7
    assert r.json()["totalCostDecimillicents"] == 7


def test_other_category_is_separate(client, usage):
    r = client.get(url(usage.id), params={"category": "workflow_execution"}, headers=usage.member)
    assert r.json()["totalCostDecimillicents"] == 999
    r = client.get(url(usage.id), params={"category": "openrouter_inference"}, headers=usage.member)
    assert r.json()["totalQuantity"] == 0


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"category": "nope"},
        {
            "category": "api_call",
            "periodStart": "2026-02-01T00:00:00Z",
            "periodEnd": "2026-01-01T00:00:00Z",
        },
        {"category": "api_call", "periodStart": "yesterday"},
        {"category": "api_call", "periodEnd": "2026-13-45T00:00:00Z"},
        {"category": "api_call", "unknown": "1"},
    ],
)
def test_bad_query_is_400(client, usage, params):
    r = client.get(url(usage.id), params=params, headers=usage.member)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "BadRequest"
