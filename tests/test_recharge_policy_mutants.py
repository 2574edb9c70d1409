"""Auto-recharge policy rules the mutation run of `billing/recharge_policy.py` found unchecked:
when spending writes a request (the threshold's boundary, reserved credits, a saved customer
AND card), the cooldown's boundary, a refusal's request after its rollback, and what the
failure count records when it turns auto-recharge off or restarts.

Spending goes through the ledger's rules in a unit of work each (tests/units.py); the worker
runs against a scripted gateway and the test clock."""

from __future__ import annotations

import datetime as dt
import logging

import pytest

from billing import auto_recharge, ledger, recharge_policy
from billing.accounts import locked_account
from billing.config import get_settings
from billing.errors import PaymentRequired
from billing.stripe_gateway import ChargeOutcome
from billing.units import DOLLAR
from models import AutoRechargeRequest, BillingAccount, utcnow
from models.clock import use_clock
from tests import units
from tests.stripe_fakes import ScriptedGateway
from tests.test_auto_recharge_mutants import AMOUNT, attempt, in_flight, report, with_card

pytestmark = pytest.mark.usefixtures("stripe_webhooks_only")


@pytest.fixture(autouse=True)
def held_connection(conn):
    """Every test here reads and writes on the test thread's own connection."""
    yield


def account(org_id: str) -> BillingAccount:
    return BillingAccount.get_by_id(org_id)


def requests(org_id: str) -> list[AutoRechargeRequest]:
    return list(
        AutoRechargeRequest.select()
        .where(AutoRechargeRequest.organization == org_id)
        .order_by(AutoRechargeRequest.created_at)
    )


def funded(org_id: str, amount: int = 10 * DOLLAR, **card: object) -> None:
    """Credits first (no request can be due yet), then a card and auto-recharge at $5."""
    units.grant(org_id, amount, "top_up", reason="seed")
    with_card(org_id, **card)  # type: ignore[arg-type]


# --- when spending writes a request ---------------------------------------------------------


def test_a_debit_below_the_threshold_writes_one_request_and_marks_it_in_flight(org, clock):
    funded(org.id)
    units.debit(org.id, 6 * DOLLAR)  # $4 left, below $5
    [request] = requests(org.id)
    assert (request.status, request.amount, request.attempts) == ("pending", AMOUNT, 0)
    assert request.created_at == request.next_attempt_at == utcnow()
    row = account(org.id)
    assert row.auto_recharge_in_flight_id == request.id
    assert row.auto_recharge_last_requested_at == utcnow()


def test_a_debit_that_leaves_the_threshold_or_more_writes_no_request(org, clock):
    funded(org.id)
    units.debit(org.id, 4 * DOLLAR)  # $6 left
    units.debit(org.id, 1 * DOLLAR)  # exactly $5 left: not below
    assert requests(org.id) == []
    assert account(org.id).auto_recharge_in_flight_id is None
    units.debit(org.id, 1)  # one decimillicent below
    assert len(requests(org.id)) == 1


def test_reserved_credits_count_against_the_threshold(org, clock):
    funded(org.id)
    ledger.reserve(org.id, 4 * DOLLAR, reference_id="job-1")  # $6 available, no request
    assert requests(org.id) == []
    units.debit(org.id, 2 * DOLLAR)  # balance $8, $4 of it available
    assert len(requests(org.id)) == 1


@pytest.mark.parametrize("missing", ["customer", "card"])
def test_no_request_without_both_a_saved_customer_and_card(org, clock, missing):
    funded(org.id)
    gone = (
        {"stripe_customer_id": None}
        if missing == "customer"
        else {"stripe_payment_method_id": None}
    )
    BillingAccount.update(**gone).where(BillingAccount.organization == org.id).execute()
    units.debit(org.id, 6 * DOLLAR)
    assert requests(org.id) == []


def test_no_request_when_auto_recharge_is_off_though_a_threshold_is_set(org, clock):
    funded(org.id)
    BillingAccount.update(auto_recharge_enabled=False).where(
        BillingAccount.organization == org.id
    ).execute()
    units.debit(org.id, 6 * DOLLAR)
    assert requests(org.id) == []


def test_the_cooldown_ends_exactly_its_length_after_the_last_request(org, clock):
    funded(org.id, 20 * DOLLAR)
    units.debit(org.id, 16 * DOLLAR)  # $4 left: the first request
    [first] = requests(org.id)
    BillingAccount.update(auto_recharge_in_flight_id=None).where(
        BillingAccount.organization == org.id
    ).execute()  # the worker settled it
    cooldown = get_settings().auto_recharge_cooldown_seconds
    clock.advance(seconds=cooldown - 1)
    units.debit(org.id, 1)
    assert requests(org.id) == [first]
    clock.advance(seconds=1)
    units.debit(org.id, 1)
    assert len(requests(org.id)) == 2
    assert account(org.id).auto_recharge_last_requested_at == utcnow()


# --- a refusal's request, after its rollback ------------------------------------------------


def test_a_debit_refused_for_lack_of_credit_requests_whatever_the_threshold(org, clock):
    """$10 available is above the $5 threshold, but $20 was refused: a recharge is due."""
    funded(org.id)
    with pytest.raises(PaymentRequired):
        units.debit(org.id, 20 * DOLLAR)
    [request] = requests(org.id)
    assert request.amount == AMOUNT
    row = account(org.id)
    assert (row.credits_balance, row.auto_recharge_in_flight_id) == (10 * DOLLAR, request.id)


