"""A corpus of bad input through the HTTP app: each gets a 4xx problem and changes nothing."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml
from jsonschema import Draft4Validator

from billing import ledger
from billing.accounts import locked_account
from models import ALL_MODELS, database
from tests.conftest import SERVICE_HEADERS
from tests.contract.test_spec import ROOT

SQL = [
    "' OR '1'='1",
    "'; DROP TABLE credit_entries; --",
    "1; DELETE FROM billing_accounts",
    '" OR ""="',
    "admin'--",
    "%' AND 1=0 UNION SELECT * FROM memberships --",
]
NASTY_STRINGS = [
    *SQL,
    "\x00",
    "nul\x00byte",
    "\u202e\u0000",
    "😀" * 300,
    "a" * 10_000,
    "",
    "\ufffd\ufffe",
]
NUMBERS = [2**63, 2**70, -1, -(2**63) - 1, 1.5, 1e308, "12", True, None, [], {}]


def snapshot() -> str:
    """A digest of every row of every table."""
    digest = hashlib.sha256()
    with database.connection_context():
        for model in ALL_MODELS:
            for row in model.select().order_by(*model._meta.sorted_fields[:1]).tuples():
                digest.update(repr(row).encode())
    return digest.hexdigest()


@pytest.fixture
def seeded(org):
    with database.connection_context(), locked_account(org.id) as account:
        ledger.grant(account, 10**9, "top_up", reason="seed")
    return org


SPEC = yaml.safe_load((ROOT / "openapi.yaml").read_text())
SCHEMAS = {
    "patch-settings": "BillingSettingsUpdate",
    "top-up": "TopUpRequest",
    "checkout": "CheckoutRequest",
    "usage": "UsageRecordRequest",
    "reserve": "ReservationRequest",
}


def valid_for_contract(name: str, body: object) -> bool:
    """Whether the contract accepts `body` (so it does not belong in a bad-input corpus)."""
    schema = {**SPEC["components"]["schemas"][SCHEMAS[name]], "components": SPEC["components"]}
    field_schemas = schema.get("properties", {})
    if isinstance(body, dict):
        for field, value in body.items():
            field_schema = field_schemas.get(field, {})
            if value is None and field_schema.get("nullable"):
                return True
    validator = Draft4Validator(schema, format_checker=None)
    return validator.is_valid(body)


def body_cases():
    """(name, operation path template, headers key, body) for JSON-body operations."""
    templates = {
        "patch-settings": (
            "PATCH",
            "/v1/organizations/{org}/billing",
            "owner",
            {"billingEmail": "a@b.co"},
        ),
        "top-up": (
            "POST",
            "/v1/billing/{org}/top-up",
            "owner",
            {
                "amountDecimillicents": 100000,
                "successUrl": "https://x.example.com",
                "cancelUrl": "https://x.example.com",
            },
        ),
        "checkout": (
            "POST",
            "/v1/billing/checkout",
            "owner",
            {
                "organizationId": "{org}",
                "subscriptionPlan": "pro",
                "successUrl": "https://x.example.com",
                "cancelUrl": "https://x.example.com",
            },
        ),
        "usage": (
            "POST",
            "/v1/service/organizations/{org}/usage",
            "service",
            {
                "category": "api_call",
                "quantity": 1,
                "unitCostDecimillicents": 1,
                "referenceId": "r1",
            },
        ),
        "reserve": (
            "POST",
            "/v1/service/organizations/{org}/reservations",
            "service",
            {"amountDecimillicents": 5, "referenceId": "r1"},
        ),
    }
    for name, (method, path, who, valid) in templates.items():
        for field, value in valid.items():
            if field == "organizationId":
                continue
            bad_values = NUMBERS if isinstance(value, int) else NASTY_STRINGS
            for bad in bad_values:
                if valid_for_contract(name, {**valid, field: bad}):
                    continue  # e.g. an injection-looking referenceId: covered below as data
                yield f"{name}-{field}-{bad!r:.20}", method, path, who, {**valid, field: bad}
        yield f"{name}-array", method, path, who, [valid]
        yield f"{name}-null", method, path, who, None
        yield f"{name}-extra-field", method, path, who, {**valid, "isAdmin": True}


def _headers(org, who):
    return SERVICE_HEADERS if who == "service" else getattr(org, who)


def _send(client, org, method, path, who, content, content_type="application/json"):
    url = path.replace("{org}", org.id)
    return client.request(
        method, url, content=content, headers={**_headers(org, who), "Content-Type": content_type}
    )


def assert_refused(response):
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] in ("BadRequest", "NotFound", "MethodNotAllowed")


CASES = list(body_cases())


@pytest.mark.parametrize(
    ("name", "method", "path", "who", "body"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_bodies_are_refused_and_change_nothing(client, seeded, name, method, path, who, body):
    if isinstance(body, dict) and body.get("organizationId") == "{org}":
        body["organizationId"] = seeded.id
    before = snapshot()
    response = _send(client, seeded, method, path, who, json.dumps(body).encode())
    assert_refused(response)
    assert snapshot() == before


RAW_BODIES = {
    "malformed": b'{"billingEmail": ',
    "trailing-garbage": b'{"billingEmail": "a@b.co"} xx',
    "deeply-nested": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "deep-array": b"[" * 200_000 + b"]" * 200_000,
    "invalid-utf8": b'{"billingEmail": "\xff\xfe"}',
    "nan": b'{"usageCapDecimillicents": NaN}',
    "infinity": b'{"usageCapDecimillicents": Infinity}',
    "huge-number": b'{"usageCapDecimillicents": 1' + b"0" * 5000 + b"}",
    "duplicate-keys": b'{"usageCapDecimillicents": 1, "usageCapDecimillicents": -1}',
    "oversized": b'{"billingEmail": "' + b"a" * 2_000_000 + b'@b.co"}',
    "empty": b"",
}


@pytest.mark.parametrize("name", list(RAW_BODIES))
def test_raw_bodies_are_refused(client, seeded, name):
    before = snapshot()
    response = _send(
        client, seeded, "PATCH", "/v1/organizations/{org}/billing", "owner", RAW_BODIES[name]
    )
    assert_refused(response)
    assert snapshot() == before


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/xml",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "application/json; charset=latin-1",
    ],
)
def test_wrong_content_types(client, seeded, content_type):
    before = snapshot()
    response = _send(
        client,
        seeded,
        "PATCH",
        "/v1/organizations/{org}/billing",
        "owner",
        b"usageCapDecimillicents=5",
        content_type,
    )
    assert_refused(response)
    assert snapshot() == before


BAD_IDS = [
    "not-a-uuid",
    "' OR 1=1 --",
    "..%2F..%2Fetc%2Fpasswd",
    "00000000-0000-0000-0000",
    "%00",
    "7d444840-9dc0-11d1-b245-5ffdce74fad2x",
    "%F0%9F%98%80",
]


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_invalid_organization_ids(client, seeded, bad_id):
    before = snapshot()
    for url in (f"/v1/billing/{bad_id}/credits", f"/v1/organizations/{bad_id}/billing"):
        assert_refused(client.get(url, headers=seeded.owner))
    assert_refused(
        client.post(
            f"/v1/service/organizations/{bad_id}/usage",
            json={
                "category": "api_call",
                "quantity": 1,
                "unitCostDecimillicents": 1,
                "referenceId": "x",
            },
            headers=SERVICE_HEADERS,
        )
    )
    assert snapshot() == before


@pytest.mark.parametrize(
    "params",
    [
        {"category": "api_call", "periodStart": "2026-02-30T00:00:00Z"},
        {"category": "api_call", "periodStart": "0000-00-00"},
        {"category": "api_call", "periodEnd": "' OR 1=1 --"},
        {
            "category": "api_call",
            "periodStart": "2026-03-01T00:00:00Z",
            "periodEnd": "2026-01-01T00:00:00Z",
        },
        {"category": "api_call", "periodStart": "9999-12-31T23:59:59-23:59"},
        {"category": "' OR '1'='1"},
        {"category": "api_call\x00"},
    ],
)
def test_bad_usage_queries(client, seeded, params):
    before = snapshot()
    assert_refused(
        client.get(f"/v1/organizations/{seeded.id}/usage", params=params, headers=seeded.member)
    )
    assert snapshot() == before


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "1 OR 1=1"},
        {"limit": "99999999999999999999"},
        {"cursor": "' OR 1=1 --"},
        {"cursor": "\x00"},
        {"limit": "-5"},
        {"limit": "0x10"},
    ],
)
def test_bad_history_queries(client, seeded, params):
    assert_refused(
        client.get(f"/v1/billing/{seeded.id}/credits/history", params=params, headers=seeded.member)
    )


@pytest.mark.parametrize("reference", SQL)
def test_injection_looking_values_are_stored_literally(client, seeded, reference):
    """Valid strings that look like SQL are data: stored verbatim, nothing else touched."""
    ref = reference.replace(" ", "_")  # referenceId is printable ASCII without spaces
    r = client.post(
        f"/v1/service/organizations/{seeded.id}/usage",
        json={
            "category": "api_call",
            "quantity": 1,
            "unitCostDecimillicents": 7,
            "referenceId": ref,
        },
        headers=SERVICE_HEADERS,
    )
    assert r.status_code == 200, r.text
    history = client.get(f"/v1/billing/{seeded.id}/credits/history", headers=seeded.member).json()[
        "items"
    ]
    assert history[0]["referenceId"] == ref
    assert [i["entryType"] for i in history] == ["usage", "purchase"]
    assert [i["kind"] for i in history] == ["charge", "top_up"]
