"""The platform's existing clients work unchanged: error bodies with `message` and `_tag`, its
usage categories, its history entry types with UUID ids and non-null reasons, date-only and
lower-case periods, and `dev/complete-local` with a plan."""

from __future__ import annotations

import datetime as dt
import re
import uuid

import pytest

from billing import ledger
from billing.accounts import locked_account
from billing.config import get_settings
from billing.stripe_gateway import get_gateway
from billing.units import DOLLAR
from models import CreditEntry, database
from tests.conftest import SERVICE_HEADERS

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
URLS = {"successUrl": "https://app.example.com/ok", "cancelUrl": "https://app.example.com/no"}


def assert_platform_problem(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == code and body["_tag"] == code
    assert body["message"] == body["detail"] and body["message"]
    return body


# --- error bodies ---------------------------------------------------------------------------


def test_domain_error_carries_message_and_tag(client, org):
    r = client.get(f"/v1/billing/{uuid.uuid4()}/credits", headers=org.owner)
    assert_platform_problem(r, 404, "NotFound")


def test_validation_error_carries_message_and_tag(client, org):
    assert_platform_problem(
        client.get("/v1/billing/not-a-uuid/credits", headers=org.owner), 400, "BadRequest"
    )


def test_oversized_body_from_middleware_carries_message_and_tag(client, org):
    big = b'{"billingEmail": "' + b"a" * 2_000_000 + b'@x.io"}'
    r = client.patch(
        f"/v1/organizations/{org.id}/billing",
        content=big,
        headers={**org.owner, "Content-Type": "application/json"},
    )
    assert_platform_problem(r, 400, "BadRequest")


def test_429_from_middleware_carries_message_and_tag(db, org):
    from handlers.app import create_app

    settings = get_settings().model_copy(update={"rate_limit_principal": "1/minute"})
    with create_app(settings).test_client() as limited:
        url = f"/v1/billing/{org.id}/credits"
        assert limited.get(url, headers=org.owner).status_code == 200
        assert_platform_problem(limited.get(url, headers=org.owner), 429, "TooManyRequests")


@pytest.mark.parametrize(
    ("method", "path", "credential", "challenge"),
    [
        ("get", "/v1/billing/{org}/credits", "bearer token", "Bearer"),
        ("post", "/v1/service/organizations/{org}/usage", "X-Service-Token", "X-Service-Token"),
        ("post", "/v1/webhooks/stripe", "Stripe-Signature", "Stripe-Signature"),
    ],
)
def test_missing_credential_401_names_it_and_challenges(
    client, org, method, path, credential, challenge
):
    r = getattr(client, method)(path.format(org=org.id))
    body = assert_platform_problem(r, 401, "Unauthorized")
    assert credential in body["detail"]
    assert r.headers["www-authenticate"].startswith(f'{challenge} realm="billing"')


def test_bad_token_401_says_why_without_library_names(client, org):
    from tests.conftest import token_for

    expired = token_for("someone", ttl=-3600)
    for token, why in (("abc", "malformed"), (expired, "expired")):
        r = client.get(
            f"/v1/billing/{org.id}/credits", headers={"Authorization": f"Bearer {token}"}
        )
        body = assert_platform_problem(r, 401, "Unauthorized")
        assert why in body["detail"]
        assert "Error" not in body["detail"], body["detail"]  # no DecodeError & co.
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_wrong_service_token_is_named(client, org):
    r = client.post(
        f"/v1/service/organizations/{org.id}/usage",
        json={
            "category": "storage",
            "quantity": 1,
            "unitCostDecimillicents": 1,
            "referenceId": "x",
        },
        headers={"X-Service-Token": "wrong"},
    )
    body = assert_platform_problem(r, 401, "Unauthorized")
    assert "service credential" in body["detail"]
    assert r.headers["www-authenticate"].startswith("X-Service-Token")


# --- usage categories -----------------------------------------------------------------------

PLATFORM_CATEGORIES = [
    "text_generation",
    "image_generation",
    "video_generation",
    "storage",
    "openrouter_inference",
    "workflow_execution",
    "api_call",
]


@pytest.fixture
def funded(org):
    with database.connection_context(), locked_account(org.id) as account:
        ledger.grant(account, 10 * DOLLAR, "top_up", reason="seed")
    return org


def test_every_platform_category_records_and_summarizes(client, funded):
    for n, category in enumerate(PLATFORM_CATEGORIES, start=1):
        r = client.post(
            f"/v1/service/organizations/{funded.id}/usage",
            json={
                "category": category,
                "quantity": n,
                "unitCostDecimillicents": 100,
                "referenceId": f"cat-{category}",
            },
            headers=SERVICE_HEADERS,
        )
        assert r.status_code == 200, r.text
        assert r.json()["category"] == category
    for n, category in enumerate(PLATFORM_CATEGORIES, start=1):
        summary = client.get(
            f"/v1/organizations/{funded.id}/usage",
            params={"category": category},
            headers=funded.member,
        ).json()
        assert (summary["totalQuantity"], summary["totalCostDecimillicents"]) == (n, n * 100)


def test_unknown_category_is_still_400(client, funded):
    r = client.get(
        f"/v1/organizations/{funded.id}/usage",
        params={"category": "teleportation"},
        headers=funded.member,
    )
    assert_platform_problem(r, 400, "BadRequest")


# --- credit history -------------------------------------------------------------------------


def test_history_uses_the_platform_entry_types(client, org):
    with database.connection_context():
        with locked_account(org.id) as account:
            ledger.grant(
                account,
                9 * DOLLAR,
                "welcome_grant",
                reason=None,
                reference_id="cs_1",
                idempotency_ref="w1",
            )
        with locked_account(org.id) as account:
            ledger.grant(
                account,
                5 * DOLLAR,
                "top_up",
                reason="credit top-up",
                reference_id="cs_2",
                idempotency_ref="t1",
            )
        with locked_account(org.id) as account:
            ledger.grant(
                account,
                3 * DOLLAR,
                "recharge",
                reason=None,
                reference_id="pi_1",
                idempotency_ref="r1",
            )
        with locked_account(org.id) as account:
            ledger.debit(
                account,
                DOLLAR,
                "charge",
                reason="usage: storage",
                reference_id="u1",
                idempotency_ref="c1",
            )
        with locked_account(org.id) as account:
            ledger.take_back(
                account, DOLLAR, "refund", reason=None, reference_id="ch_1", idempotency_ref="rf1"
            )
        with locked_account(org.id) as account:
            ledger.take_back(
                account, DOLLAR, "dispute", reason=None, reference_id="dp_1", idempotency_ref="dp1"
            )
        with locked_account(org.id) as account:
            ledger.adjust(account, -DOLLAR, reason="goodwill correction", idempotency_ref="a1")
    items = client.get(f"/v1/billing/{org.id}/credits/history", headers=org.member).json()["items"]
    assert [(i["entryType"], i["kind"]) for i in items] == [
        ("adjustment", "adjustment"),
        ("refund", "dispute"),
        ("refund", "refund"),
        ("usage", "charge"),
        ("auto_recharge", "recharge"),
        ("purchase", "top_up"),
        ("purchase", "welcome_grant"),
    ]
    assert all(isinstance(i["reason"], str) and i["reason"] for i in items)
    assert items[0]["reason"] == "goodwill correction"  # a recorded reason wins
    assert items[1]["reason"] == "lost dispute"  # none recorded: the kind's description
    assert all(UUID.match(i["id"]) for i in items)
    assert len({i["id"] for i in items}) == len(items)


def test_every_ledger_kind_has_a_wire_type():
    from billing.history import WIRE_TYPES

    assert set(WIRE_TYPES) >= ledger.CREDIT_TYPES | ledger.DEBIT_TYPES


def test_history_ids_are_stable_and_paging_keeps_commit_order(client, org):
    with database.connection_context():
        for i in range(7):
            with locked_account(org.id) as account:
                ledger.grant(
                    account,
                    1000 + i,
                    "adjustment",
                    reason=f"g{i}",
                    reference_id=None,
                    idempotency_ref=f"g{i}",
                )
    url = f"/v1/billing/{org.id}/credits/history"
    first = client.get(url, params={"limit": "7"}, headers=org.member).json()["items"]
    seen, cursor = [], None
    while True:
        params = {"limit": "3"} | ({"cursor": cursor} if cursor else {})
        page = client.get(url, params=params, headers=org.member).json()
        seen += page["items"]
        cursor = page["cursor"]
        if cursor is None:
            break
    assert [i["id"] for i in seen] == [i["id"] for i in first]
    assert [i["amountDecimillicents"] for i in seen] == [1000 + i for i in reversed(range(7))]
    # The cursor stays opaque: it does not expose the public id.
    assert all(i["id"] not in (cursor or "") for i in seen)


def test_public_id_is_filled_for_every_new_entry(org):
    with database.connection_context():
        with locked_account(org.id) as account:
            entry = ledger.grant(account, 1, "adjustment", reason="x").entry
        assert entry is not None and UUID.match(CreditEntry.get_by_id(entry.id).public_id)


# --- usage periods --------------------------------------------------------------------------


@pytest.fixture
def usage_in_november(funded, clock):
    """Usage recorded at each moment through the clock, so records, entries and daily
    rollups agree (back-dating rows by hand would leave the rollups behind)."""
    with database.connection_context():
        from billing.metering import record_usage

        for ref, when in (
            ("oct", dt.datetime(2026, 10, 31, 23, 30)),
            ("nov1", dt.datetime(2026, 11, 1, 0, 0)),
            ("nov15", dt.datetime(2026, 11, 15, 12, 0)),
            ("dec", dt.datetime(2026, 12, 1, 0, 0)),
        ):
            clock.set(when)
            record_usage(funded.id, "text_generation", 1, 10, ref)
    return funded


@pytest.mark.parametrize(
    ("start", "end", "quantity"),
    [
        ("2026-11-01", "2026-12-01", 2),
        ("2026-11-01t00:00:00z", "2026-12-01T00:00:00Z", 2),
        ("2026-11-01T00:00", "2026-11-15T12:00:00", 1),  # no offset = UTC; end exclusive
        ("2026-11-01T01:00+02:00", "2026-12-01", 3),  # 23:00 UTC on Oct 31
        ("2026-10-31T18:30:00.5-05:00", "2026-11-01", 0),  # 23:30:00.5 UTC
        ("2026-10-01", "2027-01-01", 4),
    ],
)
def test_period_forms(client, usage_in_november, start, end, quantity):
    r = client.get(
        f"/v1/organizations/{usage_in_november.id}/usage",
        params={"category": "text_generation", "periodStart": start, "periodEnd": end},
        headers=usage_in_november.member,
    )
    assert r.status_code == 200, r.text
    assert r.json()["totalQuantity"] == quantity


@pytest.mark.parametrize(
    "bad",
    [
        "2026-13-01",
        "2026-02-30",
        "0000-01-01",
        "2026-11-01T25:00",
        "2026-11-01 10:00",
        "20261101",
        "2026-W45",
        "0001-01-01T00:00+01:00",
        "9999-12-31T23:30-05:00",
        "yesterday",
        "2026-11-01T10:00:00.1234567Z",
    ],
)
def test_bad_period_is_400_never_500(client, funded, bad):
    r = client.get(
        f"/v1/organizations/{funded.id}/usage",
        params={"category": "storage", "periodStart": bad},
        headers=funded.member,
    )
    assert_platform_problem(r, 400, "BadRequest")


# --- dev/complete-local with a plan ---------------------------------------------------------


@pytest.fixture
def local_mode():
    get_gateway.cache_clear()
    assert get_settings().local_billing
    yield
    get_gateway.cache_clear()


def complete_with(client, org, headers, body=None):
    url = f"/v1/billing/{org.id}/dev/complete-local"
    return (
        client.post(url, json=body, headers=headers)
        if body is not None
        else client.post(url, headers=headers)
    )


def test_complete_local_with_a_plan_activates_and_switches(client, org, local_mode):
    r = complete_with(client, org, org.admin, {"subscriptionPlan": "agency"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["subscriptionPlan"] == "agency" and body["subscriptionStatus"] == "active"
    assert body["isSubscribed"] is True and body["creditsBalanceDecimillicents"] == 45 * DOLLAR
    assert body["stripePaymentMethodId"]
    # Switch: the plan changes, the welcome credit is not granted again.
    switched = complete_with(client, org, org.owner, {"subscriptionPlan": "try_me"}).json()
    assert switched["subscriptionPlan"] == "try_me"
    assert switched["creditsBalanceDecimillicents"] == 45 * DOLLAR
    again = complete_with(client, org, org.owner, {"subscriptionPlan": "try_me"}).json()
    assert again["creditsBalanceDecimillicents"] == 45 * DOLLAR
    history = client.get(f"/v1/billing/{org.id}/credits/history", headers=org.member).json()
    assert [(i["entryType"], i["kind"]) for i in history["items"]] == [
        ("purchase", "welcome_grant")
    ]


def test_welcome_credit_once_across_checkout_and_direct_activation(client, org, local_mode):
    client.post(
        "/v1/billing/checkout",
        json={"organizationId": org.id, "subscriptionPlan": "pro", **URLS},
        headers=org.owner,
    )
    assert complete_with(client, org, org.owner).json()["creditsBalanceDecimillicents"] == (
        20 * DOLLAR
    )
    after = complete_with(client, org, org.owner, {"subscriptionPlan": "agency"}).json()
    assert after["subscriptionPlan"] == "agency"
    assert after["creditsBalanceDecimillicents"] == 20 * DOLLAR


def test_complete_local_without_plan_still_needs_an_open_session(client, org, local_mode):
    assert_platform_problem(complete_with(client, org, org.owner), 404, "NotFound")
    assert_platform_problem(complete_with(client, org, org.owner, {}), 404, "NotFound")


@pytest.mark.parametrize(
    "body", [{"subscriptionPlan": "gold"}, {"subscriptionPlan": None}, {"plan": "pro"}]
)
def test_complete_local_bad_body_is_400_and_changes_nothing(client, org, local_mode, body):
    assert_platform_problem(complete_with(client, org, org.owner, body), 400, "BadRequest")
    settings = client.get(f"/v1/organizations/{org.id}/billing", headers=org.owner).json()
    assert settings["subscriptionStatus"] == "inactive"
    assert settings["creditsBalanceDecimillicents"] == 0


def test_complete_local_with_plan_needs_admin(client, org, local_mode):
    r = complete_with(client, org, org.member, {"subscriptionPlan": "pro"})
    assert_platform_problem(r, 403, "Forbidden")
    r = complete_with(client, org, org.outsider, {"subscriptionPlan": "pro"})
    assert_platform_problem(r, 404, "NotFound")


def test_complete_local_is_404_outside_local_mode(client, org, monkeypatch):
    monkeypatch.setenv("BILLING_LOCAL_MODE", "false")
    get_settings.cache_clear()
    try:
        r = complete_with(client, org, org.owner, {"subscriptionPlan": "pro"})
        assert_platform_problem(r, 404, "NotFound")
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
