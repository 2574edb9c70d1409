"""Rate limits per principal and per client IP, answered with a 429 problem.

Built on `limits` (fixed windows): shared across workers and instances when REDIS_URL is set,
in-memory per worker otherwise. The principal is who the credential verifiably is: a bearer
caller by its token's subject (however the header is spelled: `Bearer`, `bearer`, extra
spaces; a fresh token for the same user shares the budget), the service by its credential. A
credential that does not verify is counted against the client address, so cycling garbage
tokens buys nothing; the per-IP limit bounds everyone.

The client address is the connection's peer, or, behind `TRUSTED_PROXY_COUNT` proxies, the
entry that many places from the right of X-Forwarded-For: entries to its left were written by
the client and are not trusted. The webhook endpoint has its own, higher per-IP limit. If the
limiter's storage is down the request is let through and the error is logged: rate limiting
must not take billing down with it.
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

from billing.auth import verify_service_token, verify_user_token
from billing.config import Settings
from billing.errors import Unauthenticated
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
        self.trusted_proxy_count = settings.trusted_proxy_count
        self.settings = settings

    def _client_ip(self, scope: Scope) -> str:
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        if not self.trusted_proxy_count:
            return peer
        # Several X-Forwarded-For lines are one list, in order.
        entries = [
            entry.strip()
            for name, value in scope["headers"]
            if name == b"x-forwarded-for"
            for entry in value.decode("latin-1").split(",")
        ]
        if len(entries) < self.trusted_proxy_count:
            return peer  # it did not come through every proxy: only the peer is known
        return entries[-self.trusted_proxy_count] or peer

    def _principal(self, headers: dict[bytes, bytes], ip: str) -> str | None:
        """`user:<subject>`, `service`, `unverified:<ip>`, or None without a credential."""
        authorization = headers.get(b"authorization")
        service = headers.get(b"x-service-token")
        try:
            if authorization is not None:
                parts = authorization.decode("latin-1").split(None, 1)
                if len(parts) != 2 or parts[0].lower() != "bearer":
                    raise Unauthenticated("not a bearer credential")
                user = verify_user_token(parts[1].strip(), self.settings)
                return "user:" + hashlib.sha256(user.user_id.encode()).hexdigest()[:32]
            if service is not None:
                verify_service_token(service.decode("latin-1"), self.settings)
                return "service"
        except (Unauthenticated, UnicodeDecodeError, ValueError):
            return f"unverified:{ip}"
        return None

    def _checks(self, scope: Scope) -> list[tuple[RateLimitItem, str]]:
        # A repeated header counts by its first value, the one the request is authenticated
        # with (dict() kept the last: `Authorization: Bearer junk` after a spent caller's own
        # token moved it to a fresh, per-address budget).
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)
        ip = self._client_ip(scope)
        if scope["path"] == WEBHOOK_PATH:
            return [(self.webhook_limit, f"webhook:{ip}")]
        checks = [(self.ip_limit, f"ip:{ip}")]
        principal = self._principal(headers, ip)
        if principal is not None:
            checks.append((self.principal_limit, f"principal:{principal}"))
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
