"""Rate limits per principal and per client IP, answered with a 429 problem.

Built on `limits` (fixed windows): shared across workers and instances when REDIS_URL is set,
in-memory per worker otherwise. The principal is a hash of the presented credential, so limits
apply before (and whether or not) it verifies; the per-IP limit bounds anyone cycling
credentials. The webhook endpoint has its own, higher per-IP limit. If the limiter's storage is
down the request is let through and the error is logged: rate limiting must not take billing
down with it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time

from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing.config import Settings
from handlers.problems import send_problem

log = logging.getLogger("billing.ratelimit")
WEBHOOK_PATH = "/v1/webhooks/stripe"
UNLIMITED_PATHS = ("/healthz", "/readyz", "/metrics")


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.enabled = settings.rate_limit_enabled
        storage = storage_from_string(settings.redis_url or "memory://")
        self.limiter = FixedWindowRateLimiter(storage)
        self.principal_limit = parse(settings.rate_limit_principal)
        self.ip_limit = parse(settings.rate_limit_ip)
        self.webhook_limit = parse(settings.rate_limit_webhook)
        self.trust_forwarded_for = settings.trust_forwarded_for

    def _client_ip(self, scope: Scope, headers: dict[bytes, bytes]) -> str:
        forwarded = headers.get(b"x-forwarded-for")
        if self.trust_forwarded_for and forwarded:
            return forwarded.decode("latin-1").split(",")[0].strip()
        client = scope.get("client")
        return client[0] if client else "unknown"

    def _checks(self, scope: Scope) -> list[tuple[RateLimitItem, str]]:
        headers = dict(scope["headers"])
        ip = self._client_ip(scope, headers)
        if scope["path"] == WEBHOOK_PATH:
            return [(self.webhook_limit, f"webhook:{ip}")]
        checks = [(self.ip_limit, f"ip:{ip}")]
        credential = headers.get(b"authorization") or headers.get(b"x-service-token")
        if credential:
            digest = hashlib.sha256(credential).hexdigest()[:32]
            checks.append((self.principal_limit, f"principal:{digest}"))
        return checks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.enabled or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            verdicts = []
            for item, key in self._checks(scope):
                allowed = self.limiter.hit(item, "billing", key)
                stats = self.limiter.get_window_stats(item, "billing", key)
                verdicts.append((allowed, item, stats))
        except Exception as exc:  # the limiter's storage is down: fail open, loudly
            log.error("rate limiter unavailable: %s", type(exc).__name__)
            await self.app(scope, receive, send)
            return
        allowed, item, stats = min(verdicts, key=lambda v: (v[0], v[2].remaining))
        reset = max(0, math.ceil(stats.reset_time - time.time()))
        headers = {
            "RateLimit-Limit": str(item.amount),
            "RateLimit-Remaining": str(max(0, stats.remaining)),
            "RateLimit-Reset": str(reset),
        }
        if not allowed:
            await send_problem(
                send,
                429,
                f"rate limit of {item} exceeded; retry in {reset} s",
                {**headers, "Retry-After": str(reset)},
            )
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [
                    (k.lower().encode(), v.encode()) for k, v in headers.items()
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)
