"""The one source of "now" for every timestamp and every rule that depends on time (usage
periods and caps, grace periods, cooldowns, leases).

Production reads the system clock. Tests replace it (`use_clock`) to stand on a month boundary
or step past a lease on purpose, instead of depending on when the suite happens to run.
Timestamps are naive UTC, the form every timestamp column stores.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Clock = Callable[[], dt.datetime]


def system_clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


_clock: Clock = system_clock


def utcnow() -> dt.datetime:
    """Now, in naive UTC, from the installed clock."""
    return _clock()


@contextmanager
def use_clock(clock: Clock) -> Iterator[None]:
    """Read time from `clock` inside the block (every thread: the app's workers too)."""
    global _clock
    previous, _clock = _clock, clock
    try:
        yield
    finally:
        _clock = previous
