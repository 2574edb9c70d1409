"""Local billing mode's pages: the `url`s checkout, top-up and portal return open real pages;
Pay completes exactly the session shown (once) and redirects to successUrl, Cancel to
cancelUrl; the portal shows the plan and card and cancels the subscription."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from billing.config import Settings, base_url_for_bind, get_settings
from billing.stripe_gateway import get_gateway
from billing.units import DOLLAR
from models import CheckoutSession, database

URLS = {"successUrl": "https://app.example.com/ok", "cancelUrl": "https://app.example.com/no"}


@pytest.fixture(autouse=True)
def local_mode():
    get_gateway.cache_clear()
    assert get_settings().local_billing
    yield
    get_gateway.cache_clear()


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path


def checkout(client, org, plan="pro"):
    r = client.post(
        "/v1/billing/checkout",
        json={"organizationId": org.id, "subscriptionPlan": plan, **URLS},
        headers=org.owner,
    )
    assert r.status_code == 200, r.text
    return r.json()


def top_up(client, org, amount):
    r = client.post(
        f"/v1/billing/{org.id}/top-up",
        json={"amountDecimillicents": amount, **URLS},
        headers=org.owner,
    )
    assert r.status_code == 200, r.text
    return r.json()


def settings_of(client, org):
    return client.get(f"/v1/organizations/{org.id}/billing", headers=org.owner).json()


def test_checkout_page_shows_plan_price_and_welcome_credit(client, org):
    session = checkout(client, org, "agency")
    page = client.get(path_of(session["url"]))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="plan">agency<' in page.text
    assert 'id="price">$45.00 / month<' in page.text
    assert 'id="welcome-credit">$45.00 of credit, once<' in page.text
    assert 'id="pay"' in page.text and 'id="cancel"' in page.text


def test_pay_completes_the_session_once_and_redirects_to_success(client, org):
    session = checkout(client, org)
    pay = f"{path_of(session['url'])}/pay"
    r = client.post(pay, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == URLS["successUrl"]
    state = settings_of(client, org)
    assert state["subscriptionPlan"] == "pro" and state["subscriptionStatus"] == "active"
    assert state["creditsBalanceDecimillicents"] == 20 * DOLLAR
    again = client.post(pay, follow_redirects=False)  # a double click
    assert again.status_code == 303 and again.headers["location"] == URLS["successUrl"]
    assert settings_of(client, org)["creditsBalanceDecimillicents"] == 20 * DOLLAR
    page = client.get(path_of(session["url"])).text
    assert "This checkout is paid." in page and "disabled" in page
    assert "already used by this organization" in page


def test_pay_completes_the_session_shown_not_the_newest(client, org):
    first = top_up(client, org, 3 * DOLLAR)
    top_up(client, org, 7 * DOLLAR)
    client.post(f"{path_of(first['url'])}/pay", follow_redirects=False)
    assert settings_of(client, org)["creditsBalanceDecimillicents"] == 3 * DOLLAR
    with database.connection_context():
        statuses = sorted(s.status for s in CheckoutSession.select())
    assert statuses == ["completed", "open"]


def test_top_up_page_and_pay(client, org):
    session = top_up(client, org, 12 * DOLLAR + 34 * 100_000)
    page = client.get(path_of(session["url"]))
    assert 'id="amount">$12.34<' in page.text
    r = client.post(f"{path_of(session['url'])}/pay", follow_redirects=False)
    assert r.headers["location"] == URLS["successUrl"]
    history = client.get(f"/v1/billing/{org.id}/credits/history", headers=org.member).json()
    assert [
        (i["entryType"], i["amountDecimillicents"], i["referenceId"]) for i in history["items"]
    ] == [("purchase", 12 * DOLLAR + 34 * 100_000, session["id"])]


def test_cancel_redirects_and_the_session_can_no_longer_be_paid(client, org):
    session = top_up(client, org, DOLLAR)
    base = path_of(session["url"])
    r = client.post(f"{base}/cancel", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == URLS["cancelUrl"]
    assert client.post(f"{base}/pay", follow_redirects=False).status_code == 400
    assert (
        client.post(f"/v1/billing/{org.id}/dev/complete-local", headers=org.owner).status_code
        == 404
    )
    assert settings_of(client, org)["creditsBalanceDecimillicents"] == 0


@pytest.mark.parametrize(
    "path",
    [
        "/local/checkout/cs_local_nope",
        "/local/top-up/cs_test_not_local",
        "/local/portal/garbage",
        "/local/portal/eyJvIjoieCJ9.AAAA",
    ],
)
def test_unknown_pages_are_404(client, org, path):
    assert client.get(path).status_code == 404


def test_checkout_session_under_the_wrong_kind_is_404(client, org):
    session = checkout(client, org)
    assert client.get(path_of(session["url"]).replace("/checkout/", "/top-up/")).status_code == 404


def test_portal_shows_plan_and_card_and_cancels(client, org):
    client.post(f"{path_of(checkout(client, org)['url'])}/pay")
    r = client.post(
        "/v1/billing/portal",
        json={"organizationId": org.id, "returnUrl": "https://app.example.com/billing"},
        headers=org.owner,
    )
    portal = path_of(r.json()["url"])
    page = client.get(portal).text
    assert 'id="plan">pro<' in page and 'id="subscription-status">active<' in page
    assert 'id="card">Test card (local mode)<' in page
    assert 'id="return" href="https://app.example.com/billing"' in page
    done = client.post(f"{portal}/cancel-subscription", follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == portal
    state = settings_of(client, org)
    assert state["subscriptionStatus"] == "canceled" and state["isSubscribed"] is False
    assert state["creditsBalanceDecimillicents"] == 20 * DOLLAR  # credits stay
    after = client.get(portal).text
    assert 'id="subscription-status">canceled<' in after and "cancel-subscription" not in after


def test_portal_link_is_signed(client, org):
    r = client.post(
        "/v1/billing/portal",
        json={"organizationId": org.id, "returnUrl": "https://app.example.com/billing"},
        headers=org.owner,
    )
    portal = path_of(r.json()["url"])
    payload, signature = portal.rsplit("/", 1)[1].split(".")
    forged = f"/local/portal/{payload[:-2]}{'AA' if payload[-2:] != 'AA' else 'BB'}.{signature}"
    assert client.get(forged).status_code == 404
    assert client.post(f"{forged}/cancel-subscription").status_code == 404


def test_pages_are_404_outside_local_mode(client, org, monkeypatch):
    session = top_up(client, org, DOLLAR)
    monkeypatch.setenv("BILLING_LOCAL_MODE", "false")
    get_settings.cache_clear()
    try:
        assert client.get(path_of(session["url"])).status_code == 404
        assert client.post(f"{path_of(session['url'])}/pay").status_code == 404
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert settings_of(client, org)["creditsBalanceDecimillicents"] == 0


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("0.0.0.0:9123", "http://127.0.0.1:9123"),
        ("[::]:9123", "http://[::1]:9123"),
        ("billing.internal:8080", "http://billing.internal:8080"),
        ("unix:/run/billing.sock", "http://127.0.0.1:8000"),
    ],
)
def test_public_base_url_defaults_to_the_bound_address(bind, expected):
    assert base_url_for_bind(bind) == expected


def test_public_base_url_follows_bind_unless_set(monkeypatch):
    monkeypatch.setenv("BIND", "127.0.0.1:9555")
    monkeypatch.delenv("PUBLIC_BASE_URL", raising=False)
    assert Settings().public_base_url == "http://127.0.0.1:9555"
    monkeypatch.setenv("PUBLIC_BASE_URL", "https://billing.example.com")
    assert Settings().public_base_url == "https://billing.example.com"
