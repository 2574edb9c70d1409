"""GET credits and GET credits/history."""

from __future__ import annotations

from typing import Any

from billing import accounts, history
from billing.auth import Role, require_role
from billing.config import get_settings
from handlers import shapes


def get_credit_balance(organization_id: str, token_info: dict[str, Any]) -> dict[str, Any]:
    org = require_role(organization_id, token_info["user"], Role.member)
    return shapes.credit_balance(accounts.get_account(org))


def list_credit_history(
    organization_id: str,
    token_info: dict[str, Any],
    limit: str | None = None,
    cursor: str | None = None,
) -> dict[str, Any]:
    org = require_role(organization_id, token_info["user"], Role.member)
    page = history.list_credit_history(
        org, history.parse_limit(limit), cursor, get_settings().cursor_key
    )
    return shapes.credit_history(page)
