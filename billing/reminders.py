"""The no-cap reminder: a personal preference of one user in one organization."""

from __future__ import annotations

import peewee

from models import ReminderDismissal, database


def is_dismissed(organization_id: str, user_id: str) -> bool:
    return (
        ReminderDismissal.select()
        .where(
            (ReminderDismissal.organization == organization_id)
            & (ReminderDismissal.user_id == user_id)
        )
        .exists()
    )


def dismiss(organization_id: str, user_id: str) -> bool:
    """Record the dismissal once; repeating it (even concurrently) changes nothing."""
    try:
        with database.atomic():
            ReminderDismissal.create(organization=organization_id, user_id=user_id)
    except peewee.IntegrityError:
        pass
    return True
