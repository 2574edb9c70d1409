"""GET auto-recharge/requires-action (implemented with the Stripe issue)."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from billing.auth import Role, require_role


def get_auto_recharge_requires_action(
    organization_id: str, token_info: dict[str, Any]
) -> JSONResponse:
    require_role(organization_id.lower(), token_info["user"], Role.admin)
    return JSONResponse(None)
