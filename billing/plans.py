"""Plans and subscription statuses."""

from __future__ import annotations

from dataclasses import dataclass

from billing.units import DOLLAR
from models.kinds import SubscriptionStatus


@dataclass(frozen=True)
class Plan:
    slug: str
    monthly_price: int
    welcome_credit: int


PLANS: dict[str, Plan] = {
    "try_me": Plan("try_me", 9 * DOLLAR, 9 * DOLLAR),
    "pro": Plan("pro", 20 * DOLLAR, 20 * DOLLAR),
    "agency": Plan("agency", 45 * DOLLAR, 45 * DOLLAR),
}

SUBSCRIPTION_STATUSES = tuple(SubscriptionStatus)
ACCESS_STATUSES = frozenset(
    {SubscriptionStatus.active, SubscriptionStatus.trialing, SubscriptionStatus.past_due}
)


# A subscription in these states still exists at Stripe and bills (or resumes billing): a
# second one would charge twice. Only canceled (or never started) leaves room for a new one.
LIVE_STATUSES = ACCESS_STATUSES | {SubscriptionStatus.unpaid, SubscriptionStatus.paused}


def is_subscribed(status: str) -> bool:
    """Statuses that give access: a past_due customer keeps access during dunning."""
    return status in ACCESS_STATUSES
