"""Idempotency-Key claims at the service level: replay by canonical body, the exact 409
reasons, the lease boundary, takeovers that touch only their own claim, and completions that
store only their own response."""

from __future__ import annotations

import datetime as dt

import pytest

from billing import idempotency
from billing.config import get_settings
from billing.errors import Conflict
from models import IdempotencyRecord

IN_PROGRESS = "a request with this Idempotency-Key is in progress; retry"
OTHER_REQUEST = "this Idempotency-Key was used with a different request"
SCOPE = "service:test:org"


@pytest.fixture(autouse=True)
def _conn(conn):
    yield


class Work:
    """A unit of work that counts its runs and answers with a marker."""

    def __init__(self, answer: str) -> None:
        self.runs = 0
        self.answer = answer

    def __call__(self) -> dict[str, str]:
        self.runs += 1
        return {"answer": self.answer}


def abandoned_claim(key: str, body: dict, lease_expires_at: dt.datetime | None) -> int:
    """A claim whose process died before answering (no response stored)."""
    return IdempotencyRecord.create(
        scope=idempotency.scope_digest(SCOPE),
        idempotency_key=key,
        fingerprint=idempotency.fingerprint(body),
        lease_expires_at=lease_expires_at,
    ).id


def test_the_same_body_with_its_keys_in_another_order_replays():
    work = Work("first")
    first = idempotency.run_once(SCOPE, "k", {"a": 1, "b": {"c": 2, "d": 3}}, work)
    again = idempotency.run_once(SCOPE, "k", {"b": {"d": 3, "c": 2}, "a": 1}, work)
    assert again == first and work.runs == 1


def test_another_body_is_a_409_naming_the_reason():
    idempotency.run_once(SCOPE, "k", {"a": 1}, Work("first"))
    with pytest.raises(Conflict) as refused:
        idempotency.run_once(SCOPE, "k", {"a": 2}, Work("second"))
    assert refused.value.detail == OTHER_REQUEST


def test_a_live_claim_is_in_progress_until_the_lease_ends_then_taken_over(clock):
    lease_end = clock.now + dt.timedelta(seconds=get_settings().idempotency_lease_seconds)
    abandoned_claim("k", {"a": 1}, lease_end)
    clock.set(lease_end - dt.timedelta(microseconds=1))
    with pytest.raises(Conflict) as busy:
        idempotency.run_once(SCOPE, "k", {"a": 1}, Work("early"))
    assert busy.value.detail == IN_PROGRESS
    clock.set(lease_end)  # the lease has ended at its end: the claim is free
    work = Work("taken over")
    assert idempotency.run_once(SCOPE, "k", {"a": 1}, work) == {"answer": "taken over"}
    assert work.runs == 1


def test_a_claim_from_before_leases_existed_is_taken_over():
    abandoned_claim("k", {"a": 1}, None)
    work = Work("taken over")
    assert idempotency.run_once(SCOPE, "k", {"a": 1}, work) == {"answer": "taken over"}
    assert work.runs == 1


def test_a_takeover_moves_only_its_own_claim(clock):
    expired = clock.now - dt.timedelta(seconds=1)
    abandoned_claim("a", {"x": 1}, expired)
    other = abandoned_claim("b", {"x": 1}, expired)

    def check_other_untouched() -> dict[str, str]:
        row = IdempotencyRecord.get_by_id(other)
        assert row.lease_expires_at == expired and row.response_body is None
        return {"answer": "a"}

    idempotency.run_once(SCOPE, "a", {"x": 1}, check_other_untouched)


def test_a_lost_compare_and_set_is_in_progress(clock, monkeypatch):
    """Two takers read the same expired lease; the one whose compare-and-set finds the lease
    already moved gets the in-progress 409, not the work."""
    expired = clock.now - dt.timedelta(seconds=1)
    claim = abandoned_claim("k", {"a": 1}, expired)
    stale = IdempotencyRecord.get_by_id(claim)
    IdempotencyRecord.update(lease_expires_at=clock.now + dt.timedelta(hours=1)).where(
        IdempotencyRecord.id == claim
    ).execute()  # the other taker won meanwhile
    monkeypatch.setattr(IdempotencyRecord, "get_or_none", lambda *a, **k: stale)
    work = Work("second taker")
    with pytest.raises(Conflict) as busy:
        idempotency.run_once(SCOPE, "k", {"a": 1}, work)
    assert busy.value.detail == IN_PROGRESS and work.runs == 0


def test_a_claim_dropped_under_us_is_in_progress(monkeypatch):
    """The insert found a claim, which its owner dropped (its work failed) before we read it."""
    abandoned_claim("k", {"a": 1}, None)
    monkeypatch.setattr(IdempotencyRecord, "get_or_none", lambda *a, **k: None)
    with pytest.raises(Conflict) as busy:
        idempotency.run_once(SCOPE, "k", {"a": 1}, Work("never"))
    assert busy.value.detail == IN_PROGRESS


def test_completing_one_key_stores_only_its_own_response(clock):
    in_flight = abandoned_claim("b", {"x": 1}, clock.now + dt.timedelta(hours=1))
    idempotency.run_once(SCOPE, "a", {"x": 1}, Work("a"))
    other = IdempotencyRecord.get_by_id(in_flight)
    assert other.response_body is None and other.status_code is None
    done = IdempotencyRecord.get(IdempotencyRecord.idempotency_key == "a")
    # The stored record says what was answered, and holds no lease any more.
    assert done.status_code == 200 and done.lease_expires_at is None
    assert idempotency.run_once(SCOPE, "a", {"x": 1}, Work("replayed?")) == {"answer": "a"}
