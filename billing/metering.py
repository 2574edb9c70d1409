"""Recording usage: a usage record and its debit, in one transaction, once per reference."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from billing.accounts import lock_account
from billing.errors import Conflict, InvalidRequest
from billing.ledger import debit_locked
from billing.units import INT64_MAX
from billing.usage import CATEGORIES
from models import UsageRecord, write_transaction

MAX_METADATA_BYTES = 4096


@dataclass(frozen=True)
class RecordedUsage:
    record: UsageRecord
    balance: int
    reserved: int
    replayed: bool


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
    if category not in CATEGORIES:
        raise InvalidRequest(f"category must be one of {', '.join(CATEGORIES)}")
    for name, value, low in (("quantity", quantity, 1), ("unitCost", unit_cost, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidRequest(f"{name} must be an integer >= {low}")
    cost = quantity * unit_cost
    if cost > INT64_MAX:
        raise InvalidRequest("quantity x unitCost is too large")
    encoded = json.dumps(metadata, sort_keys=True) if metadata else None
    if encoded is not None and len(encoded.encode()) > MAX_METADATA_BYTES:
        raise InvalidRequest(f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON")
    with write_transaction():
        account = lock_account(organization_id)
        existing = UsageRecord.get_or_none(
            (UsageRecord.organization == organization_id)
            & (UsageRecord.reference_id == reference_id)
        )
        if existing is not None:
            if (existing.category, existing.quantity, existing.unit_cost) != (
                category,
                quantity,
                unit_cost,
            ):
                raise Conflict("this usage reference was recorded with other values")
            return RecordedUsage(existing, account.credits_balance, account.reserved_credits, True)
        entry = debit_locked(
            account,
            cost,
            "charge",
            f"usage: {category}",
            reference_id,
            f"usage:{organization_id}:{reference_id}",
            overdraft,
        )
        record = UsageRecord.create(
            organization=organization_id,
            category=category,
            quantity=quantity,
            unit_cost=unit_cost,
            cost=cost,
            reference_id=reference_id,
            metadata=encoded,
            credit_entry=entry,
        )
        return RecordedUsage(record, account.credits_balance, account.reserved_credits, False)
