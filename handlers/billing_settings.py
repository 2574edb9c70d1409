"""GET and PATCH /v1/organizations/{organizationId}/billing."""

from __future__ import annotations

from typing import Any

from billing import accounts
from billing.auth import Role, require_role
from handlers import shapes

# Wire name -> service field name for the PATCH body.
_FIELDS = {
    "billingEmail": "billing_email",
    "autoRechargeEnabled": "auto_recharge_enabled",
    "autoRechargeThresholdDecimillicents": "auto_recharge_threshold",
    "autoRechargeAmountDecimillicents": "auto_recharge_amount",
    "usageCapDecimillicents": "usage_cap",
}


def get_billing_settings(organization_id: str, token_info: dict[str, Any]) -> dict[str, Any]:
    org = require_role(organization_id, token_info["user"], Role.member)
    return shapes.billing_settings(accounts.get_account(org))


def update_billing_settings(
    organization_id: str, body: dict[str, Any], token_info: dict[str, Any]
) -> dict[str, Any]:
    org = require_role(organization_id, token_info["user"], Role.admin)
    changes = {_FIELDS[name]: value for name, value in body.items()}
    return shapes.billing_settings(accounts.update_settings(org, changes))
