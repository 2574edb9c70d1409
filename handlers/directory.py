"""Service operations for the platform's directory: organizations and members (PUT/DELETE)."""

from __future__ import annotations

from typing import Any

from billing import directory
from handlers import shapes


def put_organization(organization_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return shapes.organization(directory.put_organization(organization_id, body["name"]))


def put_member(organization_id: str, user_id: str, body: dict[str, Any]) -> dict[str, Any]:
    member = directory.put_member(organization_id, user_id, body["role"], body.get("email"))
    return shapes.member(member)


def remove_member(organization_id: str, user_id: str) -> dict[str, Any]:
    removal = directory.remove_member(organization_id, user_id)
    return {
        "organizationId": removal.organization_id,
        "userId": removal.user_id,
        "removed": removal.removed,
    }
