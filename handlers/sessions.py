"""POST checkout, portal and top-up: owner or admin; Idempotency-Key honoured."""

from __future__ import annotations

from typing import Any

from billing import checkout
from billing.auth import Role, require_role
from billing.config import get_settings
from billing.idempotency import run_once
from billing.stripe_gateway import SessionInfo, get_gateway
from handlers.context import idempotency_key


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
                key,
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
                key,
            )
        ),
    )
