"""Checkout, portal and top-up sessions (implemented with the Stripe issue)."""

from __future__ import annotations

from typing import Any

from billing.auth import Role, require_role
from billing.errors import NotFound


def _pending(organization_id: str, token_info: dict[str, Any]) -> dict[str, Any]:
    require_role(organization_id.lower(), token_info["user"], Role.admin)
    raise NotFound("sessions are not available yet on this server")


def create_checkout_session(body: dict[str, Any], token_info: dict[str, Any]) -> dict[str, Any]:
    return _pending(body["organizationId"], token_info)


def create_portal_session(body: dict[str, Any], token_info: dict[str, Any]) -> dict[str, Any]:
    return _pending(body["organizationId"], token_info)


def create_top_up_session(
    organization_id: str, body: dict[str, Any], token_info: dict[str, Any]
) -> dict[str, Any]:
    return _pending(organization_id, token_info)
