"""The ledger service without HTTP: grants, debits, holds, guards, idempotency, outbox."""

from __future__ import annotations

import datetime as dt

import pytest

from billing import accounts, ledger, metering
from billing.accounts import locked_account
from billing.errors import Conflict, InvalidRequest, NotFound, PaymentRequired
from models import AutoRechargeRequest, BillingAccount, CreditEntry, Reservation, utcnow
from tests.ledger_checks import assert_ledger_invariants

pytestmark = pytest.mark.usefixtures("conn")


def test_grant_and_debit_chain_balance(org):
    with locked_account(org.id) as account:
        ledger.grant(
            account, 1000, "top_up", reason="t", reference_id="cs_1", idempotency_ref="topup:cs_1"
        )
    with locked_account(org.id) as account:
        result = ledger.debit(account, 300, reason="work")
    assert result.balance == 700 and result.entry.balance_after == 700
    assert result.entry.amount == -300
    assert_ledger_invariants(org.id)


def test_debit_beyond_available_is_402_and_writes_nothing(org):
    with locked_account(org.id) as account:
        ledger.grant(account, 100, "adjustment")
    with pytest.raises(PaymentRequired, match="not enough"), locked_account(org.id) as account:
        ledger.debit(account, 101)
    assert CreditEntry.select().count() == 1
    assert_ledger_invariants(org.id)


def test_configured_overdraft_allows_going_below_zero(org):
    with locked_account(org.id) as account:
        ledger.grant(account, 100, "adjustment")
    with locked_account(org.id) as account:
        result = ledger.debit(account, 150, overdraft=50)
    assert result.balance == -50
    with pytest.raises(PaymentRequired), locked_account(org.id) as account:
        ledger.debit(account, 1, overdraft=50)
    assert_ledger_invariants(org.id, overdraft=50)


def test_same_reference_applies_once(org):
    with locked_account(org.id) as account:
        first = ledger.grant(account, 500, "top_up", idempotency_ref="topup:cs_9")
    with locked_account(org.id) as account:
        again = ledger.grant(account, 500, "top_up", idempotency_ref="topup:cs_9")
    assert again.replayed and again.entry.id == first.entry.id
    assert BillingAccount.get_by_id(org.id).credits_balance == 500


def test_reference_of_another_org_is_conflict(org, db):
    from billing.organizations import create_organization

    other = create_organization("other")
    with locked_account(org.id) as account:
        ledger.grant(account, 5, "adjustment", idempotency_ref="shared")
    with pytest.raises(Conflict), locked_account(other.id) as account:
        ledger.grant(account, 5, "adjustment", idempotency_ref="shared")


@pytest.mark.parametrize("amount", [0, -1, 1.5, True, "10", 2**63])
def test_bad_grant_amounts(org, amount):
    with pytest.raises(InvalidRequest), locked_account(org.id) as account:
        ledger.grant(account, amount, "adjustment")


def test_wrong_entry_types_refused(org):
    with pytest.raises(InvalidRequest), locked_account(org.id) as account:
        ledger.grant(account, 5, "charge")
    with pytest.raises(InvalidRequest), locked_account(org.id) as account:
        ledger.debit(account, 5, entry_type="top_up")


def test_unknown_org_is_not_found(db, conn):
    with pytest.raises(NotFound), locked_account("00000000-0000-4000-8000-000000000000"):
        pass


def test_reservation_lifecycle(org):
    with locked_account(org.id) as account:
        ledger.grant(account, 1000, "adjustment")
    held = ledger.reserve(org.id, 600, reference_id="job-1")
    assert held.reserved == 600
    with pytest.raises(PaymentRequired), locked_account(org.id) as account:
        ledger.debit(account, 401)
    done = ledger.finalize_reservation(org.id, held.reservation.id, 250)
    assert (done.balance, done.reserved) == (750, 0)
    assert done.reservation.status == "finalized"
    # Replays: same amount is fine, another amount is a conflict, release is a conflict.
    assert ledger.finalize_reservation(org.id, held.reservation.id, 250).replayed
    with pytest.raises(Conflict):
        ledger.finalize_reservation(org.id, held.reservation.id, 251)
    with pytest.raises(Conflict):
        ledger.release_reservation(org.id, held.reservation.id)
    assert_ledger_invariants(org.id)


