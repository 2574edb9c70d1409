"""Auto-recharge: drain the outbox the ledger writes and charge the saved card off-session.

Rules (the enqueue policy lives in `billing.recharge_policy`):
- a claim is a lease: `_claim_next` moves the request that is due first (by
  `next_attempt_at`, so one organization's retries never starve another's) to `processing`
  with `lease_expires_at`; a request whose lease ran out (its worker died) is claimable
  again by any worker, up to `AUTO_RECHARGE_MAX_ATTEMPTS` claims in all;
- every claim of one request charges with the same Stripe idempotency key
  (`auto-recharge:{attempt_id}`) and the same card (pinned at its first charge), and the
  attempt id is in the PaymentIntent's metadata before the call, so webhooks can settle the
  attempt by its id even when the worker died before it learned the PaymentIntent id; a claim
  after the first looks for that PaymentIntent before it charges and settles by it if found
  (the key alone does not protect a retry: Stripe forgets keys after 24 hours and refuses one
  reused with other parameters), so a takeover or a retry never charges twice;
- a worker writes an outcome only while it still owns its claim (status `processing` and
  the claim number it took), so a worker that lost its lease cannot overwrite a newer state;
- success grants credits once per payment; a decline or a permanent refusal fails the
  attempt with a reason and counts toward turning auto-recharge off; an outage (5xx,
  timeout, 429, connection) puts the request back with exponential backoff and jitter, and
  fails it (uncounted) once the attempts are spent;
- a 3-D Secure challenge is stored and surfaced until the payment succeeds, fails for good,
  or a newer attempt supersedes it.
No database transaction or lock is held while Stripe is called. Each outcome the worker writes
is one unit of work on the organization's account (`locked_account`); the outcomes a webhook
reports (`payment_succeeded`, `payment_failed`, `payment_requires_action`) take the account
the webhook's unit of work locked.
"""

from __future__ import annotations

import calendar
import datetime as dt
import logging
import random
import threading
from dataclasses import dataclass
from typing import Any

from billing import ledger, recharge_policy
from billing.accounts import get_account, locked_account
from billing.config import Settings
from billing.errors import UpstreamUnavailable
from billing.recharge_policy import IN_FLIGHT, SETTLED, AttemptStatus, FailureKind
from billing.stripe_gateway import BillingGateway
from models import (
    AutoRechargeRequest,
    BillingAccount,
    PaymentKind,
    connection,
    locked,
    utcnow,
    write_transaction,
)

log = logging.getLogger("billing.auto_recharge")

# A retry looks for an earlier claim's PaymentIntent created since the attempt was, less this
# (clocks of ours and Stripe's may differ).
LOOKUP_MARGIN_SECONDS = 300


@dataclass(frozen=True)
class RequiresAction:
    attempt_id: str
    amount: int
    payment_intent_id: str
    client_secret: str


def _due(now: dt.datetime) -> Any:
    return (
        (AutoRechargeRequest.status == AttemptStatus.pending)
        & (AutoRechargeRequest.next_attempt_at <= now)
    ) | (
        (AutoRechargeRequest.status == AttemptStatus.processing)
        & (
            AutoRechargeRequest.lease_expires_at.is_null()
            | (AutoRechargeRequest.lease_expires_at <= now)
        )
    )


def _claim_next(settings: Settings) -> AutoRechargeRequest | None:
    """Lease the request due first (SKIP LOCKED lets workers share the queue)."""
    now = utcnow()
    with write_transaction():
        request = locked(
            AutoRechargeRequest.select()
            .where(_due(now))
            .order_by(AutoRechargeRequest.next_attempt_at, AutoRechargeRequest.created_at)
            .limit(1),
            skip_locked=True,
        ).first()
        if request is None:
            return None
        request.status = AttemptStatus.processing
        request.attempts += 1
        request.lease_expires_at = now + dt.timedelta(seconds=settings.auto_recharge_lease_seconds)
        request.updated_at = now
        request.save()
        return request


