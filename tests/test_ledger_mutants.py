"""Ledger rules that mutation testing (issue 14) found no test for, checked through the
ledger's public functions (reason, reference_id, idempotency_ref and overdraft always passed
by keyword) and the rows they write."""

from __future__ import annotations

import datetime as dt

import pytest
from prometheus_client import REGISTRY

from billing import ledger
from billing.errors import Conflict, InvalidRequest, NotFound, PaymentRequired
from billing.organizations import create_organization
from billing.units import INT64_MAX
from models import (
    AutoRechargeRequest,
    BillingAccount,
    CreditEntry,
    Reservation,
    StripePayment,
    utcnow,
)
from tests import units
from tests.ledger_checks import assert_ledger_invariants

pytestmark = pytest.mark.usefixtures("conn")

HALF = ledger.SHARE_WHOLE // 2


def new_org(balance: int = 0) -> str:
    org_id = create_organization("ledger-mutants").id
    if balance:
        units.grant(org_id, balance, "top_up", reason="seed")
    return org_id


def entries(org_id: str) -> list[CreditEntry]:
    return list(
        CreditEntry.select().where(CreditEntry.organization == org_id).order_by(CreditEntry.id)
    )


def account(org_id: str) -> BillingAccount:
    return BillingAccount.get_by_id(org_id)


def with_saved_card(org_id: str, threshold: int) -> None:
    BillingAccount.update(
        auto_recharge_enabled=True,
        auto_recharge_threshold=threshold,
        auto_recharge_amount=10_000,
        stripe_customer_id=f"cus_{org_id}",
        stripe_payment_method_id=f"pm_{org_id}",
    ).where(BillingAccount.organization == org_id).execute()


def recharges(org_id: str) -> int:
    return AutoRechargeRequest.select().where(AutoRechargeRequest.organization == org_id).count()


# --- amounts -----------------------------------------------------------------------------


def test_amount_bounds_and_their_messages():
    org_id = new_org()
    assert units.grant(org_id, INT64_MAX, "adjustment").balance == INT64_MAX
    for bad, detail in (
        (0, f"amount must be from 1 to {INT64_MAX}"),
        (INT64_MAX + 1, f"amount must be from 1 to {INT64_MAX}"),
        (True, "amount must be an integer number of decimillicents"),
        (2.0, "amount must be an integer number of decimillicents"),
    ):
        with pytest.raises(InvalidRequest) as raised:
            units.grant(org_id, bad, "adjustment")
        assert raised.value.detail == detail
    with pytest.raises(InvalidRequest) as raised:
        units.debit(org_id, -1)
    assert raised.value.detail == f"amount must be from 0 to {INT64_MAX}"


def test_a_debit_of_zero_is_recorded():
    org_id = new_org(10)
    result = units.debit(org_id, 0, reason="free")
    assert result.entry is not None and result.entry.amount == 0 and result.balance == 10


def test_the_balance_and_the_months_spend_never_overflow():
    org_id = new_org()
    units.grant(org_id, INT64_MAX, "adjustment")
    with pytest.raises(InvalidRequest) as raised:
        units.grant(org_id, 1, "adjustment")
    assert raised.value.detail == "the balance would overflow"
    units.debit(org_id, INT64_MAX)  # the month's spend is now INT64_MAX
    units.grant(org_id, 1, "adjustment")
    with pytest.raises(InvalidRequest) as raised:
        units.debit(org_id, 1)
    assert raised.value.detail == "the month's spend would overflow"
    assert (account(org_id).credits_balance, account(org_id).month_spend) == (1, INT64_MAX)


def test_the_balance_may_reach_minus_int64_max_through_an_overdraft():
    org_id = new_org()
    assert units.debit(org_id, INT64_MAX, overdraft=INT64_MAX).balance == -INT64_MAX


def test_entry_types_are_checked_with_a_message_naming_them():
    org_id = new_org(100)
    with pytest.raises(InvalidRequest) as raised:
        units.grant(org_id, 1, "charge")
    assert raised.value.detail == "charge is not a credit entry type"
    with pytest.raises(InvalidRequest) as raised:
        units.debit(org_id, 1, "top_up")
    assert raised.value.detail == "top_up is not a debit entry type"
    for entry_type in sorted(ledger.CREDIT_TYPES):
        assert units.grant(org_id, 1, entry_type).entry.entry_type == entry_type
    for entry_type in sorted(ledger.DEBIT_TYPES):
        assert units.debit(org_id, 1, entry_type).entry.entry_type == entry_type


