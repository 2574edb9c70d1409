"""Invariant checks shared by the ledger tests (the audit itself lives in billing.audit)."""

from __future__ import annotations

from billing.audit import ledger_problems
from models import BillingAccount


def assert_ledger_invariants(organization_id: str, overdraft: int = 0) -> BillingAccount:
    problems = ledger_problems(organization_id, overdraft)
    assert problems == [], problems
    return BillingAccount.get_by_id(organization_id)