def test_a_refusal_whose_request_fails_still_refuses_and_logs(org, clock, monkeypatch, caplog):
    funded(org.id)

    def broken(_account, *, refused=False):
        raise RuntimeError("the request could not be written")

    monkeypatch.setattr(recharge_policy, "request_if_due", broken)
    with (
        caplog.at_level(logging.ERROR, logger="billing.recharge_policy"),
        pytest.raises(PaymentRequired),
    ):
        units.debit(org.id, 20 * DOLLAR)
    [record] = [r for r in caplog.records if r.name == "billing.recharge_policy"]
    assert record.getMessage() == "auto-recharge could not be requested after a refusal"
    assert record.exc_info is not None
    assert requests(org.id) == []


def test_reconsidering_without_a_refusal_keeps_to_the_threshold(org, clock):
    funded(org.id)
    assert recharge_policy.reconsider(org.id) is None
    assert requests(org.id) == []
    attempt_id = recharge_policy.reconsider(org.id, refused=True)
    assert [r.id for r in requests(org.id)] == [attempt_id]
    assert attempt_id is not None


# --- the failure count ----------------------------------------------------------------------


def test_the_last_allowed_failure_turns_auto_recharge_off_and_keeps_the_count(org, clock):
    limit = get_settings().auto_recharge_max_failures
    with_card(org.id, failures=limit - 1)
    request = attempt(org.id)
    in_flight(org.id, request)
    gateway = ScriptedGateway(lambda _id: ChargeOutcome("failed", "pi_no", failure_reason="no"))
    assert auto_recharge.process_one(gateway, get_settings()) == "failed"
    row = account(org.id)
    assert (row.auto_recharge_enabled, row.auto_recharge_failure_count) == (False, limit)
    assert row.auto_recharge_disabled_reason == (
        f"turned off after {limit} failed charges; update the payment method"
    )


def test_one_failure_short_of_the_limit_leaves_auto_recharge_on(org, clock):
    limit = get_settings().auto_recharge_max_failures
    with_card(org.id, failures=limit - 2)
    attempt(org.id)
    gateway = ScriptedGateway(lambda _id: ChargeOutcome("failed", "pi_no", failure_reason="no"))
    auto_recharge.process_one(gateway, get_settings())
    row = account(org.id)
    assert (row.auto_recharge_enabled, row.auto_recharge_failure_count) == (True, limit - 1)
    assert row.auto_recharge_disabled_reason is None


def test_a_failure_counted_while_turned_off_below_the_limit_records_no_reason(org, clock):
    """The owner turned auto-recharge off while a charge was out; its decline counts, but
    the account was not turned off by failures and says no such thing."""
    with_card(org.id)
    request = attempt(org.id, status="processing", attempts=1, stripe_payment_intent_id="pi_off")
    BillingAccount.update(auto_recharge_enabled=False).where(
        BillingAccount.organization == org.id
    ).execute()
    _result, outcome = report(
        org.id,
        "payment_intent.payment_failed",
        "pi_off",
        request.id,
        last_payment_error={"code": "card_declined"},
    )
    assert outcome == "auto-recharge failed"
    row = account(org.id)
    assert (row.auto_recharge_failure_count, row.auto_recharge_disabled_reason) == (1, None)


def test_a_success_after_one_failure_restarts_the_count(org, clock):
    with_card(org.id, failures=1)
    request = attempt(org.id, status="processing", attempts=1)
    report(
        org.id,
        "payment_intent.succeeded",
        "pi_after_one",
        request.id,
        amount=2000,
        amount_received=2000,
        status="succeeded",
    )
    assert AutoRechargeRequest.get_by_id(request.id).status == "succeeded"
    assert account(org.id).auto_recharge_failure_count == 0


def test_releasing_another_attempt_keeps_the_one_in_flight(org, clock):
    with_card(org.id)
    request = attempt(org.id)
    in_flight(org.id, request)
    with locked_account(org.id) as locked:
        recharge_policy.release_in_flight(locked, "not-the-one-in-flight")
    assert account(org.id).auto_recharge_in_flight_id == request.id
    with locked_account(org.id) as locked:
        recharge_policy.release_in_flight(locked, request.id)
    assert account(org.id).auto_recharge_in_flight_id is None


def test_the_cooldown_counts_from_the_last_request_not_the_clock_start(org, clock):
    """A request an hour ago is long past the cooldown: the next one is written."""
    funded(org.id)
    BillingAccount.update(auto_recharge_last_requested_at=utcnow() - dt.timedelta(hours=1)).where(
        BillingAccount.organization == org.id
    ).execute()
    units.debit(org.id, 6 * DOLLAR)
    assert len(requests(org.id)) == 1


def test_a_request_is_recorded_at_the_instant_of_its_decision(org):
    """On a clock that moves at every reading, the request's timestamps and the account's
    last-requested time are one instant: the one the cooldown was checked against."""
    start = dt.datetime(2026, 11, 15, 12, 0, 0)
    readings = iter(range(1_000_000))

    def ticking() -> dt.datetime:
        return start + dt.timedelta(milliseconds=next(readings))

    funded(org.id)
    with use_clock(ticking):
        units.debit(org.id, 6 * DOLLAR)
    [request] = requests(org.id)
    stamps = {request.created_at, request.updated_at, request.next_attempt_at}
    assert stamps == {account(org.id).auto_recharge_last_requested_at}
