"""Usage: summaries over a period (recording usage is the ledger's job, with the debit)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from peewee import fn

from billing.errors import InvalidRequest
from models import UsageDailyRollup, UsageRecord

CATEGORIES = ("openrouter_inference", "workflow_execution", "api_call")


@dataclass(frozen=True)
class UsageSummary:
    organization_id: str
    category: str
    period_start: dt.datetime
    period_end: dt.datetime
    total_quantity: int
    total_cost: int


def parse_timestamp(name: str, raw: str) -> dt.datetime:
    """ISO-8601 to naive UTC; a value without an offset is taken as UTC."""
    try:
        value = dt.datetime.fromisoformat(raw.strip())
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"{name} must be an ISO-8601 date-time") from None
    return value


def current_month(now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


def resolve_period(
    start_raw: str | None, end_raw: str | None, now: dt.datetime
) -> tuple[dt.datetime, dt.datetime]:
    """The half-open period [start, end); missing ends come from the current UTC month."""
    default_start, default_end = current_month(now)
    start = parse_timestamp("periodStart", start_raw) if start_raw else default_start
    end = parse_timestamp("periodEnd", end_raw) if end_raw else default_end
    if start > end:
        raise InvalidRequest("periodStart must not be after periodEnd")
    return start, end


def day_key(moment: dt.datetime) -> str:
    """The UTC day `moment` falls in, as the rollups store it ('YYYY-MM-DD')."""
    return f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"


def _whole_days(start: dt.datetime, end: dt.datetime) -> tuple[dt.datetime, dt.datetime] | None:
    """The midnights [first, last) bounding the whole UTC days inside [start, end), if any."""
    midnight = dt.datetime.combine(start.date(), dt.time())
    try:
        first = midnight if midnight == start else midnight + dt.timedelta(days=1)
    except OverflowError:
        return None
    last = dt.datetime.combine(end.date(), dt.time())
    return (first, last) if first < last else None


def summarize_usage(
    organization_id: str, category: str, start: dt.datetime, end: dt.datetime
) -> UsageSummary:
    """Totals over the half-open period [start, end), exact to the microsecond.

    Whole UTC days inside the period come from the per-day rollups (`usage_daily_rollups`, kept
    in each record's own transaction), one row per day; only the partial days at the edges (a
    period that does not start or end at midnight) are summed from the records themselves, by
    the (organization, category, created_at) index, so a call costs O(days) plus at most two
    days' events, never the period's whole history. A period shorter than a whole day is read
    from its records alone.
    """
    if category not in CATEGORIES:
        raise InvalidRequest(f"category must be one of {', '.join(CATEGORIES)}")
    days = _whole_days(start, end)
    in_category = (UsageRecord.organization == organization_id) & (UsageRecord.category == category)
    if days is None:
        edges = (UsageRecord.created_at >= start) & (UsageRecord.created_at < end)
        quantity, cost = 0, 0
    else:
        first, last = days
        edges = ((UsageRecord.created_at >= start) & (UsageRecord.created_at < first)) | (
            (UsageRecord.created_at >= last) & (UsageRecord.created_at < end)
        )
        quantity, cost = (
            UsageDailyRollup.select(
                fn.COALESCE(fn.SUM(UsageDailyRollup.quantity), 0),
                fn.COALESCE(fn.SUM(UsageDailyRollup.cost), 0),
            )
            .where(
                (UsageDailyRollup.organization == organization_id)
                & (UsageDailyRollup.category == category)
                & (UsageDailyRollup.day >= day_key(first))
                & (UsageDailyRollup.day < day_key(last))
            )
            .scalar(as_tuple=True)
        )
    if days is None or days != (start, end):
        edge_quantity, edge_cost = (
            UsageRecord.select(
                fn.COALESCE(fn.SUM(UsageRecord.quantity), 0),
                fn.COALESCE(fn.SUM(UsageRecord.cost), 0),
            )
            .where(in_category & edges)
            .scalar(as_tuple=True)
        )
        quantity, cost = int(quantity) + int(edge_quantity), int(cost) + int(edge_cost)
    return UsageSummary(organization_id, category, start, end, int(quantity), int(cost))
