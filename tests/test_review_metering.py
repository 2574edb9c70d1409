"""Outside review of issue 13 (metering at scale) and issue 12's operator/directory endpoints.

Each test here reproduced a break before its fix (numbers in the review report).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import pytest

from billing import ledger, metering
from billing.accounts import locked_account
from billing.organizations import create_organization
from models import AutoRechargeRequest, BillingAccount, CreditEntry, database
from models.clock import use_clock

NOV_LAST_MS = dt.datetime(2026, 11, 30, 23, 59, 59, 999000)
DEC_FIRST = dt.datetime(2026, 12, 1)


@pytest.fixture
def capped_org(db) -> Iterator[str]:
    with database.connection_context():
        org_id = create_organization("review").id
        with locked_account(org_id) as account:
            ledger.grant(account, 100_000, "top_up", reason="seed")
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


def _statements(action) -> list[str]:
    from tests.test_metering_scale import statements_of

    return statements_of(action)


def test_a_batch_refused_for_lack_of_credit_costs_the_same_over_5_or_50_organizations(db):
    """Each organization refused for lack of credit got its own transaction and row lock after
    the batch committed (to consider auto-recharge, even with auto-recharge off): 7 statements
    for 5 organizations, 52 for 50. The batch's own locks decide it, in its own transaction."""
    counts = {}
    with database.connection_context():
        for n in (5, 50):
            orgs = [create_organization(f"broke-{n}-{i}").id for i in range(n)]
            events = [metering.usage_event(o, "api_call", 1, 100, "r") for o in orgs]
            counts[n] = len(_statements(lambda events=events: metering.record_usage_batch(events)))
        assert counts[5] == counts[50], counts
        # With auto-recharge on, a refusal still asks for exactly one recharge (and a repeat
        # inside the cooldown none).
        org_id = create_organization("recharge").id
        BillingAccount.update(  # a saved card: without one no recharge is requested at all
            auto_recharge_enabled=True,
            auto_recharge_threshold=1000,
            auto_recharge_amount=10**6,
            stripe_customer_id="cus_review",
            stripe_payment_method_id="pm_review",
        ).where(BillingAccount.organization == org_id).execute()
        event = metering.usage_event(org_id, "api_call", 1, 100, "r")
        for _ in range(2):
            (outcome,) = metering.record_usage_batch([event])
            assert outcome.refusal_code == "insufficient_credits"
        requests = AutoRechargeRequest.select().where(AutoRechargeRequest.organization == org_id)
        assert [r.amount for r in requests] == [10**6]
        account = BillingAccount.get_by_id(org_id)
        assert account.auto_recharge_in_flight_id == requests.get().id


@pytest.mark.parametrize(
    ("user_id", "email"),
    [
        ("a\x00b", None),  # PostgreSQL refuses NUL: psycopg2 raised ValueError (a traceback)
        ("u" * 256, None),  # longer than memberships.user_id: DataError on PostgreSQL
        ("has space", None),
        ("dana", "not-an-email"),  # stored as is before
        ("dana", "d@" + "e" * 250 + ".io"),  # longer than memberships.email
    ],
)
def test_directory_service_refuses_what_the_contract_refuses(db, user_id, email):
    """`scripts.admin put-member/remove-member` reach the directory service without the HTTP
    layer's checks: a user id or email the contract refuses crashed on PostgreSQL or was stored
    (on SQLite) where the API could never address it. The service now says 400 itself."""
    from billing import directory
    from billing.errors import InvalidRequest
    from models import Membership

    with database.connection_context():
        org_id = directory.put_organization(str(uuid.uuid4()), "Directory").id
        with pytest.raises(InvalidRequest):
            directory.put_member(org_id, user_id, "member", email)
        if email is None:
            with pytest.raises(InvalidRequest):
                directory.remove_member(org_id, user_id)
        assert Membership.select().count() == 0


def test_a_full_batch_the_contract_allows_is_not_refused_for_its_size(client, db):
    """1,000 events (the contract's maximum) with 1.2 KB of metadata each (under its 4 KiB per
    event) make a 1.3 MB body: it was answered 400 "request body is larger than 1048576
    bytes", so a platform batching events with ordinary metadata lost whole batches."""
    from tests.conftest import SERVICE_HEADERS

    with database.connection_context():
        org_id = create_organization("big batch").id
        with locked_account(org_id) as account:
            ledger.grant(account, 10**9, "top_up", reason="seed")
    events = [
        {
            "organizationId": org_id,
            "category": "text_generation",
            "quantity": 1,
            "unitCostDecimillicents": 1,
            "referenceId": f"run-{i}",
            "metadata": {"prompt_digest": "p" * 1200},
        }
        for i in range(metering.MAX_BATCH_EVENTS)
    ]
    response = client.post(
        "/v1/service/usage/batch", json={"events": events}, headers=SERVICE_HEADERS
    )
    assert response.status_code == 200, response.text[:200]
    assert {r["status"] for r in response.json()["results"]} == {"recorded"}
    with database.connection_context():
        assert BillingAccount.get_by_id(org_id).credits_balance == 10**9 - 1000
    # The general limit still holds elsewhere, and the batch's own limit holds for the batch.
    single = client.post(
        f"/v1/service/organizations/{org_id}/usage",
        json={**events[0], "metadata": {"x": "p" * 1_100_000}},
        headers=SERVICE_HEADERS,
    )
    assert single.status_code == 400 and "larger than 1048576" in single.text
    huge = client.post(
        "/v1/service/usage/batch",
        json={"events": [{**events[0], "metadata": {"x": "p" * 5_200_000}}]},
        headers=SERVICE_HEADERS,
    )
    assert huge.status_code == 400 and "larger than 5120000" in huge.text


@pytest.mark.parametrize("path", ["debit", "batch"])
def test_a_clock_a_little_behind_cannot_reset_the_new_months_spend(capped_org, path):
    """Two workers whose clocks differ by 2 ms at midnight of a month's end: a charge stamped
    November after December's first charge moved the running spend back to November (December's
    400 forgotten), so December could spend 400 + 100 + 400 against a 500 cap. An account's
    entries now never go back in time (never before its own last write)."""
    from billing.audit import ledger_problems
    from billing.errors import PaymentRequired

    def spend(amount: int, ref: str) -> str:
        if path == "debit":
            try:
                with locked_account(capped_org) as account:
                    ledger.debit(account, amount)
            except PaymentRequired:
                return "refused"
            return "recorded"
        (outcome,) = metering.record_usage_batch(
            [metering.usage_event(capped_org, "api_call", 1, amount, ref)]
        )
        return outcome.status.value

    ahead = DEC_FIRST + dt.timedelta(milliseconds=1)
    with use_clock(lambda: ahead):
        assert spend(400, "a") == "recorded"
    with use_clock(lambda: NOV_LAST_MS):  # the other worker, 2 ms behind
        assert spend(200, "b") == "refused"  # December: 400 + 200 > 500
        assert spend(100, "c") == "recorded"
    with use_clock(lambda: ahead + dt.timedelta(milliseconds=1)):
        assert spend(400, "d") == "refused"
    account = BillingAccount.get_by_id(capped_org)
    assert (account.spend_month, account.month_spend) == ("2026-12", 500)
    assert ledger_problems(capped_org) == []
