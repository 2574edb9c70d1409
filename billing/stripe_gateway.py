"""The only module that talks to Stripe, through the official `stripe` library.

Every call has an explicit timeout, bounded retries (the library retries connection errors,
409s and 5xx with backoff) and an idempotency key, so a retried request never creates a
second customer, session or charge. A Stripe failure becomes `UpstreamUnavailable`, which
callers let propagate before they write anything.

No database connection is held while Stripe is called (`connection_released`): a hanging
Stripe then costs waiting requests, never the pool every debit needs.

`LocalGateway` is the embedded default (local billing mode): the same interface with no
network, so the service runs with no Stripe account.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import stripe

from billing.config import Settings, get_settings
from billing.errors import InvalidRequest, UpstreamUnavailable
from billing.units import to_stripe_cents
from models import connection_released

TOLERANCE = 300  # seconds a webhook signature stays valid, Stripe's default
STRIPE_KEY_MAX = 255  # Stripe refuses longer idempotency keys


def bounded_key(key: str) -> str:
    """An idempotency key Stripe accepts: keys built from a caller's (up to 255-character)
    Idempotency-Key can be longer, so those are replaced by their digest (still stable)."""
    if len(key) <= STRIPE_KEY_MAX:
        return key
    return f"{key.split(':', 1)[0]}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"


@dataclass(frozen=True)
class SessionInfo:
    id: str
    url: str


@dataclass(frozen=True)
class ChargeOutcome:
    """What an off-session charge came to. A transient failure (outage, timeout, 429) is not
    an outcome: it raises `UpstreamUnavailable` and the caller retries with the same key."""

    status: Literal["succeeded", "requires_action", "failed"]
    payment_intent_id: str | None
    client_secret: str | None = None
    failure_reason: str | None = None
    # "declined" (the card said no), "permanent" (Stripe refused the request itself), or
    # "transient" (Stripe refused to repeat it: not the customer's doing, not counted)
    failure_kind: Literal["declined", "permanent", "transient"] | None = None


class BillingGateway(Protocol):
    local: bool

    def create_customer(self, organization_id: str, email: str | None) -> str: ...

    def create_subscription_checkout(
        self,
        organization_id: str,
        customer_id: str,
        price_id: str,
        plan: str,
        success_url: str,
        cancel_url: str,
        idempotency_key: str,
    ) -> SessionInfo: ...

    def create_top_up_checkout(
        self,
        organization_id: str,
        customer_id: str,
        amount: int,
        success_url: str,
        cancel_url: str,
        idempotency_key: str,
    ) -> SessionInfo: ...

    def create_portal_session(self, customer_id: str, return_url: str) -> SessionInfo: ...

    def expire_checkout_session(self, session_id: str) -> CheckoutEnd:
        """Make an open Checkout Session unpayable; whether the customer paid it first."""
        ...

    def open_subscription_checkouts(self, customer_id: str) -> list[tuple[str, int]]:
        """The customer's payable subscription Checkout Sessions at Stripe: (id, created)."""
        ...

    def charge_off_session(
        self,
        organization_id: str,
        customer_id: str,
        payment_method_id: str,
        amount: int,
        attempt_id: str,
    ) -> ChargeOutcome: ...

    def find_attempt_charge(
        self, customer_id: str, attempt_id: str, since: int
    ) -> ChargeOutcome | None: ...

    def verify_event(self, payload: bytes, signature: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class CheckoutEnd:
    """What became of a Checkout Session we asked Stripe to expire."""

    paid: bool  # the customer paid it first
    subscription_id: str | None = None  # the subscription paying it created


# A customer's open Checkout Sessions read per listing (top-ups included): ten pages.
MAX_LISTED_SESSIONS = 1000


_NOT_EXPIRED = "the payment provider did not expire a checkout; retry later"


def _missing(exc: stripe.InvalidRequestError) -> bool:
    return exc.code == "resource_missing" or exc.http_status == 404


def _metadata(organization_id: str, kind: str, **extra: str) -> dict[str, str]:
    return {"organization_id": organization_id, "kind": kind, **extra}


class StripeGateway:
    local = False

    def __init__(self, settings: Settings) -> None:
        assert settings.stripe_secret_key is not None
        base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
        self._client = stripe.StripeClient(
            settings.stripe_secret_key.get_secret_value(),
            base_addresses=base,  # type: ignore[arg-type]
            max_network_retries=settings.stripe_max_retries,
            http_client=stripe.HTTPXClient(
                timeout=settings.stripe_timeout_seconds, allow_sync_methods=True
            ),
        )
        self._webhook_secret = (
            settings.stripe_webhook_secret.get_secret_value()
            if settings.stripe_webhook_secret
            else None
        )

    @staticmethod
    def _call(fn: Any, params: dict[str, Any], idempotency_key: str | None = None) -> Any:
        options = {"idempotency_key": bounded_key(idempotency_key)} if idempotency_key else {}
        try:
            return StripeGateway._send(functools.partial(fn, params=params, options=options))
        except stripe.InvalidRequestError as exc:
            raise InvalidRequest(
                f"the payment provider refused the request: {exc.user_message or exc.code}"
            ) from None

    def expire_checkout_session(self, session_id: str) -> CheckoutEnd:
        sessions = self._client.v1.checkout.sessions
        try:
            session = self._send(sessions.expire, session_id)
        except stripe.InvalidRequestError as refused:
            if _missing(refused):  # not a session of this Stripe account: nobody can pay it
                return CheckoutEnd(paid=False)
            # Stripe expires only open sessions: this one was paid, or expired already.
            try:
                session = self._send(sessions.retrieve, session_id)
            except stripe.InvalidRequestError as exc:
                if _missing(exc):
                    return CheckoutEnd(paid=False)
                raise UpstreamUnavailable(_NOT_EXPIRED) from exc
        if session.status == "open":  # refused for another reason: it is still payable
            raise UpstreamUnavailable(_NOT_EXPIRED)
        subscription = getattr(session, "subscription", None)  # an id, or expanded
        subscription_id = getattr(subscription, "id", subscription)
        return CheckoutEnd(
            paid=session.status == "complete",
            subscription_id=str(subscription_id) if subscription_id else None,
        )

    def open_subscription_checkouts(self, customer_id: str) -> list[tuple[str, int]]:
        def every_page() -> list[tuple[str, int]]:
            listed = self._client.v1.checkout.sessions.list(
                params={"customer": customer_id, "status": "open", "limit": 100}
            ).auto_paging_iter()
            return [
                (str(s.id), int(s.created))
                for s in itertools.islice(listed, MAX_LISTED_SESSIONS)
                if s.mode == "subscription"
            ]

        try:
            return list(self._send(every_page))
        except stripe.InvalidRequestError as exc:
            raise UpstreamUnavailable(
                "the payment provider refused a listing; retry later"
            ) from exc

    @staticmethod
    def _send(fn: Any, *args: Any) -> Any:
        """`fn(*args)` with the database connection given back meanwhile; Stripe's refusal
        (InvalidRequestError) is the caller's to read, any other failure is an outage. `_call`
        is this with the refusal made a 400."""
        try:
            with connection_released():
                return fn(*args)
        except stripe.InvalidRequestError:
            raise
        except stripe.StripeError as exc:
            raise UpstreamUnavailable(
                "the payment provider is unavailable; nothing was changed, retry later"
            ) from exc

    def create_customer(self, organization_id: str, email: str | None) -> str:
        params: dict[str, Any] = {"metadata": {"organization_id": organization_id}}
        if email:
            params["email"] = email
        customer = self._call(
            self._client.v1.customers.create, params, f"customer:{organization_id}"
        )
        return str(customer.id)

    def create_subscription_checkout(
        self,
        organization_id: str,
        customer_id: str,
        price_id: str,
        plan: str,
        success_url: str,
        cancel_url: str,
        idempotency_key: str,
    ) -> SessionInfo:
        metadata = _metadata(organization_id, "subscription", plan=plan)
        session = self._call(
            self._client.v1.checkout.sessions.create,
            {
                "mode": "subscription",
                "customer": customer_id,
                "client_reference_id": organization_id,
                "line_items": [{"price": price_id, "quantity": 1}],
                "success_url": success_url,
                "cancel_url": cancel_url,
                "metadata": metadata,
                "subscription_data": {"metadata": metadata},
            },
            idempotency_key,
        )
        return SessionInfo(str(session.id), str(session.url))

    def create_top_up_checkout(
        self,
        organization_id: str,
        customer_id: str,
        amount: int,
        success_url: str,
        cancel_url: str,
        idempotency_key: str,
    ) -> SessionInfo:
        metadata = _metadata(organization_id, "top_up", amount_decimillicents=str(amount))
        session = self._call(
            self._client.v1.checkout.sessions.create,
            {
                "mode": "payment",
                "customer": customer_id,
                "client_reference_id": organization_id,
                "line_items": [
                    {
                        "price_data": {
                            "currency": "usd",
                            "unit_amount": to_stripe_cents(amount),
                            "product_data": {"name": "Credit top-up"},
                        },
                        "quantity": 1,
                    }
                ],
                "success_url": success_url,
                "cancel_url": cancel_url,
                "metadata": metadata,
                "payment_intent_data": {"metadata": metadata, "setup_future_usage": "off_session"},
            },
            idempotency_key,
        )
        return SessionInfo(str(session.id), str(session.url))

    def create_portal_session(self, customer_id: str, return_url: str) -> SessionInfo:
        session = self._call(
            self._client.v1.billing_portal.sessions.create,
            {"customer": customer_id, "return_url": return_url},
            f"portal:{uuid.uuid4()}",
        )
        return SessionInfo(str(session.id), str(session.url))

    def charge_off_session(
        self,
        organization_id: str,
        customer_id: str,
        payment_method_id: str,
        amount: int,
        attempt_id: str,
    ) -> ChargeOutcome:
        params = {
            "amount": to_stripe_cents(amount),
            "currency": "usd",
            "customer": customer_id,
            "payment_method": payment_method_id,
            "off_session": True,
            "confirm": True,
            "metadata": _metadata(
                organization_id,
                "auto_recharge",
                attempt_id=attempt_id,
                amount_decimillicents=str(amount),
            ),
        }
        try:
            with connection_released():
                intent = self._client.v1.payment_intents.create(
                    params=params,  # type: ignore[arg-type]
                    options={"idempotency_key": f"auto-recharge:{attempt_id}"},
                )
        except stripe.CardError as exc:
            # Real Stripe answers an off-session 3-D Secure need with a card error whose
            # payment intent carries the client secret; a decline has the same shape.
            failed = exc.error.payment_intent if exc.error else None
            failed_id = getattr(failed, "id", None)
            if exc.code == "authentication_required" and failed_id:
                secret = getattr(failed, "client_secret", None)
                return ChargeOutcome("requires_action", failed_id, secret)
            reason = exc.user_message or exc.code or "card_declined"
            return ChargeOutcome(
                "failed", failed_id, None, f"the card was declined: {reason}"[:500], "declined"
            )
        except stripe.IdempotencyError:
            # The key was first used with other parameters: every retry of this attempt would
            # get the same answer. Fail it (not the customer's doing: uncounted) and free the
            # organization's slot for a new attempt, rather than retry until attempts run out.
            return ChargeOutcome(
                "failed",
                None,
                None,
                "the payment provider refused to repeat this charge with other parameters",
                "transient",
            )
        except stripe.InvalidRequestError as exc:
            # 400/404: a detached card, a deleted customer, bad parameters. Retrying the same
            # request gives the same answer, so it fails the attempt for good.
            reason = exc.code or "invalid_request"
            return ChargeOutcome(
                "failed",
                None,
                None,
                f"the saved payment method cannot be charged ({reason}); update it",
                "permanent",
            )
        except stripe.StripeError as exc:
            # 5xx, 409, 429, timeouts, connection errors, and our own credential being refused
            # (401/403, an operator's matter, not the customer's): retry later, same key.
            raise UpstreamUnavailable("the payment provider is unavailable") from exc
        if intent.status == "succeeded":
            return ChargeOutcome("succeeded", intent.id)
        if intent.status == "requires_action":
            return ChargeOutcome("requires_action", intent.id, intent.client_secret)
        return ChargeOutcome(
            "failed", intent.id, None, f"payment intent {intent.status}", "declined"
        )

    def find_attempt_charge(
        self, customer_id: str, attempt_id: str, since: int
    ) -> ChargeOutcome | None:
        """What an earlier claim of this attempt came to at Stripe, if it created a
        PaymentIntent (found by the attempt id in its metadata among the customer's
        PaymentIntents created since `since`, a Unix time); None if it created none.

        A retry looks before it charges again: an earlier claim's answer may have been lost
        after Stripe charged, and its idempotency key protects only for 24 hours and only with
        the same parameters. List endpoints are consistent (search is not)."""
        params = {"customer": customer_id, "created": {"gte": since}, "limit": 100}
        try:
            with connection_released():
                page = self._client.v1.payment_intents.list(params=params)  # type: ignore[arg-type]
                found = next(
                    (
                        intent
                        for intent in itertools.islice(page.auto_paging_iter(), MAX_LOOKUP)
                        if _attempt_of(intent) == attempt_id
                    ),
                    None,
                )
        except stripe.StripeError as exc:
            raise UpstreamUnavailable("the payment provider is unavailable") from exc
        return None if found is None else _outcome_of(found)

    def verify_event(self, payload: bytes, signature: str) -> dict[str, Any]:
        if self._webhook_secret is None:
            raise InvalidRequest("no webhook signing secret is configured")
        try:
            stripe.WebhookSignature.verify_header(
                payload.decode("utf-8"), signature, self._webhook_secret, tolerance=TOLERANCE
            )
        except (stripe.SignatureVerificationError, UnicodeDecodeError):
            raise InvalidRequest("the Stripe-Signature does not match the body") from None
        # The library bounds only the past; a timestamp far in the future is as suspect.
        stamp = dict(p.split("=", 1) for p in signature.split(",") if "=" in p).get("t", "")
        if not stamp.isdigit() or int(stamp) > time.time() + TOLERANCE:
            raise InvalidRequest("the Stripe-Signature timestamp is in the future")
        return _parse_event(payload)


def _parse_event(payload: bytes) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except ValueError:
        raise InvalidRequest("the event is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("id"), str):
        raise InvalidRequest("the event has no id")
    return event


# PaymentIntents a lookup reads at most (one organization's, over an attempt's life).
MAX_LOOKUP = 1000


def _attempt_of(intent: Any) -> str | None:
    metadata = intent.metadata
    return None if metadata is None else metadata.to_dict().get("attempt_id")


def _outcome_of(intent: Any) -> ChargeOutcome:
    """A PaymentIntent an off-session charge created, read as that charge's outcome."""
    error = intent.last_payment_error
    if intent.status == "succeeded":
        return ChargeOutcome("succeeded", intent.id)
    if intent.status == "requires_action" or (
        intent.status == "requires_payment_method"
        and error is not None
        and error.code == "authentication_required"
    ):
        return ChargeOutcome("requires_action", intent.id, intent.client_secret)
    if intent.status in ("requires_payment_method", "canceled"):
        reason = (error.code if error else None) or intent.status
        return ChargeOutcome(
            "failed", intent.id, None, f"the card was declined: {reason}"[:500], "declined"
        )
    # processing, requires_confirmation, requires_capture: not settled yet; look again later
    raise UpstreamUnavailable(f"payment intent {intent.id} is still {intent.status}")


class LocalGateway:
    """Local billing mode: sessions point at this server; charges always succeed."""

    local = True

    def __init__(self, settings: Settings) -> None:
        self._base = settings.public_base_url.rstrip("/")

    def create_customer(self, organization_id: str, email: str | None) -> str:
        return f"cus_local_{uuid.uuid4().hex[:16]}"

    def _session(self, kind: str) -> SessionInfo:
        session_id = f"cs_local_{uuid.uuid4().hex}"
        return SessionInfo(session_id, f"{self._base}/local/{kind}/{session_id}")

    def create_subscription_checkout(self, *args: Any, **kwargs: Any) -> SessionInfo:
        return self._session("checkout")

    def create_top_up_checkout(self, *args: Any, **kwargs: Any) -> SessionInfo:
        return self._session("top-up")

    def create_portal_session(self, customer_id: str, return_url: str) -> SessionInfo:
        return SessionInfo(f"bps_local_{uuid.uuid4().hex}", f"{self._base}/local/portal")

    def expire_checkout_session(self, session_id: str) -> CheckoutEnd:
        # A local session exists only as our row: the service's conditional update of it decides
        # whether it expired or the local page completed it first.
        return CheckoutEnd(paid=False)

    def open_subscription_checkouts(self, customer_id: str) -> list[tuple[str, int]]:
        return []  # local sessions exist only as our rows

    def charge_off_session(
        self,
        organization_id: str,
        customer_id: str,
        payment_method_id: str,
        amount: int,
        attempt_id: str,
    ) -> ChargeOutcome:
        return ChargeOutcome("succeeded", f"pi_local_{attempt_id.replace('-', '')}")

    def find_attempt_charge(
        self, customer_id: str, attempt_id: str, since: int
    ) -> ChargeOutcome | None:
        return None  # local charges answer at once: nothing is ever lost

    def verify_event(self, payload: bytes, signature: str) -> dict[str, Any]:
        raise InvalidRequest("webhooks are not accepted in local billing mode")


@functools.lru_cache(maxsize=1)
def get_gateway() -> BillingGateway:
    settings = get_settings()
    if settings.stripe_secret_key is not None:
        return StripeGateway(settings)
    if settings.billing_local_mode:
        return LocalGateway(settings)
    raise InvalidRequest("billing is not configured: set STRIPE_SECRET_KEY or BILLING_LOCAL_MODE")
