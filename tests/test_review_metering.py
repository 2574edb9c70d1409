"""Outside review of issue 13 (metering at scale) and issue 12's operator/directory endpoints.

Each test here reproduced a break before its fix (numbers in the review report).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from billing import ledger, metering
from billing.organizations import create_organization
from models import BillingAccount, CreditEntry, database
from models.clock import use_clock

NOV_LAST_MS = dt.datetime(2026, 11, 30, 23, 59, 59, 999000)
DEC_FIRST = dt.datetime(2026, 12, 1)


@pytest.fixture
def capped_org(db) -> Iterator[str]:
    with database.connection_context():
        org_id = create_organization("review").id
        ledger.grant(org_id, 100_000, "top_up", "seed")
        BillingAccount.update(usage_cap=500).where(BillingAccount.organization == org_id).execute()
        yield org_id


def test_a_batch_straddling_midnight_keeps_the_usage_cap(capped_org):
    """A batch reads the clock once for its writes (November 23:59:59.999) and the cap check
    read it again per event; once the wall clock passed midnight the check saw December's empty
    spend while each charge still went into November: 2,000 charged against a 500 cap."""
    calls = 0

    def crossing_midnight() -> dt.datetime:
        nonlocal calls
        calls += 1
        return NOV_LAST_MS if calls == 1 else DEC_FIRST

    events = [metering.usage_event(capped_org, "api_call", 1, 100, f"r{i}") for i in range(20)]
    with use_clock(crossing_midnight):
        outcomes = metering.record_usage_batch(events)
    account = BillingAccount.get_by_id(capped_org)
    charged_in_november = -sum(
        e.amount
        for e in CreditEntry.select().where(
            (CreditEntry.organization == capped_org)
            & (CreditEntry.entry_type == "charge")
            & (CreditEntry.created_at < DEC_FIRST)
        )
    )
    assert charged_in_november <= 500, [o.status.value for o in outcomes]
    assert (account.spend_month, account.month_spend) == ("2026-11", charged_in_november)
    assert [o.status.value for o in outcomes] == ["recorded"] * 5 + ["refused"] * 15
