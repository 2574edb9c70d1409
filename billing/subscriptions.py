"""Subscription state, welcome credit and payment-failure state of an organization.

Called by the webhook processor and by local completion alike, so both paths apply the same
rules: state only moves forward in event time, and the welcome credit is granted once per
organization, ever.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from billing import ledger
from billing.accounts import lock_account
from billing.plans import PLANS, SUBSCRIPTION_STATUSES
from models import BillingAccount, utcnow, write_transaction

# Stripe statuses that are not ours map onto the nearest one of ours.
_STATUS_MAP = {"incomplete": "inactive", "incomplete_expired": "canceled"}


@dataclass(frozen=True)
class SubscriptionState:
    subscription_id: str
    status: str
    plan: str | None
    started_at: dt.datetime | None
    ends_at: dt.datetime | None
    current_period_end: dt.datetime | None
    payment_method_id: str | None = None


def normalize_status(stripe_status: str) -> str:
    status = _STATUS_MAP.get(stripe_status, stripe_status)
    return status if status in SUBSCRIPTION_STATUSES else "inactive"


def apply_subscription_state(
    organization_id: str, state: SubscriptionState, event_created: int
) -> bool:
    """Record the subscription's state unless a newer event was already applied."""
    with write_transaction():
        account = lock_account(organization_id)
        if (
            account.subscription_state_at is not None
            and event_created < account.subscription_state_at
        ):
            return False
        account.stripe_subscription_id = state.subscription_id
        account.subscription_status = state.status
        if state.plan is not None:
            account.subscription_plan = state.plan
        account.subscription_started_at = state.started_at or account.subscription_started_at
        account.subscription_ends_at = state.ends_at
        account.subscription_current_period_end = state.current_period_end
        if state.payment_method_id:
            account.stripe_payment_method_id = state.payment_method_id
        account.subscription_state_at = event_created
        account.updated_at = utcnow()
        account.save()
        return True


def grant_welcome_credit(organization_id: str, plan: str | None, reference_id: str) -> bool:
    """The plan's one-time welcome credit, on the first paid invoice; once per organization."""
    with write_transaction():
        account = lock_account(organization_id)
        plan = plan or account.subscription_plan
        if account.welcome_credit_granted_at is not None or plan not in PLANS:
            return False
        ledger.grant(
            organization_id,
            PLANS[plan].welcome_credit,
            "welcome_grant",
            f"welcome credit for the {plan} plan",
            reference_id,
            f"welcome:{organization_id}",
        )
        account = lock_account(organization_id)  # reload: the grant moved the balance
        account.welcome_credit_granted_at = utcnow()
        account.save(only=[BillingAccount.welcome_credit_granted_at])
        return True


def start_payment_grace_period(organization_id: str, days: int) -> None:
    """A failed invoice: spending stops (402) until a payment succeeds."""
    with write_transaction():
        account = lock_account(organization_id)
        if account.payment_grace_period_ends_at is None:
            account.payment_grace_period_ends_at = utcnow() + dt.timedelta(days=days)
            account.save(only=[BillingAccount.payment_grace_period_ends_at])


def clear_payment_failure(organization_id: str) -> None:
    with write_transaction():
        account = lock_account(organization_id)
        if account.payment_grace_period_ends_at is not None:
            account.payment_grace_period_ends_at = None
            account.save(only=[BillingAccount.payment_grace_period_ends_at])
