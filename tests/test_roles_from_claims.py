"""Roles from token claims: with JWT_ORG_ROLES_CLAIM set, a user's organization roles come from
that claim of their token (an object mapping organization ids to roles) instead of the
membership table."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest

from billing.config import get_settings

CLAIM = "https://platform.example.com/org_roles"


@pytest.fixture
def claim_roles(monkeypatch):
    monkeypatch.setenv("JWT_ORG_ROLES_CLAIM", CLAIM)
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def token(sub: str, roles: object = None, *, with_claim: bool = True) -> dict[str, str]:
    now = int(time.time())
    claims: dict[str, object] = {"sub": sub, "iat": now, "exp": now + 600}
    if with_claim:
        claims[CLAIM] = roles
    secret = get_settings().jwt_secret.get_secret_value()
    return {"Authorization": f"Bearer {jwt.encode(claims, secret, 'HS256')}"}


def test_roles_come_from_the_claim(client, org, claim_roles):
    settings = f"/v1/organizations/{org.id}/billing"
    admin = token("idp|ann", {org.id.upper(): "admin", "not-a-uuid": "owner"})
    member = token("idp|bob", {org.id: "member"})
    assert client.get(settings, headers=admin).status_code == 200
    assert (
        client.patch(settings, json={"usageCapDecimillicents": 5}, headers=admin).status_code == 200
    )
    assert client.get(settings, headers=member).status_code == 200
    assert (
        client.patch(settings, json={"usageCapDecimillicents": 6}, headers=member).status_code
        == 403
    )


def test_the_claim_is_the_only_source(client, org, claim_roles):
    """The membership table's owner, without the organization in their claim, gets 404."""
    settings = f"/v1/organizations/{org.id}/billing"
    assert client.get(settings, headers=org.owner).status_code == 404  # no claim at all
    owner_sub = jwt.decode(
        org.owner["Authorization"].split()[1], options={"verify_signature": False}
    )["sub"]
    assert (
        client.get(settings, headers=token(owner_sub, {str(uuid.uuid4()): "owner"})).status_code
        == 404
    )
    assert client.get(settings, headers=token(owner_sub, {org.id: "superuser"})).status_code == 404


def test_unknown_organization_in_the_claim_is_404(client, org, claim_roles):
    ghost = str(uuid.uuid4())
    r = client.get(f"/v1/billing/{ghost}/credits", headers=token("idp|cy", {ghost: "owner"}))
    assert r.status_code == 404


@pytest.mark.parametrize("bad", [["owner"], "owner", 3])
def test_a_malformed_claim_is_401(client, org, claim_roles, bad):
    r = client.get(f"/v1/billing/{org.id}/credits", headers=token("idp|dee", bad))
    assert r.status_code == 401 and "roles claim" in r.json()["detail"]


def test_without_the_setting_the_claim_is_ignored(client, org):
    r = client.get(f"/v1/billing/{org.id}/credits", headers=token("idp|eve", {org.id: "owner"}))
    assert r.status_code == 404  # not in the membership table
    assert client.get(f"/v1/billing/{org.id}/credits", headers=org.member).status_code == 200