# --- entries: what each operation writes ---------------------------------------------------


def test_grant_and_debit_write_what_they_were_given():
    org_id = new_org()
    granted = units.grant(
        org_id, 500, "top_up", reason="bought", reference_id="cs_1", idempotency_ref="topup:cs_1"
    )
    debited = units.debit(
        org_id, 200, reason="work", reference_id="job-1", idempotency_ref="debit:job-1"
    )
    rows = [
        (e.entry_type, e.amount, e.reason, e.reference_id, e.idempotency_ref, e.balance_after)
        for e in entries(org_id)
    ]
    assert rows == [
        ("top_up", 500, "bought", "cs_1", "topup:cs_1", 500),
        ("charge", -200, "work", "job-1", "debit:job-1", 300),
    ]
    assert (granted.replayed, debited.replayed) == (False, False)
    assert (debited.balance, debited.reserved, debited.available) == (300, 0, 300)


def test_a_replay_returns_the_first_entry_and_the_current_totals():
    org_id = new_org(1_000)
    first = units.debit(org_id, 100, idempotency_ref="d1")
    ledger.reserve(org_id, 50, reference_id="hold")
    again = units.debit(org_id, 100, idempotency_ref="d1")
    assert again.replayed is True and again.entry is not None
    assert again.entry.id == first.entry.id
    assert (again.balance, again.reserved) == (900, 50)
    grant = units.grant(org_id, 5, "adjustment", idempotency_ref="g1")
    grant_again = units.grant(org_id, 5, "adjustment", idempotency_ref="g1")
    assert grant_again.replayed and grant_again.entry.id == grant.entry.id
    assert grant_again.balance == 905


def test_a_reference_of_another_organization_is_a_conflict_that_says_so():
    org_id, other = new_org(100), new_org(100)
    units.debit(org_id, 1, idempotency_ref="mine")
    for action in (
        lambda: units.debit(other, 1, idempotency_ref="mine"),
        lambda: units.grant(other, 1, "adjustment", idempotency_ref="mine"),
        lambda: units.adjust(other, -1, reason="x", idempotency_ref="mine"),
    ):
        with pytest.raises(Conflict) as raised:
            action()
        assert raised.value.detail == "this reference belongs to another organization"
    assert account(other).credits_balance == 100


def test_ledger_entries_and_refusals_are_counted_by_type_and_reason():
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    org_id = new_org()
    before = {
        "grant": sample("billing_ledger_entries_total", entry_type="welcome_grant"),
        "debit": sample("billing_ledger_entries_total", entry_type="charge"),
        "short": sample("billing_ledger_refusals_total", reason="insufficient_credits"),
        "cap": sample("billing_ledger_refusals_total", reason="usage_cap"),
        "held": sample("billing_ledger_refusals_total", reason="suspended"),
        "failed": sample("billing_ledger_refusals_total", reason="payment_failed"),
    }
    units.grant(org_id, 100, "welcome_grant")
    units.debit(org_id, 10)
    with pytest.raises(PaymentRequired):
        units.debit(org_id, 1_000)
    BillingAccount.update(usage_cap=10).where(BillingAccount.organization == org_id).execute()
    with pytest.raises(PaymentRequired):
        units.debit(org_id, 1)
    BillingAccount.update(suspended_at=utcnow()).where(
        BillingAccount.organization == org_id
    ).execute()
    for _ in range(2):
        with pytest.raises(PaymentRequired):
            units.debit(org_id, 1)
    BillingAccount.update(suspended_at=None, payment_grace_period_ends_at=utcnow()).where(
        BillingAccount.organization == org_id
    ).execute()
    with pytest.raises(PaymentRequired) as raised:
        ledger.reserve(org_id, 1, reference_id="r")
    assert raised.value.detail == "a payment failed; update the payment method to continue"
    after = {
        "grant": sample("billing_ledger_entries_total", entry_type="welcome_grant"),
        "debit": sample("billing_ledger_entries_total", entry_type="charge"),
        "short": sample("billing_ledger_refusals_total", reason="insufficient_credits"),
        "cap": sample("billing_ledger_refusals_total", reason="usage_cap"),
        "held": sample("billing_ledger_refusals_total", reason="suspended"),
        "failed": sample("billing_ledger_refusals_total", reason="payment_failed"),
    }
    assert {k: after[k] - before[k] for k in before} == {
        "grant": 1,
        "debit": 1,
        "short": 1,
        "cap": 1,
        "held": 2,
        "failed": 1,
    }


