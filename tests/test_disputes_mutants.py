"""Dispute rules the mutation run of `billing/disputes.py` found unchecked: what an opened or
closed dispute records and answers, which payment a closing reverses and by what share (the
charged currency, else USD against the order, else the whole payment), and from when spending
is held while disputes overlap.

Payments are recorded through the ledger's rules (tests/units.py); disputes arrive as signed
webhooks through `webhooks.receive`, on the test clock."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from billing import ledger
from billing.units import CENT, DOLLAR
from models import BillingAccount, CreditEntry, StripeDispute, WebhookEvent, utcnow
from tests import units
from tests.stripe_events import deliver, link_customer, reversed_total, signed
from tests.stripe_fakes import stripe_object

ORDER = 10 * DOLLAR

pytestmark = pytest.mark.usefixtures("stripe_webhooks_only")


def paid(
    org_id: str,
    pi: str = "pi_paid",
    *,
    currency: str | None = "usd",
    charged: int | None = 1000,
    ordered: int | None = ORDER,
) -> str:
    """A payment of ours on record that granted $10."""
    link_customer(org_id)
    units.credit_payment(
        org_id,
        pi,
        kind="top_up",
        ordered=ordered,
        charged_currency=currency,
        charged_amount=charged,
        grant_amount=ORDER,
    )
    return pi


def disputed(
    org_id: str,
    event_type: str,
    *,
    status: str,
    dispute_id: str = "dp_1",
    pi: str | None = "pi_paid",
    amount: int = 1000,
    currency: str = "usd",
    charge: str | None = None,
) -> str:
    """Deliver a dispute event; the outcome the webhook recorded."""
    obj: dict[str, Any] = stripe_object(
        "dispute",
        id=dispute_id,
        charge=charge,
        payment_intent=pi,
        amount=amount,
        currency=currency,
        status=status,
        metadata={"organization_id": org_id},
    )
    result = deliver(*signed(event_type, obj))
    outcome = WebhookEvent.get_by_id(result.event_id).outcome
    assert isinstance(outcome, str)
    return outcome


def opened(org_id: str, **kwargs: Any) -> str:
    return disputed(org_id, "charge.dispute.created", status="needs_response", **kwargs)


def closed(org_id: str, status: str, **kwargs: Any) -> str:
    return disputed(org_id, "charge.dispute.closed", status=status, **kwargs)


def held_since(org_id: str) -> dt.datetime | None:
    return BillingAccount.get_by_id(org_id).disputed_at


@pytest.fixture(autouse=True)
def held_connection(conn):
    yield


# --- what opening and closing record --------------------------------------------------------


def test_an_opened_dispute_is_recorded_open_and_holds_spending_from_then(org, clock):
    pi = paid(org.id)
    assert opened(org.id) == "dispute opened: spending held"
    row = StripeDispute.get_by_id("dp_1")
    assert (row.organization_id, row.payment_id, row.status, row.is_open) == (
        org.id,
        pi,
        "needs_response",
        True,
    )
    assert row.opened_at == utcnow() == held_since(org.id)
    assert row.closed_at is None
    clock.advance(minutes=5)
    assert opened(org.id) == "dispute already known: no change"
    assert held_since(org.id) == row.opened_at


def test_a_won_dispute_is_recorded_closed_and_lifts_the_hold(org, clock):
    paid(org.id)
    opened(org.id)
    clock.advance(minutes=5)
    assert closed(org.id, "won") == "dispute won"
    row = StripeDispute.get_by_id("dp_1")
    assert (row.status, row.is_open, row.closed_at) == ("won", False, utcnow())
    assert held_since(org.id) is None
    assert reversed_total(org.id) == 0
    clock.advance(minutes=5)
    assert closed(org.id, "lost") == "dispute already closed: no change"
    assert StripeDispute.get_by_id("dp_1").status == "won"
    assert reversed_total(org.id) == 0


def test_a_dispute_closed_before_it_was_heard_open_never_holds(org, clock):
    pi = paid(org.id)
    assert closed(org.id, "won") == "dispute won"
    row = StripeDispute.get_by_id("dp_1")
    assert (row.payment_id, row.status, row.is_open, row.closed_at) == (pi, "won", False, utcnow())
    assert held_since(org.id) is None
    assert opened(org.id) == "dispute already known: no change"
    assert held_since(org.id) is None
    assert StripeDispute.get_by_id("dp_1").is_open is False


def test_a_lost_dispute_heard_only_closed_still_reverses(org, clock):
    paid(org.id)
    assert closed(org.id, "lost", amount=500) == f"dispute lost: reversed {ORDER // 2}"
    assert reversed_total(org.id) == ORDER // 2


# --- what a lost dispute reverses -----------------------------------------------------------


def test_a_lost_dispute_reverses_its_share_under_its_own_reference(org, clock):
    pi = paid(org.id)
    opened(org.id)
    assert closed(org.id, "lost", amount=250) == f"dispute lost: reversed {ORDER // 4}"
    [entry] = CreditEntry.select().where(CreditEntry.entry_type == "dispute")
    assert (entry.amount, entry.reference_id) == (-(ORDER // 4), "dp_1")
    payment = units.payment_on_record(org.id, pi)
    assert payment.disputed_share == ledger.SHARE_WHOLE // 4
    assert payment.refunded_share == 0
    assert held_since(org.id) is None


def test_a_usd_dispute_of_a_krw_charge_is_a_share_of_the_order(org, clock):
    """Charged 13,500 KRW for a $10 order; the dispute names $2.50: a quarter of the order."""
    paid(org.id, currency="krw", charged=13500)
    assert closed(org.id, "lost", amount=250) == f"dispute lost: reversed {ORDER // 4}"
    assert reversed_total(org.id) == 250 * CENT


def test_a_dispute_in_the_charged_currency_is_a_share_of_the_charge(org, clock):
    paid(org.id, currency="krw", charged=13500)
    assert closed(org.id, "lost", amount=3375, currency="krw") == (
        f"dispute lost: reversed {ORDER // 4}"
    )


def test_a_dispute_on_an_unknown_base_reverses_the_whole_payment(org, clock):
    """Charged in KRW, disputed in EUR: no base to take a share on, so all of it."""
    paid(org.id, currency="krw", charged=13500)
    assert closed(org.id, "lost", amount=1, currency="eur") == f"dispute lost: reversed {ORDER}"


def test_a_usd_dispute_of_a_payment_with_no_order_on_record_reverses_it_whole(org, clock):
    paid(org.id, currency="krw", charged=13500, ordered=None)
    assert closed(org.id, "lost", amount=250) == f"dispute lost: reversed {ORDER}"


def test_a_usd_dispute_with_no_charge_on_record_is_a_share_of_the_order(org, clock):
    paid(org.id, currency="usd", charged=None)
    assert closed(org.id, "lost", amount=500) == f"dispute lost: reversed {ORDER // 2}"


def test_a_dispute_opened_without_its_payment_reverses_the_one_named_at_closing(org, clock):
    pi = paid(org.id)
    opened(org.id, pi=None, charge="ch_unknown")
    assert StripeDispute.get_by_id("dp_1").payment_id is None
    assert closed(org.id, "lost", amount=500, pi=pi) == f"dispute lost: reversed {ORDER // 2}"
    assert StripeDispute.get_by_id("dp_1").payment_id == pi


def test_a_closing_that_names_no_payment_keeps_the_one_heard_at_opening(org, clock):
    pi = paid(org.id)
    opened(org.id)
    assert closed(org.id, "lost", amount=500, pi=None, charge="ch_unknown") == (
        f"dispute lost: reversed {ORDER // 2}"
    )
    assert StripeDispute.get_by_id("dp_1").payment_id == pi


def test_a_lost_dispute_of_no_known_payment_reverses_nothing(org, clock):
    link_customer(org.id)
    units.grant(org.id, ORDER, "adjustment", reason="other credit")
    assert closed(org.id, "lost", pi=None, charge="ch_unknown") == "dispute lost"
    assert reversed_total(org.id) == 0
    assert BillingAccount.get_by_id(org.id).credits_balance == ORDER


# --- the hold while disputes overlap --------------------------------------------------------


def test_the_hold_runs_from_the_oldest_open_dispute(org, clock):
    paid(org.id)
    first_at = utcnow()
    opened(org.id, dispute_id="dp_first")
    clock.advance(hours=1)
    second_at = utcnow()
    opened(org.id, dispute_id="dp_second")
    assert held_since(org.id) == first_at
    clock.advance(hours=1)
    closed(org.id, "won", dispute_id="dp_first")
    assert held_since(org.id) == second_at
    clock.advance(hours=1)
    closed(org.id, "won", dispute_id="dp_second")
    assert held_since(org.id) is None


def test_a_newer_dispute_does_not_move_an_older_hold(org, clock):
    paid(org.id)
    first_at = utcnow()
    opened(org.id, dispute_id="dp_first")
    clock.advance(hours=1)
    opened(org.id, dispute_id="dp_second")
    clock.advance(hours=1)
    closed(org.id, "won", dispute_id="dp_second")
    assert held_since(org.id) == first_at


def test_another_organizations_open_dispute_does_not_hold_this_one(org, clock):
    from billing.organizations import create_organization

    other = create_organization("Other disputes").id
    paid(other, "pi_other")
    opened(other, dispute_id="dp_other", pi="pi_other")
    paid(org.id)
    opened(org.id)
    closed(org.id, "won")
    assert held_since(org.id) is None
    assert held_since(other) is not None


def test_the_hold_runs_from_the_earliest_opening_not_the_first_written(org, clock):
    """Another instance's clock ran an hour ahead when it recorded dp_a: dp_b, written after
    it, opened earlier, and the hold runs from dp_b's opening."""
    paid(org.id)
    early = utcnow()
    clock.advance(hours=1)
    opened(org.id, dispute_id="dp_a")
    clock.set(early)
    opened(org.id, dispute_id="dp_b")
    assert held_since(org.id) == early
