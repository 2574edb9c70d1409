"""POST /v1/webhooks/stripe: the raw body goes to the webhook service for verification."""

from __future__ import annotations

from typing import Any

from connexion import request
from starlette.concurrency import run_in_threadpool

from billing import webhooks
from billing.stripe_gateway import get_gateway
from models import connection


def _receive(payload: bytes, signature: str) -> dict[str, Any]:
    with connection():
        result = webhooks.receive(payload, signature, get_gateway())
    return {
        "processed": result.processed,
        "idempotent": result.idempotent,
        "eventId": result.event_id,
    }


async def receive_stripe_webhook(token_info: dict[str, Any]) -> Any:
    # No `body` parameter: Connexion would consume the stream parsing it, and the signature
    # must be checked against the exact bytes Stripe sent.
    payload = await request.body()
    result = await run_in_threadpool(_receive, payload, token_info["signature"])
    return result, 200, {"Content-Type": "application/json"}
