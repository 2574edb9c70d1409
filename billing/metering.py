"""Recording usage: a usage record and its debit, in one transaction, once per reference.

One event or a batch of up to `MAX_BATCH_EVENTS` go through the same code: validate every event
first (an invalid one rejects the whole request, before anything is written), then, in ONE
write transaction, lock the accounts in sorted organization-id order (so concurrent batches over
overlapping organizations cannot deadlock), read the records already made under the batch's
references, decide each event in request order against the locked accounts' in-memory totals
(the ledger's own rules: `ledger.spend_refusal`, `ledger.apply_to_account`), and write the
outcome with a handful of multi-row statements: the credit entries, the usage records, the
per-day rollups (`usage_daily_rollups`) and the accounts' totals. No statement aggregates over
the ledger or the usage records, so a debit costs the same with ten entries or a million.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from peewee import EXCLUDED, Case

from billing import ledger, metering_sql, recharge_policy
from billing.accounts import locked_accounts
from billing.errors import Conflict, InvalidRequest, PaymentRequired
from billing.metrics import LEDGER_ENTRIES
from billing.units import USAGE_QUANTITY_MAX, USAGE_UNIT_COST_MAX
from billing.usage import CATEGORIES, day_key
from models import (
    BillingAccount,
    CreditEntry,
    CreditEntryType,
    UsageDailyRollup,
    UsageRecord,
    is_postgres,
)

MAX_METADATA_BYTES = 4096
MAX_BATCH_EVENTS = 1000
CONFLICT_DETAIL = "this usage reference was recorded with other values"


@dataclass(slots=True)
class NewUsage:
    """A usage record this call writes, before and after the write gives it its ids (building a
    Peewee model per event cost a third of a batch's CPU)."""

    organization_id: str
    category: str
    quantity: int
    unit_cost: int
    cost: int
    reference_id: str
    metadata: str | None
    created_at: dt.datetime
    id: int = 0
    credit_entry_id: int = 0


Usage = UsageRecord | NewUsage  # a stored record, or one this call wrote


@dataclass(frozen=True)
class RecordedUsage:
    record: Usage
    balance: int
    reserved: int
    replayed: bool


@dataclass(frozen=True)
class UsageEvent:
    """One validated usage event (`metadata` already encoded as it is stored)."""

    organization_id: str
    category: str
    quantity: int
    unit_cost: int
    reference_id: str
    metadata: str | None

    @property
    def cost(self) -> int:
        return self.quantity * self.unit_cost


class EventStatus(StrEnum):
    recorded = "recorded"
    duplicate = "duplicate"  # the reference was recorded before with the same values
    refused = "refused"  # what a single record would answer with 402
    conflict = "conflict"  # the reference was recorded before with other values


@dataclass(frozen=True)
class EventOutcome:
    """The result of one event: the record made (recorded) or found (duplicate, conflict),
    the account's totals right after the event, and for a refusal its reason code and text."""

    status: EventStatus
    record: Usage | None
    balance: int
    reserved: int
    refusal_code: str | None = None
    refusal_detail: str | None = None


def usage_event(
    organization_id: str,
    category: str,
    quantity: int,
    unit_cost: int,
    reference_id: str,
    metadata: dict[str, Any] | None = None,
) -> UsageEvent:
    """Validate one event as a single record would; InvalidRequest names what is wrong."""
    if category not in CATEGORIES:
        raise InvalidRequest(f"category must be one of {', '.join(CATEGORIES)}")
    for name, value, low, high in (
        ("quantity", quantity, 1, USAGE_QUANTITY_MAX),
        ("unitCostDecimillicents", unit_cost, 0, USAGE_UNIT_COST_MAX),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidRequest(f"{name} must be an integer from {low} to {high}")
    encoded = json.dumps(metadata, sort_keys=True) if metadata else None
    if encoded is not None and len(encoded.encode()) > MAX_METADATA_BYTES:
        raise InvalidRequest(f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON")
    return UsageEvent(organization_id, category, quantity, unit_cost, reference_id, encoded)


def usage_events(items: Sequence[dict[str, Any]]) -> list[UsageEvent]:
    """Validate a batch's events (wire names); the first invalid one rejects the batch."""
    if len(items) > MAX_BATCH_EVENTS:
        raise InvalidRequest(f"a batch holds at most {MAX_BATCH_EVENTS} events")
    events = []
    for index, item in enumerate(items):
        try:
            events.append(
                usage_event(
                    str(item["organizationId"]).lower(),
                    item["category"],
                    item["quantity"],
                    item["unitCostDecimillicents"],
                    item["referenceId"],
                    item.get("metadata"),
                )
            )
        except InvalidRequest as exc:
            raise InvalidRequest(f"events[{index}]: {exc.detail}") from None
    return events


def record_usage(
    organization_id: str,
    category: str,
    quantity: int,
    unit_cost: int,
    reference_id: str,
    metadata: dict[str, Any] | None = None,
    overdraft: int = 0,
) -> RecordedUsage:
    """Charge quantity x unit_cost for usage; the same reference records once.

    A repeat with the same reference returns the first record; with different numbers it is a
    409, because silently returning the first result would hide a caller's bug.
    """
    event = usage_event(organization_id, category, quantity, unit_cost, reference_id, metadata)
    (outcome,) = record_usage_batch([event], overdraft)
    if outcome.status is EventStatus.conflict:
        raise Conflict(CONFLICT_DETAIL)
    if outcome.status is EventStatus.refused:
        raise PaymentRequired(outcome.refusal_detail or "payment required")
    assert outcome.record is not None
    return RecordedUsage(
        outcome.record,
        outcome.balance,
        outcome.reserved,
        outcome.status is EventStatus.duplicate,
    )


def _same_values(record: Usage, event: UsageEvent) -> bool:
    return (record.category, record.quantity, record.unit_cost) == (
        event.category,
        event.quantity,
        event.unit_cost,
    )


@functools.cache
def _one_record_sql() -> str:
    """SELECT the record of one (organization, reference); those two parameters."""
    query = UsageRecord.select().where(
        (UsageRecord.organization == "") & (UsageRecord.reference_id == "")
    )
    return str(query.sql()[0])


def _recorded_before(events: Sequence[UsageEvent]) -> dict[tuple[str, str], UsageRecord]:
    """The records already made under the batch's (organization, reference) pairs."""
    wanted = {(e.organization_id, e.reference_id) for e in events}
    records: Iterable[UsageRecord]
    if len(events) == 1:
        records = UsageRecord.raw(_one_record_sql(), *next(iter(wanted)))
    elif is_postgres():
        # Pairs joined by the (organization, reference) index: one probe per event, never a
        # scan that would grow with the table (two IN lists may be planned as one).
        organizations, references = zip(*sorted(wanted), strict=True)
        records = UsageRecord.raw(
            "SELECT u.* FROM unnest(%s::varchar[], %s::varchar[]) AS k (org, ref) "
            "JOIN usage_records u ON u.organization_id = k.org AND u.reference_id = k.ref",
            list(organizations),
            list(references),
        )
    else:
        pairs = sorted(wanted)
        records = UsageRecord.raw(
            f"SELECT u.* FROM (VALUES {', '.join(['(?, ?)'] * len(pairs))}) AS k "
            "JOIN usage_records u ON u.organization_id = k.column1 AND u.reference_id = k.column2",
            *(value for pair in pairs for value in pair),
        )
    found: dict[tuple[str, str], UsageRecord] = {}
    for record in records:
        key = (record.organization_id, record.reference_id)
        if key in wanted:
            found[key] = record
    return found


def record_usage_batch(events: Sequence[UsageEvent], overdraft: int = 0) -> list[EventOutcome]:
    """Apply validated events in order, in one transaction; one outcome per event.

    An unknown organization makes the whole batch a NotFound (nothing is written).
    """
    if not events:
        return []
    outcomes: list[EventOutcome] = []
    with locked_accounts({e.organization_id for e in events}) as accounts:
        known: dict[tuple[str, str], Usage] = dict(_recorded_before(events))
        now = max(ledger.account_now(account) for account in accounts.values())
        day = day_key(now)
        new_records: list[tuple[NewUsage, UsageEvent]] = []
        entry_rows: list[dict[str, Any]] = []
        for event in events:
            account = accounts[event.organization_id]
            first = known.get((event.organization_id, event.reference_id))
            if first is not None:
                same = _same_values(first, event)
                outcomes.append(
                    EventOutcome(
                        EventStatus.duplicate if same else EventStatus.conflict,
                        first,
                        account.credits_balance,
                        account.reserved_credits,
                        refusal_detail=None if same else CONFLICT_DETAIL,
                    )
                )
                continue
            refusal = ledger.spend_refusal(account, event.cost, overdraft, now=now)
            if refusal is not None:
                outcomes.append(
                    EventOutcome(
                        EventStatus.refused,
                        None,
                        account.credits_balance,
                        account.reserved_credits,
                        refusal[0],
                        refusal[1],
                    )
                )
                continue
            balance_after = ledger.apply_to_account(
                account, CreditEntryType.charge, -event.cost, now
            )
            entry_rows.append(
                {
                    "organization": event.organization_id,
                    "entry_type": CreditEntryType.charge,
                    "amount": -event.cost,
                    "reason": f"usage: {event.category}",
                    "reference_id": event.reference_id,
                    "idempotency_ref": f"usage:{event.organization_id}:{event.reference_id}",
                    "balance_after": balance_after,
                    "created_at": now,
                }
            )
            record = NewUsage(
                event.organization_id,
                event.category,
                event.quantity,
                event.unit_cost,
                event.cost,
                event.reference_id,
                event.metadata,
                now,
            )
            known[(event.organization_id, event.reference_id)] = record
            new_records.append((record, event))
            outcomes.append(
                EventOutcome(EventStatus.recorded, record, balance_after, account.reserved_credits)
            )
        if new_records:
            _write(accounts, entry_rows, new_records, day)
        # Refused for lack of credit: auto-recharge may be due although nothing was spent. A
        # refusal here does not roll back (the batch commits), so it is decided on the accounts
        # already locked, in this transaction: not one more transaction and lock per
        # organization (a batch over 1,000 organizations out of credit made 1,000 of them).
        short_of_credit = {
            event.organization_id
            for event, outcome in zip(events, outcomes, strict=True)
            if outcome.refusal_code == "insufficient_credits"
        }
        for organization_id in sorted(short_of_credit):
            recharge_policy.request_if_due(accounts[organization_id], refused=True)
    return outcomes


def _write(
    accounts: dict[str, BillingAccount],
    entry_rows: list[dict[str, Any]],
    new_records: list[tuple[NewUsage, UsageEvent]],
    day: str,
) -> None:
    """Write the batch's effects: one statement on PostgreSQL (metering_sql), four multi-row
    statements on SQLite; then what follows spending (auto-recharge) per account."""
    touched = [accounts[o] for o in sorted({r.organization_id for r, _ in new_records})]
    if is_postgres():
        ids = metering_sql.write_usage(
            [
                (
                    r.organization_id,
                    r.category,
                    r.quantity,
                    r.unit_cost,
                    r.cost,
                    r.reference_id,
                    r.metadata,
                    row["idempotency_ref"],
                    row["reason"],
                    row["balance_after"],
                )
                for (r, _), row in zip(new_records, entry_rows, strict=True)
            ],
            [(o, c, day, q, cost, n) for (o, c), (q, cost, n) in _rollup_sums(new_records)],
            touched,
            entry_rows[0]["created_at"],
        )
        for record, _ in new_records:
            record.id, record.credit_entry_id = ids[(record.organization_id, record.reference_id)]
    else:
        _write_each(entry_rows, new_records, day)
        _save_totals(touched)
    LEDGER_ENTRIES.labels(CreditEntryType.charge).inc(len(entry_rows))
    for account in touched:
        ledger.after_spending(account)


def _write_each(
    entry_rows: list[dict[str, Any]],
    new_records: list[tuple[NewUsage, UsageEvent]],
    day: str,
) -> None:
    """The batch's entries, records and rollups as three multi-row statements."""
    entry_ids = dict(
        (ref, entry_id)
        for entry_id, ref in CreditEntry.insert_many(entry_rows)
        .returning(CreditEntry.id, CreditEntry.idempotency_ref)
        .tuples()
        .execute()
    )
    record_rows = []
    for record, event in new_records:
        entry_id = entry_ids[f"usage:{event.organization_id}:{event.reference_id}"]
        record.credit_entry_id = entry_id
        record_rows.append(
            {
                "organization": record.organization_id,
                "category": record.category,
                "quantity": record.quantity,
                "unit_cost": record.unit_cost,
                "cost": record.cost,
                "reference_id": record.reference_id,
                "metadata": record.metadata,
                "credit_entry": entry_id,
                "created_at": record.created_at,
            }
        )
    record_ids = {
        (organization_id, reference_id): record_id
        for record_id, organization_id, reference_id in UsageRecord.insert_many(record_rows)
        .returning(UsageRecord.id, UsageRecord.organization, UsageRecord.reference_id)
        .tuples()
        .execute()
    }
    for record, _ in new_records:
        record.id = record_ids[(record.organization_id, record.reference_id)]
    _add_to_rollups(new_records, day)


def _rollup_sums(
    new_records: list[tuple[NewUsage, UsageEvent]],
) -> list[tuple[tuple[str, str], tuple[int, int, int]]]:
    """(organization, category) -> (quantity, cost, events) of the batch, in key order."""
    sums: dict[tuple[str, str], tuple[int, int, int]] = {}
    for record, _ in new_records:
        key = (record.organization_id, record.category)
        quantity, cost, count = sums.get(key, (0, 0, 0))
        sums[key] = (quantity + record.quantity, cost + record.cost, count + 1)
    return sorted(sums.items())


def _add_to_rollups(new_records: list[tuple[NewUsage, UsageEvent]], day: str) -> None:
    """Add the batch to its day's (organization, category) rollups: one upsert."""
    rows = [
        {
            "organization": organization_id,
            "category": category,
            "day": day,
            "quantity": quantity,
            "cost": cost,
            "events": count,
        }
        for (organization_id, category), (quantity, cost, count) in _rollup_sums(new_records)
    ]
    R = UsageDailyRollup
    R.insert_many(rows).on_conflict(
        conflict_target=[R.organization, R.category, R.day],
        update={
            R.quantity: R.quantity + EXCLUDED.quantity,
            R.cost: R.cost + EXCLUDED.cost,
            R.events: R.events + EXCLUDED.events,
        },
    ).execute()


def _save_totals(accounts: list[BillingAccount]) -> None:
    """Write the locked accounts' new totals (`ledger.ACCOUNT_TOTALS`) in one UPDATE."""
    if len(accounts) == 1:
        accounts[0].save(only=ledger.ACCOUNT_TOTALS)
        return
    key = BillingAccount.organization
    values = {
        field: Case(key, [(a.organization_id, getattr(a, field.name)) for a in accounts])
        for field in ledger.ACCOUNT_TOTALS
    }
    BillingAccount.update(values).where(key.in_([a.organization_id for a in accounts])).execute()
