"""POST dev/complete-local: local billing mode only; a 404 in every other mode."""

from __future__ import annotations

from typing import Any

from billing import accounts, checkout
from billing.auth import Role, require_role
from billing.config import get_settings
from billing.errors import NotFound
from handlers import shapes


def complete_local_checkout(organization_id: str, token_info: dict[str, Any]) -> dict[str, Any]:
    if not get_settings().local_billing:
        raise NotFound("not found")
    org = require_role(organization_id, token_info["user"], Role.admin)
    checkout.complete_local_checkout(org)
    return shapes.billing_settings(accounts.get_account(org))
