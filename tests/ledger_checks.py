"""Invariant checks shared by the ledger tests."""

from __future__ import annotations

from peewee import fn

from models import BillingAccount, CreditEntry, Reservation


def assert_ledger_invariants(organization_id: str, overdraft: int = 0) -> BillingAccount:
    account = BillingAccount.get_by_id(organization_id)
    entries = list(
        CreditEntry.select()
        .where(CreditEntry.organization == organization_id)
        .order_by(CreditEntry.id)
    )
    running = 0
    for entry in entries:
        running += entry.amount
        assert entry.balance_after == running, "balance_after must chain through every entry"
    assert account.credits_balance == running, "balance must equal the sum of entries"
    open_holds = (
        Reservation.select(fn.COALESCE(fn.SUM(Reservation.amount), 0))
        .where((Reservation.organization == organization_id) & (Reservation.status == "open"))
        .scalar()
    )
    assert account.reserved_credits == open_holds, "reserved must equal open reservations"
    assert account.credits_balance - account.reserved_credits >= -overdraft, "overdrawn"
    return account