# --- guards ------------------------------------------------------------------------------


def test_each_refusal_has_its_reason_and_the_edges_are_allowed():
    org_id = new_org(1_000)
    BillingAccount.update(usage_cap=600).where(BillingAccount.organization == org_id).execute()
    ledger.reserve(org_id, 100, reference_id="hold")  # counts toward the cap and against available
    units.debit(org_id, 500)  # 500 spent + 100 held = exactly the cap
    with pytest.raises(PaymentRequired) as raised:
        units.debit(org_id, 1)
    assert raised.value.detail == "this would exceed the usage cap for the current period"
    BillingAccount.update(usage_cap=None).where(BillingAccount.organization == org_id).execute()
    units.debit(org_id, 400)  # available 500 - 100 held: exactly all of it
    with pytest.raises(PaymentRequired) as raised:
        units.debit(org_id, 1)
    assert raised.value.detail == "not enough available credits"
    assert units.debit(org_id, 1, overdraft=1).balance == 99
    with pytest.raises(PaymentRequired):
        units.debit(org_id, 1, overdraft=1)
    BillingAccount.update(suspended_at=utcnow()).where(
        BillingAccount.organization == org_id
    ).execute()
    with pytest.raises(PaymentRequired) as raised:
        units.debit(org_id, 0)
    assert raised.value.detail == "the organization is suspended"


def test_a_cap_counts_only_the_current_months_spend(clock):
    org_id = new_org(1_000)
    BillingAccount.update(usage_cap=100).where(BillingAccount.organization == org_id).execute()
    units.debit(org_id, 100)
    with pytest.raises(PaymentRequired):
        units.debit(org_id, 1)
    clock.advance(days=31)
    assert units.debit(org_id, 100).balance == 800
    assert account(org_id).month_spend == 100


def test_an_entry_is_stamped_now_unless_the_clock_is_behind_the_running_month(clock):
    """A worker whose clock is behind the month its account's spend already counts in stamps
    its entry at that month's start (so the month's spend is not reset); otherwise now."""
    org_id = new_org(1_000)
    clock.set(dt.datetime(2026, 12, 1, 0, 0, 5))
    units.debit(org_id, 100)
    clock.set(dt.datetime(2026, 12, 15, 12, 0))
    assert units.debit(org_id, 10).entry.created_at == dt.datetime(2026, 12, 15, 12, 0)
    clock.set(dt.datetime(2026, 11, 30, 23, 59, 58))
    behind = units.debit(org_id, 50)
    assert behind.entry.created_at == dt.datetime(2026, 12, 1)
    assert CreditEntry.get_by_id(behind.entry.id).created_at == dt.datetime(2026, 12, 1)
    assert (account(org_id).spend_month, account(org_id).month_spend) == ("2026-12", 160)


# --- adjustments -------------------------------------------------------------------------


def test_adjustments_write_their_reason_and_apply_once_both_ways():
    org_id = new_org()
    up = units.adjust(org_id, 1, reason="goodwill", idempotency_ref="adj:up")
    up_again = units.adjust(org_id, 1, reason="goodwill", idempotency_ref="adj:up")
    units.grant(org_id, 99, "top_up")
    down = units.adjust(org_id, -40, reason="correction", idempotency_ref="adj:down")
    ledger.reserve(org_id, 10, reference_id="hold")
    down_again = units.adjust(org_id, -40, reason="correction", idempotency_ref="adj:down")
    assert (up.replayed, up_again.replayed, down.replayed, down_again.replayed) == (
        False,
        True,
        False,
        True,
    )
    assert up_again.entry.id == up.entry.id and down_again.entry.id == down.entry.id
    assert (down_again.balance, down_again.reserved) == (60, 10)
    rows = [(e.entry_type, e.amount, e.reason, e.idempotency_ref) for e in entries(org_id)]
    assert rows == [
        ("adjustment", 1, "goodwill", "adj:up"),
        ("top_up", 99, None, None),
        ("adjustment", -40, "correction", "adj:down"),
    ]


