"""Subscription state, welcome credit and payment-failure state of an organization.

Called by the webhook processor and by local completion alike, on the account their unit of
work locked (none of these opens a transaction or takes the lock), so both paths apply the same
rules: state is kept per subscription and per invoice and only moves forward in event order
(`created`, then the object's lifecycle, then event id); the organization shows its current
subscription; the grace period runs while a failed invoice is unresolved; and the welcome
credit is granted once per organization, ever.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from billing import ledger
from billing.config import get_settings
from billing.plans import PLANS, SUBSCRIPTION_STATUSES, is_subscribed
from models import (
    BillingAccount,
    CreditEntryType,
    InvoiceStatus,
    StripeInvoice,
    StripeSubscription,
    SubscriptionStatus,
    utcnow,
)

# Stripe statuses that are not ours map onto the nearest one of ours.
_STATUS_MAP = {
    "incomplete": SubscriptionStatus.inactive,
    "incomplete_expired": SubscriptionStatus.canceled,
}


@dataclass(frozen=True)
class SubscriptionState:
    subscription_id: str
    status: SubscriptionStatus
    plan: str | None
    started_at: dt.datetime | None
    ends_at: dt.datetime | None
    current_period_end: dt.datetime | None
    payment_method_id: str | None = None


def normalize_status(stripe_status: str) -> SubscriptionStatus:
    status = _STATUS_MAP.get(stripe_status, stripe_status)
    return (
        SubscriptionStatus(status)
        if status in SUBSCRIPTION_STATUSES
        else SubscriptionStatus.inactive
    )


class SubscriptionChange(StrEnum):
    applied = "applied"  # the organization's current subscription moved to this state
    recorded = "recorded"  # another subscription's state: kept, the organization unchanged
    stale = "stale"  # an older event than the one already applied: nothing changed
    foreign = "foreign"  # the subscription belongs to another organization


# A subscription's own lifecycle, to order two events of the same second.
_LIFECYCLE = {
    "incomplete": 0,
    "trialing": 1,
    "active": 2,
    "past_due": 3,
    "unpaid": 4,
    "paused": 4,
    "incomplete_expired": 5,
    "canceled": 5,
}


def lifecycle_rank(stripe_status: str) -> int:
    return _LIFECYCLE.get(stripe_status, 0)


@dataclass(frozen=True)
class EventOrder:
    """Where an event stands among a subscription's events: its `created`, then the status'
    place in the lifecycle, then the event id (any fixed rule breaks the last ties)."""

    created: int
    rank: int = 0
    event_id: str = ""

    def key(self) -> tuple[int, int, str]:
        return (self.created, self.rank, self.event_id)


def current_subscription(organization_id: str) -> StripeSubscription | None:
    """The subscription the organization is on: one giving access before one that does not,
    then the newest (by Stripe's `created`, then id). A pure function of the per-subscription
    states, so it is the same whatever order their events arrived in."""
    rows = StripeSubscription.select().where(StripeSubscription.organization == organization_id)
    return max(
        rows,
        key=lambda r: (is_subscribed(r.status), r.subscription_created, r.id),
        default=None,
    )


def _adopt_legacy(account: BillingAccount) -> None:
    """State kept on the account before per-subscription rows existed becomes a row."""
    sub_id = account.stripe_subscription_id
    if sub_id is None or StripeSubscription.get_or_none(StripeSubscription.id == sub_id):
        return
    StripeSubscription.create(
        id=sub_id,
        organization=account.organization_id,
        status=account.subscription_status,
        plan=account.subscription_plan,
        subscription_created=account.subscription_state_at or 0,
        started_at=account.subscription_started_at,
        ends_at=account.subscription_ends_at,
        current_period_end=account.subscription_current_period_end,
        event_created=account.subscription_state_at or 0,
        event_rank=0,
        event_id="",
    )


def _show(account: BillingAccount, row: StripeSubscription) -> None:
    account.stripe_subscription_id = row.id
    account.subscription_status = row.status
    account.subscription_plan = row.plan or account.subscription_plan
    account.subscription_started_at = row.started_at or account.subscription_started_at
    account.subscription_ends_at = row.ends_at
    account.subscription_current_period_end = row.current_period_end
    if row.payment_method_id:
        account.stripe_payment_method_id = row.payment_method_id
    account.subscription_state_at = row.event_created
    account.updated_at = utcnow()
    account.save()


def record_subscription_event(
    account: BillingAccount,
    state: SubscriptionState,
    order: EventOrder,
    *,
    subscription_created: int | None = None,
) -> SubscriptionChange:
    """Keep the subscription's newest state, then show the organization's current one.

    An older event than the one applied to this subscription changes nothing; an event for
    a subscription that is not (and does not become) the current one changes only its row.
    """
    organization_id = account.organization_id
    _adopt_legacy(account)
    row = StripeSubscription.get_or_none(StripeSubscription.id == state.subscription_id)
    if row is not None and row.organization_id != organization_id:
        return SubscriptionChange.foreign
    if row is not None and order.key() < (row.event_created, row.event_rank, row.event_id):
        return SubscriptionChange.stale
    if row is None:
        row = StripeSubscription(
            id=state.subscription_id,
            organization=organization_id,
            subscription_created=subscription_created or order.created,
        )
        force_insert = True
    else:
        force_insert = False
    row.status = state.status
    row.plan = state.plan or row.plan
    row.started_at = state.started_at or row.started_at
    row.ends_at = state.ends_at
    row.current_period_end = state.current_period_end
    row.payment_method_id = state.payment_method_id or row.payment_method_id
    row.event_created, row.event_rank, row.event_id = order.key()
    row.save(force_insert=force_insert)
    current = current_subscription(organization_id)
    assert current is not None  # this subscription's row, at least
    _show(account, current)
    _set_grace_period(account, get_settings().payment_grace_period_days)
    if current.id == state.subscription_id:
        return SubscriptionChange.applied
    return SubscriptionChange.recorded


def apply_subscription_state(
    account: BillingAccount, state: SubscriptionState, event_created: int
) -> bool:
    """Local completion: record the state as of `event_created` (later calls win ties)."""
    order = EventOrder(event_created, lifecycle_rank(state.status), "~local")
    change = record_subscription_event(account, state, order)
    return change == SubscriptionChange.applied


def grant_welcome_credit(account: BillingAccount, plan: str | None, reference_id: str) -> bool:
    """The plan's one-time welcome credit, on the first paid invoice; once per organization."""
    plan = plan or account.subscription_plan
    if account.welcome_credit_granted_at is not None or plan not in PLANS:
        return False
    ledger.grant(
        account,
        PLANS[plan].welcome_credit,
        CreditEntryType.welcome_grant,
        reason=f"welcome credit for the {plan} plan",
        reference_id=reference_id,
        idempotency_ref=f"welcome:{account.organization_id}",
    )
    account.welcome_credit_granted_at = utcnow()
    account.save(only=[BillingAccount.welcome_credit_granted_at])
    return True


def record_invoice(
    account: BillingAccount,
    *,
    invoice_id: str,
    subscription_id: str | None,
    status: InvoiceStatus,
    amount_paid: int,
    invoice_created: int,
    event_created: int,
    grace_days: int,
) -> str:
    """Keep the invoice's payment state and derive the grace period from all of them.

    Paid is final: a late failure of a paid invoice changes nothing. A failure is resolved by
    its own payment or by a paid (non-zero) invoice of the same subscription at least as new;
    the grace period runs exactly while some failure is unresolved. A $0 invoice or an older
    one proves nothing about the card, so it resolves no other invoice's failure.
    """
    organization_id = account.organization_id
    row = StripeInvoice.get_or_none(StripeInvoice.id == invoice_id)
    if row is not None and row.organization_id != organization_id:
        return "invoice of another organization: ignored"
    if row is None:
        row = StripeInvoice.create(
            id=invoice_id,
            organization=organization_id,
            subscription_id=subscription_id,
            status=status.value,
            amount_paid=amount_paid,
            invoice_created=invoice_created,
            event_created=event_created,
        )
        outcome = f"invoice {status.value}"
    elif row.status == InvoiceStatus.paid:
        outcome = (
            "invoice already paid"
            if status == InvoiceStatus.paid
            else "late failure of a paid invoice: ignored"
        )
    elif status == InvoiceStatus.paid:
        row.status, row.amount_paid = status.value, amount_paid
        row.event_created = max(row.event_created, event_created)
        row.save()
        outcome = "invoice paid"
    else:
        outcome = "invoice failed again"
    _resolve_failures(row)
    _set_grace_period(account, grace_days)
    return outcome


def _at_least_as_new(row: StripeInvoice) -> Any:
    return (StripeInvoice.invoice_created > row.invoice_created) | (
        (StripeInvoice.invoice_created == row.invoice_created) & (StripeInvoice.id >= row.id)
    )


def _resolve_failures(row: StripeInvoice) -> None:
    if row.subscription_id is None:
        return
    same_subscription = (StripeInvoice.organization == row.organization_id) & (
        StripeInvoice.subscription_id == row.subscription_id
    )
    if row.status == InvoiceStatus.paid and row.amount_paid > 0:
        older_or_same = ~_at_least_as_new(row) | (StripeInvoice.id == row.id)
        StripeInvoice.update(resolved=True).where(
            same_subscription
            & (StripeInvoice.status == InvoiceStatus.failed.value)
            & (StripeInvoice.resolved == False)  # noqa: E712 - SQL, not Python
            & older_or_same
        ).execute()
    elif row.status == InvoiceStatus.failed and not row.resolved:
        newer_paid = StripeInvoice.select().where(
            same_subscription
            & (StripeInvoice.status == InvoiceStatus.paid.value)
            & (StripeInvoice.amount_paid > 0)
            & _at_least_as_new(row)
        )
        if newer_paid.exists():
            row.resolved = True
            row.save(only=[StripeInvoice.resolved])


def _set_grace_period(account: BillingAccount, days: int) -> None:
    """The grace period runs while a failure is unresolved, except one of a canceled
    subscription the organization has since replaced: its late failure must not block an
    organization paying for its current subscription (the old one can never be paid again).
    The account's `stripe_subscription_id` must already be the current one."""
    replaced = StripeSubscription.select(StripeSubscription.id).where(
        (StripeSubscription.organization == account.organization_id)
        & (StripeSubscription.status == SubscriptionStatus.canceled)
        & (StripeSubscription.id != (account.stripe_subscription_id or ""))
    )
    unresolved = (
        StripeInvoice.select()
        .where(
            (StripeInvoice.organization == account.organization_id)
            & (StripeInvoice.status == InvoiceStatus.failed.value)
            & (StripeInvoice.resolved == False)  # noqa: E712 - SQL, not Python
            & (
                StripeInvoice.subscription_id.is_null()
                | StripeInvoice.subscription_id.not_in(replaced)
            )
        )
        .exists()
    )
    if unresolved and account.payment_grace_period_ends_at is None:
        account.payment_grace_period_ends_at = utcnow() + dt.timedelta(days=days)
    elif not unresolved and account.payment_grace_period_ends_at is not None:
        account.payment_grace_period_ends_at = None
    else:
        return
    account.save(only=[BillingAccount.payment_grace_period_ends_at])
