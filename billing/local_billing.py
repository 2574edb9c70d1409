"""Local billing mode: what Stripe would do, done in-process, through the same rules.

Activating a plan directly (the platform's `dev/complete-local` with a plan) goes through
`apply_subscription_state` and `grant_welcome_credit` like a paid first invoice, so the welcome
credit is still granted once per organization, whatever the order of calls.

The local checkout, top-up and portal pages stand in for Stripe's hosted ones. Like Stripe's,
their URLs are capabilities: a checkout session id is a random 128-bit id, and a portal link
carries the organization and return URL signed with a key derived from the JWT secret. Paying
completes exactly the session shown, once (a second Pay only redirects again).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass

from billing import recharge_policy
from billing.accounts import get_account, locked_account
from billing.checkout import activate_locally, complete_local_session
from billing.config import get_settings
from billing.errors import InvalidRequest, NotFound
from billing.plans import PLANS
from billing.stripe_gateway import SessionInfo
from billing.subscriptions import SubscriptionState, apply_subscription_state
from models import (
    BillingAccount,
    CheckoutSession,
    CheckoutStatus,
    SubscriptionStatus,
    locked,
    utcnow,
    write_transaction,
)


def activate_plan(organization_id: str, plan: str) -> None:
    """Subscribe to `plan`, or switch to it, with no checkout; a card is on file afterwards."""
    if plan not in PLANS:
        raise InvalidRequest(f"subscriptionPlan must be one of {', '.join(PLANS)}")
    with locked_account(organization_id) as account:
        activate_locally(
            account,
            plan,
            started_at=account.subscription_started_at or utcnow(),
            welcome_reference=f"local-plan:{organization_id}",
        )
        recharge_policy.request_if_due(account)  # a card is on file now


# --- checkout and top-up pages --------------------------------------------------------------


def open_session(session_id: str) -> tuple[CheckoutSession, BillingAccount]:
    """The session a local checkout or top-up page shows, with its organization's account."""
    session = CheckoutSession.get_or_none(CheckoutSession.id == session_id)
    if session is None or not session_id.startswith("cs_local_"):
        raise NotFound("no such local checkout session")
    return session, get_account(session.organization_id)


def _lock_session(session_id: str) -> CheckoutSession:
    """Inside a write transaction: the local session a page shows, locked."""
    session = locked(CheckoutSession.select().where(CheckoutSession.id == session_id)).get_or_none()
    if session is None or not session_id.startswith("cs_local_"):
        raise NotFound("no such local checkout session")
    return session


def pay(session_id: str) -> CheckoutSession:
    """Pay for the session shown, as Stripe's webhooks would complete it; paying twice (a
    double click, a reload) completes it once. A canceled session cannot be paid. One unit of
    work on the session's organization (its account locked first, then the session)."""
    organization_id = open_session(session_id)[0].organization_id
    with locked_account(organization_id) as account:
        session = _lock_session(session_id)
        if session.status == CheckoutStatus.open:
            return complete_local_session(account, session)
        if session.status != CheckoutStatus.completed:
            raise InvalidRequest(f"this checkout was {session.status}")
        return session


def cancel(session_id: str) -> CheckoutSession:
    """Leave the checkout without paying: the session can no longer be completed."""
    with write_transaction():
        session = _lock_session(session_id)
        if session.status == CheckoutStatus.open:
            session.status = CheckoutStatus.canceled
            session.save(only=[CheckoutSession.status])
        return session


# --- portal ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PortalLink:
    organization_id: str
    return_url: str


def _portal_key() -> bytes:
    secret = get_settings().jwt_secret.get_secret_value().encode()
    return hashlib.sha256(b"local-portal:" + secret).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def portal_session(organization_id: str, return_url: str) -> SessionInfo:
    payload = json.dumps({"o": organization_id, "r": return_url}, separators=(",", ":")).encode()
    signature = hmac.new(_portal_key(), payload, hashlib.sha256).digest()[:16]
    token = f"{_b64(payload)}.{_b64(signature)}"
    base = get_settings().public_base_url.rstrip("/")
    return SessionInfo(f"bps_local_{uuid.uuid4().hex}", f"{base}/local/portal/{token}")


def read_portal_link(token: str) -> PortalLink:
    """The organization and return URL a portal link names; NotFound for anything not ours."""
    try:
        payload_part, signature_part = token.split(".")
        payload = base64.urlsafe_b64decode(payload_part + "=" * (-len(payload_part) % 4))
        signature = base64.urlsafe_b64decode(signature_part + "=" * (-len(signature_part) % 4))
    except (ValueError, binascii.Error):
        raise NotFound("no such portal session") from None
    expected = hmac.new(_portal_key(), payload, hashlib.sha256).digest()[:16]
    if not hmac.compare_digest(signature, expected):
        raise NotFound("no such portal session")
    data = json.loads(payload)
    return PortalLink(organization_id=str(data["o"]), return_url=str(data["r"]))


def cancel_subscription(organization_id: str) -> BillingAccount:
    """What the portal's cancel does on Stripe: the subscription ends now (as
    customer.subscription.deleted would record it); credits stay."""
    with locked_account(organization_id) as account:
        if (
            account.stripe_subscription_id is None
            or account.subscription_status == SubscriptionStatus.canceled
        ):
            return account
        now = utcnow()
        apply_subscription_state(
            account,
            SubscriptionState(
                subscription_id=account.stripe_subscription_id,
                status=SubscriptionStatus.canceled,
                plan=None,
                started_at=account.subscription_started_at,
                ends_at=now,
                current_period_end=account.subscription_current_period_end,
            ),
            max(int(now.timestamp()), account.subscription_state_at or 0),
        )
        return account