def _owned(request: AutoRechargeRequest) -> Any:
    """Still this worker's claim: processing, with the claim number it took."""
    return (
        (AutoRechargeRequest.id == request.id)
        & (AutoRechargeRequest.status == AttemptStatus.processing)
        & (AutoRechargeRequest.attempts == request.attempts)
    )


def _settle(
    account: BillingAccount,
    condition: Any,
    attempt: AutoRechargeRequest,
    status: AttemptStatus,
    **fields: object,
) -> bool:
    """Move an attempt out of flight (if `condition` still holds) and free the organization's
    in-flight slot, on the organization's locked account.

    The account row is locked first, as every other writer does (a webhook's grant, the
    enqueue policy): locking the attempt first deadlocked with the webhook reporting the
    same payment on PostgreSQL."""
    now = utcnow()
    done = {"completed_at": now} if status in SETTLED else {}
    changed = (
        AutoRechargeRequest.update(
            status=status, updated_at=now, lease_expires_at=None, **done, **fields
        )
        .where(condition)
        .execute()
    )
    if changed:
        recharge_policy.release_in_flight(account, attempt.id)
    return bool(changed)


def _unsettled(attempt: AutoRechargeRequest) -> Any:
    return (AutoRechargeRequest.id == attempt.id) & AutoRechargeRequest.status.not_in(SETTLED)


def _backoff(settings: Settings, attempts: int) -> float:
    """Exponential and capped, then jittered to 50-100% of it (spreads a herd of retries)."""
    ceiling = min(
        settings.auto_recharge_retry_max_seconds,
        settings.auto_recharge_retry_base_seconds * 2 ** max(0, attempts - 1),
    )
    return ceiling * random.uniform(0.5, 1.0)


def _retry_later(request: AutoRechargeRequest, settings: Settings) -> str:
    if request.attempts >= settings.auto_recharge_max_attempts:
        with locked_account(request.organization_id) as account:
            _settle(
                account,
                _owned(request),
                request,
                AttemptStatus.failed,
                failure_kind=FailureKind.transient,
                failure_reason=(
                    f"the payment provider was unavailable for {request.attempts} attempts"
                ),
            )
        return AttemptStatus.failed
    due = utcnow() + dt.timedelta(seconds=_backoff(settings, request.attempts))
    with write_transaction():  # survives a connection the server ended during the call
        AutoRechargeRequest.update(
            status=AttemptStatus.pending,
            next_attempt_at=due,
            lease_expires_at=None,
            updated_at=utcnow(),
            failure_reason="the payment provider was unavailable; retrying",
        ).where(_owned(request)).execute()
    return AttemptStatus.pending


def _fail(
    account: BillingAccount,
    condition: Any,
    attempt: AutoRechargeRequest,
    kind: FailureKind,
    reason: str,
    **fields: object,
) -> bool:
    """Settle the attempt as failed on the locked account; a counted failure counts."""
    failed = _settle(
        account,
        condition,
        attempt,
        AttemptStatus.failed,
        failure_kind=kind,
        failure_reason=reason[:500],
        client_secret=None,
        **fields,
    )
    if failed and kind in recharge_policy.COUNTED_FAILURES:
        recharge_policy.count_failure(account)
    return failed


