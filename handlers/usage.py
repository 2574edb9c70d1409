"""GET /v1/organizations/{organizationId}/usage."""

from __future__ import annotations

from typing import Any

from billing import usage
from billing.auth import Role, require_role
from handlers import shapes
from models import utcnow


def get_usage_summary(
    organization_id: str,
    category: str,
    token_info: dict[str, Any],
    period_start: str | None = None,
    period_end: str | None = None,
) -> dict[str, Any]:
    org = require_role(organization_id, token_info["user"], Role.member)
    start, end = usage.resolve_period(period_start, period_end, utcnow())
    return shapes.usage_summary(usage.summarize_usage(org, category, start, end))
