"""Ledger rules run as a use case runs them, one unit of work each, for tests that exercise a
rule on its own: `units.debit(org_id, 5)` is `with locked_account(org_id) as account:
ledger.debit(account, 5)`. (The rules take the locked account; the entry point opens the unit.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from billing import ledger
from billing.accounts import locked_account

T = TypeVar("T")


def _one_unit(rule: Callable[..., T]) -> Callable[..., T]:
    def run(organization_id: str, *args: Any, **kwargs: Any) -> T:
        with locked_account(organization_id) as account:
            return rule(account, *args, **kwargs)

    run.__doc__ = f"`ledger.{rule.__name__}` in a unit of work of its own."
    return run


grant = _one_unit(ledger.grant)
debit = _one_unit(ledger.debit)
take_back = _one_unit(ledger.take_back)
adjust = _one_unit(ledger.adjust)
credit_payment = _one_unit(ledger.credit_payment)
reverse_payment = _one_unit(ledger.reverse_payment)
payment_on_record = _one_unit(ledger.payment_on_record)
