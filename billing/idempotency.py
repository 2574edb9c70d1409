"""Idempotency-Key handling: the same key and request replays the stored response.

A key is claimed by inserting its row before the work runs (unique on scope + key), so two
concurrent requests with one key cannot both do the work: the loser sees the claim and gets a
409 while the first is in progress, or the stored response once it finished. The same key with
a different request is a 409. When the work fails, the claim is dropped so the client may retry.

The claim is a lease (`IDEMPOTENCY_LEASE_SECONDS`): if the process serving it dies, the row
stays without a response, and the next request with the same key and body takes it over once
the lease has expired, instead of answering "in progress" forever. The work itself is
idempotent below this layer (ledger references, Stripe idempotency keys derived from the key),
so a takeover of a claim whose first owner did in fact finish does not apply twice.

Scopes are stored as a SHA-256 digest: a scope names caller-supplied parts (path ids, a
token's subject of up to 255 characters), so its raw form has no useful bound; the digest
always fits the column, on PostgreSQL as on SQLite.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from typing import Any

import peewee

from billing.config import get_settings
from billing.errors import Conflict
from models import IdempotencyRecord, database, utcnow


def fingerprint(request: Any) -> str:
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def scope_digest(scope: str) -> str:
    """The fixed-length (64 hex characters) form a scope is stored in."""
    return hashlib.sha256(scope.encode()).hexdigest()


def _lease_end() -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=get_settings().idempotency_lease_seconds)


def _existing_or_takeover(
    scope: str, key: str, digest: str
) -> dict[str, Any] | tuple[int, dt.datetime]:
    """The stored response, or the abandoned claim this request now owns (its id and the
    lease this request set on it)."""
    record = IdempotencyRecord.get_or_none(
        (IdempotencyRecord.scope == scope) & (IdempotencyRecord.idempotency_key == key)
    )
    if record is None:  # claimed and dropped between our insert and this read: let them retry
        raise Conflict("a request with this Idempotency-Key is in progress; retry")
    if record.fingerprint != digest:
        raise Conflict("this Idempotency-Key was used with a different request")
    if record.response_body is not None:
        return json.loads(record.response_body)
    now = utcnow()
    if record.lease_expires_at is not None and record.lease_expires_at > now:
        raise Conflict("a request with this Idempotency-Key is in progress; retry")
    # The owner's lease ran out (it died, or is far past any deadline): take the claim over,
    # compare-and-set on the old lease so that of two takers only one wins.
    lease = _lease_end()
    taken = (
        IdempotencyRecord.update(lease_expires_at=lease)
        .where(
            (IdempotencyRecord.id == record.id)
            & IdempotencyRecord.response_body.is_null()
            & (
                IdempotencyRecord.lease_expires_at.is_null()
                if record.lease_expires_at is None
                else IdempotencyRecord.lease_expires_at == record.lease_expires_at
            )
        )
        .execute()
    )
    if not taken:
        raise Conflict("a request with this Idempotency-Key is in progress; retry")
    return int(record.id), lease


def run_once(
    scope: str, key: str | None, request: Any, work: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Run `work` once per (scope, key); without a key, just run it."""
    if key is None:
        return work()
    digest = fingerprint(request)
    stored_scope = scope_digest(scope)
    lease = _lease_end()
    try:
        with database.atomic():
            record_id = IdempotencyRecord.create(
                scope=stored_scope,
                idempotency_key=key,
                fingerprint=digest,
                lease_expires_at=lease,
            ).id
    except peewee.IntegrityError:
        found = _existing_or_takeover(stored_scope, key, digest)
        if isinstance(found, dict):
            return found
        record_id, lease = found
    try:
        response = work()
    except BaseException:
        # Drop the claim only while it is still ours: a slow request whose lease ran out
        # and was taken over must not free the key under the taker (a third request would
        # then run the work alongside it). Each write is a transaction of its own: its first
        # statement is repeated on a fresh connection should the server have ended this one
        # during the work (`models.db`), so the claim is never left to its lease.
        with database.atomic():
            IdempotencyRecord.delete().where(
                (IdempotencyRecord.id == record_id)
                & IdempotencyRecord.response_body.is_null()
                & (IdempotencyRecord.lease_expires_at == lease)
            ).execute()
        raise
    with database.atomic():
        IdempotencyRecord.update(
            status_code=200, response_body=json.dumps(response), lease_expires_at=None
        ).where(
            (IdempotencyRecord.id == record_id) & IdempotencyRecord.response_body.is_null()
        ).execute()
    return response
