"""Service operations for operators: credit adjustments, suspension, the ledger audit."""

from __future__ import annotations

from typing import Any

from billing import operators
from billing.config import get_settings
from billing.errors import InvalidRequest
from billing.idempotency import run_once
from handlers import shapes
from handlers.context import idempotency_key


def adjust_credits(organization_id: str, body: dict[str, Any]) -> dict[str, Any]:
    org = organization_id.lower()
    key = idempotency_key()
    if not key:
        raise InvalidRequest("an Idempotency-Key header is required for a credit adjustment")
    return run_once(
        f"service:adjustCredits:{org}",
        key,
        body,
        lambda: shapes.credit_adjustment(
            operators.adjust_credits(
                org,
                amount=body["amountDecimillicents"],
                reason=body["reason"],
                idempotency_key=key,
                overdraft=get_settings().overdraft_limit_decimillicents,
            )
        ),
    )


def suspend_organization(organization_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return shapes.suspension(operators.suspend(organization_id.lower(), body["reason"]))


def unsuspend_organization(organization_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return shapes.suspension(operators.unsuspend(organization_id.lower(), body["reason"]))


def get_ledger_audit(organization_id: str) -> dict[str, Any]:
    result = operators.audit(organization_id.lower(), get_settings().overdraft_limit_decimillicents)
    return {
        "organizationId": result.organization_id,
        "sound": not result.problems,
        "problems": result.problems,
        "creditsBalanceDecimillicents": result.balance,
        "reservedCreditsDecimillicents": result.reserved,
        "entryCount": result.entries,
    }
