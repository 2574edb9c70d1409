"""Connexion security callbacks: they only turn credentials into a principal (billing.auth)."""

from __future__ import annotations

from typing import Any

from connexion.exceptions import OAuthProblem

from billing import auth
from billing.config import get_settings
from billing.errors import Unauthenticated


def user_from_bearer(token: str) -> dict[str, Any]:
    try:
        user = auth.verify_user_token(token, get_settings())
    except Unauthenticated as exc:
        raise OAuthProblem(detail=exc.detail) from None
    return {"sub": user.user_id, "user": user}


def service_from_token(token: str, required_scopes: Any = None) -> dict[str, Any]:
    try:
        service = auth.verify_service_token(token, get_settings())
    except Unauthenticated as exc:
        raise OAuthProblem(detail=exc.detail) from None
    return {"sub": service.name, "service": service}


def stripe_signature_present(value: str, required_scopes: Any = None) -> dict[str, Any]:
    """Presence only: the signature is checked against the raw body by the webhook service."""
    return {"sub": "stripe", "signature": value}
