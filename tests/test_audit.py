"""The audit must notice a tampered ledger (so the invariant checks elsewhere can fail)."""

from __future__ import annotations

import pytest

from billing import ledger
from billing.accounts import locked_account
from billing.audit import ledger_problems
from models import BillingAccount, CreditEntry

pytestmark = pytest.mark.usefixtures("conn")


def test_sound_ledger_has_no_problems(org):
    with locked_account(org.id) as account:
        ledger.grant(account, 100, "adjustment")
    ledger.reserve(org.id, 30, reference_id="hold")
    assert ledger_problems(org.id) == []


def test_tampering_is_detected(org):
    with locked_account(org.id) as account:
        ledger.grant(account, 100, "adjustment")
    with locked_account(org.id) as account:
        ledger.debit(account, 40)
    CreditEntry.update(amount=-10).where(CreditEntry.amount == -40).execute()
    problems = ledger_problems(org.id)
    assert any("balance_after" in p for p in problems)
    assert any("sum of entries" in p for p in problems)
    BillingAccount.update(reserved_credits=500).execute()
    assert any("open holds" in p for p in ledger_problems(org.id))
    assert any("overdraft" in p for p in ledger_problems(org.id))
