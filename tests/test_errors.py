"""One error mapping: problem+json with a stable code and the request id, never internals."""

from __future__ import annotations

import pytest


def assert_problem(r, status, code):
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["code"] == code
    assert body["requestId"] == r.headers["x-request-id"]
    assert set(body) == {
        "type",
        "title",
        "status",
        "detail",
        "code",
        "requestId",
        "message",
        "_tag",
    }
    assert body["message"] == body["detail"] and body["_tag"] == body["code"]
    return body


def test_unknown_path_is_problem_404(client):
    assert_problem(client.get("/v1/nothing-here"), 404, "NotFound")


def test_unknown_method_is_problem_405(client, org):
    assert_problem(
        client.delete(f"/v1/billing/{org.id}/credits", headers=org.owner), 405, "MethodNotAllowed"
    )


def test_invalid_uuid_is_400(client, org):
    assert_problem(
        client.get("/v1/billing/not-a-uuid/credits", headers=org.owner), 400, "BadRequest"
    )


def test_request_id_is_echoed_or_made(client, org):
    r = client.get(
        f"/v1/billing/{org.id}/credits", headers={**org.owner, "X-Request-Id": "abc-123"}
    )
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get(
        f"/v1/billing/{org.id}/credits", headers={**org.owner, "X-Request-Id": "bad id\x7f"}
    )
    assert r.headers["x-request-id"] != "bad id\x7f" and len(r.headers["x-request-id"]) == 36


def test_unexpected_error_is_500_without_internals(client, org, monkeypatch):
    from billing import accounts

    def explode(_org):
        raise RuntimeError("secret internals: password=hunter2 at /srv/app.py line 3")

    monkeypatch.setattr(accounts, "get_account", explode)
    r = client.get(f"/v1/billing/{org.id}/credits", headers=org.owner)
    body = assert_problem(r, 500, "InternalError")
    assert "hunter2" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
    assert "request id" in body["detail"]


def test_database_error_is_clear_500(client, org, monkeypatch):
    import peewee

    from billing import accounts

    def down(_org):
        raise peewee.OperationalError("could not connect to server: 10.0.0.5")

    monkeypatch.setattr(accounts, "get_account", down)
    body = assert_problem(
        client.get(f"/v1/billing/{org.id}/credits", headers=org.owner), 500, "InternalError"
    )
    assert "10.0.0.5" not in body["detail"] and "database" in body["detail"]


def test_oversized_body_is_400(client, org):
    big = b'{"billingEmail": "' + b"a" * 2_000_000 + b'@x.io"}'
    r = client.patch(
        f"/v1/organizations/{org.id}/billing",
        content=big,
        headers={**org.owner, "Content-Type": "application/json"},
    )
    assert_problem(r, 400, "BadRequest")


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml"])
def test_wrong_content_type_is_400(client, org, content_type):
    r = client.patch(
        f"/v1/organizations/{org.id}/billing",
        content=b"{}",
        headers={**org.owner, "Content-Type": content_type},
    )
    assert_problem(r, 400, "BadRequest")


def test_405_allow_lists_every_method_the_contract_defines(client, org):
    r = client.delete(f"/v1/organizations/{org.id}/billing", headers=org.owner)
    assert_problem(r, 405, "MethodNotAllowed")
    assert r.headers["allow"] == "GET, PATCH"


def test_undecodable_body_is_400(client, org):
    r = client.patch(
        f"/v1/organizations/{org.id}/billing",
        content=b'{"billingEmail": "\xff"}',
        headers={**org.owner, "Content-Type": "application/json"},
    )
    assert_problem(r, 400, "BadRequest")
