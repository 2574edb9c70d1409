"""POST dev/complete-local (implemented with the Stripe issue)."""

from __future__ import annotations

from typing import Any

from billing.auth import Role, require_role
from billing.errors import NotFound


def complete_local_checkout(organization_id: str, token_info: dict[str, Any]) -> dict[str, Any]:
    require_role(organization_id.lower(), token_info["user"], Role.admin)
    raise NotFound("no open local checkout for this organization")