def process_one(gateway: BillingGateway, settings: Settings) -> str | None:
    """Handle one due request; returns its new status, or None when nothing is due."""
    request = _claim_next(settings)
    if request is None:
        return None
    org = request.organization_id
    if request.attempts > settings.auto_recharge_max_attempts:
        # Claimed again and again without an outcome (its workers keep dying): stop here; a
        # payment that did go through is still granted by its webhook.
        return _retry_later(request, settings)
    snapshot = get_account(org)  # unlocked: no lock is held across the charge
    if not snapshot.auto_recharge_enabled:
        with locked_account(org) as account:
            _settle(
                account,
                _owned(request),
                request,
                AttemptStatus.canceled,
                failure_reason="auto-recharge was turned off",
            )
        return AttemptStatus.canceled
    if not (snapshot.stripe_customer_id and snapshot.stripe_payment_method_id):
        with locked_account(org) as account:
            _fail(
                account, _owned(request), request, FailureKind.permanent, "no saved payment method"
            )
        return AttemptStatus.failed
    try:
        outcome = None
        if request.attempts > 1:  # an earlier claim may have charged: look before charging
            outcome = gateway.find_attempt_charge(
                snapshot.stripe_customer_id,
                request.id,
                calendar.timegm(request.created_at.timetuple()) - LOOKUP_MARGIN_SECONDS,
            )
        if outcome is None:
            outcome = gateway.charge_off_session(
                org,
                snapshot.stripe_customer_id,
                _pinned_card(request, snapshot.stripe_payment_method_id),
                request.amount,
                request.id,
            )
    except UpstreamUnavailable:
        return _retry_later(request, settings)
    with locked_account(org) as account:  # the outcome: one unit of work
        _supersede_challenges(org, keep=request.id)
        if outcome.status == "succeeded":
            payment_succeeded(account, str(outcome.payment_intent_id), request.amount, request.id)
        elif outcome.status == "requires_action":
            _settle(
                account,
                _owned(request),
                request,
                AttemptStatus.requires_action,
                stripe_payment_intent_id=outcome.payment_intent_id,
                client_secret=outcome.client_secret,
            )
        else:
            kind = FailureKind(outcome.failure_kind or FailureKind.declined)
            _fail(
                account,
                _owned(request),
                request,
                kind,
                outcome.failure_reason or "the charge failed",
                stripe_payment_intent_id=outcome.payment_intent_id,
            )
    return outcome.status


def _pinned_card(request: AutoRechargeRequest, saved: str) -> str:
    """The card this attempt charges: the one saved when it was first charged.

    Every claim repeats the same Stripe request (same idempotency key), and Stripe refuses a
    key reused with other parameters. Were a retry to take a card saved since (during an
    outage's backoff), it would be refused until the attempts ran out, and, had the lost
    first answer been a success, a fresh key would charge the customer twice. The first
    claim to charge pins the card; a takeover reads what it pinned."""
    if request.stripe_payment_method_id:
        return request.stripe_payment_method_id
    AutoRechargeRequest.update(stripe_payment_method_id=saved).where(
        (AutoRechargeRequest.id == request.id)
        & AutoRechargeRequest.stripe_payment_method_id.is_null()
    ).execute()
    pinned = (
        AutoRechargeRequest.select(AutoRechargeRequest.stripe_payment_method_id)
        .where(AutoRechargeRequest.id == request.id)
        .scalar()
    )
    return str(pinned)


def _supersede_challenges(organization_id: str, keep: str) -> None:
    AutoRechargeRequest.update(status=AttemptStatus.superseded, updated_at=utcnow()).where(
        (AutoRechargeRequest.organization == organization_id)
        & (AutoRechargeRequest.status == AttemptStatus.requires_action)
        & (AutoRechargeRequest.id != keep)
    ).execute()


def drain(
    gateway: BillingGateway,
    settings: Settings,
    limit: int = 100,
    stop: threading.Event | None = None,
) -> int:
    """Handle due requests one by one; a set `stop` ends it between charges, never inside one."""
    handled = 0
    while handled < limit and not (stop is not None and stop.is_set()):
        if process_one(gateway, settings) is None:
            break
        handled += 1
    return handled


def _attempt_for(
    organization_id: str, payment_intent_id: str, attempt_id: str | None
) -> AutoRechargeRequest | None:
    """The attempt a PaymentIntent reports on: by the attempt id in its metadata (known
    before the charge, so it finds attempts whose worker died before recording the
    PaymentIntent id), else by the PaymentIntent id."""
    condition = AutoRechargeRequest.organization == organization_id
    if attempt_id:
        found = AutoRechargeRequest.get_or_none(condition & (AutoRechargeRequest.id == attempt_id))
        if found is not None:
            return found
    return AutoRechargeRequest.get_or_none(
        condition & (AutoRechargeRequest.stripe_payment_intent_id == payment_intent_id)
    )