def test_release_gives_everything_back(org):
    with locked_account(org.id) as account:
        ledger.grant(account, 1000, "adjustment")
    held = ledger.reserve(org.id, 1000, reference_id="job-2")
    released = ledger.release_reservation(org.id, held.reservation.id)
    assert (released.balance, released.reserved) == (1000, 0)
    assert ledger.release_reservation(org.id, held.reservation.id).replayed
    with pytest.raises(Conflict):
        ledger.finalize_reservation(org.id, held.reservation.id, 1)
    assert_ledger_invariants(org.id)


def test_reserve_same_reference_once_and_other_amount_conflicts(org):
    with locked_account(org.id) as account:
        ledger.grant(account, 1000, "adjustment")
    a = ledger.reserve(org.id, 100, reference_id="job-3")
    b = ledger.reserve(org.id, 100, reference_id="job-3")
    assert b.replayed and a.reservation.id == b.reservation.id
    with pytest.raises(Conflict):
        ledger.reserve(org.id, 200, reference_id="job-3")
    assert Reservation.select().count() == 1
    assert_ledger_invariants(org.id)


def test_finalize_above_hold_needs_the_extra(org):
    with locked_account(org.id) as account:
        ledger.grant(account, 1000, "adjustment")
    held = ledger.reserve(org.id, 500, reference_id="job-4")
    with pytest.raises(PaymentRequired):
        ledger.finalize_reservation(org.id, held.reservation.id, 1001)
    assert Reservation.get_by_id(held.reservation.id).status == "open"
    done = ledger.finalize_reservation(org.id, held.reservation.id, 1000)
    assert done.balance == 0
    assert_ledger_invariants(org.id)


def test_finalize_one_above_a_hold_of_everything_is_refused(org):
    """The boundary: the hold is all there is, so one more than the hold is refused."""
    with locked_account(org.id) as account:
        ledger.grant(account, 1000, "adjustment")
    held = ledger.reserve(org.id, 1000, reference_id="job-edge")
    with pytest.raises(PaymentRequired):
        ledger.finalize_reservation(org.id, held.reservation.id, 1001)
    assert ledger.finalize_reservation(org.id, held.reservation.id, 1000).balance == 0
    assert_ledger_invariants(org.id)


def test_suspended_and_grace_period_block_spending(org):
    with locked_account(org.id) as account:
        ledger.grant(account, 1000, "adjustment")
    BillingAccount.update(suspended_at=utcnow()).execute()
    with pytest.raises(PaymentRequired, match="suspended"), locked_account(org.id) as account:
        ledger.debit(account, 1)
    with pytest.raises(PaymentRequired, match="suspended"):
        ledger.reserve(org.id, 1, reference_id="r")
    BillingAccount.update(
        suspended_at=None, payment_grace_period_ends_at=utcnow() + dt.timedelta(days=3)
    ).execute()
    with (
        pytest.raises(PaymentRequired, match="payment failed"),
        locked_account(org.id) as account,
    ):
        ledger.debit(account, 1)
    BillingAccount.update(payment_grace_period_ends_at=None).execute()
    with locked_account(org.id) as account:
        assert ledger.debit(account, 1).balance == 999


def test_usage_cap_blocks_and_lowering_or_clearing_it_applies_at_once(org, clock):
    with locked_account(org.id) as account:
        ledger.grant(account, 10_000, "adjustment")
    accounts.update_settings(org.id, {"usage_cap": 1000})
    metering.record_usage(org.id, "api_call", 9, 100, "u1")  # 900 spent
    with pytest.raises(PaymentRequired, match="usage cap"):
        metering.record_usage(org.id, "api_call", 2, 100, "u2")
    metering.record_usage(org.id, "api_call", 1, 100, "u3")  # exactly at the cap
    accounts.update_settings(org.id, {"usage_cap": 500})  # below current usage
    with pytest.raises(PaymentRequired):
        metering.record_usage(org.id, "api_call", 1, 0, "u4")
    accounts.update_settings(org.id, {"usage_cap": None})
    assert metering.record_usage(org.id, "api_call", 1, 100, "u5").balance == 8_900
    # Reservations count toward the cap too.
    accounts.update_settings(org.id, {"usage_cap": 1_200})
    ledger.reserve(org.id, 100, reference_id="hold")
    with pytest.raises(PaymentRequired, match="usage cap"), locked_account(org.id) as account:
        ledger.debit(account, 1)


