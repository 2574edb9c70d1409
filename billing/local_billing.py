"""Local billing mode: what Stripe would do, done in-process, through the same rules.

Activating a plan directly (the platform's `dev/complete-local` with a plan) goes through
`apply_subscription_state` and `grant_welcome_credit` like a paid first invoice, so the welcome
credit is still granted once per organization, whatever the order of calls.
"""

from __future__ import annotations

import datetime as dt
import uuid

from billing.accounts import lock_account
from billing.checkout import LOCAL_PAYMENT_METHOD
from billing.errors import InvalidRequest
from billing.plans import PLANS
from billing.subscriptions import SubscriptionState, apply_subscription_state, grant_welcome_credit
from models import utcnow, write_transaction

LOCAL_PERIOD = dt.timedelta(days=30)


def activate_plan(organization_id: str, plan: str) -> None:
    """Subscribe to `plan`, or switch to it, with no checkout; a card is on file afterwards."""
    if plan not in PLANS:
        raise InvalidRequest(f"subscriptionPlan must be one of {', '.join(PLANS)}")
    with write_transaction():
        account = lock_account(organization_id)
        if not account.stripe_payment_method_id:
            account.stripe_payment_method_id = LOCAL_PAYMENT_METHOD
            account.save(only=[type(account).stripe_payment_method_id])
        now = utcnow()
        apply_subscription_state(
            organization_id,
            SubscriptionState(
                subscription_id=account.stripe_subscription_id
                or f"sub_local_{uuid.uuid4().hex[:16]}",
                status="active",
                plan=plan,
                started_at=account.subscription_started_at or now,
                ends_at=None,
                current_period_end=now + LOCAL_PERIOD,
            ),
            int(now.timestamp()),
        )
        grant_welcome_credit(organization_id, plan, f"local-plan:{organization_id}")
