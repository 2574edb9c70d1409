"""Configuration from environment variables, validated once at start-up.

A bad value stops the process with a message naming the variable, never a stack trace deep in a
request. Secrets are held as `SecretStr` so that printing the settings never reveals them.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Literal

from limits import parse as parse_limit
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_JWT_SECRET = "dev-only-insecure-jwt-secret-change-me-0000"
# The stripe library's longest sleep between retries (stripe._http_client.HTTPClient.MAX_DELAY).
STRIPE_MAX_RETRY_DELAY = 5


class ConfigError(RuntimeError):
    """A configuration value is missing or invalid; the message says which and why."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    database_url: str = Field(
        default="sqlite:///data/billing.sqlite3",
        description="sqlite:///path or postgresql://user@host:port/db",
    )
    db_pool_size: int = Field(default=10, ge=1, le=200)

    jwt_secret: SecretStr = SecretStr(DEV_JWT_SECRET)
    jwt_algorithm: Literal["HS256", "HS384", "HS512", "RS256", "ES256"] = "HS256"
    jwt_public_key: SecretStr | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_org_roles_claim: str | None = Field(
        default=None,
        description="A claim mapping organization ids to roles; when set, roles come from it.",
    )

    service_token: SecretStr | None = Field(
        default=None, description="Bearer credential for service-to-service operations."
    )

    stripe_secret_key: SecretStr | None = None
    stripe_webhook_secret: SecretStr | None = None
    stripe_api_base: str | None = Field(default=None, description="Override, for tests only.")
    stripe_timeout_seconds: float = Field(default=10.0, gt=0, le=80)
    stripe_max_retries: int = Field(default=2, ge=0, le=5)
    stripe_price_try_me: str = "price_try_me"
    stripe_price_pro: str = "price_pro"
    stripe_price_agency: str = "price_agency"

    billing_local_mode: bool = Field(
        default=True, description="Local billing mode when no Stripe key is configured."
    )
    bind: str = Field(default="127.0.0.1:8000", description="host:port the server binds (BIND).")
    public_base_url: str = Field(
        default="", description="Base of local session URLs; unset = the address in BIND."
    )
    payment_grace_period_days: int = Field(default=7, ge=0, le=60)
    auto_recharge_cooldown_seconds: int = Field(default=600, ge=0, le=86_400)
    auto_recharge_max_failures: int = Field(default=3, ge=1, le=20)
    auto_recharge_lease_seconds: int = Field(
        default=120,
        ge=1,
        le=3600,
        description="How long a worker's claim on an auto-recharge request lasts.",
    )
    auto_recharge_max_attempts: int = Field(
        default=8, ge=1, le=50, description="Charge attempts (retries after outages included)."
    )
    auto_recharge_retry_base_seconds: float = Field(default=30.0, ge=0, le=3600)
    auto_recharge_retry_max_seconds: float = Field(default=3600.0, ge=0, le=86_400)
    idempotency_lease_seconds: int = Field(
        default=120, ge=1, le=3600, description="How long an in-progress Idempotency-Key holds."
    )
    auto_recharge_in_process: bool = Field(
        default=True, description="In local billing mode, drain the outbox inside the app."
    )
    overdraft_limit_decimillicents: int = Field(default=0, ge=0)

    redis_url: str | None = Field(
        default=None, description="redis://host:6379/0 shares rate limits across instances."
    )
    rate_limit_enabled: bool = True
    rate_limit_principal: str = "600/minute"
    rate_limit_ip: str = "1200/minute"
    rate_limit_webhook: str = "6000/minute"
    trusted_proxy_count: int = Field(
        default=0,
        ge=0,
        le=10,
        description="Proxies in front of the app: the client is this many X-Forwarded-For "
        "entries from the right (0 = ignore the header).",
    )
    trust_forwarded_for: bool = Field(
        default=False, description="Deprecated: TRUSTED_PROXY_COUNT=1 is its safe equivalent."
    )

    response_validation: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_body_bytes: int = Field(default=1_048_576, ge=1024)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not (
            self.database_url.startswith("sqlite:///")
            or self.database_url.startswith(("postgresql://", "postgres://"))
        ):
            raise ValueError("DATABASE_URL must start with sqlite:/// or postgresql://")
        if self.jwt_algorithm.startswith("HS"):
            if len(self.jwt_secret.get_secret_value()) < 32:
                raise ValueError("JWT_SECRET must be at least 32 characters")
        elif self.jwt_public_key is None:
            raise ValueError(f"JWT_PUBLIC_KEY is required for JWT_ALGORITHM={self.jwt_algorithm}")
        if not self.public_base_url:
            self.public_base_url = base_url_for_bind(self.bind)
        elif not self.public_base_url.startswith(("http://", "https://")):
            raise ValueError("PUBLIC_BASE_URL must start with http:// or https://")
        for name in ("rate_limit_principal", "rate_limit_ip", "rate_limit_webhook"):
            try:
                parse_limit(getattr(self, name))
            except ValueError:
                raise ValueError(f"{name.upper()} must look like 600/minute") from None
        if self.trust_forwarded_for and self.trusted_proxy_count == 0:
            # The old switch trusted the leftmost (client-written) entry; keep its intent,
            # one proxy, without the bypass.
            self.trusted_proxy_count = 1
        if self.auto_recharge_retry_max_seconds < self.auto_recharge_retry_base_seconds:
            raise ValueError(
                "AUTO_RECHARGE_RETRY_MAX_SECONDS must be >= AUTO_RECHARGE_RETRY_BASE_SECONDS"
            )
        longest_call = self.longest_stripe_call_seconds
        for name in ("auto_recharge_lease_seconds", "idempotency_lease_seconds"):
            if getattr(self, name) <= longest_call:
                raise ValueError(
                    f"{name.upper()} must be longer than the longest Stripe call "
                    f"({longest_call:g}s: STRIPE_TIMEOUT_SECONDS x (STRIPE_MAX_RETRIES + 1) "
                    f"+ {STRIPE_MAX_RETRY_DELAY}s per retry), or a claim could lapse mid-call"
                )
        if self.stripe_secret_key is not None:
            if self.stripe_webhook_secret is None:
                raise ValueError("STRIPE_WEBHOOK_SECRET is required with STRIPE_SECRET_KEY")
            if self.jwt_secret.get_secret_value() == DEV_JWT_SECRET:
                raise ValueError("JWT_SECRET must be set (not the dev default) with Stripe")
        return self

    @property
    def longest_stripe_call_seconds(self) -> float:
        """How long one Stripe call can take with the library's retries: every try may wait
        the full timeout, and the library sleeps at most `STRIPE_MAX_RETRY_DELAY` between
        tries. A lease (a claim held across a call) must outlast it."""
        retries = self.stripe_max_retries
        return self.stripe_timeout_seconds * (retries + 1) + STRIPE_MAX_RETRY_DELAY * retries

    @property
    def plan_prices(self) -> dict[str, str]:
        """Plan slug -> Stripe price id; the one map both checkout and webhooks read."""
        return {
            "try_me": self.stripe_price_try_me,
            "pro": self.stripe_price_pro,
            "agency": self.stripe_price_agency,
        }

    @property
    def local_billing(self) -> bool:
        """Local billing mode: no Stripe key and local mode enabled."""
        return self.stripe_secret_key is None and self.billing_local_mode

    @property
    def cursor_key(self) -> bytes:
        """Key for signing pagination cursors, derived so it never equals the JWT secret."""
        return hashlib.sha256(b"cursor:" + self.jwt_secret.get_secret_value().encode()).digest()


def base_url_for_bind(bind: str) -> str:
    """The URL a browser on this machine uses to reach a server bound to `bind` (host:port):
    a wildcard address is reached through loopback; a Unix socket falls back to port 8000."""
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit() or host.startswith("unix"):
        return "http://127.0.0.1:8000"
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
    return f"http://{host}:{port}"


def load_settings() -> Settings:
    """Read and validate the environment; raise ConfigError with a readable message."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).upper() or 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