def test_a_negative_adjustment_may_use_exactly_the_available_credit_and_overdraft():
    org_id = new_org(100)
    ledger.reserve(org_id, 30, reference_id="hold")
    with pytest.raises(PaymentRequired) as raised:
        units.adjust(org_id, -71, reason="too much")
    assert raised.value.detail == "not enough available credits"
    assert units.adjust(org_id, -70, reason="all of it").balance == 30
    assert units.adjust(org_id, -5, reason="into overdraft", overdraft=5).balance == 25
    with pytest.raises(PaymentRequired):
        units.adjust(org_id, -1, reason="past overdraft", overdraft=5)
    assert_ledger_invariants(org_id, overdraft=5)


@pytest.mark.parametrize("amount", [0, True, 1.0, "5"])
def test_an_adjustment_must_be_a_non_zero_integer(amount):
    org_id = new_org(100)
    with pytest.raises(InvalidRequest) as raised:
        units.adjust(org_id, amount, reason="x")
    assert raised.value.detail == "an adjustment must be a non-zero integer"
    assert len(entries(org_id)) == 1


# --- take_back ---------------------------------------------------------------------------


def test_take_back_takes_what_is_available_after_holds_never_below_zero():
    org_id = new_org(1_000)
    ledger.reserve(org_id, 300, reference_id="hold")
    first = units.take_back(
        org_id, 900, "refund", reason="refund", reference_id="ch_1", idempotency_ref="refund:1"
    )
    assert first.entry is not None and first.entry.amount == -700 and first.replayed is False
    assert (first.entry.reason, first.entry.reference_id) == ("refund", "ch_1")
    again = units.take_back(
        org_id, 900, "refund", reason="refund", reference_id="ch_1", idempotency_ref="refund:1"
    )
    assert again.replayed and again.entry is not None and again.entry.id == first.entry.id
    nothing = units.take_back(
        org_id, 50, "dispute", reason="lost", reference_id="dp_1", idempotency_ref="dispute:1"
    )
    assert nothing.entry is not None and nothing.entry.amount == 0
    assert (nothing.balance, nothing.reserved) == (300, 300)


def test_take_back_from_an_overdrawn_account_takes_nothing():
    org_id = new_org(100)
    units.debit(org_id, 150, overdraft=50)
    result = units.take_back(
        org_id, 10, "refund", reason="r", reference_id="ch", idempotency_ref="refund:o"
    )
    assert result.entry is not None and result.entry.amount == 0 and result.balance == -50


# --- reservations ------------------------------------------------------------------------


def test_a_reservation_holds_once_and_answers_with_the_totals():
    org_id = new_org(1_000)
    held = ledger.reserve(org_id, 300, reference_id="job")
    assert (held.balance, held.reserved, held.replayed) == (1_000, 300, False)
    stored = Reservation.get_by_id(held.reservation.id)
    assert (stored.organization_id, stored.amount, stored.reference_id, stored.status) == (
        org_id,
        300,
        "job",
        "open",
    )
    again = ledger.reserve(org_id, 300, reference_id="job")
    assert again.replayed and again.reservation.id == held.reservation.id
    assert (again.balance, again.reserved) == (1_000, 300)
    with pytest.raises(Conflict) as raised:
        ledger.reserve(org_id, 301, reference_id="job")
    assert raised.value.detail == "this reservation reference was used with another amount"
    other = new_org(1_000)
    assert not ledger.reserve(
        other, 5, reference_id="job"
    ).replayed  # references are per organization
    assert account(org_id).reserved_credits == 300


def test_a_reservation_may_hold_exactly_what_is_available_and_use_the_overdraft():
    org_id = new_org(100)
    with pytest.raises(PaymentRequired):
        ledger.reserve(org_id, 101, reference_id="too-much")
    ledger.reserve(org_id, 100, reference_id="all")
    ledger.reserve(org_id, 20, reference_id="overdraft", overdraft=20)
    with pytest.raises(PaymentRequired):
        ledger.reserve(org_id, 1, reference_id="past", overdraft=20)
    assert account(org_id).reserved_credits == 120


def test_holding_or_finalizing_below_the_threshold_requests_a_recharge():
    org_id = new_org(1_000)
    with_saved_card(org_id, threshold=500)
    held = ledger.reserve(org_id, 400, reference_id="job")
    assert recharges(org_id) == 0
    other = new_org(1_000)
    with_saved_card(other, threshold=500)
    ledger.reserve(other, 600, reference_id="big")
    assert recharges(other) == 1
    ledger.finalize_reservation(org_id, held.reservation.id, 600)  # available 400 < 500
    assert recharges(org_id) == 1


