"""POST checkout, portal and top-up: owner or admin; Idempotency-Key honoured."""

from __future__ import annotations

import hashlib
from typing import Any

from billing import checkout
from billing.auth import Role, require_role
from billing.config import get_settings
from billing.idempotency import run_once
from billing.stripe_gateway import SessionInfo, get_gateway
from handlers.context import idempotency_key


def _stripe_key(user_id: str, key: str | None) -> str | None:
    """The caller's Idempotency-Key is theirs (the replay scope names the user): another
    admin who picks the same key must not reuse, or be refused, the first one's Stripe key.
    The user is named by a digest: unambiguous whatever the subject holds, and not sent."""
    if key is None:
        return None
    return f"{hashlib.sha256(user_id.encode()).hexdigest()[:32]}:{key}"


def _session(info: SessionInfo) -> dict[str, Any]:
    return {"id": info.id, "url": info.url}


def create_checkout_session(body: dict[str, Any], token_info: dict[str, Any]) -> dict[str, Any]:
    user = token_info["user"]
    org = require_role(body["organizationId"], user, Role.admin)
    key = idempotency_key()
    return run_once(
        f"user:{user.user_id}:checkout:{org}",
        key,
        body,
        lambda: _session(
            checkout.start_subscription_checkout(
                org,
                body["subscriptionPlan"],
                body["successUrl"],
                body["cancelUrl"],
                get_gateway(),
                get_settings(),
            )
        ),
    )


def create_portal_session(body: dict[str, Any], token_info: dict[str, Any]) -> dict[str, Any]:
    user = token_info["user"]
    org = require_role(body["organizationId"], user, Role.admin)
    return run_once(
        f"user:{user.user_id}:portal:{org}",
        idempotency_key(),
        body,
        lambda: _session(checkout.open_portal(org, body["returnUrl"], get_gateway())),
    )


def create_top_up_session(
    organization_id: str, body: dict[str, Any], token_info: dict[str, Any]
) -> dict[str, Any]:
    user = token_info["user"]
    org = require_role(organization_id, user, Role.admin)
    key = idempotency_key()
    return run_once(
        f"user:{user.user_id}:top-up:{org}",
        key,
        body,
        lambda: _session(
            checkout.start_top_up(
                org,
                body["amountDecimillicents"],
                body["successUrl"],
                body["cancelUrl"],
                get_gateway(),
                _stripe_key(user.user_id, key),
            )
        ),
    )
