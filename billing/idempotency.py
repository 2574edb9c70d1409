"""Idempotency-Key handling: the same key and request replays the stored response.

A key is claimed by inserting its row before the work runs (unique on scope + key), so two
concurrent requests with one key cannot both do the work: the loser sees the claim and gets a
409 while the first is in progress, or the stored response once it finished. The same key with
a different request is a 409. When the work fails, the claim is dropped so the client may retry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import peewee

from billing.errors import Conflict
from models import IdempotencyRecord, database


def fingerprint(request: Any) -> str:
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _existing(scope: str, key: str, digest: str) -> dict[str, Any]:
    record = IdempotencyRecord.get_or_none(
        (IdempotencyRecord.scope == scope) & (IdempotencyRecord.idempotency_key == key)
    )
    if record is None:  # claimed and dropped between our insert and this read: let them retry
        raise Conflict("a request with this Idempotency-Key is in progress; retry")
    if record.fingerprint != digest:
        raise Conflict("this Idempotency-Key was used with a different request")
    if record.response_body is None:
        raise Conflict("a request with this Idempotency-Key is in progress; retry")
    return json.loads(record.response_body)


def run_once(
    scope: str, key: str | None, request: Any, work: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Run `work` once per (scope, key); without a key, just run it."""
    if key is None:
        return work()
    digest = fingerprint(request)
    try:
        with database.atomic():
            record = IdempotencyRecord.create(scope=scope, idempotency_key=key, fingerprint=digest)
    except peewee.IntegrityError:
        return _existing(scope, key, digest)
    try:
        response = work()
    except BaseException:
        IdempotencyRecord.delete().where(IdempotencyRecord.id == record.id).execute()
        raise
    IdempotencyRecord.update(status_code=200, response_body=json.dumps(response)).where(
        IdempotencyRecord.id == record.id
    ).execute()
    return response
