"""Ledger audit: check an organization's money invariants against its stored rows.

Used by the tests after every scenario and by the soak run; callable in production too
(for example from a periodic job) since it only reads.
"""

from __future__ import annotations

from peewee import fn

from models import BillingAccount, CreditEntry, Reservation


def ledger_problems(organization_id: str, overdraft: int = 0) -> list[str]:
    """Every broken invariant for the organization; an empty list means the ledger is sound."""
    problems: list[str] = []
    account = BillingAccount.get_by_id(organization_id)
    running = 0
    entries = (
        CreditEntry.select(CreditEntry.id, CreditEntry.amount, CreditEntry.balance_after)
        .where(CreditEntry.organization == organization_id)
        .order_by(CreditEntry.id)
    )
    for entry in entries:
        entry_id, amount, after = entry.id, entry.amount, entry.balance_after
        running += amount
        if after != running:
            problems.append(f"entry {entry_id}: balance_after {after} != {running}")
    if account.credits_balance != running:
        problems.append(f"balance {account.credits_balance} != sum of entries {running}")
    open_holds = (
        Reservation.select(fn.COALESCE(fn.SUM(Reservation.amount), 0))
        .where((Reservation.organization == organization_id) & (Reservation.status == "open"))
        .scalar()
    )
    if account.reserved_credits != open_holds:
        problems.append(f"reserved {account.reserved_credits} != open holds {open_holds}")
    if account.credits_balance - account.reserved_credits < -overdraft:
        problems.append("available credit is below the allowed overdraft")
    return problems
