"""Usage: summaries over a period (recording usage is the ledger's job, with the debit)."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from enum import StrEnum

from peewee import fn

from billing.errors import InvalidRequest
from models import UsageDailyRollup, UsageRecord


class UsageCategory(StrEnum):
    """Every usage category the platform sends: its current four and the older three."""

    text_generation = "text_generation"
    image_generation = "image_generation"
    video_generation = "video_generation"
    storage = "storage"
    openrouter_inference = "openrouter_inference"
    workflow_execution = "workflow_execution"
    api_call = "api_call"


CATEGORIES = tuple(c.value for c in UsageCategory)

# periodStart/periodEnd: a date, or a date-time with or without an offset (none = UTC); `T`
# and `Z` in either case. The contract documents the same pattern (a test compares them).
PERIOD_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"([Tt][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?([Zz]|[+-][0-9]{2}:[0-9]{2})?)?$"
)
_PERIOD = re.compile(PERIOD_PATTERN)


@dataclass(frozen=True)
class UsageSummary:
    organization_id: str
    category: str
    period_start: dt.datetime
    period_end: dt.datetime
    total_quantity: int
    total_cost: int


def parse_timestamp(name: str, raw: str) -> dt.datetime:
    """A date (midnight UTC) or an ISO-8601 date-time to naive UTC; no offset means UTC."""
    problem = f"{name} must be a date (2026-11-01) or an ISO-8601 date-time (2026-11-01T00:00:00Z)"
    if not isinstance(raw, str) or not _PERIOD.fullmatch(raw):
        raise InvalidRequest(problem)
    try:
        value = dt.datetime.fromisoformat(raw.upper().replace("Z", "+00:00"))
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise InvalidRequest(problem) from None
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
