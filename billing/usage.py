"""Usage: summaries over a period (recording usage is the ledger's job, with the debit)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from peewee import fn

from billing.errors import InvalidRequest
from models import UsageRecord

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


def summarize_usage(
    organization_id: str, category: str, start: dt.datetime, end: dt.datetime
) -> UsageSummary:
    if category not in CATEGORIES:
        raise InvalidRequest(f"category must be one of {', '.join(CATEGORIES)}")
    quantity, cost = (
        UsageRecord.select(
            fn.COALESCE(fn.SUM(UsageRecord.quantity), 0), fn.COALESCE(fn.SUM(UsageRecord.cost), 0)
        )
        .where(
            (UsageRecord.organization == organization_id)
            & (UsageRecord.category == category)
            & (UsageRecord.created_at >= start)
            & (UsageRecord.created_at < end)
        )
        .scalar(as_tuple=True)
    )
    return UsageSummary(organization_id, category, start, end, int(quantity), int(cost))
