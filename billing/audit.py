"""Ledger audit: check an organization's money invariants against its stored rows.

Used by the tests after every scenario and by the soak run; callable in production too
(for example from a periodic job) since it only reads.
"""

from __future__ import annotations

import datetime as dt
import typing as t
from collections.abc import Iterable

from peewee import fn

from billing.ledger import SPEND_TYPES
from billing.usage import current_month
from models import (
    BillingAccount,
    CreditEntry,
    Reservation,
    ReservationStatus,
    UsageDailyRollup,
    UsageRecord,
    is_postgres,
)


def ledger_problems(organization_id: str, overdraft: int = 0) -> list[str]:
    """Every broken invariant for the organization; an empty list means the ledger is sound."""
    account = BillingAccount.get_by_id(organization_id)
    problems = _chain_problems(organization_id)
    total = (
        CreditEntry.select(fn.COALESCE(fn.SUM(CreditEntry.amount), 0))
        .where(CreditEntry.organization == organization_id)
        .scalar()
    )
    if account.credits_balance != total:
        problems.append(f"balance {account.credits_balance} != sum of entries {total}")
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


# Mismatches reported per check: the audit answers what is wrong, not a dump of the ledger.
MAX_REPORTED = 100


def _chain_problems(organization_id: str) -> list[str]:
    """Each entry's balance_after equals the running sum of the entries up to it, in id
    order. Computed by the database, which returns only the entries that disagree: a year of
    history is not read into the process."""
    chain = (
        CreditEntry.select(
            CreditEntry.id,
            CreditEntry.balance_after,
            fn.SUM(CreditEntry.amount).over(order_by=[CreditEntry.id]).alias("running"),
        )
        .where(CreditEntry.organization == organization_id)
        .alias("chain")
    )
    wrong = (
        CreditEntry.select(chain.c.id, chain.c.balance_after, chain.c.running)
        .from_(chain)
        .where(chain.c.balance_after != chain.c.running)
        .order_by(chain.c.id)
        .limit(MAX_REPORTED)
        .tuples()
    )
    rows = t.cast(Iterable[tuple[int, int, int]], wrong)
    return [f"entry {i}: balance_after {after} != {running}" for i, after, running in rows]


def _rollup_problems(organization_id: str) -> list[str]:
    """Each (category, day) rollup equals a recount of that day's usage records (grouped by
    the database; one row per category and day, not per record)."""
    if is_postgres():  # as text whatever the server's DateStyle
        day = fn.to_char(UsageRecord.created_at, "YYYY-MM-DD").coerce(False)
    else:  # SQLite keeps timestamps as ISO text
        day = fn.SUBSTR(UsageRecord.created_at, 1, 10).coerce(False)
    counted = (
        UsageRecord.select(
            UsageRecord.category,
            day.alias("day"),
            fn.SUM(UsageRecord.quantity),
            fn.SUM(UsageRecord.cost),
            fn.COUNT(UsageRecord.id),
        )
        .where(UsageRecord.organization == organization_id)
        .group_by(UsageRecord.category, day)
        .tuples()
    )
    rows = t.cast(Iterable[tuple[str, str, int, int, int]], counted)
    recount = {(c, d): (int(q), int(cost), int(n)) for c, d, q, cost, n in rows}
    rollups = {
        (r.category, r.day): (r.quantity, r.cost, r.events)
        for r in UsageDailyRollup.select().where(UsageDailyRollup.organization == organization_id)
    }
    return [
        f"usage rollup {key}: {rollups.get(key)} != records {recount.get(key)}"
        for key in sorted(set(recount) | set(rollups))
        if rollups.get(key) != recount.get(key)
    ][:MAX_REPORTED]
