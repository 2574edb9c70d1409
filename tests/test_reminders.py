"""The no-cap reminder is personal to the user and the organization."""

from __future__ import annotations

from billing.organizations import add_member, create_organization
from models import database
from tests.conftest import bearer


def test_dismiss_is_personal_and_idempotent(client, org):
    base = f"/v1/billing/{org.id}/no-cap-reminder"
    assert client.get(base, headers=org.member).json() == {"dismissed": False}
    for _ in range(2):
        r = client.post(base + "/dismiss", headers=org.member)
        assert r.status_code == 200 and r.json() == {"dismissed": True}
    assert client.get(base, headers=org.member).json() == {"dismissed": True}
    # Another member of the same organization still sees it.
    assert client.get(base, headers=org.admin).json() == {"dismissed": False}


def test_same_user_in_another_org_still_sees_it(client):
    with database.connection_context():
        a, b = create_organization("A"), create_organization("B")
        add_member(a.id, "u1", "member")
        add_member(b.id, "u1", "member")
    client.post(f"/v1/billing/{a.id}/no-cap-reminder/dismiss", headers=bearer("u1"))
    assert (
        client.get(f"/v1/billing/{a.id}/no-cap-reminder", headers=bearer("u1")).json()["dismissed"]
        is True
    )
    assert (
        client.get(f"/v1/billing/{b.id}/no-cap-reminder", headers=bearer("u1")).json()["dismissed"]
        is False
    )