def test_finalizing_charges_the_actual_amount_and_records_how():
    org_id = new_org(1_000)
    held = ledger.reserve(org_id, 300, reference_id="job-7")
    done = ledger.finalize_reservation(org_id, held.reservation.id, 250)
    assert (done.balance, done.reserved, done.replayed) == (750, 0, False)
    stored = Reservation.get_by_id(held.reservation.id)
    assert (stored.status, stored.final_amount) == ("finalized", 250)
    assert stored.closed_at is not None
    entry = CreditEntry.get_by_id(stored.credit_entry_id)
    assert (entry.entry_type, entry.amount, entry.reason, entry.reference_id) == (
        "charge",
        -250,
        "reservation finalized",
        "job-7",
    )
    assert entry.idempotency_ref == f"reservation:{held.reservation.id}"
    assert account(org_id).month_spend == 250
    again = ledger.finalize_reservation(org_id, held.reservation.id, 250)
    assert again.replayed and (again.balance, again.reserved) == (750, 0)
    assert again.reservation.id == held.reservation.id
    with pytest.raises(Conflict) as raised:
        ledger.finalize_reservation(org_id, held.reservation.id, 249)
    assert raised.value.detail == "the reservation was finalized with another amount"
    with pytest.raises(Conflict) as raised:
        ledger.release_reservation(org_id, held.reservation.id)
    assert raised.value.detail == "the reservation is finalized"
    assert len(entries(org_id)) == 2


def test_finalizing_above_the_hold_checks_only_what_is_then_available():
    org_id = new_org(1_000)
    ledger.reserve(org_id, 200, reference_id="other")
    held = ledger.reserve(org_id, 300, reference_id="job")
    with pytest.raises(PaymentRequired):
        ledger.finalize_reservation(org_id, held.reservation.id, 801)
    assert account(org_id).reserved_credits == 500  # the refused finalize changed nothing
    done = ledger.finalize_reservation(org_id, held.reservation.id, 800)
    assert (done.balance, done.reserved) == (200, 200)
    small = new_org(100)
    over = ledger.reserve(small, 100, reference_id="over")
    with pytest.raises(PaymentRequired):
        ledger.finalize_reservation(small, over.reservation.id, 106, overdraft=5)
    done = ledger.finalize_reservation(small, over.reservation.id, 105, overdraft=5)
    assert (done.balance, done.reserved) == (-5, 0)


def test_a_hold_already_checked_may_be_finalized_up_to_its_amount_while_spending_is_held():
    """The guards applied when the credits were held; finalizing at most the hold (zero
    included) charges what was set aside even if the organization is suspended since."""
    org_id = new_org(1_000)
    job = ledger.reserve(org_id, 300, reference_id="job")
    nothing = ledger.reserve(org_id, 100, reference_id="nothing")
    BillingAccount.update(suspended_at=utcnow()).where(
        BillingAccount.organization == org_id
    ).execute()
    assert ledger.finalize_reservation(org_id, job.reservation.id, 300).balance == 700
    done = ledger.finalize_reservation(org_id, nothing.reservation.id, 0)
    assert (done.balance, done.reserved) == (700, 0)
    assert Reservation.get_by_id(nothing.reservation.id).final_amount == 0


def test_releasing_gives_the_hold_back_once():
    org_id = new_org(1_000)
    held = ledger.reserve(org_id, 300, reference_id="job")
    ledger.reserve(org_id, 100, reference_id="other")
    released = ledger.release_reservation(org_id, held.reservation.id)
    assert (released.balance, released.reserved, released.replayed) == (1_000, 100, False)
    stored = Reservation.get_by_id(held.reservation.id)
    assert stored.status == "released" and stored.closed_at is not None
    assert released.reservation.id == held.reservation.id
    again = ledger.release_reservation(org_id, held.reservation.id)
    assert again.replayed and (again.balance, again.reserved) == (1_000, 100)
    assert again.reservation.id == held.reservation.id
    with pytest.raises(Conflict) as raised:
        ledger.finalize_reservation(org_id, held.reservation.id, 300)
    assert raised.value.detail == "the reservation is released"
    assert account(org_id).reserved_credits == 100 and len(entries(org_id)) == 1


def test_a_reservation_of_another_organization_is_not_found():
    org_id, other = new_org(100), new_org(100)
    held = ledger.reserve(org_id, 10, reference_id="job")
    for action in (
        lambda: ledger.finalize_reservation(other, held.reservation.id, 10),
        lambda: ledger.release_reservation(other, held.reservation.id),
    ):
        with pytest.raises(NotFound) as raised:
            action()
        assert raised.value.detail == "reservation not found"
    assert Reservation.get_by_id(held.reservation.id).status == "open"


