"""Test doubles for Stripe that keep the real `stripe` library in the loop.

- `localstripe` (a stateful fake Stripe server, started as a subprocess on a free loopback port)
  serves customers, payment methods and off-session PaymentIntents.
- `FixtureFront`, an HTTP server in front of it, answers the endpoints localstripe lacks
  (Checkout and Billing Portal sessions) with Stripe's own object shapes from
  `shared/reference/stripe-fixtures3.json`, records the form parameters sent, and forwards every
  other request to localstripe. The app's StripeClient points its api base address here.
- `signed_event` builds a webhook body from a fixture object and signs it with
  `stripe.WebhookSignature.generate_signature_header`, as Stripe does.
"""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import stripe

from billing.stripe_gateway import ChargeOutcome

# The first ancestor holding shared/ (the project's sibling), so a copy of the tests elsewhere
# in the tree (mutation testing runs them from mutants/) finds the fixtures too.
FIXTURES_PATH = next(
    folder / "shared/reference/stripe-fixtures3.json"
    for folder in Path(__file__).resolve().parents
    if (folder / "shared/reference/stripe-fixtures3.json").exists()
)
WEBHOOK_SECRET = "whsec_test_billing_api_secret"
API_KEY = "sk_test_localstripe"


def fixtures() -> dict[str, Any]:
    return json.loads(FIXTURES_PATH.read_text())["resources"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_localstripe() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    exe = Path(sys.executable).parent / "localstripe"
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - outlives this function with the server
        prefix="localstripe-", suffix=".log", delete=False
    )
    # --from-scratch: localstripe otherwise loads /tmp/localstripe.pickle, a file every
    # instance on the machine rewrites, and a truncated one stops it from starting.
    proc = subprocess.Popen(
        [str(exe), "--port", str(port), "--from-scratch"], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60  # a loaded 2-core machine can take a while
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(f"{url}/v1/customers", auth=(API_KEY, ""), timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"localstripe did not start: {Path(log.name).read_text()[-2000:]}")


def forward(
    handler: BaseHTTPRequestHandler, backend: str, raw: bytes, *, timeout: float
) -> httpx.Response:
    """Pass a request a fake front does not answer itself on to the real fake (localstripe),
    with the headers Stripe's API reads."""
    headers = {
        k: v
        for k, v in handler.headers.items()
        if k.lower() in ("authorization", "content-type", "idempotency-key")
    }
    return httpx.request(
        handler.command, backend + handler.path, content=raw, headers=headers, timeout=timeout
    )


def _nested(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe form encoding (a[b][0][c]=v) back into a dict, lists as dicts keyed '0', '1'."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        parts = key.replace("]", "").split("[")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


IDEMPOTENCY_ERROR = {
    "error": {
        "type": "idempotency_error",
        "message": (
            "Keys for idempotent requests can only be used with the same parameters they were "
            "first used with. Try using a key other than the one used with the original request."
        ),
    }
}


def _invalid_request(message: str) -> dict[str, Any]:
    return {"error": {"type": "invalid_request_error", "message": message}}


class FixtureFront:
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.idempotency_keys: list[str | None] = []
        self.fail_with: int | None = None  # answer every request with this status
        self.delay = 0.0  # seconds to stall before answering (timeouts)
        # Answer off-session PaymentIntent creation as real Stripe does when the card needs the
        # customer to authenticate (localstripe cannot): see `authentication_required`.
        self.require_authentication = False
        self.authentication_intents: list[dict[str, Any]] = []
        # Drop the answer of the next request after Stripe has processed it (a lost response:
        # the caller sees a broken connection, the charge did happen).
        self.lose_next_answer = False
        # Stripe's idempotency: a key's first processed request and its answer. A repeat with
        # the same parameters gets the same answer; with others, a 400 idempotency_error.
        self._answered: dict[str, tuple[tuple[str, str, str], int, bytes]] = {}
        self._fixtures = fixtures()
        self.sessions: dict[str, dict[str, Any]] = {}  # Checkout Sessions made here, by id
        self.fail_with_on_expire: int | None = None  # Stripe down for session expiry only
        self._lock = threading.Lock()
        front = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _respond(self, status: int, body: bytes, content_type="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                params = _nested(parse_qsl(raw.decode(), keep_blank_values=True))
                path = self.path.split("?")[0]
                front.requests.append((self.command, path, params))
                front.idempotency_keys.append(self.headers.get("Idempotency-Key"))
                if front.delay:
                    time.sleep(front.delay)
                if front.fail_with is not None:
                    error = {"error": {"type": "api_error", "message": "injected"}}
                    return self._respond(front.fail_with, json.dumps(error).encode())
                if (
                    front.require_authentication
                    and self.command == "POST"
                    and path == "/v1/payment_intents"
                    and params.get("off_session") == "true"
                ):
                    body = front.authentication_required(params)
                    return self._respond(402, json.dumps(body).encode())
                if self.command == "POST" and path == "/v1/checkout/sessions":
                    return self._respond(200, json.dumps(front.checkout(params)).encode())
                if self.command == "GET" and path == "/v1/checkout/sessions":
                    return self._respond(200, json.dumps(front.list_sessions(self.path)).encode())
                if path.startswith("/v1/checkout/sessions/"):
                    status, body = front.session_call(self.command, path)
                    return self._respond(status, json.dumps(body).encode())
                if self.command == "POST" and path == "/v1/billing_portal/sessions":
                    return self._respond(200, json.dumps(front.portal(params)).encode())
                if self.command == "GET" and path == "/v1/payment_intents":
                    return self._respond(200, json.dumps(front.intents(self.path)).encode())
                key = self.headers.get("Idempotency-Key")
                request = (self.command, path, json.dumps(params, sort_keys=True))
                if key is not None and key in front._answered:
                    first, status, content = front._answered[key]
                    if first != request:
                        return self._respond(400, json.dumps(IDEMPOTENCY_ERROR).encode())
                    return self._respond(status, content)
                upstream = forward(self, front.backend, raw, timeout=10)
                if key is not None and self.command == "POST":
                    front._answered[key] = (request, upstream.status_code, upstream.content)
                if front.lose_next_answer:
                    front.lose_next_answer = False
                    self.close_connection = True
                    return  # nothing is written back: the client's connection breaks
                self._respond(upstream.status_code, upstream.content)

            do_GET = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # A short poll: `close` waits for the loop to notice, once per test using the front.
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def checkout(self, params: dict[str, Any]) -> dict[str, Any]:
        session = copy.deepcopy(self._fixtures["checkout.session"])
        session_id = f"cs_test_{uuid.uuid4().hex[:24]}"
        session.update(
            id=session_id,
            url=f"https://checkout.stripe.com/c/pay/{session_id}",
            mode=params.get("mode"),
            customer=params.get("customer"),
            client_reference_id=params.get("client_reference_id"),
            metadata=params.get("metadata", {}),
            success_url=params.get("success_url"),
            cancel_url=params.get("cancel_url"),
            status="open",
            payment_status="unpaid",
            created=int(time.time()),
        )
        with self._lock:
            self.sessions[session_id] = session
        return session

    def list_sessions(self, request_path: str) -> dict[str, Any]:
        """`GET /v1/checkout/sessions` with Stripe's `customer` and `status` filters, newest
        first, in pages (`limit`, default 10; `starting_after`; `has_more`)."""
        query = dict(parse_qsl(request_path.partition("?")[2]))
        with self._lock:
            kept = [
                copy.deepcopy(s)
                for s in self.sessions.values()
                if all(
                    s.get(name) == query[name] for name in ("customer", "status") if name in query
                )
            ]
        kept.sort(key=lambda s: s["created"], reverse=True)
        if "starting_after" in query:
            ids = [s["id"] for s in kept]
            kept = kept[ids.index(query["starting_after"]) + 1 :]
        limit = int(query.get("limit", 10))
        return {
            "object": "list",
            "url": "/v1/checkout/sessions",
            "has_more": len(kept) > limit,
            "data": kept[:limit],
        }

    def session_call(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        """GET /v1/checkout/sessions/{id} and POST .../{id}/expire, as Stripe answers them:
        only an open session can be expired."""
        session_id, _, action = path.removeprefix("/v1/checkout/sessions/").partition("/")
        if action == "expire" and self.fail_with_on_expire is not None:
            return self.fail_with_on_expire, {"error": {"type": "api_error", "message": "down"}}
        with self._lock:
            session = self.sessions.get(session_id)
            if session is None:
                error = _invalid_request(f"No such checkout.session: '{session_id}'")
                error["error"]["code"] = "resource_missing"
                return 404, error
            if method == "POST" and action == "expire":
                if session["status"] != "open":
                    return 400, _invalid_request(
                        "Only Checkout Sessions with a status in [open] can be expired."
                    )
                session["status"] = "expired"
            return 200, copy.deepcopy(session)

    def complete(self, session_id: str, subscription: str | None = None) -> str:
        """The customer pays a session (as Stripe does, only an open one); a subscription
        session's payment creates its subscription, whose id is returned."""
        with self._lock:
            session = self.sessions[session_id]
            assert session["status"] == "open", session["status"]
            if session.get("mode") == "subscription":
                subscription = subscription or f"sub_{uuid.uuid4().hex[:24]}"
            session.update(status="complete", payment_status="paid", subscription=subscription)
            return str(subscription)

    def payable_sessions(self) -> list[str]:
        with self._lock:
            return [i for i, s in self.sessions.items() if s["status"] == "open"]

    def authentication_required(self, params: dict[str, Any]) -> dict[str, Any]:
        """Stripe's answer to an off-session charge that needs 3-D Secure: HTTP 402, a
        `card_error` with code `authentication_required`, and the PaymentIntent (status
        requires_payment_method, with its client secret) for bringing the customer back."""
        intent_id = f"pi_{uuid.uuid4().hex[:24]}"
        intent = stripe_object(
            "payment_intent",
            id=intent_id,
            amount=int(params["amount"]),
            currency=params.get("currency", "usd"),
            customer=params.get("customer"),
            payment_method=params.get("payment_method"),
            metadata=params.get("metadata", {}),
            status="requires_payment_method",
            client_secret=f"{intent_id}_secret_{uuid.uuid4().hex[:24]}",
        )
        self.authentication_intents.append(intent)
        return {
            "error": {
                "type": "card_error",
                "code": "authentication_required",
                "decline_code": "authentication_required",
                "message": "Your card was declined. This transaction requires authentication.",
                "payment_intent": intent,
            }
        }

    def remember(self, key: str, method: str, path: str, params: dict[str, Any]) -> None:
        """Stripe holds an answer for `key`, given to a request with these parameters."""
        error = {"error": {"type": "api_error", "message": "stored"}}
        request = (method, path, json.dumps(params, sort_keys=True))
        self._answered[key] = (request, 500, json.dumps(error).encode())

    def intents(self, request_path: str) -> dict[str, Any]:
        """`GET /v1/payment_intents` with Stripe's `customer` and `created[gte]` filters
        (localstripe refuses both): localstripe's whole list, filtered here, newest first."""
        query = dict(parse_qsl(request_path.partition("?")[2]))
        listed: list[dict[str, Any]] = []
        page: dict[str, Any] = {"has_more": True, "data": []}
        while page["has_more"]:  # localstripe pages oldest first, 100 at a time
            params: dict[str, Any] = {"limit": 100}
            if page["data"]:
                params["starting_after"] = page["data"][-1]["id"]
            page = httpx.get(
                f"{self.backend}/v1/payment_intents", params=params, auth=(API_KEY, "")
            ).json()
            listed += page["data"]
        since = int(query.get("created[gte]", 0))
        kept = [
            intent
            for intent in listed
            if intent.get("customer") == query.get("customer", intent.get("customer"))
            and intent.get("created", 0) >= since
        ]
        kept.sort(key=lambda intent: intent.get("created", 0), reverse=True)
        return {"object": "list", "url": "/v1/payment_intents", "has_more": False, "data": kept}

    def portal(self, params: dict[str, Any]) -> dict[str, Any]:
        session = copy.deepcopy(self._fixtures["billing_portal.session"])
        session_id = f"bps_{uuid.uuid4().hex[:24]}"
        session.update(
            id=session_id,
            customer=params.get("customer"),
            return_url=params.get("return_url"),
            url=f"https://billing.stripe.com/p/session/{session_id}",
        )
        return session

    def sent(self, method: str, path: str) -> list[dict[str, Any]]:
        return [p for m, pa, p in self.requests if m == method and pa == path]

    def close(self) -> None:
        self.server.shutdown()


def stripe_object(kind: str, **fields: Any) -> dict[str, Any]:
    obj = copy.deepcopy(fixtures()[kind])
    obj.update(fields)
    return obj


def event_body(
    event_type: str, obj: dict[str, Any], created: int | None = None, event_id: str | None = None
) -> bytes:
    event = copy.deepcopy(fixtures()["event"])
    event.update(
        id=event_id or f"evt_{uuid.uuid4().hex[:24]}",
        type=event_type,
        created=created if created is not None else int(time.time()),
        data={"object": obj},
    )
    return json.dumps(event).encode()


def signature_for(body: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    return stripe.WebhookSignature.generate_signature_header(body.decode(), secret, timestamp)


class ScriptedGateway:
    """Answers each off-session charge with `answer(attempt_id)`: an outcome, or an
    exception to raise."""

    local = False

    def __init__(self, answer: Callable[[str], ChargeOutcome | Exception]) -> None:
        self.answer = answer
        self.charged: list[str] = []
        self.calls: list[tuple[str, str, str, int, str]] = []

    def charge_off_session(
        self,
        organization_id: str,
        customer_id: str,
        payment_method_id: str,
        amount: int,
        attempt_id: str,
    ) -> ChargeOutcome:
        self.charged.append(attempt_id)
        self.calls.append((organization_id, customer_id, payment_method_id, amount, attempt_id))
        result = self.answer(attempt_id)
        if isinstance(result, Exception):
            raise result
        return result

    def find_attempt_charge(
        self, customer_id: str, attempt_id: str, since: int
    ) -> ChargeOutcome | None:
        """A scripted charge leaves nothing at Stripe to find: every retry charges again."""
        return None
