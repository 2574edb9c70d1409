"""Every operation x every kind of caller -> the status DESIGN.md prescribes.

Generated from openapi.yaml: each operation's security scheme and `x-required-role` decide the
expectation, so a new operation cannot be forgotten (one without either fails here).
"""

from __future__ import annotations

import copy
import json
import time
import uuid

import jwt
import pytest
import yaml

from billing.config import get_settings
from tests.conftest import SERVICE_HEADERS, token_for
from tests.contract.test_spec import ROOT, _resolve

SPEC = yaml.safe_load((ROOT / "openapi.yaml").read_text())
ROLE_RANK = {"member": 1, "admin": 2, "owner": 3}
CALLERS = [
    "none",
    "expired",
    "other_key",
    "alg_none",
    "outsider",
    "member",
    "admin",
    "owner",
    "service",
]


def operations():
    for path, item in SPEC["paths"].items():
        for method, op in item.items():
            if method in ("get", "post", "patch", "put", "delete"):
                yield method, path, op


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def headers_for(caller: str, org) -> dict[str, str]:
    secret = get_settings().jwt_secret.get_secret_value()
    owner_sub = jwt.decode(
        org.owner["Authorization"].split()[1], options={"verify_signature": False}
    )["sub"]
    now = int(time.time())
    return {
        "none": {},
        "expired": _bearer(token_for(owner_sub, ttl=-600)),
        "other_key": _bearer(
            jwt.encode({"sub": owner_sub, "exp": now + 600}, "x" * 40 + secret, "HS256")
        ),
        "alg_none": _bearer(jwt.encode({"sub": owner_sub, "exp": now + 600}, None, "none")),
        "outsider": org.outsider,
        "member": org.member,
        "admin": org.admin,
        "owner": org.owner,
        "service": SERVICE_HEADERS,
    }[caller]


def expected(op: dict, caller: str) -> str:
    """'401', '403', '404', or 'allowed' (any status that is not an auth refusal)."""
    scheme = next(iter((op.get("security") or SPEC["security"])[0]))
    if scheme == "stripeSignature":
        return "401"  # none of these callers carries a Stripe-Signature
    if scheme == "serviceAuth":
        return "allowed" if caller == "service" else "401"
    assert scheme == "bearerAuth"
    role = op["x-required-role"]  # every user operation must name its role
    if caller in ("none", "expired", "other_key", "alg_none", "service"):
        return "401"
    if caller == "outsider":
        return "404"
    return "allowed" if ROLE_RANK[caller] >= ROLE_RANK[role] else "403"


def request_for(method: str, path: str, op: dict, org_id: str):
    url = path.replace("{organizationId}", org_id).replace("{reservationId}", str(uuid.uuid4()))
    query = {}
    for raw in SPEC["paths"][path].get("parameters", []) + op.get("parameters", []):
        param = _resolve(SPEC, raw)
        if param["in"] == "query" and param.get("required"):
            schema = _resolve(SPEC, param["schema"])
            query[param["name"]] = schema.get("enum", [schema.get("example")])[0]
    body = None
    if "requestBody" in op:
        body = _with_organization(
            copy.deepcopy(op["requestBody"]["content"]["application/json"]["example"]), org_id
        )
    return url, query, body


def _with_organization(node, org_id: str):
    """The example body with every organizationId (a batch's events too) naming `org_id`."""
    if isinstance(node, dict):
        return {
            k: org_id if k == "organizationId" else _with_organization(v, org_id)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_with_organization(v, org_id) for v in node]
    return node


ORGANIZATION_NOT_FOUND = "organization not found"

CASES = [
    pytest.param(m, p, op, c, id=f"{op['operationId']}-{c}")
    for m, p, op in operations()
    for c in CALLERS
]


@pytest.mark.parametrize(("method", "path", "op", "caller"), CASES)
def test_authorization_matrix(client, org, method, path, op, caller):
    url, query, body = request_for(method, path, op, org.id)
    kwargs = {"params": query, "headers": headers_for(caller, org)}
    if body is not None:
        kwargs["content"] = json.dumps(body)
        kwargs["headers"] = {**kwargs["headers"], "Content-Type": "application/json"}
    response = client.request(method.upper(), url, **kwargs)
    want = expected(op, caller)
    if want == "allowed":
        assert response.status_code not in (401, 403), response.text
        assert response.status_code < 500, response.text
        # A 404 may name the missing reservation or open session this request made up, but
        # never the organization: that is the answer a non-member gets.
        if response.status_code == 404:
            assert response.json()["detail"] != ORGANIZATION_NOT_FOUND, response.text
    else:
        assert response.status_code == int(want), response.text
        problem = response.json()
        assert (
            problem["code"] == {"401": "Unauthorized", "403": "Forbidden", "404": "NotFound"}[want]
        )
        if want == "404":
            assert problem["detail"] == ORGANIZATION_NOT_FOUND