# --- payments and their reversals -----------------------------------------------------------


def test_share_of_is_clamped_to_whole_billionths():
    assert ledger.share_of(1, 3) == 333_333_333
    assert ledger.share_of(1, 1) == ledger.SHARE_WHOLE
    assert ledger.share_of(3, 3) == ledger.SHARE_WHOLE
    assert ledger.share_of(4, 3) == ledger.SHARE_WHOLE
    assert ledger.share_of(0, 3) == ledger.share_of(-1, 3) == 0
    assert ledger.share_of(1, 0) == ledger.share_of(1, -5) == 0


def top_up(org_id: str, payment_id: str, amount: int, **fields) -> ledger.PaymentOutcome:
    return units.credit_payment(
        org_id,
        payment_id,
        kind=ledger.PaymentKind.top_up,
        ordered=amount,
        grant_amount=amount,
        **fields,
    )


def refund(org_id: str, payment_id: str, share: int, ref: str) -> ledger.PaymentOutcome:
    return units.reverse_payment(
        org_id, payment_id, kind=ledger.ReversalKind.refund, share=share, reference_id=ref
    )


def dispute(org_id: str, payment_id: str, share: int, ref: str) -> ledger.PaymentOutcome:
    return units.reverse_payment(
        org_id, payment_id, kind=ledger.ReversalKind.dispute, share=share, reference_id=ref
    )


def test_a_top_up_is_recorded_and_granted_once():
    org_id = new_org()
    first = top_up(
        org_id, "pi_1", 1_000, charged_currency="usd", charged_amount=10, charge_id="ch_1"
    )
    assert (first.granted_now, first.reversed_now) == (1_000, 0)
    assert first.payment is not None and first.payment.id == "pi_1"
    again = top_up(org_id, "pi_1", 1_000, charged_currency="eur", charged_amount=99)
    assert (again.granted_now, again.reversed_now) == (0, 0)
    payment = StripePayment.get_by_id("pi_1")
    assert (payment.organization_id, payment.kind, payment.ordered_amount) == (
        org_id,
        "top_up",
        1_000,
    )
    assert (payment.granted_amount, payment.charge_id) == (1_000, "ch_1")
    assert (payment.charged_currency, payment.charged_amount) == ("usd", 10)
    (entry,) = entries(org_id)
    assert (entry.entry_type, entry.amount, entry.reason, entry.reference_id) == (
        "top_up",
        1_000,
        "credit top-up",
        "pi_1",
    )
    assert entry.idempotency_ref == "topup:pi_1"


def test_an_auto_recharge_payment_grants_a_recharge_entry():
    org_id = new_org()
    outcome = units.credit_payment(
        org_id, "pi_r", kind=ledger.PaymentKind.auto_recharge, ordered=500, grant_amount=500
    )
    assert outcome.granted_now == 500
    (entry,) = entries(org_id)
    assert (entry.entry_type, entry.reason, entry.idempotency_ref) == (
        "recharge",
        "auto-recharge",
        "recharge:pi_r",
    )
    assert StripePayment.get_by_id("pi_r").kind == "auto_recharge"


def test_a_flagged_payment_is_recorded_and_never_credited():
    org_id = new_org()
    outcome = units.credit_payment(
        org_id,
        "pi_f",
        kind=ledger.PaymentKind.top_up,
        ordered=1_000,
        grant_amount=1_000,
        flagged_reason="x" * 600,
    )
    assert outcome.granted_now == 0 and entries(org_id) == []
    payment = StripePayment.get_by_id("pi_f")
    assert payment.flagged_reason == "x" * 500 and payment.granted_amount == 0
    assert top_up(org_id, "pi_f", 1_000).granted_now == 0  # flagged once, never credited
    assert entries(org_id) == []


def test_an_invalid_grant_amount_is_refused():
    org_id = new_org()
    with pytest.raises(InvalidRequest):
        top_up(org_id, "pi_bad", -5)
    assert entries(org_id) == [] and StripePayment.get_or_none(StripePayment.id == "pi_bad") is None


