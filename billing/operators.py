"""Operator actions: credit adjustments, suspension, and the ledger audit.

Each action carries a reason and is recorded in `operator_actions`. A credit adjustment is a
ledger `adjustment` entry made once per idempotency key: the key becomes the entry's
idempotency reference, so a retry (over HTTP or from `scripts.admin`) replays the first entry,
and the same key with another amount or reason is a 409.

Suspension here is the operator's hold (`suspended_at` with `suspension_reason`); unsuspending
clears only that hold, never another one (a dispute's, for instance).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from billing import ledger
from billing.accounts import locked_account
from billing.audit import ledger_problems
from billing.directory import clean_text
from billing.errors import Conflict, InvalidRequest, NotFound
from billing.units import ADJUSTMENT_MAX
from models import (
    BillingAccount,
    CreditEntry,
    OperatorAction,
    OperatorActionKind,
    Organization,
    utcnow,
)

MAX_REASON = 500


@dataclass(frozen=True)
class Adjustment:
    entry: CreditEntry
    balance: int
    reserved: int
    replayed: bool


@dataclass(frozen=True)
class Audit:
    organization_id: str
    balance: int
    reserved: int
    entries: int
    problems: list[str]


def _reason(reason: str) -> str:
    return clean_text("reason", reason, MAX_REASON)


def adjustment_ref(organization_id: str, idempotency_key: str) -> str:
    """The ledger's idempotency reference for a key: a digest, so any key up to the contract's
    255 characters fits the 300-character column."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
    return f"operator:{organization_id}:{digest}"


def adjust_credits(
    organization_id: str, *, amount: int, reason: str, idempotency_key: str, overdraft: int = 0
) -> Adjustment:
    """Grant (amount > 0) or take back (amount < 0) credits, once per idempotency key."""
    reason = _reason(reason)
    if isinstance(amount, bool) or not isinstance(amount, int) or amount == 0:
        raise InvalidRequest("amountDecimillicents must be a non-zero integer")
    if not -ADJUSTMENT_MAX <= amount <= ADJUSTMENT_MAX:
        raise InvalidRequest(
            f"amountDecimillicents must be from -{ADJUSTMENT_MAX} to {ADJUSTMENT_MAX}"
        )
    if not idempotency_key:
        raise InvalidRequest("an Idempotency-Key is required for a credit adjustment")
    ref = adjustment_ref(organization_id, idempotency_key)
    # One unit of work: the entry and its action record commit together.
    with locked_account(organization_id) as account:
        result = ledger.adjust(
            account, amount, reason=reason, idempotency_ref=ref, overdraft=overdraft
        )
        entry = result.entry
        assert entry is not None
        if result.replayed:
            if (entry.amount, entry.reason) != (amount, reason):
                raise Conflict("this Idempotency-Key was used for another adjustment")
        else:
            OperatorAction.create(
                organization=organization_id,
                action=OperatorActionKind.credit_adjustment,
                reason=reason,
                amount=amount,
                credit_entry=entry,
            )
    return Adjustment(entry, result.balance, result.reserved, result.replayed)


def suspend(organization_id: str, reason: str) -> BillingAccount:
    """Stop spending (402) until an operator unsuspends; repeating keeps the first time."""
    return _set_suspension(organization_id, OperatorActionKind.suspend, reason)


def unsuspend(organization_id: str, reason: str) -> BillingAccount:
    """Lift the operator's suspension; a no-op when there is none."""
    return _set_suspension(organization_id, OperatorActionKind.unsuspend, reason)


def _set_suspension(
    organization_id: str, action: OperatorActionKind, reason: str
) -> BillingAccount:
    """Suspend or unsuspend under the account lock; only a change is saved and recorded."""
    reason = _reason(reason)
    suspending = action == OperatorActionKind.suspend
    with locked_account(organization_id) as account:
        if (account.suspended_at is None) == suspending:
            account.suspended_at = utcnow() if suspending else None
            account.suspension_reason = reason if suspending else None
            account.updated_at = utcnow()
            account.save(
                only=[
                    BillingAccount.suspended_at,
                    BillingAccount.suspension_reason,
                    BillingAccount.updated_at,
                ]
            )
            OperatorAction.create(organization=organization_id, action=action, reason=reason)
        return account


def audit(organization_id: str, overdraft: int = 0) -> Audit:
    """The organization's ledger checked against its invariants (reads only)."""
    if Organization.get_or_none(Organization.id == organization_id) is None:
        raise NotFound("organization not found")
    problems = ledger_problems(organization_id, overdraft)
    account = BillingAccount.get_by_id(organization_id)
    entries = CreditEntry.select().where(CreditEntry.organization == organization_id).count()
    return Audit(
        organization_id, account.credits_balance, account.reserved_credits, entries, problems
    )
