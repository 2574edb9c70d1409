"""Auto-recharge: drain the outbox the ledger writes and charge the saved card off-session.

Rules: one request in flight per organization (the ledger enqueues at most one pending or
processing request, and none within the cooldown after the last one); success grants credits
once per payment; a decline is recorded and, after `auto_recharge_max_failures` consecutive
failures, auto-recharge is turned off with a reason; a 3-D Secure challenge is stored and
surfaced until the payment succeeds, fails for good, or a newer attempt supersedes it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from billing import ledger
from billing.accounts import get_account, lock_account
from billing.config import Settings
from billing.errors import UpstreamUnavailable
from billing.stripe_gateway import BillingGateway
from models import (
    AutoRechargeRequest,
    BillingAccount,
    connection,
    locked,
    utcnow,
    write_transaction,
)

log = logging.getLogger("billing.auto_recharge")


@dataclass(frozen=True)
class RequiresAction:
    attempt_id: str
    amount: int
    payment_intent_id: str
    client_secret: str


def _claim_next() -> AutoRechargeRequest | None:
    """Move the oldest pending request to `processing` (SKIP LOCKED lets workers share)."""
    with write_transaction():
        request = locked(
            AutoRechargeRequest.select()
            .where(AutoRechargeRequest.status == "pending")
            .order_by(AutoRechargeRequest.created_at)
            .limit(1),
            skip_locked=True,
        ).first()
        if request is None:
            return None
        request.status = "processing"
        request.attempts += 1
        request.updated_at = utcnow()
        request.save()
        return request


def _finish(request_id: str, status: str, **fields: object) -> None:
    AutoRechargeRequest.update(
        status=status, updated_at=utcnow(), completed_at=utcnow(), **fields
    ).where(AutoRechargeRequest.id == request_id).execute()


def _supersede_challenges(organization_id: str, keep: str) -> None:
    AutoRechargeRequest.update(status="superseded", updated_at=utcnow()).where(
        (AutoRechargeRequest.organization == organization_id)
        & (AutoRechargeRequest.status == "requires_action")
        & (AutoRechargeRequest.id != keep)
    ).execute()


def _record_failure(organization_id: str, settings: Settings) -> None:
    recent = list(
        AutoRechargeRequest.select(AutoRechargeRequest.status)
        .where(
            (AutoRechargeRequest.organization == organization_id)
            & (AutoRechargeRequest.status.in_(("succeeded", "failed")))
        )
        .order_by(AutoRechargeRequest.updated_at.desc())
        .limit(settings.auto_recharge_max_failures)
    )
    if len(recent) >= settings.auto_recharge_max_failures and all(
        r.status == "failed" for r in recent
    ):
        with write_transaction():
            account = lock_account(organization_id)
            account.auto_recharge_enabled = False
            account.auto_recharge_disabled_reason = (
                f"turned off after {len(recent)} failed charges; update the payment method"
            )
            account.save(
                only=[
                    BillingAccount.auto_recharge_enabled,
                    BillingAccount.auto_recharge_disabled_reason,
                ]
            )


def process_one(gateway: BillingGateway, settings: Settings) -> str | None:
    """Handle one pending request; returns its new status, or None when the outbox is empty."""
    request = _claim_next()
    if request is None:
        return None
    org = request.organization_id
    account = get_account(org)
    if not account.auto_recharge_enabled:
        _finish(request.id, "canceled", failure_reason="auto-recharge was turned off")
        return "canceled"
    if not (account.stripe_customer_id and account.stripe_payment_method_id):
        _finish(request.id, "failed", failure_reason="no saved payment method")
        _record_failure(org, settings)
        return "failed"
    try:
        outcome = gateway.charge_off_session(
            org,
            account.stripe_customer_id,
            account.stripe_payment_method_id,
            request.amount,
            request.id,
        )
    except UpstreamUnavailable:
        # Back to the queue; the same attempt id reuses Stripe's idempotency key.
        AutoRechargeRequest.update(status="pending", updated_at=utcnow()).where(
            AutoRechargeRequest.id == request.id
        ).execute()
        return "pending"
    _supersede_challenges(org, keep=request.id)
    if outcome.status == "succeeded":
        payment_succeeded(org, str(outcome.payment_intent_id), request.amount, request.id)
    elif outcome.status == "requires_action":
        AutoRechargeRequest.update(
            status="requires_action",
            stripe_payment_intent_id=outcome.payment_intent_id,
            client_secret=outcome.client_secret,
            updated_at=utcnow(),
        ).where(AutoRechargeRequest.id == request.id).execute()
    else:
        _finish(
            request.id,
            "failed",
            failure_reason=outcome.failure_reason,
            stripe_payment_intent_id=outcome.payment_intent_id,
        )
        _record_failure(org, settings)
    return outcome.status


def drain(gateway: BillingGateway, settings: Settings, limit: int = 100) -> int:
    handled = 0
    while handled < limit and process_one(gateway, settings) is not None:
        handled += 1
    return handled


def _attempt_for(organization_id: str, payment_intent_id: str, attempt_id: str | None):
    condition = AutoRechargeRequest.organization == organization_id
    if attempt_id:
        return AutoRechargeRequest.get_or_none(condition & (AutoRechargeRequest.id == attempt_id))
    return AutoRechargeRequest.get_or_none(
        condition & (AutoRechargeRequest.stripe_payment_intent_id == payment_intent_id)
    )


def payment_succeeded(
    organization_id: str, payment_intent_id: str, amount: int, attempt_id: str | None
) -> str:
    """Grant the recharge once per payment (worker and webhook may both report it)."""
    result = ledger.grant(
        organization_id,
        amount,
        "recharge",
        "auto-recharge",
        payment_intent_id,
        f"recharge:{payment_intent_id}",
    )
    attempt = _attempt_for(organization_id, payment_intent_id, attempt_id)
    if attempt is not None and attempt.status != "succeeded":
        _finish(
            attempt.id, "succeeded", stripe_payment_intent_id=payment_intent_id, client_secret=None
        )
    return "recharge already granted" if result.replayed else "recharge granted"


def payment_failed(
    organization_id: str, payment_intent_id: str, reason: str, *, attempt_id: str | None = None
) -> str:
    attempt = _attempt_for(organization_id, payment_intent_id, attempt_id)
    if attempt is None or attempt.status in ("succeeded", "failed"):
        return "auto-recharge failure already recorded"
    _finish(attempt.id, "failed", failure_reason=reason[:500], client_secret=None)
    return "auto-recharge failed"


def payment_requires_action(
    organization_id: str,
    payment_intent_id: str,
    client_secret: str | None,
    *,
    attempt_id: str | None = None,
) -> str:
    attempt = _attempt_for(organization_id, payment_intent_id, attempt_id)
    if attempt is None or attempt.status not in ("processing", "requires_action"):
        return "ignored"
    AutoRechargeRequest.update(
        status="requires_action", client_secret=client_secret, updated_at=utcnow()
    ).where(AutoRechargeRequest.id == attempt.id).execute()
    return "auto-recharge requires action"


def remember_payment_method(organization_id: str, payment_method_id: str) -> None:
    """A successful payment's card becomes the one auto-recharge uses, if none is saved."""
    BillingAccount.update(stripe_payment_method_id=payment_method_id).where(
        (BillingAccount.organization == organization_id)
        & (BillingAccount.stripe_payment_method_id.is_null())
    ).execute()


def pending_action(organization_id: str) -> RequiresAction | None:
    attempt = (
        AutoRechargeRequest.select()
        .where(
            (AutoRechargeRequest.organization == organization_id)
            & (AutoRechargeRequest.status == "requires_action")
        )
        .order_by(AutoRechargeRequest.updated_at.desc())
        .first()
    )
    if attempt is None or not attempt.stripe_payment_intent_id or not attempt.client_secret:
        return None
    return RequiresAction(
        attempt.id, attempt.amount, attempt.stripe_payment_intent_id, attempt.client_secret
    )


def run_worker(
    stop: threading.Event, gateway: BillingGateway, settings: Settings, poll_seconds: float
) -> None:
    """Drain the outbox until `stop` is set: the worker process's loop, and the in-process
    worker the app runs in local billing mode."""
    while not stop.is_set():
        try:
            with connection():
                drain(gateway, settings)
        except Exception:  # keep the loop alive; the error is logged with its type
            log.exception("auto-recharge drain failed")
        stop.wait(poll_seconds)
