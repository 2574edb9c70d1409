"""Who is calling: bearer JWTs for users, a shared credential for other services, and roles.

The JWT algorithm is pinned by configuration, so `alg: none` and algorithm-confusion tokens
are refused by PyJWT itself. The service credential is a separate scheme (X-Service-Token),
so a user token never reaches service operations and the service credential never acts as a
user. Roles come from our own membership table (kept by the platform's directory sync), or,
when JWT_ORG_ROLES_CLAIM names a claim, from that claim alone: an object mapping organization
ids to roles, for identity providers that put organization roles in the token. Either way an
organization the caller does not belong to is reported exactly like one that does not exist.
"""

from __future__ import annotations

import hmac
import time
import uuid
from dataclasses import dataclass
from enum import IntEnum

import jwt

from billing.config import Settings
from billing.errors import Forbidden, NotFound, Unauthenticated
from models import Membership, Organization
from models.prepared import PreparedSelect


class Role(IntEnum):
    member = 1
    admin = 2
    owner = 3


@dataclass(frozen=True)
class User:
    user_id: str
    email: str | None
    # (organization id, role) pairs from the configured claim; None = roles from memberships.
    org_roles: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class Service:
    """Another part of the platform, calling with the service credential."""

    name: str = "service"


def verify_user_token(token: str, settings: Settings) -> User:
    """Decode and check a user's JWT: signature, algorithm, expiry, and the claims we need."""
    key = (
        settings.jwt_secret.get_secret_value()
        if settings.jwt_algorithm.startswith("HS")
        else settings.jwt_public_key.get_secret_value()  # type: ignore[union-attr]
    )
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[settings.jwt_algorithm],
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            options={"require": ["exp", "sub"], "verify_aud": settings.jwt_audience is not None},
            leeway=30,
        )
    except jwt.PyJWTError as exc:
        raise Unauthenticated(f"invalid bearer token: {_token_fault(exc)}") from None
    sub = claims.get("sub")
    # A NUL is no one's id, and PostgreSQL refuses it in a query (the membership read was a 500).
    if not isinstance(sub, str) or not sub or len(sub) > 255 or "\x00" in sub:
        raise Unauthenticated("invalid bearer token: bad subject")
    email = claims.get("email")
    if isinstance(email, str) and "\x00" in email:
        email = None
    org_roles = None
    if settings.jwt_org_roles_claim is not None:
        org_roles = _org_roles(claims.get(settings.jwt_org_roles_claim))
    return User(user_id=sub, email=email if isinstance(email, str) else None, org_roles=org_roles)


def _org_roles(raw: object) -> tuple[tuple[str, str], ...]:
    """The claim's organization roles; no claim means no organization. Entries that are not
    a UUID naming a known role are ignored (an identity provider may list other kinds)."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise Unauthenticated("invalid bearer token: the organization roles claim is not an object")
    roles = []
    for org, role in raw.items():
        try:
            org_id = str(uuid.UUID(str(org)))
        except ValueError:
            continue
        if isinstance(role, str) and role in Role.__members__:
            roles.append((org_id, role))
    return tuple(roles)


def _token_fault(exc: jwt.PyJWTError) -> str:
    """What is wrong with a token, in words (never the library's class names)."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "it has expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "it is not valid yet"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "wrong audience"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the {exc.claim} claim is missing"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "the signing algorithm is not accepted"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "the signature does not verify"
    return "it is malformed"


def verify_service_token(token: str, settings: Settings) -> Service:
    """Constant-time check of the service credential; unset means service calls are off."""
    expected = settings.service_token
    if expected is None or not hmac.compare_digest(
        token.encode(), expected.get_secret_value().encode()
    ):
        raise Unauthenticated("invalid service credential")
    return Service()


# The membership every user request checks, rendered once.
_MEMBERSHIP = PreparedSelect(
    Membership, lambda: (Membership.organization == "") & (Membership.user_id == "")
)


def require_role(organization_id: str, principal: User, minimum: Role) -> str:
    """The organization's canonical (lower-case) id, if the caller holds at least `minimum`.

    Not a member (or no such organization) is NotFound, so ids cannot be probed; a member
    without the role is Forbidden.
    """
    organization_id = organization_id.lower()
    if principal.org_roles is not None:
        role_name = dict(principal.org_roles).get(organization_id)
        if (
            role_name is None
            or not Organization.select().where(Organization.id == organization_id).exists()
        ):
            raise NotFound("organization not found")
        role = Role[role_name]
    else:
        membership = _MEMBERSHIP.first(organization_id, principal.user_id)
        if membership is None:
            raise NotFound("organization not found")
        role = Role[membership.role]
    if role < minimum:
        raise Forbidden(f"this action needs the {minimum.name} role or higher")
    return organization_id


def mint_user_token(
    user_id: str, settings: Settings, email: str | None = None, ttl_seconds: int = 3600
) -> str:
    """A user JWT signed with the configured HS secret: for the dev script and tests."""
    if not settings.jwt_algorithm.startswith("HS"):
        raise ValueError("minting needs an HS* algorithm; asymmetric keys are issued elsewhere")
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id, "iat": now, "exp": now + ttl_seconds}
    if email:
        claims["email"] = email
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    return jwt.encode(
        claims, settings.jwt_secret.get_secret_value(), algorithm=settings.jwt_algorithm
    )
