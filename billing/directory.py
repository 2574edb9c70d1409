"""The platform's directory: organizations and their members, kept in step by the platform.

Every call says what the state should be (PUT semantics), so repeating one changes nothing and
concurrent repeats cannot conflict: rows are upserted on their natural keys (the organization
id; the organization and user id of a membership).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from billing.accounts import EMAIL
from billing.auth import Role
from billing.errors import InvalidRequest, NotFound
from models import BillingAccount, Membership, Organization, database

MAX_NAME = 200
# Names and reasons: one line of text, not blank, no control characters (PostgreSQL refuses
# NUL). The contract states the same pattern.
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
_TEXT = re.compile(TEXT_PATTERN)
# A member's user id, as the contract's UserId parameter states it (printable ASCII, no '/').
USER_ID_PATTERN = r"^[\x21-\x2e\x30-\x7e]{1,255}$"
_USER_ID = re.compile(USER_ID_PATTERN)
MAX_EMAIL = 254


def clean_text(name: str, value: object, max_length: int) -> str:
    """A one-line text field, stripped; InvalidRequest when it breaks the contract's rule."""
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= max_length
        or not _TEXT.fullmatch(value)
    ):
        raise InvalidRequest(
            f"{name} must be 1 to {max_length} characters of one-line text, not blank"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{name} is not valid Unicode text") from None
    return value.strip()


@dataclass(frozen=True)
class MemberRemoval:
    organization_id: str
    user_id: str
    removed: bool


def canonical_id(organization_id: str) -> str:
    try:
        return str(uuid.UUID(organization_id))
    except (ValueError, AttributeError, TypeError):
        raise InvalidRequest("organizationId must be a UUID") from None


def _user_id(user_id: object) -> str:
    """The contract's rule, checked here too: `scripts.admin` reaches this service without the
    HTTP layer (PostgreSQL refused a NUL or an over-long id with a crash)."""
    if not isinstance(user_id, str) or not _USER_ID.fullmatch(user_id):
        raise InvalidRequest("userId must be 1 to 255 printable ASCII characters, without '/'")
    return user_id


def _email(email: object) -> str | None:
    if email is not None and (
        not isinstance(email, str) or len(email) > MAX_EMAIL or not EMAIL.fullmatch(email)
    ):
        raise InvalidRequest("email must be an ASCII email address")
    return email


def _existing(organization_id: str) -> Organization:
    organization = Organization.get_or_none(Organization.id == organization_id)
    if organization is None:
        raise NotFound("organization not found")
    return organization


def put_organization(organization_id: str, name: str) -> Organization:
    """Create the organization (and its empty billing account) or rename it."""
    org_id = canonical_id(organization_id)
    name = clean_text("name", name, MAX_NAME)
    with database.atomic():
        Organization.insert(id=org_id, name=name).on_conflict(
            conflict_target=[Organization.id], update={Organization.name: name}
        ).execute()
        BillingAccount.insert(organization=org_id).on_conflict_ignore().execute()
        return Organization.get_by_id(org_id)


def put_member(
    organization_id: str, user_id: str, role: str, email: str | None = None
) -> Membership:
    """Add the user with `role`, or change their role (and email, when one is given)."""
    if role not in Role.__members__:
        raise InvalidRequest(f"role must be one of {', '.join(Role.__members__)}")
    org_id = canonical_id(organization_id)
    user_id, email = _user_id(user_id), _email(email)
    with database.atomic():
        _existing(org_id)
        update: dict[object, object] = {Membership.role: role}
        if email is not None:
            update[Membership.email] = email
        Membership.insert(organization=org_id, user_id=user_id, role=role, email=email).on_conflict(
            conflict_target=[Membership.organization, Membership.user_id], update=update
        ).execute()
        return Membership.get((Membership.organization == org_id) & (Membership.user_id == user_id))


def remove_member(organization_id: str, user_id: str) -> MemberRemoval:
    """Remove the user from the organization; removing a non-member is a no-op, not an error."""
    org_id = canonical_id(organization_id)
    user_id = _user_id(user_id)
    with database.atomic():
        _existing(org_id)
        removed = (
            Membership.delete()
            .where((Membership.organization == org_id) & (Membership.user_id == user_id))
            .execute()
        )
    return MemberRemoval(org_id, user_id, bool(removed))
