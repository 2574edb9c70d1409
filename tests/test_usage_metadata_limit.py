"""The 4 KiB metadata limit on recorded usage, at its boundary: 4,096 bytes of encoded JSON
are stored, 4,097 are a 400 that writes nothing."""

from __future__ import annotations

import json

import pytest

from billing import ledger
from billing.accounts import locked_account
from billing.metering import MAX_METADATA_BYTES
from models import CreditEntry, UsageRecord, database
from tests.conftest import SERVICE_HEADERS


def encoded_size(metadata: dict[str, str]) -> int:
    return len(json.dumps(metadata, sort_keys=True).encode())


@pytest.fixture
def funded(org):
    with database.connection_context(), locked_account(org.id) as account:
        ledger.grant(account, 10_000, "top_up", reason="seed")
    return org


def usage(reference: str, metadata: dict[str, str]) -> dict:
    return {
        "category": "api_call",
        "quantity": 1,
        "unitCostDecimillicents": 10,
        "referenceId": reference,
        "metadata": metadata,
    }


def exactly(size: int) -> dict[str, str]:
    """ASCII filler sized so the stored encoding is exactly `size` bytes."""
    base = encoded_size({"note": ""})
    return {"note": "x" * (size - base)}


def test_metadata_at_the_limit_is_stored(client, funded):
    metadata = exactly(MAX_METADATA_BYTES)
    assert encoded_size(metadata) == MAX_METADATA_BYTES
    r = client.post(
        f"/v1/service/organizations/{funded.id}/usage",
        json=usage("at-limit", metadata),
        headers=SERVICE_HEADERS,
    )
    assert r.status_code == 200, r.text
    with database.connection_context():
        stored = UsageRecord.get(UsageRecord.reference_id == "at-limit")
        assert json.loads(stored.metadata) == metadata


def test_metadata_one_byte_over_is_400_and_writes_nothing(client, funded):
    metadata = exactly(MAX_METADATA_BYTES + 1)
    r = client.post(
        f"/v1/service/organizations/{funded.id}/usage",
        json=usage("over-limit", metadata),
        headers=SERVICE_HEADERS,
    )
    assert r.status_code == 400, r.text
    assert "4096 bytes" in r.json()["detail"]
    with database.connection_context():
        assert UsageRecord.select().count() == 0
        assert CreditEntry.select().count() == 1  # the seed only
