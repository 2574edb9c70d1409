"""Organizations and their members: created by the admin script and by tests."""

from __future__ import annotations

import uuid

from billing.auth import Role
from billing.errors import InvalidRequest
from models import BillingAccount, Membership, Organization, database


def create_organization(name: str, organization_id: str | None = None) -> Organization:
    """An organization together with its (empty) billing account."""
    org_id = str(uuid.UUID(organization_id)) if organization_id else str(uuid.uuid4())
    with database.atomic():
        org = Organization.create(id=org_id, name=name)
        BillingAccount.create(organization=org)
    return org


def add_member(organization_id: str, user_id: str, role: str, email: str | None = None) -> None:
    """Add or change a member's role (idempotent for the same user)."""
    if role not in Role.__members__:
        raise InvalidRequest(f"role must be one of {', '.join(Role.__members__)}")
    with database.atomic():
        existing = Membership.get_or_none(
            (Membership.organization == organization_id) & (Membership.user_id == user_id)
        )
        if existing is None:
            Membership.create(organization=organization_id, user_id=user_id, role=role, email=email)
        else:
            existing.role = role
            existing.email = email or existing.email
            existing.save()
