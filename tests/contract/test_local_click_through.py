"""Local billing mode, clicked through in headless Chromium against a real gunicorn server:
subscribe, top up, abandon a top-up, and cancel the subscription in the portal, each time
checking the balance and the state through the API.

The browser is driven over the DevTools protocol (Chromium's --remote-debugging-port and the
`websockets` client already installed with uvicorn): pages are opened from the `url`s the API
returns and buttons are clicked with real mouse events at their on-screen position. Chromium
comes from Debian's package; with REQUIRE_BROWSER=1 (CI) a missing browser fails.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from scripts.local_server import LocalServer
from tests.contract.test_rendered_spec import CHROMIUM

DOLLAR = 10_000_000
SEED = 100_000  # the server seeds one cent of credit
WAIT = 30.0  # seconds to wait for a page, an upper bound only (nothing asserts on time)


class Browser:
    """One headless Chromium tab, driven over the DevTools protocol."""

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="chromium-click-")
        self.process = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                "--window-size=1024,900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + WAIT
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self.ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=WAIT))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str) -> Any:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                value = self.eval(expression)
            except RuntimeError:  # the page is navigating
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}; at {self.url()}")

    def url(self) -> str:
        return str(self.eval("location.href"))

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def text(self, element_id: str) -> str:
        return str(self.wait_for(f"document.getElementById({json.dumps(element_id)})?.textContent"))

    def click(self, element_id: str) -> None:
        """A real mouse click in the middle of the element."""
        box = self.wait_for(
            f"(() => {{ const e = document.getElementById({json.dumps(element_id)});"
            " if (!e) return null; e.scrollIntoView(); const r = e.getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box["x"],
                y=box["y"],
                button="left",
                clickCount=1,
            )

    def wait_until_at(self, url: str) -> None:
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def close(self) -> None:
        try:
            if hasattr(self, "ws"):
                self.ws.close()
        finally:
            self.process.terminate()
            self.process.wait(timeout=30)
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    if CHROMIUM is None:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is required (REQUIRE_BROWSER=1) but not installed")
        pytest.skip("chromium is not installed")
    with LocalServer(credit=SEED, workers=1) as running:
        yield running


@pytest.fixture(scope="module")
def browser(server) -> Iterator[Browser]:
    tab = Browser()
    try:
        yield tab
    finally:
        tab.close()


def api(server: LocalServer, method: str, path: str, body: dict | None = None) -> Any:
    request = urllib.request.Request(
        f"{server.base_url}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"},
        method=method,
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def test_click_through_subscribe_top_up_and_cancel(server, browser):
    org = server.organization_id
    ok, no = f"{server.base_url}/healthz?done=ok", f"{server.base_url}/healthz?done=no"
    urls = {"successUrl": ok, "cancelUrl": no}

    # Subscribe: the checkout page shows the plan, its price and the welcome credit; Pay.
    session = api(
        server,
        "POST",
        "/v1/billing/checkout",
        {"organizationId": org, "subscriptionPlan": "pro", **urls},
    )
    assert session["url"].startswith(server.base_url)  # PUBLIC_BASE_URL follows BIND
    browser.open(session["url"])
    assert browser.text("plan") == "pro"
    assert browser.text("price") == "$20.00 / month"
    assert browser.text("welcome-credit") == "$20.00 of credit, once"
    browser.click("pay")
    browser.wait_until_at(ok)
    state = api(server, "GET", f"/v1/organizations/{org}/billing")
    assert (state["subscriptionPlan"], state["subscriptionStatus"]) == ("pro", "active")
    assert state["creditsBalanceDecimillicents"] == SEED + 20 * DOLLAR

    # Top up $7.50: Pay.
    top_up = api(
        server,
        "POST",
        f"/v1/billing/{org}/top-up",
        {"amountDecimillicents": 75_000_000, **urls},
    )
    browser.open(top_up["url"])
    assert browser.text("amount") == "$7.50"
    browser.click("pay")
    browser.wait_until_at(ok)
    credits = api(server, "GET", f"/v1/billing/{org}/credits")
    assert credits["creditsBalanceDecimillicents"] == SEED + 20 * DOLLAR + 75_000_000

    # Another top-up, abandoned: Cancel goes to cancelUrl and buys nothing.
    abandoned = api(
        server,
        "POST",
        f"/v1/billing/{org}/top-up",
        {"amountDecimillicents": 5 * DOLLAR, **urls},
    )
    browser.open(abandoned["url"])
    browser.click("cancel")
    browser.wait_until_at(no)
    credits = api(server, "GET", f"/v1/billing/{org}/credits")
    assert credits["creditsBalanceDecimillicents"] == SEED + 20 * DOLLAR + 75_000_000

    # The portal: plan and card shown; cancel the subscription; the return link goes back.
    back = f"{server.base_url}/healthz?done=portal"
    portal = api(server, "POST", "/v1/billing/portal", {"organizationId": org, "returnUrl": back})
    browser.open(portal["url"])
    assert browser.text("plan") == "pro"
    assert browser.text("subscription-status") == "active"
    assert browser.text("card") == "Test card (local mode)"
    browser.click("cancel-subscription")
    browser.wait_for("document.getElementById('subscription-status')?.textContent === 'canceled'")
    state = api(server, "GET", f"/v1/organizations/{org}/billing")
    assert state["subscriptionStatus"] == "canceled" and state["isSubscribed"] is False
    assert state["creditsBalanceDecimillicents"] == SEED + 20 * DOLLAR + 75_000_000
    browser.click("return")
    browser.wait_until_at(back)

    history = api(server, "GET", f"/v1/billing/{org}/credits/history")
    assert [(i["entryType"], i["kind"]) for i in history["items"]] == [
        ("purchase", "top_up"),
        ("purchase", "welcome_grant"),
        ("adjustment", "adjustment"),
    ]
