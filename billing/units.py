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
# recordUsage: each factor's bound keeps quantity x unit cost within int64 (9e18 < 2**63 - 1),
# so a request the contract accepts can always be charged.
USAGE_QUANTITY_MAX = 1_000_000_000
USAGE_UNIT_COST_MAX = 9 * 10**9
# An operator's credit adjustment, either way: $1,000,000 at most, far from overflowing a balance.
ADJUSTMENT_MAX = 1_000_000 * DOLLAR


def to_stripe_cents(decimillicents: int) -> int:
    """Stripe charges whole cents; an amount that is not a whole number of cents is refused."""
    cents, remainder = divmod(decimillicents, CENT)
    if remainder:
        raise ValueError("amount must be a whole number of cents")
    return cents


def from_stripe_cents(cents: int) -> int:
    return cents * CENT
