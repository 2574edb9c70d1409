"""Per-request context shared by middleware, handlers, errors and logs."""

from __future__ import annotations

import contextvars

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def idempotency_key() -> str | None:
    """The request's Idempotency-Key header (validated by the spec), if any."""
    from connexion import request

    return request.headers.get("idempotency-key")
