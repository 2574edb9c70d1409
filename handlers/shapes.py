"""Wire shapes: camelCase JSON from service results, timestamps as ISO-8601 UTC."""

from __future__ import annotations

import datetime as dt
from typing import Any

from billing.accounts import suspended_since
from billing.history import HistoryPage, wire_reason, wire_type
from billing.ledger import ReservationResult
from billing.metering import EventOutcome, EventStatus, RecordedUsage, UsageEvent
from billing.operators import Adjustment
from billing.plans import is_subscribed
from billing.usage import UsageSummary
from models import BillingAccount, CreditEntry, Membership, Organization


def iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value.isoformat(timespec="seconds") + "Z"


def billing_settings(account: BillingAccount) -> dict[str, Any]:
    return {
        "organizationId": account.organization_id,
        "billingEmail": account.billing_email,
        "stripeCustomerId": account.stripe_customer_id,
        "stripeSubscriptionId": account.stripe_subscription_id,
        "stripePaymentMethodId": account.stripe_payment_method_id,
        "stripeMeteredSubscriptionItemId": account.stripe_metered_subscription_item_id,
        "creditsBalanceDecimillicents": account.credits_balance,
        "reservedCreditsDecimillicents": account.reserved_credits,
        "autoRechargeEnabled": account.auto_recharge_enabled,
        "autoRechargeThresholdDecimillicents": account.auto_recharge_threshold,
        "autoRechargeAmountDecimillicents": account.auto_recharge_amount,
        "usageCapDecimillicents": account.usage_cap,
        "isSubscribed": is_subscribed(account.subscription_status),
        "subscriptionStatus": account.subscription_status,
        "subscriptionPlan": account.subscription_plan,
        "subscriptionStartedAt": iso(account.subscription_started_at),
        "subscriptionEndsAt": iso(account.subscription_ends_at),
        "subscriptionCurrentPeriodEnd": iso(account.subscription_current_period_end),
        "suspendedAt": iso(suspended_since(account)),
        "paymentGracePeriodEndsAt": iso(account.payment_grace_period_ends_at),
    }


def credit_balance(account: BillingAccount) -> dict[str, Any]:
    return {
        "creditsBalanceDecimillicents": account.credits_balance,
        "reservedCreditsDecimillicents": account.reserved_credits,
        "availableDecimillicents": account.credits_balance - account.reserved_credits,
        "isSuspended": suspended_since(account) is not None,
        "suspendedAt": iso(suspended_since(account)),
        "paymentGracePeriodEndsAt": iso(account.payment_grace_period_ends_at),
    }


def credit_entry(entry: CreditEntry) -> dict[str, Any]:
    return {
        "id": entry.public_id,
        "entryType": wire_type(entry.entry_type).value,
        "kind": entry.entry_type,
        "amountDecimillicents": entry.amount,
        "reason": wire_reason(entry.entry_type, entry.reason),
        "referenceId": entry.reference_id,
        "balanceAfter": entry.balance_after,
        "createdAt": iso(entry.created_at),
    }


def credit_history(page: HistoryPage) -> dict[str, Any]:
    return {
        "items": [credit_entry(e) for e in page.items],
        "cursor": page.cursor,
        "hasMore": page.has_more,
    }


def usage_summary(summary: UsageSummary) -> dict[str, Any]:
    return {
        "organizationId": summary.organization_id,
        "category": summary.category,
        "periodStart": iso(summary.period_start),
        "periodEnd": iso(summary.period_end),
        "totalQuantity": summary.total_quantity,
        "totalCostDecimillicents": summary.total_cost,
    }


def recorded_usage(result: RecordedUsage) -> dict[str, Any]:
    record = result.record
    return {
        "id": str(record.id),
        "organizationId": record.organization_id,
        "category": record.category,
        "quantity": record.quantity,
        "unitCostDecimillicents": record.unit_cost,
        "costDecimillicents": record.cost,
        "referenceId": record.reference_id,
        "createdAt": iso(record.created_at),
        "availableDecimillicents": result.balance - result.reserved,
        "replayed": result.replayed,
    }


def batch_outcome(event: UsageEvent, outcome: EventOutcome) -> dict[str, Any]:
    """One event's result; `usage` only where a record answers it (recorded, duplicate)."""
    shown: dict[str, Any] = {
        "status": outcome.status.value,
        "organizationId": event.organization_id,
        "referenceId": event.reference_id,
        "reason": outcome.refusal_code,
        "detail": outcome.refusal_detail,
    }
    if outcome.record is not None and outcome.status in (
        EventStatus.recorded,
        EventStatus.duplicate,
    ):
        replayed = outcome.status is EventStatus.duplicate
        shown["usage"] = recorded_usage(
            RecordedUsage(outcome.record, outcome.balance, outcome.reserved, replayed)
        )
    return shown


def reservation(result: ReservationResult) -> dict[str, Any]:
    held = result.reservation
    return {
        "id": held.id,
        "organizationId": held.organization_id,
        "amountDecimillicents": held.amount,
        "status": held.status,
        "referenceId": held.reference_id,
        "finalAmountDecimillicents": held.final_amount,
        "createdAt": iso(held.created_at),
        "availableDecimillicents": result.balance - result.reserved,
        "replayed": result.replayed,
    }


def organization(org: Organization) -> dict[str, Any]:
    return {"organizationId": org.id, "name": org.name, "createdAt": iso(org.created_at)}


def member(membership: Membership) -> dict[str, Any]:
    return {
        "organizationId": membership.organization_id,
        "userId": membership.user_id,
        "role": membership.role,
        "email": membership.email,
    }


def credit_adjustment(result: Adjustment) -> dict[str, Any]:
    return {
        "entry": credit_entry(result.entry),
        "availableDecimillicents": result.balance - result.reserved,
        "replayed": result.replayed,
    }


def suspension(account: BillingAccount) -> dict[str, Any]:
    return {
        "organizationId": account.organization_id,
        "isSuspended": account.suspended_at is not None,
        "suspendedAt": iso(account.suspended_at),
        "reason": account.suspension_reason,
    }