def test_a_payment_of_another_organization_is_a_conflict():
    org_id, other = new_org(), new_org()
    top_up(org_id, "pi_o", 100)
    with pytest.raises(Conflict) as raised:
        top_up(other, "pi_o", 100)
    assert raised.value.detail == "this payment belongs to another organization"
    with pytest.raises(Conflict):
        refund(other, "pi_o", HALF, "ch_o")
    assert entries(other) == []


def test_refunds_take_back_the_cumulative_share_once():
    org_id = new_org()
    top_up(org_id, "pi_2", 1_000, charge_id="ch_2")
    half = refund(org_id, "pi_2", HALF, "re_1")
    assert (half.granted_now, half.reversed_now) == (0, 500)
    assert refund(org_id, "pi_2", HALF, "re_1").reversed_now == 0  # the same share again
    assert refund(org_id, "pi_2", HALF // 2, "re_0").reversed_now == 0  # a lower share
    rest = refund(org_id, "pi_2", 2 * ledger.SHARE_WHOLE, "re_2")  # clamped to the whole
    assert rest.reversed_now == 500
    rows = [(e.entry_type, e.amount, e.reason, e.reference_id) for e in entries(org_id)]
    assert rows[1:] == [
        ("refund", -500, "refund of pi_2", "re_1"),
        ("refund", -500, "refund of pi_2", "re_2"),
    ]
    payment = StripePayment.get_by_id("pi_2")
    assert (payment.refunded_share, payment.reversed_amount) == (ledger.SHARE_WHOLE, 1_000)
    assert account(org_id).credits_balance == 0
    assert_ledger_invariants(org_id)


def test_disputes_add_their_shares_and_never_take_more_than_was_granted():
    org_id = new_org()
    top_up(org_id, "pi_3", 1_000)
    assert dispute(org_id, "pi_3", HALF, "dp_1").reversed_now == 500
    assert dispute(org_id, "pi_3", -HALF, "dp_neg").reversed_now == 0  # a negative share adds 0
    assert StripePayment.get_by_id("pi_3").disputed_share == HALF
    assert refund(org_id, "pi_3", HALF, "re_1").reversed_now == 500  # 1/2 + 1/2: all of it
    assert dispute(org_id, "pi_3", HALF, "dp_2").reversed_now == 0  # never past the grant
    payment = StripePayment.get_by_id("pi_3")
    assert payment.disputed_share == ledger.SHARE_WHOLE
    assert payment.reversed_amount == 1_000
    kinds = [(e.entry_type, e.reason) for e in entries(org_id)[1:]]
    assert kinds == [("dispute", "dispute of pi_3"), ("dispute", "dispute of pi_3")]


def test_a_reversal_takes_at_most_what_is_available_and_forgives_the_rest():
    org_id = new_org()
    top_up(org_id, "pi_4", 1_000)
    units.debit(org_id, 700)
    ledger.reserve(org_id, 100, reference_id="hold")
    assert refund(org_id, "pi_4", HALF, "re_1").reversed_now == 200  # 300 - 100 held
    ledger.release_reservation(org_id, Reservation.get().id)
    top_up(org_id, "pi_other", 1_000)
    # The first refund's shortfall is not collected from the other payment's credits.
    assert refund(org_id, "pi_4", HALF, "re_1").reversed_now == 0
    assert refund(org_id, "pi_4", 3 * HALF // 2, "re_2").reversed_now == 250
    payment = StripePayment.get_by_id("pi_4")
    assert payment.reversed_amount == 450
    assert account(org_id).credits_balance == 1_000 - 700 + 1_000 - 450


def test_a_refund_reported_before_the_payment_applies_when_it_is_credited():
    org_id = new_org(100)
    early = refund(org_id, "pi_5", HALF, "re_early")
    assert early.reversed_now == 0 and early.payment is not None
    assert early.payment.kind == "top_up" and early.payment.granted_amount == 0
    assert len(entries(org_id)) == 1
    credited = top_up(org_id, "pi_5", 1_000, charge_id="ch_5")
    assert (credited.granted_now, credited.reversed_now) == (1_000, 500)
    refund_entry = entries(org_id)[-1]
    assert (refund_entry.amount, refund_entry.reference_id) == (-500, "ch_5")
    assert account(org_id).credits_balance == 600


def test_a_grant_made_before_payments_were_tracked_is_found_by_its_reference():
    org_id = new_org()
    units.grant(org_id, 800, "top_up", idempotency_ref="topup:pi_old")
    units.grant(org_id, 400, "recharge", idempotency_ref="recharge:pi_auto")
    old = units.payment_on_record(org_id, "pi_old")
    assert old is not None and (old.kind, old.granted_amount, old.ordered_amount) == (
        "top_up",
        800,
        800,
    )
    assert refund(org_id, "pi_auto", HALF, "re_a").reversed_now == 200
    assert StripePayment.get_by_id("pi_auto").kind == "auto_recharge"
    assert units.payment_on_record(org_id, "pi_none") is None
    # Crediting a legacy payment again grants nothing more.
    assert top_up(org_id, "pi_old", 800).granted_now == 0
    assert account(org_id).credits_balance == 800 + 400 - 200


def test_a_legacy_grant_completes_a_payment_row_made_by_an_early_refund():
    org_id = new_org()
    units.grant(org_id, 600, "top_up", idempotency_ref="topup:pi_mix")
    StripePayment.create(id="pi_mix", organization=org_id, kind="top_up", refunded_share=HALF)
    outcome = top_up(org_id, "pi_mix", 600)
    assert outcome.granted_now == 0 and outcome.reversed_now == 300
    payment = StripePayment.get_by_id("pi_mix")
    assert (payment.granted_amount, payment.reversed_amount) == (600, 300)


def test_a_positive_adjustment_applies_even_to_an_overdrawn_account():
    org_id = new_org(100)
    units.debit(org_id, 150, overdraft=50)
    assert units.adjust(org_id, 1, reason="goodwill").balance == -49


def test_a_reversal_takes_whole_credits_down_to_a_single_one():
    org_id = new_org()
    top_up(org_id, "pi_third", 1_000)
    assert refund(org_id, "pi_third", ledger.share_of(1, 3), "re_third").reversed_now == 333
    top_up(org_id, "pi_one", 1_000)
    assert refund(org_id, "pi_one", ledger.share_of(1, 1_000), "re_one").reversed_now == 1
    amounts = [e.amount for e in entries(org_id) if e.entry_type == "refund"]
    assert amounts == [-333, -1]
    assert account(org_id).credits_balance == 2_000 - 334


def test_a_reversal_on_an_empty_account_takes_nothing():
    org_id = new_org()
    top_up(org_id, "pi_spent", 1_000)
    units.debit(org_id, 1_000)
    outcome = refund(org_id, "pi_spent", ledger.SHARE_WHOLE, "re_spent")
    assert outcome.reversed_now == 0 and account(org_id).credits_balance == 0
    assert [e.entry_type for e in entries(org_id)] == ["top_up", "charge"]


def test_each_payment_settles_against_its_own_reversals():
    org_id = new_org()
    top_up(org_id, "pi_a", 1_000)
    assert refund(org_id, "pi_a", HALF, "re_a").reversed_now == 500
    top_up(org_id, "pi_b", 1_000)
    assert refund(org_id, "pi_b", HALF, "re_b").reversed_now == 500


def test_a_repeated_payment_report_does_not_collect_a_forgiven_shortfall():
    org_id = new_org()
    top_up(org_id, "pi_s", 1_000)
    units.debit(org_id, 700)
    assert refund(org_id, "pi_s", ledger.SHARE_WHOLE, "re_s").reversed_now == 300
    top_up(org_id, "pi_new", 1_000)
    again = top_up(org_id, "pi_s", 1_000)  # the same payment reported again
    assert (again.granted_now, again.reversed_now) == (0, 0)
    assert account(org_id).credits_balance == 1_000


def test_the_order_and_the_charge_on_record_are_kept_by_later_reports():
    org_id = new_org()
    refund(org_id, "pi_k", HALF, "re_k")
    units.reverse_payment(
        org_id,
        "pi_k",
        kind=ledger.ReversalKind.refund,
        share=HALF,
        reference_id="re_k",
        charge_id="ch_k",
    )
    assert StripePayment.get_by_id("pi_k").charge_id == "ch_k"
    units.credit_payment(org_id, "pi_k", kind=ledger.PaymentKind.top_up, ordered=1_000)
    units.credit_payment(
        org_id, "pi_k", kind=ledger.PaymentKind.top_up, ordered=None, grant_amount=1_000
    )
    payment = StripePayment.get_by_id("pi_k")
    assert (payment.ordered_amount, payment.charge_id) == (1_000, "ch_k")
    refund_entry = entries(org_id)[-1]
    assert (refund_entry.amount, refund_entry.reference_id) == (-500, "ch_k")
