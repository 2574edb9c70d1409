"""POST dev/complete-local: local billing mode only; a 404 in every other mode."""

from __future__ import annotations

import json
from typing import Any

from billing import accounts, checkout, local_billing
from billing.auth import Role, require_role
from billing.config import get_settings
from billing.errors import NotFound
from handlers import shapes


def _requested_plan(body: Any) -> str | None:
    """The (already validated) body's plan: Connexion passes the body parsed, or as raw bytes
    when the request came without a Content-Type (no body at all)."""
    if isinstance(body, bytes | str):
        body = json.loads(body or "{}")
    return body.get("subscriptionPlan") if isinstance(body, dict) else None


def complete_local_checkout(
    organization_id: str, token_info: dict[str, Any], body: Any = None
) -> dict[str, Any]:
    if not get_settings().local_billing:
        raise NotFound("not found")
    org = require_role(organization_id, token_info["user"], Role.admin)
    plan = _requested_plan(body)
    if plan is None:
        checkout.complete_local_checkout(org)
    else:
        local_billing.activate_plan(org, plan)
    return shapes.billing_settings(accounts.get_account(org))
