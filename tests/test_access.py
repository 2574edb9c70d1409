"""Who may call what: 401 without a valid token, 404 for non-members, 403 for members on
admin operations."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest

from tests.conftest import token_for

READS = [
    ("get", "/v1/organizations/{org}/billing"),
    ("get", "/v1/billing/{org}/credits"),
    ("get", "/v1/billing/{org}/credits/history"),
    ("get", "/v1/organizations/{org}/usage?category=api_call"),
    ("get", "/v1/billing/{org}/no-cap-reminder"),
    ("post", "/v1/billing/{org}/no-cap-reminder/dismiss"),
]
ADMIN_ONLY = [
    ("patch", "/v1/organizations/{org}/billing", {"billingEmail": "a@example.com"}),
    ("get", "/v1/billing/{org}/auto-recharge/requires-action", None),
]


def call(client, method, path, org_id, headers, body=None):
    kwargs = {"headers": headers}
    if body is not None:
        kwargs["json"] = body
    return getattr(client, method)(path.format(org=org_id), **kwargs)


@pytest.mark.parametrize(("method", "path"), READS)
def test_any_member_may_read(client, org, method, path):
    for headers in (org.member, org.admin, org.owner):
        assert call(client, method, path, org.id, headers).status_code == 200


@pytest.mark.parametrize(("method", "path"), READS)
def test_outsider_and_unknown_org_look_the_same(client, org, method, path):
    r1 = call(client, method, path, org.id, org.outsider)
    r2 = call(client, method, path, str(uuid.uuid4()), org.owner)
    assert r1.status_code == r2.status_code == 404
    assert r1.json()["detail"] == r2.json()["detail"]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ONLY)
def test_member_gets_403_admin_and_owner_200(client, org, method, path, body):
    assert call(client, method, path, org.id, org.member, body).status_code == 403
    assert call(client, method, path, org.id, org.admin, body).status_code == 200
    assert call(client, method, path, org.id, org.owner, body).status_code == 200


def _forged(claims, key="another-key-that-is-long-enough-000000000", alg="HS256"):
    return jwt.encode(claims, key, algorithm=alg)


@pytest.mark.parametrize(
    "auth",
    [
        None,
        "Bearer ",
        "Bearer not-a-jwt",
        "Basic dXNlcjpwYXNz",
        "Bearer " + _forged({"sub": "owner", "exp": int(time.time()) + 60}),
        "Bearer "
        + jwt.encode({"sub": "owner", "exp": int(time.time()) + 60}, None, algorithm="none"),
    ],
)
def test_bad_credentials_are_401(client, org, auth):
    headers = {"Authorization": auth} if auth else {}
    r = client.get(f"/v1/billing/{org.id}/credits", headers=headers)
    assert r.status_code == 401
    assert r.json()["code"] == "Unauthorized"
    assert r.headers["content-type"] == "application/problem+json"


def test_expired_token_is_401(client, org):
    owner = org.owner["Authorization"].split()[1]
    sub = jwt.decode(owner, options={"verify_signature": False})["sub"]
    expired = token_for(sub, ttl=-3600)
    r = client.get(f"/v1/billing/{org.id}/credits", headers={"Authorization": f"Bearer {expired}"})
    assert r.status_code == 401


def test_token_without_exp_is_401(client, org):
    from billing.config import get_settings

    token = jwt.encode({"sub": "x"}, get_settings().jwt_secret.get_secret_value(), "HS256")
    r = client.get(f"/v1/billing/{org.id}/credits", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401


def test_service_credential_is_not_a_user_token(client, org):
    from tests.conftest import SERVICE_HEADERS

    r = client.get(
        f"/v1/billing/{org.id}/credits",
        headers={"Authorization": f"Bearer {SERVICE_HEADERS['X-Service-Token']}"},
    )
    assert r.status_code == 401
