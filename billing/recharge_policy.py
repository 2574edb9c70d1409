"""Auto-recharge policy: when an organization gets a recharge request, and the state that
decision reads.

Rules:
- a request is written when available credit is below the threshold after a debit or
  reservation, when a debit or reservation was refused for lack of credit (whatever the
  threshold), and when the payment method changes while available is below the threshold;
  never without a saved customer and card (it could only fail, and count toward turning
  auto-recharge off);
- at most one request is in flight (pending or processing) per organization, and none is made
  within `AUTO_RECHARGE_COOLDOWN_SECONDS` of the previous one;
- `AUTO_RECHARGE_MAX_FAILURES` consecutive counted failures (declines, permanent refusals)
  turn auto-recharge off with a reason; a success resets the count; an outage never counts.

The decision reads only the locked account row (`auto_recharge_in_flight_id`,
`auto_recharge_last_requested_at`), never the outbox, so a debit costs the same whatever the
organization's history. The worker clears the in-flight id in the same transaction that moves
its request out of pending/processing. Every function here but `reconsider` takes the account
its caller's unit of work locked.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any

from billing.accounts import locked_account
from billing.config import get_settings
from models import AttemptStatus, AutoRechargeRequest, BillingAccount, FailureKind, utcnow

log = logging.getLogger("billing.recharge_policy")


IN_FLIGHT = (AttemptStatus.pending, AttemptStatus.processing)
SETTLED = (
    AttemptStatus.succeeded,
    AttemptStatus.failed,
    AttemptStatus.canceled,
    AttemptStatus.superseded,
)
COUNTED_FAILURES = (FailureKind.declined, FailureKind.permanent)


def request_if_due(account: BillingAccount, *, refused: bool = False) -> str | None:
    """With the account locked: write one recharge request if the rules say so; its id."""
    if not account.auto_recharge_enabled or account.auto_recharge_threshold is None:
        return None
    if account.auto_recharge_amount is None:
        return None
    if not (account.stripe_customer_id and account.stripe_payment_method_id):
        # Nothing to charge: such an attempt could only fail and count toward turning
        # auto-recharge off. Saving a card reconsiders (`remember_payment_method`).
        return None
    available = account.credits_balance - account.reserved_credits
    if not refused and available >= account.auto_recharge_threshold:
        return None
    if account.auto_recharge_in_flight_id is not None:
        return None
    now = utcnow()
    cooldown = dt.timedelta(seconds=get_settings().auto_recharge_cooldown_seconds)
    last = account.auto_recharge_last_requested_at
    if last is not None and last > now - cooldown:
        return None
    attempt_id = str(uuid.uuid4())
    AutoRechargeRequest.create(
        id=attempt_id,
        organization=account.organization_id,
        amount=account.auto_recharge_amount,
        created_at=now,
        updated_at=now,
        next_attempt_at=now,
    )
    account.auto_recharge_in_flight_id = attempt_id
    account.auto_recharge_last_requested_at = now
    account.save(
        only=[
            BillingAccount.auto_recharge_in_flight_id,
            BillingAccount.auto_recharge_last_requested_at,
        ]
    )
    return attempt_id


def reconsider(organization_id: str, *, refused: bool = False) -> str | None:
    """In a short unit of work of its own: after a refusal, whose transaction rolled back."""
    with locked_account(organization_id) as account:
        return request_if_due(account, refused=refused)


def after_refusal(organization_id: str) -> None:
    """Run once a debit refused for lack of credit has rolled back; never masks the 402."""
    try:
        reconsider(organization_id, refused=True)
    except Exception:
        log.exception("auto-recharge could not be requested after a refusal")


def release_in_flight(account: BillingAccount, attempt_id: str) -> None:
    """The attempt left pending/processing: the organization may get a new one (cooldown)."""
    if account.auto_recharge_in_flight_id == attempt_id:
        account.auto_recharge_in_flight_id = None
        account.save(only=[BillingAccount.auto_recharge_in_flight_id])


def count_failure(account: BillingAccount) -> None:
    """One more consecutive counted failure; at the limit, turn auto-recharge off."""
    limit = get_settings().auto_recharge_max_failures
    account.auto_recharge_failure_count += 1
    fields: list[Any] = [BillingAccount.auto_recharge_failure_count]
    if account.auto_recharge_failure_count >= limit and account.auto_recharge_enabled:
        account.auto_recharge_enabled = False
        account.auto_recharge_disabled_reason = (
            f"turned off after {account.auto_recharge_failure_count} failed charges; "
            "update the payment method"
        )
        fields += [
            BillingAccount.auto_recharge_enabled,
            BillingAccount.auto_recharge_disabled_reason,
        ]
    account.save(only=fields)


def reset_failures(account: BillingAccount) -> None:
    """A success: the count of consecutive failures starts again."""
    if account.auto_recharge_failure_count != 0:
        account.auto_recharge_failure_count = 0
        account.save(only=[BillingAccount.auto_recharge_failure_count])
