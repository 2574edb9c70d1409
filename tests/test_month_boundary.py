"""The usage period is the UTC calendar month, half-open: a charge at 23:59:59.999 on the last
day belongs to that month, one at 00:00:00 on the first belongs to the next. The usage cap and
the default usage summary both follow it, checked with the clock standing on the boundary."""

from __future__ import annotations

import datetime as dt

import pytest

from billing import accounts, ledger
from billing.accounts import locked_account
from billing.errors import PaymentRequired
from tests.conftest import SERVICE_HEADERS

LAST_MOMENT = dt.datetime(2026, 11, 30, 23, 59, 59, 999_000)
FIRST_MOMENT = dt.datetime(2026, 12, 1, 0, 0, 0)
CAP = 1_000


@pytest.fixture
def capped(org, conn, clock):
    with locked_account(org.id) as account:
        ledger.grant(account, 1_000_000, "top_up", reason="seed")
    accounts.update_settings(org.id, {"usage_cap": CAP})
    return org


def test_cap_counts_the_last_moment_of_the_month(capped, clock):
    clock.set(LAST_MOMENT)
    with locked_account(capped.id) as account:
        ledger.debit(account, CAP)  # exactly the cap, from no prior spend: allowed
    with pytest.raises(PaymentRequired), locked_account(capped.id) as account:
        ledger.debit(account, 1)


def test_cap_starts_afresh_at_the_first_moment_of_the_next_month(capped, clock):
    clock.set(LAST_MOMENT)
    with locked_account(capped.id) as account:
        ledger.debit(account, CAP)
    clock.set(FIRST_MOMENT)
    with locked_account(capped.id) as account:
        ledger.debit(account, CAP)  # November's spend no longer counts
    with pytest.raises(PaymentRequired), locked_account(capped.id) as account:
        ledger.debit(account, 1)


def test_cap_with_no_prior_spend_allows_exactly_the_cap(capped, clock):
    clock.set(FIRST_MOMENT)
    with pytest.raises(PaymentRequired), locked_account(capped.id) as account:
        ledger.debit(account, CAP + 1)
    with locked_account(capped.id) as account:
        ledger.debit(account, CAP)


def _record(client, org_id: str, reference: str) -> None:
    r = client.post(
        f"/v1/service/organizations/{org_id}/usage",
        json={
            "category": "api_call",
            "quantity": 1,
            "unitCostDecimillicents": 10,
            "referenceId": reference,
        },
        headers=SERVICE_HEADERS,
    )
    assert r.status_code == 200, r.text


def _summary(client, org, **params: str) -> dict:
    r = client.get(
        f"/v1/organizations/{org.id}/usage",
        params={"category": "api_call", **params},
        headers=org.member,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_default_usage_period_on_either_side_of_the_boundary(client, org, clock):
    with ledger_connection(), locked_account(org.id) as account:
        ledger.grant(account, 1_000, "top_up", reason="seed")
    clock.set(LAST_MOMENT)
    _record(client, org.id, "november")
    november = _summary(client, org)
    assert (november["periodStart"], november["periodEnd"]) == (
        "2026-11-01T00:00:00Z",
        "2026-12-01T00:00:00Z",
    )
    assert november["totalQuantity"] == 1
    clock.set(FIRST_MOMENT)
    _record(client, org.id, "december-1")
    _record(client, org.id, "december-2")
    december = _summary(client, org)
    assert december["periodStart"] == "2026-12-01T00:00:00Z"
    assert december["totalQuantity"] == 2
    # The explicit half-open period ending at the boundary holds November's record only.
    explicit = _summary(
        client, org, periodStart="2026-11-30T23:59:59Z", periodEnd="2026-12-01T00:00:00Z"
    )
    assert explicit["totalQuantity"] == 1


def ledger_connection():
    from models import database

    return database.connection_context()
