"""Ledger audit: check an organization's money invariants against its stored rows.

Used by the tests after every scenario and by the soak run; callable in production too
(for example from a periodic job) since it only reads.
"""

from __future__ import annotations

import datetime as dt

from peewee import fn

from billing.ledger import SPEND_TYPES
from billing.usage import current_month, day_key
from models import (
    BillingAccount,
    CreditEntry,
    Reservation,
    ReservationStatus,
    UsageDailyRollup,
    UsageRecord,
)


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
        .where(
            (Reservation.organization == organization_id)
            & (Reservation.status == ReservationStatus.open)
        )
        .scalar()
    )
    if account.reserved_credits != open_holds:
        problems.append(f"reserved {account.reserved_credits} != open holds {open_holds}")
    if account.credits_balance - account.reserved_credits < -overdraft:
        problems.append("available credit is below the allowed overdraft")
    problems += _month_spend_problems(account)
    problems += _rollup_problems(organization_id)
    return problems


def _month_spend_problems(account: BillingAccount) -> list[str]:
    """The running month spend equals that month's charges, and no charge is newer."""
    charges = CreditEntry.select(fn.COALESCE(fn.SUM(CreditEntry.amount), 0)).where(
        (CreditEntry.organization == account.organization_id)
        & (CreditEntry.entry_type.in_(SPEND_TYPES))
    )
    if account.spend_month is None:
        counted, later = 0, charges.scalar()
    else:
        year, month = (int(part) for part in account.spend_month.split("-"))
        start, end = current_month(dt.datetime(year, month, 1))
        counted = -int(
            charges.where(
                (CreditEntry.created_at >= start) & (CreditEntry.created_at < end)
            ).scalar()
        )
        later = charges.where(CreditEntry.created_at >= end).scalar()
    problems = []
    if account.month_spend != counted:
        problems.append(
            f"month spend {account.month_spend} != charges of {account.spend_month} {counted}"
        )
    if later:
        problems.append(f"charges after the running spend's month {account.spend_month}")
    return problems


def _rollup_problems(organization_id: str) -> list[str]:
    """Each (category, day) rollup equals a recount of that day's usage records."""
    recount: dict[tuple[str, str], tuple[int, int, int]] = {}
    records = UsageRecord.select(
        UsageRecord.category, UsageRecord.quantity, UsageRecord.cost, UsageRecord.created_at
    ).where(UsageRecord.organization == organization_id)
    for record in records:
        key = (record.category, day_key(record.created_at))
        quantity, cost, events = recount.get(key, (0, 0, 0))
        recount[key] = (quantity + record.quantity, cost + record.cost, events + 1)
    rollups = {
        (r.category, r.day): (r.quantity, r.cost, r.events)
        for r in UsageDailyRollup.select().where(UsageDailyRollup.organization == organization_id)
    }
    return [
        f"usage rollup {key}: {rollups.get(key)} != records {recount.get(key)}"
        for key in sorted(set(recount) | set(rollups))
        if rollups.get(key) != recount.get(key)
    ]