def payment_succeeded(
    account: BillingAccount, payment_intent_id: str, amount: int, attempt_id: str | None
) -> str:
    """Grant the recharge once per payment (worker and webhook may both report it), on the
    organization's locked account. Recorded as a Stripe payment like a top-up, so a refund or
    dispute Stripe reported before this success is taken back right after the grant."""
    organization_id = account.organization_id
    result = ledger.credit_payment(
        account,
        payment_intent_id,
        kind=PaymentKind.auto_recharge,
        ordered=amount,
        grant_amount=amount,
    )
    attempt = _attempt_for(organization_id, payment_intent_id, attempt_id)
    if attempt is not None and attempt.status != AttemptStatus.succeeded:
        _settle(
            account,
            (AutoRechargeRequest.id == attempt.id)
            & (AutoRechargeRequest.status != AttemptStatus.succeeded),
            attempt,
            AttemptStatus.succeeded,
            stripe_payment_intent_id=payment_intent_id,
            client_secret=None,
            failure_reason=None,
        )
        recharge_policy.reset_failures(account)
    return "recharge granted" if result.granted_now else "recharge already granted"


def payment_failed(
    account: BillingAccount, payment_intent_id: str, reason: str, *, attempt_id: str | None = None
) -> str:
    attempt = _attempt_for(account.organization_id, payment_intent_id, attempt_id)
    if attempt is None or attempt.status in SETTLED:
        return "auto-recharge failure already recorded"
    _fail(
        account,
        _unsettled(attempt),
        attempt,
        FailureKind.declined,
        f"the payment failed: {reason}",
        stripe_payment_intent_id=payment_intent_id,
    )
    return "auto-recharge failed"


def payment_requires_action(
    account: BillingAccount,
    payment_intent_id: str,
    client_secret: str | None,
    *,
    attempt_id: str | None = None,
) -> str:
    attempt = _attempt_for(account.organization_id, payment_intent_id, attempt_id)
    if attempt is None or attempt.status not in (*IN_FLIGHT, AttemptStatus.requires_action):
        return "ignored"
    _settle(
        account,
        (AutoRechargeRequest.id == attempt.id)
        & AutoRechargeRequest.status.in_((*IN_FLIGHT, AttemptStatus.requires_action)),
        attempt,
        AttemptStatus.requires_action,
        stripe_payment_intent_id=payment_intent_id,
        client_secret=client_secret,
    )
    return "auto-recharge requires action"


def remember_payment_method(account: BillingAccount, payment_method_id: str) -> None:
    """A successful payment's card becomes the one auto-recharge uses, if none is saved or
    the saved one has been failing; a new card re-evaluates auto-recharge at once. On the
    organization's locked account."""
    if save_payment_method(account, payment_method_id):
        recharge_policy.request_if_due(account)


def save_payment_method(account: BillingAccount, payment_method_id: str) -> bool:
    """`remember_payment_method` without the re-evaluation: whether the card was saved. For a
    caller that must first apply what the same payment bought (a webhook: the top-up or the
    recharge it credits), then re-evaluate on the balance it leaves."""
    saved = account.stripe_payment_method_id
    if saved is None or (account.auto_recharge_failure_count > 0 and saved != payment_method_id):
        account.stripe_payment_method_id = payment_method_id
        account.save(only=[BillingAccount.stripe_payment_method_id])
        return True
    return False


def pending_action(organization_id: str) -> RequiresAction | None:
    attempt = (
        AutoRechargeRequest.select()
        .where(
            (AutoRechargeRequest.organization == organization_id)
            & (AutoRechargeRequest.status == AttemptStatus.requires_action)
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
                drain(gateway, settings, stop=stop)
        except Exception:  # keep the loop alive; the error is logged with its type
            log.exception("auto-recharge drain failed")
        stop.wait(poll_seconds)