def test_usage_is_recorded_once_per_reference(org):
    with locked_account(org.id) as account:
        ledger.grant(account, 10_000, "adjustment")
    first = metering.record_usage(org.id, "api_call", 3, 100, "ref-a", {"k": "v"})
    again = metering.record_usage(org.id, "api_call", 3, 100, "ref-a", {"k": "v"})
    assert again.replayed and again.record.id == first.record.id
    assert again.balance == 9_700
    with pytest.raises(Conflict):
        metering.record_usage(org.id, "api_call", 4, 100, "ref-a")
    assert_ledger_invariants(org.id)


def _save_card(org_id: str) -> None:
    """Auto-recharge requests need a card to charge (none is written without one)."""
    BillingAccount.update(stripe_customer_id="cus_test", stripe_payment_method_id="pm_test").where(
        BillingAccount.organization == org_id
    ).execute()


def test_crossing_threshold_enqueues_one_auto_recharge(org):
    with locked_account(org.id) as account:
        ledger.grant(account, 1000, "adjustment")
    accounts.update_settings(
        org.id,
        {
            "auto_recharge_enabled": True,
            "auto_recharge_threshold": 500,
            "auto_recharge_amount": 100_000,
        },
    )
    _save_card(org.id)
    with locked_account(org.id) as account:
        ledger.debit(account, 400)
    assert AutoRechargeRequest.select().count() == 0
    with locked_account(org.id) as account:
        ledger.debit(account, 200)  # available 400 < 500
    with locked_account(org.id) as account:
        ledger.debit(account, 100)  # still below: no second request while one is in flight
    requests = list(AutoRechargeRequest.select())
    assert len(requests) == 1
    assert requests[0].amount == 100_000 and requests[0].status == "pending"


def test_refused_debit_writes_nothing_but_requests_one_recharge(org):
    accounts.update_settings(
        org.id,
        {
            "auto_recharge_enabled": True,
            "auto_recharge_threshold": 500,
            "auto_recharge_amount": 100_000,
        },
    )
    _save_card(org.id)
    with pytest.raises(PaymentRequired), locked_account(org.id) as account:
        ledger.debit(account, 10)
    # The refusal rolled back (no entry); lack of credit still asks for one recharge.
    assert CreditEntry.select().count() == 0
    assert AutoRechargeRequest.select().count() == 1
    with pytest.raises(PaymentRequired), locked_account(org.id) as account:
        ledger.debit(account, 10)
    assert AutoRechargeRequest.select().count() == 1  # one in flight at most


def test_take_back_reverses_at_most_what_remains(org):
    with locked_account(org.id) as account:
        ledger.grant(account, 1000, "top_up", idempotency_ref="topup:x")
    with locked_account(org.id) as account:
        ledger.debit(account, 700)
    with locked_account(org.id) as account:
        result = ledger.take_back(
            account,
            1000,
            "refund",
            reason="refund",
            reference_id="ch_1",
            idempotency_ref="refund:ch_1",
        )
    assert result.entry.amount == -300 and result.balance == 0
    with locked_account(org.id) as account:
        assert ledger.take_back(
            account,
            1000,
            "refund",
            reason="refund",
            reference_id="ch_1",
            idempotency_ref="refund:ch_1",
        ).replayed
    assert_ledger_invariants(org.id)


def test_adjust_both_ways(org):
    with locked_account(org.id) as account:
        ledger.adjust(account, 500, reason="goodwill")
    with locked_account(org.id) as account:
        assert ledger.adjust(account, -200, reason="correction").balance == 300
    with pytest.raises(PaymentRequired), locked_account(org.id) as account:
        ledger.adjust(account, -301, reason="too much")
    with pytest.raises(InvalidRequest), locked_account(org.id) as account:
        ledger.adjust(account, 0, reason="nothing")
    assert_ledger_invariants(org.id)
