"""Checkout, top-up and portal sessions, and completing a local checkout.

Customers: created on first need with a Stripe idempotency key derived from the organization,
so concurrent first calls (and a retry after a crash between Stripe's answer and our write)
get one customer. Stripe is called with no transaction or lock held: a hanging Stripe stalls
only that request, never the organization's debits. Nothing is written when Stripe fails: the
session row is stored only after Stripe answered.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid

from peewee import fn

from billing import ledger, recharge_policy
from billing.accounts import get_account, locked_account
from billing.config import Settings
from billing.errors import Conflict, InvalidRequest, NotFound
from billing.plans import LIVE_STATUSES, PLANS
from billing.stripe_gateway import BillingGateway, SessionInfo
from billing.subscriptions import SubscriptionState, apply_subscription_state, grant_welcome_credit
from billing.units import CENT, TOP_UP_MAX, TOP_UP_MIN
from models import (
    BillingAccount,
    CheckoutKind,
    CheckoutSession,
    CheckoutStatus,
    CreditEntryType,
    StripeSubscription,
    SubscriptionStatus,
    database,
    locked,
    utcnow,
)

LOCAL_PAYMENT_METHOD = "pm_local_card"


def ensure_customer(organization_id: str, gateway: BillingGateway) -> str:
    """The organization's Stripe customer: read, else create (no lock held) and record.

    The record is first-writer-wins (a conditional update), so of two concurrent creators
    both return the stored id; with Stripe's idempotency key both got the same one anyway.
    """
    account = get_account(organization_id)
    if account.stripe_customer_id:
        return account.stripe_customer_id
    customer_id = gateway.create_customer(organization_id, account.billing_email)
    with database.atomic():  # a transaction's first statement survives a dead connection
        BillingAccount.update(stripe_customer_id=customer_id).where(
            (BillingAccount.organization == organization_id)
            & BillingAccount.stripe_customer_id.is_null()
        ).execute()
    return str(get_account(organization_id).stripe_customer_id)


def _record(
    session: SessionInfo, organization_id: str, kind: CheckoutKind, **details: object
) -> SessionInfo:
    """Store the session Stripe answered with (once, even if an idempotent replay repeats it).

    In a transaction of its own: after the Stripe call the connection comes fresh from the
    pool, and a transaction's first statement is repeated on another connection if the server
    ended that one (`models.db`); an autocommit write could not be."""
    with database.atomic():
        CheckoutSession.insert(
            id=session.id, organization=organization_id, kind=kind, url=session.url, **details
        ).on_conflict_ignore().execute()
    return session


def start_subscription_checkout(
    organization_id: str,
    plan: str,
    success_url: str,
    cancel_url: str,
    gateway: BillingGateway,
    settings: Settings,
) -> SessionInfo:
    if plan not in PLANS:
        raise InvalidRequest(f"subscriptionPlan must be one of {', '.join(PLANS)}")
    refusal = _subscription_refusal(organization_id)
    if refusal is not None:
        raise Conflict(refusal)
    customer = ensure_customer(organization_id, gateway)
    # The open sessions are expired before a new one is made, so a Stripe outage at expiry
    # makes nothing new: retries during it cannot pile up open sessions for the next request
    # to expire one call at a time. (`_keep_one_payable_subscription_checkout` still settles
    # the sessions racing requests make meanwhile.)
    if not all([_expire(row.id, gateway) for row in _open_rows(organization_id)]):
        raise Conflict(_PAID)
    refusal = _subscription_refusal(organization_id)
    if refusal is not None:
        raise Conflict(refusal)
    session = gateway.create_subscription_checkout(
        organization_id,
        customer,
        settings.plan_prices[plan],
        plan,
        success_url,
        cancel_url,
        # A key of its own for each attempt: a retry under the client's Idempotency-Key (after
        # a failure, which this unit may have expired) must get a payable session, never
        # Stripe's replay of the expired one. An attempt's lost answer leaves a session nobody
        # recorded, which `_expire_unrecorded` expires.
        f"checkout:{organization_id}:{uuid.uuid4()}",
    )
    try:
        _record(
            session,
            organization_id,
            CheckoutKind.subscription,
            plan=plan,
            success_url=success_url,
            cancel_url=cancel_url,
        )
    except Exception:
        # Unrecorded, nothing would ever expire it: try now (a process that dies here leaves
        # it to the next checkout's look at Stripe, `_expire_unrecorded`).
        with contextlib.suppress(Exception):
            gateway.expire_checkout_session(session.id)
        raise
    _keep_one_payable_subscription_checkout(organization_id, customer, session.id, gateway)
    return session


# Stripe keeps a Checkout Session payable for 24 hours unless told otherwise.
SESSION_LIFETIME = dt.timedelta(hours=25)
# How long a paid checkout's subscription may take to be reported before a new checkout is
# allowed again (Stripe retries a webhook delivery for up to three days). A row still open is
# asked about (once: the answer is recorded) until a payment of it would be that old: one paid
# in its last hour, unreported, must still block.
PAID_CHECKOUT_PATIENCE = dt.timedelta(days=3)


def _subscription_refusal(organization_id: str) -> str | None:
    """Why the organization may not open a subscription checkout now, if it may not: a
    second subscription would bill twice (an unpaid or paused one still bills, or resumes; a
    plan change goes through the portal), and so would paying a checkout while one already
    paid has its subscription on the way."""
    if get_account(organization_id).subscription_status in LIVE_STATUSES:
        return "the organization already has a subscription; use the portal"
    # Reported means past `incomplete` (ours: inactive): a Checkout subscription starts there
    # and turns active with a later event; until then it may still bill.
    reported = StripeSubscription.select(StripeSubscription.id).where(
        (StripeSubscription.id == CheckoutSession.stripe_subscription_id)
        & (StripeSubscription.status != SubscriptionStatus.inactive)
    )
    pending = CheckoutSession.select(CheckoutSession.id).where(
        (CheckoutSession.organization == organization_id)
        & (CheckoutSession.kind == CheckoutKind.subscription)
        & (CheckoutSession.status == CheckoutStatus.completed)
        & CheckoutSession.stripe_subscription_id.is_null(False)
        & (CheckoutSession.completed_at >= utcnow() - PAID_CHECKOUT_PATIENCE)
        & ~fn.EXISTS(reported)
    )
    if pending.exists():
        return _PAID
    return None


_PAID = "a subscription checkout was just paid; the subscription is on its way"


def _open_rows(organization_id: str) -> list[CheckoutSession]:
    """The organization's subscription sessions still open by our rows, newest first, as far
    back as a payment of one could still be unreported."""
    return list(
        CheckoutSession.select()
        .where(
            (CheckoutSession.organization == organization_id)
            & (CheckoutSession.kind == CheckoutKind.subscription)
            & (CheckoutSession.status == CheckoutStatus.open)
            & (CheckoutSession.created_at >= utcnow() - SESSION_LIFETIME - PAID_CHECKOUT_PATIENCE)
        )
        .order_by(CheckoutSession.created_at.desc(), CheckoutSession.id.desc())
    )


def _keep_one_payable_subscription_checkout(
    organization_id: str, customer: str, session_id: str, gateway: BillingGateway
) -> None:
    """At most one subscription checkout of an organization can be paid: two paid ones would
    be two subscriptions, each billing every month. The newest stands and the older open ones
    are expired at Stripe; if an older one was paid first, the subscription is on its way and
    the new session is expired instead (409).

    Requests racing each other agree, since each reads the others' recorded sessions: the
    newest's request expires the older ones, an older one's request finds a newer one and
    expires only its own. The subscription check is read again last, after the older sessions
    can no longer be paid: one paid (and reported) while this request talked to Stripe is seen
    there. No lock is held around Stripe.
    """
    payable = _open_rows(organization_id)
    if not payable or payable[0].id != session_id:
        _expire(session_id, gateway)
        raise Conflict("a newer subscription checkout was opened at the same time; use that one")
    refusal = None
    for older in payable[1:]:
        if not _expire(older.id, gateway):
            refusal = _PAID
    if not _expire_unrecorded(organization_id, customer, gateway):
        refusal = _PAID
    refusal = refusal or _subscription_refusal(organization_id)
    if refusal is not None:
        _expire(session_id, gateway)
        raise Conflict(refusal)


# A session at Stripe with no row of ours is a crash's leftover only once no request can still
# be about to record it (a request lasts at most gunicorn's timeout, and its Stripe calls).
UNRECORDED_AFTER = dt.timedelta(minutes=2)


def _expire_unrecorded(organization_id: str, customer: str, gateway: BillingGateway) -> bool:
    """Expire the customer's payable subscription sessions at Stripe that we never recorded
    (the process died between Stripe's answer and our row; their links were never handed out).
    False when one of them was paid."""
    cutoff = (utcnow() - UNRECORDED_AFTER).replace(tzinfo=dt.UTC).timestamp()
    at_stripe = {i: c for i, c in gateway.open_subscription_checkouts(customer) if c < cutoff}
    if not at_stripe:
        return True
    recorded = {
        row.id
        for row in CheckoutSession.select(CheckoutSession.id).where(
            CheckoutSession.id.in_(list(at_stripe))
        )
    }
    ends = [gateway.expire_checkout_session(i) for i in at_stripe if i not in recorded]
    return not any(end.paid for end in ends)


def _expire(session_id: str, gateway: BillingGateway) -> bool:
    """Make a session unpayable. False when it was paid first and what it made is not on
    record: paid at Stripe, its subscription unknown (one Stripe names is recorded with the
    session, and `_subscription_refusal` weighs it), or paid on the local page (which completes
    a session only while our row is open)."""
    end = gateway.expire_checkout_session(session_id)
    if end.paid:
        if end.subscription_id is None:
            return False
        with database.atomic():
            record_completed(session_id, end.subscription_id)
        return True
    with database.atomic():
        expired = (
            CheckoutSession.update(status=CheckoutStatus.expired)
            .where(
                (CheckoutSession.id == session_id) & (CheckoutSession.status == CheckoutStatus.open)
            )
            .execute()
        )
        if expired:
            return True
        row = CheckoutSession.get_or_none(CheckoutSession.id == session_id)
        return row is None or row.status != CheckoutStatus.completed


def record_completed(session_id: str, subscription_id: str | None) -> None:
    """Stripe reports a session of ours paid: it is no longer payable, and the subscription it
    made blocks new subscription checkouts until that subscription is reported."""
    CheckoutSession.update(
        status=CheckoutStatus.completed,
        completed_at=fn.COALESCE(CheckoutSession.completed_at, utcnow()),
        stripe_subscription_id=fn.COALESCE(CheckoutSession.stripe_subscription_id, subscription_id),
    ).where(CheckoutSession.id == session_id).execute()


def start_top_up(
    organization_id: str,
    amount: int,
    success_url: str,
    cancel_url: str,
    gateway: BillingGateway,
    idempotency_key: str | None = None,
) -> SessionInfo:
    if (
        isinstance(amount, bool)
        or not isinstance(amount, int)
        or not TOP_UP_MIN <= amount <= TOP_UP_MAX
    ):
        raise InvalidRequest(f"amountDecimillicents must be from {TOP_UP_MIN} to {TOP_UP_MAX}")
    if amount % CENT:
        raise InvalidRequest("amountDecimillicents must be a whole number of cents (100000)")
    customer = ensure_customer(organization_id, gateway)
    session = gateway.create_top_up_checkout(
        organization_id,
        customer,
        amount,
        success_url,
        cancel_url,
        f"top-up:{organization_id}:{idempotency_key or uuid.uuid4()}",
    )
    return _record(
        session,
        organization_id,
        CheckoutKind.top_up,
        amount=amount,
        success_url=success_url,
        cancel_url=cancel_url,
    )


def open_portal(organization_id: str, return_url: str, gateway: BillingGateway) -> SessionInfo:
    customer = ensure_customer(organization_id, gateway)
    if gateway.local:  # the local portal page needs the organization and the return URL
        from billing import local_billing

        return local_billing.portal_session(organization_id, return_url)
    return gateway.create_portal_session(customer, return_url)


def grant_top_up(account: BillingAccount, amount: int, payment_reference: str) -> bool:
    """Credits for a paid top-up, on the locked account; the payment's reference makes it
    apply once."""
    result = ledger.grant(
        account,
        amount,
        CreditEntryType.top_up,
        reason="credit top-up",
        reference_id=payment_reference,
        idempotency_ref=f"topup:{payment_reference}",
    )
    return not result.replayed


LOCAL_PERIOD = dt.timedelta(days=30)


def keep_local_card(account: BillingAccount) -> None:
    """Local billing mode: paying leaves a card on file, as a Stripe Checkout payment does."""
    if not account.stripe_payment_method_id:
        account.stripe_payment_method_id = LOCAL_PAYMENT_METHOD
        account.save(only=[BillingAccount.stripe_payment_method_id])


def activate_locally(
    account: BillingAccount, plan: str, *, started_at: dt.datetime, welcome_reference: str
) -> None:
    """Local billing mode, on the locked account: what a paid first invoice does at Stripe (a
    card on file, the plan active for a period, the welcome credit once per organization)."""
    keep_local_card(account)
    now = utcnow()
    apply_subscription_state(
        account,
        SubscriptionState(
            subscription_id=account.stripe_subscription_id or f"sub_local_{uuid.uuid4().hex[:16]}",
            status=SubscriptionStatus.active,
            plan=plan,
            started_at=started_at,
            ends_at=None,
            current_period_end=now + LOCAL_PERIOD,
        ),
        int(now.timestamp()),
    )
    grant_welcome_credit(account, plan, welcome_reference)


def complete_local_checkout(organization_id: str) -> CheckoutSession:
    """Local billing mode: finish the newest open session as Stripe's webhooks would. One
    unit of work."""
    with locked_account(organization_id) as account:
        # Locked as `pay` locks it: a Cancel on the page (the session's lock only) either
        # commits first, and the session is no longer open here, or waits for this unit.
        session = locked(
            CheckoutSession.select()
            .where(
                (CheckoutSession.organization == organization_id)
                & (CheckoutSession.status == CheckoutStatus.open)
            )
            .order_by(CheckoutSession.created_at.desc(), CheckoutSession.id.desc())
        ).first()
        if session is None:
            raise NotFound("no open local checkout for this organization")
        return complete_local_session(account, session)


def complete_local_session(account: BillingAccount, session: CheckoutSession) -> CheckoutSession:
    """Finish one open local session on its organization's locked account, as Stripe's
    webhooks would: activate the plan and grant the welcome credit once, or grant the top-up
    once; then, a card being on file now, a recharge may be due."""
    if session.kind == CheckoutKind.subscription:
        assert session.plan is not None  # a subscription session always stores its plan
        activate_locally(account, session.plan, started_at=utcnow(), welcome_reference=session.id)
    else:
        assert session.amount is not None  # a top-up session always stores its amount
        keep_local_card(account)
        grant_top_up(account, session.amount, session.id)
    session.status = CheckoutStatus.completed
    session.completed_at = utcnow()
    session.save()
    recharge_policy.request_if_due(account)
    return session
