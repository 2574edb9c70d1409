"""Credit history: newest first, keyset pagination with opaque, signed cursors.

A cursor names the last entry id of the page it ends and the organization it belongs to, and is
signed with HMAC-SHA256: a tampered cursor, or one from another organization, is rejected rather
than silently showing the wrong page. Ledger ids grow in commit order per organization (writers
hold the account lock), so keyset paging never skips or repeats an entry.

On the wire an entry is named by its `public_id` (a UUID) and typed with the platform's seven
entry types; the ledger's finer internal type stays available as `kind`, and `reason` is never
empty (an entry written without one gets its kind's description).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from enum import StrEnum

from billing.errors import InvalidRequest
from models import CreditEntry, CreditEntryType

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
log = logging.getLogger("billing.history")


class EntryType(StrEnum):
    """Credit entry types on the wire: exactly the ones the platform's clients know."""

    purchase = "purchase"
    usage = "usage"
    adjustment = "adjustment"
    refund = "refund"
    auto_recharge = "auto_recharge"
    reserve = "reserve"
    release = "release"


# The ledger's internal entry type (and a hold's) -> (wire type, reason shown when the entry
# has none).
WIRE_TYPES: dict[str, tuple[EntryType, str]] = {
    CreditEntryType.top_up: (EntryType.purchase, "credit top-up"),
    CreditEntryType.welcome_grant: (EntryType.purchase, "welcome credit"),
    CreditEntryType.initial_grant: (EntryType.purchase, "initial credit"),
    CreditEntryType.charge: (EntryType.usage, "usage"),
    CreditEntryType.recharge: (EntryType.auto_recharge, "auto-recharge"),
    CreditEntryType.refund: (EntryType.refund, "refund"),
    CreditEntryType.dispute: (EntryType.refund, "lost dispute"),
    CreditEntryType.adjustment: (EntryType.adjustment, "operator adjustment"),
    "reserve": (EntryType.reserve, "credits held"),
    "release": (EntryType.release, "hold released"),
}


def wire_type(kind: str) -> EntryType:
    """The platform's type for an internal one; a kind added later reads as an adjustment
    (signed, so the amount still tells the direction) and is logged so it gets a mapping."""
    mapped = WIRE_TYPES.get(kind)
    if mapped is None:
        log.warning("credit entry kind %s has no wire type; shown as adjustment", kind)
        return EntryType.adjustment
    return mapped[0]


def wire_reason(kind: str, reason: str | None) -> str:
    if reason:
        return reason
    return WIRE_TYPES[kind][1] if kind in WIRE_TYPES else kind.replace("_", " ")


@dataclass(frozen=True)
class HistoryPage:
    items: list[CreditEntry]
    cursor: str | None
    has_more: bool


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_cursor(organization_id: str, last_id: int, key: bytes) -> str:
    payload = json.dumps({"o": organization_id, "i": last_id}, separators=(",", ":")).encode()
    signature = hmac.new(key, payload, hashlib.sha256).digest()[:16]
    return f"{_b64(payload)}.{_b64(signature)}"


def decode_cursor(cursor: str, organization_id: str, key: bytes) -> int:
    """The entry id the cursor continues after; InvalidRequest for anything not ours."""
    try:
        payload_part, signature_part = cursor.split(".")
        payload = _unb64(payload_part)
        signature = _unb64(signature_part)
    except (ValueError, binascii.Error):
        raise InvalidRequest("cursor is not valid") from None
    expected = hmac.new(key, payload, hashlib.sha256).digest()[:16]
    if not hmac.compare_digest(signature, expected):
        raise InvalidRequest("cursor is not valid")
    data = json.loads(payload)
    if data.get("o") != organization_id or not isinstance(data.get("i"), int):
        raise InvalidRequest("cursor is not valid for this organization")
    return int(data["i"])


def parse_limit(raw: str | int | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    text = str(raw)
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(text)


def list_credit_history(
    organization_id: str, limit: int, cursor: str | None, key: bytes
) -> HistoryPage:
    query = CreditEntry.select().where(CreditEntry.organization == organization_id)
    if cursor is not None:
        query = query.where(CreditEntry.id < decode_cursor(cursor, organization_id, key))
    rows = list(query.order_by(CreditEntry.id.desc()).limit(limit + 1))
    has_more = len(rows) > limit
    items = rows[:limit]
    next_cursor = encode_cursor(organization_id, items[-1].id, key) if has_more else None
    return HistoryPage(items=items, cursor=next_cursor, has_more=has_more)
