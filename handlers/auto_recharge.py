"""GET auto-recharge/requires-action: owner or admin (the client secret confirms a payment)."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from billing import auto_recharge
from billing.auth import Role, require_role


def get_auto_recharge_requires_action(
    organization_id: str, token_info: dict[str, Any]
) -> JSONResponse:
    org = require_role(organization_id, token_info["user"], Role.admin)
    action = auto_recharge.pending_action(org)
    if action is None:
        return JSONResponse(None)
    return JSONResponse(
        {
            "attemptId": action.attempt_id,
            "amountDecimillicents": action.amount,
            "stripePaymentIntentId": action.payment_intent_id,
            "clientSecret": action.client_secret,
        },
        headers={"Cache-Control": "no-store"},
    )
