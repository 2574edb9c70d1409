"""The caller's own no-cap reminder state."""

from __future__ import annotations

from typing import Any

from billing import reminders
from billing.auth import Role, require_role


def get_no_cap_reminder(organization_id: str, token_info: dict[str, Any]) -> dict[str, Any]:
    user = token_info["user"]
    org = require_role(organization_id, user, Role.member)
    return {"dismissed": reminders.is_dismissed(org, user.user_id)}


def dismiss_no_cap_reminder(organization_id: str, token_info: dict[str, Any]) -> dict[str, Any]:
    user = token_info["user"]
    org = require_role(organization_id, user, Role.member)
    return {"dismissed": reminders.dismiss(org, user.user_id)}
