"""POST /v1/webhooks/stripe (implemented with the Stripe issue)."""

from __future__ import annotations

from typing import Any

from billing.errors import InvalidRequest


def receive_stripe_webhook(body: dict[str, Any], token_info: dict[str, Any]) -> dict[str, Any]:
    raise InvalidRequest("no webhook signing secret is configured on this server")
