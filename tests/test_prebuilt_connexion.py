"""What handlers/prebuilt.py builds once per operation instead of per request behaves as
Connexion's own per-request construction did: the spec is still served, bodies are still
validated whatever the Content-Type's parameters (past the bounded cache too), unknown query
parameters are still refused, and the validators really are built once."""

from __future__ import annotations

import json

import pytest
from connexion.middleware import ConnexionMiddleware

from handlers import prebuilt
from handlers.app import create_app
from handlers.validation import CompiledParameterValidator

CHARSETS = [  # every spelling Python reads as UTF-8 or ASCII: the only charsets JSON takes
    "utf-8",
    "UTF-8",
    "utf8",
    "UTF8",
    "utf_8",
    "U8",
    "cp65001",
    "ascii",
    "us-ascii",
    "ASCII",
    "646",
    "ansi_x3.4_1968",
]


def test_the_spec_is_served_and_other_paths_go_past_the_spec_middleware(client, org):
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    assert spec.json()["paths"]["/v1/billing/{organizationId}/credits"]["get"]["operationId"]
    assert client.get(f"/v1/billing/{org.id}/credits", headers=org.owner).status_code == 200
    ui = client.get("/ui/")
    assert ui.status_code == 200 and "swagger-ui" in ui.text
    for asset in ("swagger-ui.css", "swagger-ui-bundle.js"):
        served = client.get(f"/ui/{asset}")
        assert served.status_code == 200, asset
        assert len(served.content) > 10_000, asset
    assert client.get("/ui", follow_redirects=False).status_code == 307
    missing = client.get("/openapi.json/extra")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


def test_bodies_are_validated_for_every_content_type_parameter_past_the_cache(client, org):
    assert len(CHARSETS) > prebuilt._BODY_VALIDATORS_KEPT
    url = f"/v1/organizations/{org.id}/billing"
    for number, charset in enumerate(CHARSETS, start=1):
        # Connexion reads the charset only when no space follows the semicolon.
        headers = {**org.owner, "Content-Type": f"application/json;charset={charset}"}
        bad = json.dumps({"usageCapDecimillicents": "x"}).encode(charset)
        refused = client.patch(url, content=bad, headers=headers)
        assert refused.status_code == 400, charset
        assert "is not of type 'integer'" in refused.json()["detail"], charset
        good = json.dumps({"usageCapDecimillicents": number}).encode(charset)
        accepted = client.patch(url, content=good, headers=headers)
        assert accepted.status_code == 200, charset
        assert accepted.json()["usageCapDecimillicents"] == number


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json;charset=no-such-codec",
        "application/json; charset=no-such-codec",
        "application/json;charset=latin-1",
        "application/json; charset=utf-16",
        'application/json; charset="cp1252"',
    ],
)
def test_a_charset_that_is_not_utf8_is_a_400_that_changes_nothing(client, org, content_type):
    """JSON is UTF-8 (RFC 8259): an unknown charset made Connexion fail (a 500), and another
    one was validated as one text and handled as another (a 500 once a letter is non-ASCII)."""
    url = f"/v1/organizations/{org.id}/billing"
    body = '{"usageCapDecimillicents": 5, "billingEmail": "caf\u00e9@example.com"}'
    r = client.patch(
        url,
        content=body.encode("latin-1"),
        headers={**org.owner, "Content-Type": content_type},
    )
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["detail"] == "a JSON body is UTF-8 (RFC 8259): charset=utf-8"
    assert client.get(url, headers=org.owner).json()["usageCapDecimillicents"] is None


def test_unknown_query_parameters_are_still_refused(client, org):
    url = f"/v1/billing/{org.id}/credits/history"
    assert client.get(url, params={"limit": 5}, headers=org.owner).status_code == 200
    refused = client.get(url, params={"limit": 5, "surprise": 1}, headers=org.owner)
    assert refused.status_code == 400
    bad_limit = client.get(url, params={"limit": "many"}, headers=org.owner)
    assert bad_limit.status_code == 400


def test_a_body_with_another_media_type_is_refused(client, org):
    r = client.patch(
        f"/v1/organizations/{org.id}/billing",
        content=b"usageCapDecimillicents=1",
        headers={**org.owner, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/problem+json"


def test_each_operations_parameter_validator_is_built_once(db, org, monkeypatch):
    built = []
    original = CompiledParameterValidator.__init__

    def counting(self, *args, **kwargs):
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(CompiledParameterValidator, "__init__", counting)
    app = create_app()
    with app.test_client() as client:
        for _ in range(5):
            r = client.get(f"/v1/billing/{org.id}/credits", headers=org.owner)
            assert r.status_code == 200
    assert len(built) == 1


def test_each_app_gets_connexions_stack_once_with_its_own_middlewares(db):
    assert isinstance(prebuilt.MIDDLEWARES, tuple)
    assert len(prebuilt.MIDDLEWARES) == len(ConnexionMiddleware.default_middlewares)
    first, second = create_app(), create_app()
    ours = 3  # the edge, the rate limiter and the JSON content-type check
    for app in (first, second):
        stack = app.middleware.middlewares
        assert len(stack) == len(ConnexionMiddleware.default_middlewares) + ours


@pytest.mark.parametrize("path", ["/openapi.json"])
def test_the_spec_middleware_knows_the_paths_it_serves(app, path):
    app.middleware._build_middleware_stack()
    found = []
    layer = app.middleware.app
    while layer is not None and not found:
        if isinstance(layer, prebuilt.SpecPathsMiddleware):
            found.append(layer)
        layer = getattr(layer, "app", None)
    assert found and path in found[0]._served
