"""Service-to-service operations (extension): record usage, hold and settle reservations.

Authenticated by the service credential (X-Service-Token); every POST honours Idempotency-Key.
"""

from __future__ import annotations

from typing import Any

from billing import ledger, metering
from billing.config import get_settings
from billing.idempotency import run_once
from handlers import shapes
from handlers.context import idempotency_key


def _overdraft() -> int:
    return get_settings().overdraft_limit_decimillicents


def record_usage(organization_id: str, body: dict[str, Any]) -> dict[str, Any]:
    org = organization_id.lower()
    return run_once(
        f"service:recordUsage:{org}",
        idempotency_key(),
        body,
        lambda: shapes.recorded_usage(
            metering.record_usage(
                org,
                body["category"],
                body["quantity"],
                body["unitCostDecimillicents"],
                body["referenceId"],
                body.get("metadata"),
                _overdraft(),
            )
        ),
    )


def record_usage_batch(body: dict[str, Any]) -> dict[str, Any]:
    events = metering.usage_events(body["events"])
    outcomes = metering.record_usage_batch(events, _overdraft())
    return {"results": [shapes.batch_outcome(e, o) for e, o in zip(events, outcomes, strict=True)]}


def create_reservation(organization_id: str, body: dict[str, Any]) -> dict[str, Any]:
    org = organization_id.lower()
    return run_once(
        f"service:createReservation:{org}",
        idempotency_key(),
        body,
        lambda: shapes.reservation(
            ledger.reserve(
                org,
                body["amountDecimillicents"],
                reference_id=body["referenceId"],
                overdraft=_overdraft(),
            )
        ),
    )


def finalize_reservation(
    organization_id: str,
    reservation_id: str,
    body: dict[str, Any],
) -> dict[str, Any]:
    org, rid = organization_id.lower(), reservation_id.lower()
    return run_once(
        f"service:finalizeReservation:{org}:{rid}",
        idempotency_key(),
        body,
        lambda: shapes.reservation(
            ledger.finalize_reservation(
                org, rid, body["actualAmountDecimillicents"], overdraft=_overdraft()
            )
        ),
    )


def release_reservation(organization_id: str, reservation_id: str) -> dict[str, Any]:
    org, rid = organization_id.lower(), reservation_id.lower()
    return run_once(
        f"service:releaseReservation:{org}:{rid}",
        idempotency_key(),
        {},
        lambda: shapes.reservation(ledger.release_reservation(org, rid)),
    )
