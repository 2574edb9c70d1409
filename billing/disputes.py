"""Disputes: an open dispute holds spending; a lost one reverses what its payment bought.

The hold is its own state (`billing_accounts.disputed_at`, from the open `StripeDispute` rows),
apart from an operator's suspension (`suspended_at`): closing a dispute never lifts an
operator's suspension, and lifting that never ends a dispute hold. A dispute's rows change
only under the account lock (the webhook's unit of work locks it and passes it here), so its
closing reverses once, and `created` arriving after `closed` opens nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from billing import ledger
from billing.units import CENT
from models import BillingAccount, StripeDispute, StripePayment, utcnow


class DisputeOutcome(StrEnum):
    won = "won"
    lost = "lost"


@dataclass(frozen=True)
class DisputeReport:
    dispute_id: str
    payment_id: str | None
    status: str
    amount: int  # in the dispute's currency's minor unit
    currency: str | None


def opened(account: BillingAccount, dispute: DisputeReport) -> str:
    organization_id = account.organization_id
    row = StripeDispute.get_or_none(StripeDispute.id == dispute.dispute_id)
    if row is not None:
        return "dispute already known: no change"
    StripeDispute.create(
        id=dispute.dispute_id,
        organization=organization_id,
        payment_id=dispute.payment_id,
        status=dispute.status,
        is_open=True,
    )
    _refresh_hold(account)
    return "dispute opened: spending held"


def closed(account: BillingAccount, dispute: DisputeReport) -> str:
    organization_id = account.organization_id
    row = StripeDispute.get_or_none(StripeDispute.id == dispute.dispute_id)
    if row is not None and not row.is_open:
        return "dispute already closed: no change"
    if row is None:  # closed before we heard it open: it never holds spending
        row = StripeDispute.create(
            id=dispute.dispute_id,
            organization=organization_id,
            payment_id=dispute.payment_id,
            status=dispute.status,
            is_open=False,
            closed_at=utcnow(),
        )
    else:
        row.payment_id = row.payment_id or dispute.payment_id
        row.status, row.is_open, row.closed_at = dispute.status, False, utcnow()
        row.save()
    outcome = f"dispute {dispute.status}"
    if dispute.status == DisputeOutcome.lost and row.payment_id:
        share = _share(ledger.payment_on_record(account, row.payment_id), dispute)
        result = ledger.reverse_payment(
            account,
            row.payment_id,
            kind=ledger.ReversalKind.dispute,
            share=share,
            reference_id=dispute.dispute_id,
        )
        outcome = f"dispute lost: reversed {result.reversed_now}"
    _refresh_hold(account)
    return outcome


def _share(payment: StripePayment | None, dispute: DisputeReport) -> int:
    """The disputed part of the payment, on the base it was charged in: the charged currency
    and amount, else USD cents against the order, else (unknown base) the whole payment."""
    if (
        payment is not None
        and payment.charged_amount
        and (dispute.currency == payment.charged_currency)
    ):
        return ledger.share_of(dispute.amount, payment.charged_amount)
    if payment is not None and payment.ordered_amount and dispute.currency == "usd":
        return ledger.share_of(dispute.amount * CENT, payment.ordered_amount)
    return ledger.SHARE_WHOLE


def _refresh_hold(account: BillingAccount) -> None:
    oldest_open = (
        StripeDispute.select(StripeDispute.opened_at)
        .where(
            (StripeDispute.organization == account.organization_id)
            & (StripeDispute.is_open == True)  # noqa: E712 - SQL, not Python
        )
        .order_by(StripeDispute.opened_at)
        .first()
    )
    since = oldest_open.opened_at if oldest_open else None
    if since != account.disputed_at:
        account.disputed_at = since
        account.save(only=[BillingAccount.disputed_at])
