"""Money units and bounds. All money is an integer count of decimillicents: no floats, ever."""

from __future__ import annotations

DOLLAR = 10_000_000
CENT = 100_000
INT64_MAX = 2**63 - 1

TOP_UP_MIN = CENT
TOP_UP_MAX = 500 * DOLLAR
AUTO_RECHARGE_THRESHOLD_MIN = 1
AUTO_RECHARGE_THRESHOLD_MAX = 500 * DOLLAR
AUTO_RECHARGE_AMOUNT_MIN = CENT
AUTO_RECHARGE_AMOUNT_MAX = 500 * DOLLAR


def to_stripe_cents(decimillicents: int) -> int:
    """Stripe charges whole cents; an amount that is not a whole number of cents is refused."""
    cents, remainder = divmod(decimillicents, CENT)
    if remainder:
        raise ValueError("amount must be a whole number of cents")
    return cents


def from_stripe_cents(cents: int) -> int:
    return cents * CENT
