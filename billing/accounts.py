"""An organization's billing account: the unit of work that locks it, and its settings.

One unit of work per use case: the entry point (a service function a handler, the webhook
processor or a worker calls) opens `locked_account` once; the rules it calls (the ledger's
operations, subscription and dispute state, the auto-recharge policy) take that locked account
and never open a transaction or take the lock themselves.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from contextlib import contextmanager
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
from models import BillingAccount, locked, utcnow, write_transaction
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


@contextmanager
def locked_account(organization_id: str) -> Iterator[BillingAccount]:
    """A use case's unit of work: one write transaction holding the organization's account
    lock, taken once. Everything the use case writes commits (or rolls back) together."""
    with write_transaction():
        yield lock_account(organization_id)


@contextmanager
def locked_accounts(organization_ids: set[str]) -> Iterator[dict[str, BillingAccount]]:
    """The unit of work of a use case over several organizations (a usage batch): one write
    transaction, the accounts locked in one statement in organization-id order, so concurrent
    units over overlapping organizations cannot deadlock."""
    with write_transaction():
        yield _lock_accounts(sorted(organization_ids))


def _lock_accounts(ordered: list[str]) -> dict[str, BillingAccount]:
    if len(ordered) == 1:
        return {ordered[0]: lock_account(ordered[0])}
    accounts = {
        account.organization_id: account
        for account in locked(
            BillingAccount.select()
            .where(BillingAccount.organization.in_(ordered))
            .order_by(BillingAccount.organization)
        )
    }
    if len(accounts) != len(ordered):
        raise NotFound("organization not found")
    return accounts


def lock_account(organization_id: str) -> BillingAccount:
    """Inside a write transaction: the account row, locked against concurrent writers. Use
    cases take it through `locked_account`; the webhook processor, whose unit of work is the
    event's own transaction, takes it once per event.

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
    with locked_account(organization_id) as account:
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
