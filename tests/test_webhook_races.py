"""Races 1-3 of issue 10 on PostgreSQL: the same deliveries, released together by a barrier,
round after round. Each round uses a fresh organization; every round must end right.

(SQLite serializes writers for the whole transaction, so these interleavings cannot happen
there; the tests are skipped on it.)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import pytest

from billing import ledger
from billing.accounts import locked_account
from billing.organizations import create_organization
from billing.units import CENT, DOLLAR
from models import BillingAccount, database, is_postgres
from tests import stripe_events as ev

ROUNDS = int(os.environ.get("RACE_ROUNDS", "15"))

pytestmark = pytest.mark.usefixtures("stripe_mode")


@pytest.fixture(autouse=True)
def _postgres_only(db):
    if not is_postgres():
        pytest.skip("the races need PostgreSQL's row locks and concurrent transactions")


def _new_org(extra_credit: int = 50 * DOLLAR) -> str:
    with database.connection_context():
        org_id = create_organization(f"race {uuid.uuid4().hex[:6]}").id
        if extra_credit:
            with locked_account(org_id) as account:
                ledger.grant(account, extra_credit, "adjustment", reason="other credit")
    ev.link_customer(org_id)
    return org_id


def _count_failures(round_fn: Callable[[], bool]) -> int:
    failures = sum(0 if round_fn() else 1 for _ in range(ROUNDS))
    print(f"{round_fn.__name__}: {failures}/{ROUNDS} rounds wrong")
    return failures


def _top_up(org_id: str) -> None:
    ev.deliver(
        *ev.signed(
            "checkout.session.completed",
            ev.top_up_session(
                org_id,
                pi=f"pi_{org_id[:8]}",
                session_id=f"cs_{org_id[:8]}",
                amount_decimillicents=10 * DOLLAR,
            ),
        )
    )


def test_concurrent_cumulative_refunds_reverse_the_latest_total_once():
    def partial_refunds_race() -> bool:
        org_id = _new_org()
        _top_up(org_id)
        pi = f"pi_{org_id[:8]}"
        ev.deliver_together(
            [
                ev.signed(
                    "charge.refunded",
                    ev.charge(org_id, refunded_cents=300, pi=pi, charge_id=f"ch_{org_id[:8]}"),
                ),
                ev.signed(
                    "charge.refunded",
                    ev.charge(org_id, refunded_cents=500, pi=pi, charge_id=f"ch_{org_id[:8]}"),
                ),
            ]
        )
        return ev.reversed_total(org_id) == 500 * CENT

    assert _count_failures(partial_refunds_race) == 0


def test_full_refund_racing_a_lost_dispute_reverses_the_payment_once():
    def refund_dispute_race() -> bool:
        org_id = _new_org()
        _top_up(org_id)
        pi = f"pi_{org_id[:8]}"
        ev.deliver_together(
            [
                ev.signed(
                    "charge.refunded",
                    ev.charge(org_id, refunded_cents=1000, pi=pi, charge_id=f"ch_{org_id[:8]}"),
                ),
                ev.signed(
                    "charge.dispute.closed",
                    ev.dispute(
                        status="lost",
                        pi=pi,
                        dispute_id=f"dp_{org_id[:8]}",
                        charge_id=f"ch_{org_id[:8]}",
                    ),
                ),
            ]
        )
        return ev.reversed_total(org_id) == 10 * DOLLAR

    assert _count_failures(refund_dispute_race) == 0


def _account(org_id: str) -> BillingAccount:
    with database.connection_context():
        return BillingAccount.get_by_id(org_id)


def test_old_paid_invoice_racing_a_newer_failure_keeps_the_grace_period():
    def invoice_race() -> bool:
        org_id = _new_org(0)
        t = 1_800_000_000
        ev.deliver(
            *ev.signed(
                "customer.subscription.created",
                ev.subscription(org_id, sub=f"sub_{org_id[:8]}"),
                created=t,
            )
        )
        ev.deliver(
            *ev.signed(
                "invoice.paid",
                ev.invoice(org_id, inv=f"in_old_{org_id[:8]}", sub=f"sub_{org_id[:8]}", created=t),
                created=t,
            )
        )
        ev.deliver_together(
            [
                ev.signed(
                    "invoice.payment_failed",
                    ev.invoice(
                        org_id,
                        inv=f"in_new_{org_id[:8]}",
                        sub=f"sub_{org_id[:8]}",
                        paid_cents=0,
                        status="open",
                        created=t + 100,
                    ),
                    created=t + 100,
                ),
                # Stripe sends invoice.payment_succeeded and invoice.paid for one payment.
                ev.signed(
                    "invoice.payment_succeeded",
                    ev.invoice(
                        org_id, inv=f"in_old_{org_id[:8]}", sub=f"sub_{org_id[:8]}", created=t
                    ),
                    created=t + 1,
                ),
            ]
        )
        return _account(org_id).payment_grace_period_ends_at is not None

    assert _count_failures(invoice_race) == 0


def test_late_failure_of_a_paid_invoice_racing_its_payment_blocks_nothing():
    def late_failure_race() -> bool:
        org_id = _new_org(0)
        t = 1_800_000_000
        ev.deliver(
            *ev.signed(
                "customer.subscription.created",
                ev.subscription(org_id, sub=f"sub_{org_id[:8]}"),
                created=t,
            )
        )
        ev.deliver_together(
            [
                ev.signed(
                    "invoice.payment_failed",
                    ev.invoice(
                        org_id,
                        inv=f"in_1_{org_id[:8]}",
                        sub=f"sub_{org_id[:8]}",
                        paid_cents=0,
                        status="open",
                        created=t,
                    ),
                    created=t + 10,
                ),
                ev.signed(
                    "invoice.paid",
                    ev.invoice(
                        org_id, inv=f"in_1_{org_id[:8]}", sub=f"sub_{org_id[:8]}", created=t
                    ),
                    created=t + 20,
                ),
            ]
        )
        return _account(org_id).payment_grace_period_ends_at is None

    assert _count_failures(late_failure_race) == 0


def test_same_second_subscription_events_end_in_the_later_lifecycle_state():
    def same_second_race() -> bool:
        org_id = _new_org(0)
        t = 1_800_000_000
        ev.deliver_together(
            [
                ev.signed(
                    "customer.subscription.updated",
                    ev.subscription(org_id, sub=f"sub_{org_id[:8]}", status="active", created=t),
                    created=t,
                ),
                ev.signed(
                    "customer.subscription.created",
                    ev.subscription(
                        org_id, sub=f"sub_{org_id[:8]}", status="incomplete", created=t
                    ),
                    created=t,
                ),
            ]
        )
        return _account(org_id).subscription_status == "active"

    assert _count_failures(same_second_race) == 0


def test_old_subscription_deleted_racing_the_new_one_keeps_the_new_one():
    def replaced_subscription_race() -> bool:
        org_id = _new_org(0)
        t = 1_800_000_000
        ev.deliver(
            *ev.signed(
                "customer.subscription.created",
                ev.subscription(org_id, sub=f"sub_old_{org_id[:8]}", created=t),
                created=t,
            )
        )
        ev.deliver_together(
            [
                ev.signed(
                    "customer.subscription.created",
                    ev.subscription(org_id, sub=f"sub_new_{org_id[:8]}", created=t + 100),
                    created=t + 100,
                ),
                ev.signed(
                    "customer.subscription.deleted",
                    ev.subscription(
                        org_id, sub=f"sub_old_{org_id[:8]}", status="canceled", created=t
                    ),
                    created=t + 101,
                ),
            ]
        )
        account = _account(org_id)
        return (
            account.subscription_status == "active"
            and account.stripe_subscription_id == f"sub_new_{org_id[:8]}"
        )

    assert _count_failures(replaced_subscription_race) == 0
