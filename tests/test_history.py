"""Credit history pagination: newest first, opaque signed cursors, limits."""

from __future__ import annotations

import pytest

from billing import ledger
from billing.accounts import locked_account
from models import database


def url(org_id: str) -> str:
    return f"/v1/billing/{org_id}/credits/history"


def grant_n(org_id: str, n: int) -> None:
    with database.connection_context():
        for i in range(n):
            with locked_account(org_id) as account:
                ledger.grant(
                    account, 1000 + i, "adjustment", reason=f"grant {i}", reference_id=f"ref-{i}"
                )


def test_empty_history(client, org):
    r = client.get(url(org.id), headers=org.member)
    assert r.status_code == 200
    assert r.json() == {"items": [], "cursor": None, "hasMore": False}


def test_exactly_one_page(client, org):
    grant_n(org.id, 20)
    body = client.get(url(org.id), headers=org.member).json()
    assert len(body["items"]) == 20
    assert body["hasMore"] is False and body["cursor"] is None


def test_pages_walk_newest_first_without_gaps(client, org):
    grant_n(org.id, 45)
    seen, cursor = [], None
    while True:
        params = {"limit": "20"} | ({"cursor": cursor} if cursor else {})
        body = client.get(url(org.id), params=params, headers=org.member).json()
        seen.extend(body["items"])
        cursor = body["cursor"]
        assert body["hasMore"] is (cursor is not None)
        if cursor is None:
            break
    assert len(seen) == 45
    amounts = [item["amountDecimillicents"] for item in seen]
    assert amounts == [1000 + i for i in reversed(range(45))]
    assert seen[0]["balanceAfter"] == sum(amounts)
    assert len({item["id"] for item in seen}) == 45


def test_entry_shape(client, org):
    grant_n(org.id, 1)
    item = client.get(url(org.id), headers=org.member).json()["items"][0]
    assert item["entryType"] == "adjustment"
    assert item["reason"] == "grant 0"
    assert item["referenceId"] == "ref-0"
    assert item["balanceAfter"] == 1000
    assert item["createdAt"].endswith("Z")


def test_cursor_past_the_end_is_an_empty_page(client, org):
    grant_n(org.id, 3)
    first = client.get(url(org.id), params={"limit": "2"}, headers=org.member).json()
    second = client.get(
        url(org.id), params={"limit": "2", "cursor": first["cursor"]}, headers=org.member
    ).json()
    assert len(second["items"]) == 1 and second["cursor"] is None
    # Reusing the last cursor after more entries arrive still gives only older entries.
    grant_n(org.id, 1)
    again = client.get(
        url(org.id), params={"limit": "2", "cursor": first["cursor"]}, headers=org.member
    ).json()
    assert [i["amountDecimillicents"] for i in again["items"]] == [1000]


@pytest.mark.parametrize("limit", ["0", "101", "-1", "abc", "1.5", "", "1e2"])
def test_bad_limit_is_400(client, org, limit):
    r = client.get(url(org.id), params={"limit": limit}, headers=org.member)
    assert r.status_code == 400
    assert r.json()["code"] == "BadRequest"


@pytest.mark.parametrize("limit", ["1", "100"])
def test_limit_bounds_accepted(client, org, limit):
    grant_n(org.id, 2)
    r = client.get(url(org.id), params={"limit": limit}, headers=org.member)
    assert r.status_code == 200
    assert len(r.json()["items"]) == min(int(limit), 2)


def test_tampered_cursor_is_400(client, org):
    grant_n(org.id, 3)
    cursor = client.get(url(org.id), params={"limit": "1"}, headers=org.member).json()["cursor"]
    payload, sig = cursor.split(".")
    tampered = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + sig
    for bad in (tampered, "garbage", cursor + "x", "a.b.c", "%%%"):
        r = client.get(url(org.id), params={"cursor": bad}, headers=org.member)
        assert r.status_code == 400, bad
        assert r.json()["code"] == "BadRequest"


def test_cursor_from_another_org_is_400(client, org, db):
    from billing.organizations import add_member, create_organization

    grant_n(org.id, 3)
    cursor = client.get(url(org.id), params={"limit": "1"}, headers=org.owner).json()["cursor"]
    with database.connection_context():
        other = create_organization("Other")
        add_member(other.id, "shared-user", "owner")
    from tests.conftest import bearer

    r = client.get(url(other.id), params={"cursor": cursor}, headers=bearer("shared-user"))
    assert r.status_code == 400
