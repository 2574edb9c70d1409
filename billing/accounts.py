"""Billing settings: read them, and change the ones a customer may change."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from billing.errors import InvalidRequest, NotFound
from billing.units import (
    AUTO_RECHARGE_AMOUNT_MAX,
    AUTO_RECHARGE_AMOUNT_MIN,
    AUTO_RECHARGE_THRESHOLD_MAX,
    AUTO_RECHARGE_THRESHOLD_MIN,
    CENT,
    INT64_MAX,
)
from models import BillingAccount, utcnow, write_transaction
from models.prepared import PreparedSelect

# The same rule as the contract's pattern for billingEmail.
EMAIL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)
UPDATABLE = {
    "billing_email",
    "auto_recharge_enabled",
    "auto_recharge_threshold",
    "auto_recharge_amount",
    "usage_cap",
}
_BOUNDS = {
    "auto_recharge_threshold": (AUTO_RECHARGE_THRESHOLD_MIN, AUTO_RECHARGE_THRESHOLD_MAX),
    "auto_recharge_amount": (AUTO_RECHARGE_AMOUNT_MIN, AUTO_RECHARGE_AMOUNT_MAX),
    "usage_cap": (0, INT64_MAX),
}


# The account reads every request makes (a balance, a debit's lock), rendered once.
_ACCOUNT = PreparedSelect(BillingAccount, lambda: BillingAccount.organization == "")
_ACCOUNT_FOR_UPDATE = PreparedSelect(
    BillingAccount, lambda: BillingAccount.organization == "", for_update=True
)


def get_account(organization_id: str) -> BillingAccount:
    account = _ACCOUNT.first(organization_id)
    if account is None:
        raise NotFound("organization not found")
    return account


def suspended_since(account: BillingAccount) -> dt.datetime | None:
    """Spending is held by an operator's suspension or by an open dispute; each is its own
    state (lifting one never lifts the other), and the earlier start is reported."""
    held = [t for t in (account.suspended_at, account.disputed_at) if t is not None]
    return min(held) if held else None


def lock_account(organization_id: str) -> BillingAccount:
    """Inside a write transaction: the account row, locked against concurrent writers.

    PostgreSQL takes a row lock; SQLite has none, and needs none, as `write_transaction`
    already holds its database-wide writer lock.
    """
    account = _ACCOUNT_FOR_UPDATE.first(organization_id)
    if account is None:
        raise NotFound("organization not found")
    return account


def _validate(changes: dict[str, Any]) -> None:
    unknown = set(changes) - UPDATABLE
    if unknown:
        raise InvalidRequest(f"unknown settings: {', '.join(sorted(unknown))}")
    for name, (low, high) in _BOUNDS.items():
        value = changes.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidRequest(f"{name} must be an integer from {low} to {high}")
    enabled = changes.get("auto_recharge_enabled")
    if "auto_recharge_enabled" in changes and not isinstance(enabled, bool):
        raise InvalidRequest("auto_recharge_enabled must be true or false")
    email = changes.get("billing_email")
    if email is not None and (
        not isinstance(email, str) or len(email) > 254 or not EMAIL.fullmatch(email)
    ):
        raise InvalidRequest("billingEmail must be an ASCII email address")
    amount = changes.get("auto_recharge_amount")
    if isinstance(amount, int) and amount % CENT:
        raise InvalidRequest("autoRechargeAmountDecimillicents must be whole cents (100000)")


def update_settings(organization_id: str, changes: dict[str, Any]) -> BillingAccount:
    """Apply a partial update atomically; a rule broken anywhere changes nothing.

    Enabling auto-recharge needs both a threshold and an amount, from this update or already
    stored; clearing either while it is enabled is refused for the same reason.
    """
    _validate(changes)
    with write_transaction():
        account = lock_account(organization_id)
        for name, value in changes.items():
            setattr(account, name, value)
        if account.auto_recharge_enabled and (
            account.auto_recharge_threshold is None or account.auto_recharge_amount is None
        ):
            raise InvalidRequest(
                "auto-recharge needs autoRechargeThresholdDecimillicents and "
                "autoRechargeAmountDecimillicents"
            )
        account.updated_at = utcnow()
        account.save()
    return account
