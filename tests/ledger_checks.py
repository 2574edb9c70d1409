"""Invariant checks and account set-ups shared by the ledger tests (the audit itself lives
in billing.audit)."""

from __future__ import annotations

from typing import Any

from billing.audit import ledger_problems
from billing.units import DOLLAR
from models import BillingAccount


def auto_recharge_on(
    organization_id: str,
    *,
    card: str | None,
    threshold: int = 5 * DOLLAR,
    amount: int = 20 * DOLLAR,
    **fields: Any,
) -> None:
    """Auto-recharge enabled (threshold $5 and amount $20 unless given), `card` on file, and
    any other account columns in `fields`."""
    BillingAccount.update(
        auto_recharge_enabled=True,
        auto_recharge_threshold=threshold,
        auto_recharge_amount=amount,
        stripe_payment_method_id=card,
        **fields,
    ).where(BillingAccount.organization == organization_id).execute()


def assert_ledger_invariants(organization_id: str, overdraft: int = 0) -> BillingAccount:
    problems = ledger_problems(organization_id, overdraft)
    assert problems == [], problems
    return BillingAccount.get_by_id(organization_id)
