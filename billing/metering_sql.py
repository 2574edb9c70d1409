"""Usage writes as ONE PostgreSQL statement: entries, records, daily rollups and account totals.

Why: on the hot path (one usage record, or a batch of 1,000) each round trip holds the account
lock a little longer, and Peewee spends as long building four INSERT/UPDATE statements as
PostgreSQL spends running them. One data-modifying CTE, written once here, does all four writes:
the credit entries (ids handed out in event order, so `balance_after` runs in id order), the
usage records pointing at their entries, the rollup upserts, and the accounts' new totals. The
caller has made every decision already under the account locks; this only writes. SQLite has no
data-modifying CTEs and no round trips to save, so it keeps the Peewee statements (metering.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from models import BillingAccount, database

_EVENT_COLUMNS = 11  # ordinal + the ten columns of `ev` below


def _rows(count: int, width: int) -> str:
    one = "(" + ", ".join(["%s"] * width) + ")"
    return ", ".join([one] * count)


def write_usage(
    events: Sequence[tuple[Any, ...]],
    rollups: Sequence[tuple[str, str, str, int, int, int]],
    accounts: Sequence[BillingAccount],
    now: dt.datetime,
) -> dict[tuple[str, str], tuple[int, int]]:
    """Write the batch; return {(organization id, reference id): (record id, entry id)}.

    `events` rows are (organization_id, category, quantity, unit_cost, cost, reference_id,
    metadata, idempotency_ref, reason, balance_after), in the order their entries must take.
    """
    params: list[Any] = []
    for ordinal, row in enumerate(events):
        params.append(ordinal)
        params.extend(row)
    params += [now, now]
    for row in rollups:
        params.extend(row)
    params.append(now)
    for account in accounts:
        params += [
            account.organization_id,
            account.credits_balance,
            account.spend_month,
            account.month_spend,
        ]
    sql = f"""
WITH ev (ordinal, organization_id, category, quantity, unit_cost, cost, reference_id, metadata,
         idempotency_ref, reason, balance_after) AS (
    VALUES {_rows(len(events), _EVENT_COLUMNS)}
),
entries AS (
    INSERT INTO credit_entries (organization_id, entry_type, amount, reason, reference_id,
                                idempotency_ref, balance_after, created_at, public_id)
    SELECT organization_id, 'charge', -cost::bigint, reason, reference_id, idempotency_ref,
           balance_after::bigint, %s, gen_random_uuid()::text
    FROM ev ORDER BY ordinal
    RETURNING id, idempotency_ref
),
records AS (
    INSERT INTO usage_records (organization_id, category, quantity, unit_cost, cost,
                               reference_id, metadata, credit_entry_id, created_at)
    SELECT ev.organization_id, ev.category, ev.quantity::bigint, ev.unit_cost::bigint,
           ev.cost::bigint, ev.reference_id, ev.metadata::text, entries.id, %s
    FROM ev JOIN entries ON entries.idempotency_ref = ev.idempotency_ref
    ORDER BY ev.ordinal
    RETURNING id, organization_id, reference_id, credit_entry_id
),
rollups AS (
    INSERT INTO usage_daily_rollups (organization_id, category, day, quantity, cost, events)
    VALUES {_rows(len(rollups), 6)}
    ON CONFLICT (organization_id, category, day) DO UPDATE SET
        quantity = usage_daily_rollups.quantity + EXCLUDED.quantity,
        cost = usage_daily_rollups.cost + EXCLUDED.cost,
        events = usage_daily_rollups.events + EXCLUDED.events
),
totals AS (
    UPDATE billing_accounts AS account SET
        credits_balance = t.credits_balance::bigint,
        spend_month = t.spend_month,
        month_spend = t.month_spend::bigint,
        updated_at = %s
    FROM (VALUES {_rows(len(accounts), 4)})
        AS t (organization_id, credits_balance, spend_month, month_spend)
    WHERE account.organization_id = t.organization_id
)
SELECT organization_id, reference_id, id, credit_entry_id FROM records
"""
    cursor = database.execute_sql(sql, params)
    return {(org, ref): (record_id, entry_id) for org, ref, record_id, entry_id in cursor}
