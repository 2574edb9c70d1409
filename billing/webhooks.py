"""Stripe webhook processing: verified, parsed, stored once by event id, processed exactly once.

1. The signature is checked against the raw body (300 s tolerance); a bad one stores nothing.
2. The event is parsed into a typed model (`billing.stripe_events`); one that cannot be
   understood is a 400 and stores nothing (why: that module's docstring).
3. The event is inserted by id; a duplicate insert is ignored.
4. In one write transaction (the event's unit of work) the event row is locked, and unless
   already processed the organization's account is locked once, the event's effects are
   applied on it and `processed_at` is set. Effects and the mark commit together, so
   concurrent or repeated deliveries apply once.

Effects live in the domain, each taking the account this unit of work locked: payments and
their reversals in the ledger (`credit_payment`, `reverse_payment`), disputes in
`billing.disputes`, subscription and invoice state in `billing.subscriptions`, auto-recharge
outcomes in `billing.auto_recharge`. State is kept per Stripe object and ordered by event,
so late, repeated, concurrent and reordered events end in the same state.

Currency: a top-up is credited for what was ordered (the amount stored with the session, or our
own metadata), and only when Stripe's report in the settlement currency (USD, or the session's
`currency_conversion` under Adaptive Pricing) agrees; anything else is recorded and flagged on
the payment row and in the log, never credited.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peewee import IntegrityError

from billing import auto_recharge, checkout, disputes, ledger, recharge_policy
from billing.accounts import lock_account
from billing.config import get_settings
from billing.errors import Conflict, InvalidRequest
from billing.metrics import WEBHOOK_EVENTS
from billing.plans import PLANS
from billing.stripe_events import (
    Charge,
    CheckoutSession,
    Dispute,
    Event,
    Invoice,
    Owned,
    PaymentIntent,
    Price,
    StripeModel,
    Subscription,
    parse_event,
)
from billing.stripe_gateway import BillingGateway
from billing.subscriptions import (
    EventOrder,
    SubscriptionChange,
    SubscriptionState,
    grant_welcome_credit,
    lifecycle_rank,
    normalize_status,
    record_invoice,
    record_subscription_event,
)
from billing.units import CENT, from_stripe_cents
from models import (
    BillingAccount,
    CreditEntry,
    InvoiceStatus,
    PaymentKind,
    StripePayment,
    WebhookEvent,
    database,
    locked,
    utcnow,
    write_transaction,
)
from models import CheckoutSession as StoredSession

log = logging.getLogger("billing.webhooks")

SETTLEMENT_CURRENCY = "usd"


@dataclass(frozen=True)
class WebhookResult:
    event_id: str
    processed: bool
    idempotent: bool


def receive(payload: bytes, signature: str, gateway: BillingGateway) -> WebhookResult:
    event = parse_event(gateway.verify_event(payload, signature))
    seen = WebhookEvent.get_or_none(WebhookEvent.id == event.id)
    if seen is not None and seen.processed_at is not None:
        return _already_applied(seen)  # Stripe's retries: no write lock needed
    with database.atomic():
        WebhookEvent.insert(
            id=event.id,
            event_type=event.type,
            stripe_created=event.created,
            payload=payload.decode("utf-8"),
        ).on_conflict_ignore().execute()
    try:
        with write_transaction():
            stored = locked(WebhookEvent.select().where(WebhookEvent.id == event.id)).get()
            if stored.processed_at is not None:
                return _already_applied(stored)
            organization_id, outcome = _dispatch(event)
            stored.organization_id = organization_id
            stored.outcome = outcome[:500]
            stored.processed_at = utcnow()
            stored.save()
    except InvalidRequest:
        # The domain refused the event (a 400): it leaves nothing, its row included.
        WebhookEvent.delete().where(
            (WebhookEvent.id == event.id) & WebhookEvent.processed_at.is_null()
        ).execute()
        raise
    log.info("stripe event %s %s: %s", event.id, event.type, outcome)
    WEBHOOK_EVENTS.labels(
        stored.event_type, "ignored" if outcome == "ignored" else "processed"
    ).inc()
    return WebhookResult(event.id, processed=outcome != "ignored", idempotent=False)


def _already_applied(event: WebhookEvent) -> WebhookResult:
    WEBHOOK_EVENTS.labels(event.event_type, "duplicate").inc()
    return WebhookResult(event.id, processed=event.outcome != "ignored", idempotent=True)


# --- resolving the organization ---------------------------------------------------------


def _organization_for(obj: Owned) -> str | None:
    """Our metadata first, then client_reference_id, then the customer id we stored."""
    for candidate in (obj.metadata.get("organization_id"), obj.client_reference_id):
        if candidate and BillingAccount.get_or_none(BillingAccount.organization == candidate):
            return candidate
    if obj.customer:
        account = BillingAccount.get_or_none(BillingAccount.stripe_customer_id == obj.customer)
        if account is not None:
            return account.organization_id
    return None


def _payment_for(payment_intent: str | None, charge: str | None) -> StripePayment | None:
    """Charges and disputes name the payment: by its PaymentIntent, else by its charge."""
    if payment_intent:
        payment = StripePayment.get_or_none(StripePayment.id == payment_intent)
        if payment is not None:
            return payment
    if charge:
        return StripePayment.get_or_none(StripePayment.charge_id == charge)
    return None


def _plan_from_price(price: Price | None) -> str | None:
    if price is None:
        return None
    by_price = {price_id: plan for plan, price_id in get_settings().plan_prices.items()}
    if price.id in by_price:
        return by_price[price.id]
    lookup = price.lookup_key or price.metadata.get("plan")
    return lookup if lookup in PLANS else None


def _ts(value: int | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromtimestamp(value, dt.UTC).replace(tzinfo=None)


# --- subscriptions and invoices ---------------------------------------------------------


def _subscription_changed(event: Event, sub: Subscription, account: BillingAccount) -> str:
    items = sub.items.data if sub.items else []
    first_item = items[0] if items else None
    plan = _plan_from_price(first_item.price if first_item else None) or sub.metadata.get("plan")
    stripe_status = "canceled" if event.type == "customer.subscription.deleted" else sub.status
    state = SubscriptionState(
        subscription_id=sub.id,
        status=normalize_status(stripe_status),
        plan=plan if plan in PLANS else None,
        started_at=_ts(sub.start_date),
        ends_at=_ts(sub.ended_at) or _ts(sub.cancel_at),
        current_period_end=_ts(sub.current_period_end)
        or _ts(first_item.current_period_end if first_item else None),
        payment_method_id=sub.default_payment_method,
    )
    order = EventOrder(event.created, lifecycle_rank(stripe_status), event.id)
    change = record_subscription_event(
        account, state, order, subscription_created=sub.created or sub.start_date
    )
    # A card may be on file now. A first subscription's welcome credit comes with its first
    # paid invoice: reconsidering before it would charge for a balance it is about to cover,
    # so then the paid invoice reconsiders (`_invoice_paid`).
    if (
        change == SubscriptionChange.applied
        and state.payment_method_id
        and not _welcome_credit_pending(account, state.plan)
    ):
        recharge_policy.request_if_due(account)
    return {
        SubscriptionChange.applied: f"subscription {state.status}",
        SubscriptionChange.recorded: f"subscription {sub.id} is not current: recorded",
        SubscriptionChange.stale: "stale subscription update ignored",
        SubscriptionChange.foreign: "subscription of another organization: ignored",
    }[change]


def _invoice(event: Event, invoice: Invoice, account: BillingAccount, status: InvoiceStatus) -> str:
    return record_invoice(
        account,
        invoice_id=invoice.id,
        subscription_id=invoice.subscription_id,
        status=status,
        amount_paid=invoice.amount_paid if status == InvoiceStatus.paid else 0,
        invoice_created=invoice.created or event.created,
        event_created=event.created,
        grace_days=get_settings().payment_grace_period_days,
    )


def _invoice_paid(event: Event, invoice: Invoice, account: BillingAccount) -> str:
    outcome = _invoice(event, invoice, account, InvoiceStatus.paid)
    if invoice.amount_paid <= 0:
        return f"{outcome} (nothing charged)"
    plan = None
    for line in invoice.lines.data if invoice.lines else []:
        plan = _plan_from_price(line.price) or plan
    granted = grant_welcome_credit(account, plan, invoice.payment_intent or invoice.id)
    if not granted:
        return outcome
    recharge_policy.request_if_due(account)  # on the balance the welcome credit leaves
    return f"{outcome}; welcome credit granted"


def _welcome_credit_pending(account: BillingAccount, plan: str | None) -> bool:
    return (
        account.welcome_credit_granted_at is None
        and plan in PLANS
        and PLANS[plan].welcome_credit > 0
    )


def _invoice_failed(event: Event, invoice: Invoice, account: BillingAccount) -> str:
    return _invoice(event, invoice, account, InvoiceStatus.failed)


# --- top-ups and auto-recharge ------------------------------------------------------------


def _ordered(session_id: str | None, org: str, metadata: dict[str, str]) -> int | None:
    """What was ordered: the amount stored when we created the session, else our metadata."""
    if session_id:
        stored = StoredSession.get_or_none(
            (StoredSession.id == session_id) & (StoredSession.organization == org)
        )
        if stored is not None and stored.amount:
            return int(stored.amount)
    text = metadata.get("amount_decimillicents", "")
    if not (text.isascii() and text.isdigit()) or len(text) > 16:
        return None
    return int(text) if 0 < int(text) <= 10**15 else None


def _settled_cents(session: CheckoutSession) -> int | None:
    """The USD cents Stripe reports: the session's own amount when it is in USD, else the
    Adaptive Pricing conversion's source amount when that is USD."""
    if session.currency == SETTLEMENT_CURRENCY:
        return session.amount_total
    conversion = session.currency_conversion
    if conversion is not None and conversion.source_currency == SETTLEMENT_CURRENCY:
        return conversion.amount_total
    return None


def _mismatch(ordered: int | None, settled_cents: int | None, currency: str | None) -> str | None:
    if ordered is None:
        return "no order on record for this payment"
    if settled_cents is None:
        return f"settled in {currency or 'an unknown currency'} with no USD amount"
    if from_stripe_cents(settled_cents) != ordered:
        return f"Stripe reports {settled_cents} USD cents for an order of {ordered // CENT}"
    return None


def _credit_top_up(
    account: BillingAccount,
    payment_id: str,
    *,
    ordered: int | None,
    flag: str | None,
    **charged: Any,
) -> str:
    result = ledger.credit_payment(
        account,
        payment_id,
        kind=PaymentKind.top_up,
        ordered=ordered,
        grant_amount=None if flag else ordered,
        flagged_reason=flag,
        **charged,
    )
    if flag:
        log.warning("top-up %s flagged, not credited: %s", payment_id, flag)
        return f"top-up flagged, not credited: {flag}"
    return "top-up granted" if result.granted_now else "top-up already granted"


def _checkout_completed(event: Event, session: CheckoutSession, account: BillingAccount) -> str:
    checkout.record_completed(session.id, session.subscription)
    if session.payment_status != "paid":
        return f"checkout not paid ({session.payment_status}): no credit"
    if session.mode != "payment":
        return "subscription checkout completed"
    ordered = _ordered(session.id, account.organization_id, session.metadata)
    return _credit_top_up(
        account,
        session.payment_intent or session.id,
        ordered=ordered,
        flag=_mismatch(ordered, _settled_cents(session), session.currency),
        charged_currency=session.currency,
        charged_amount=session.amount_total,
    )


def _payment_succeeded(event: Event, intent: PaymentIntent, account: BillingAccount) -> str:
    """The payment's card is saved (before its effects: a recharge's success resets the
    failures that let a new card replace a failing one), and auto-recharge re-evaluated after
    them, on the balance this payment leaves: a top-up or recharge paid with the first or a
    new card must not also request a recharge its own credit covers."""
    new_card = False
    if intent.payment_method:
        new_card = auto_recharge.save_payment_method(account, intent.payment_method)
    outcome = _payment_effects(intent, account)
    if new_card:
        recharge_policy.request_if_due(account)
    return outcome


def _payment_effects(intent: PaymentIntent, account: BillingAccount) -> str:
    kind = intent.metadata.get("kind")
    cents = intent.amount_received or intent.amount or 0
    if intent.currency not in (None, SETTLEMENT_CURRENCY):
        if kind == PaymentKind.auto_recharge:
            log.warning("auto-recharge %s settled in %s: not credited", intent.id, intent.currency)
            return f"auto-recharge flagged, not credited: settled in {intent.currency}"
        if kind == PaymentKind.top_up:
            # Adaptive Pricing: only the Checkout Session carries the USD amount; it decides.
            ledger.credit_payment(
                account,
                intent.id,
                kind=PaymentKind.top_up,
                ordered=_ordered(None, account.organization_id, intent.metadata),
                charged_currency=intent.currency,
                charged_amount=cents,
                charge_id=intent.latest_charge,
            )
            return f"top-up paid in {intent.currency}: the checkout session decides the credit"
    if kind == PaymentKind.top_up and cents > 0:
        ordered = _ordered(None, account.organization_id, intent.metadata)
        if ordered is None:  # the checkout session names the order; it grants
            ledger.credit_payment(
                account,
                intent.id,
                kind=PaymentKind.top_up,
                ordered=None,
                charged_currency=intent.currency,
                charged_amount=cents,
                charge_id=intent.latest_charge,
            )
            return "top-up payment recorded: the checkout session grants it"
        return _credit_top_up(
            account,
            intent.id,
            ordered=ordered,
            flag=_mismatch(ordered, cents, intent.currency),
            charged_currency=intent.currency,
            charged_amount=cents,
            charge_id=intent.latest_charge,
        )
    if kind == PaymentKind.auto_recharge:
        return auto_recharge.payment_succeeded(
            account, intent.id, from_stripe_cents(cents), intent.metadata.get("attempt_id")
        )
    return "payment recorded"


def _payment_failed(event: Event, intent: PaymentIntent, account: BillingAccount) -> str:
    if intent.metadata.get("kind") != PaymentKind.auto_recharge:
        return "payment failure recorded"
    error = intent.last_payment_error
    return auto_recharge.payment_failed(
        account,
        intent.id,
        (error.code if error else None) or "failed",
        attempt_id=intent.metadata.get("attempt_id"),
    )


def _payment_requires_action(event: Event, intent: PaymentIntent, account: BillingAccount) -> str:
    if intent.metadata.get("kind") != PaymentKind.auto_recharge:
        return "ignored"
    return auto_recharge.payment_requires_action(
        account, intent.id, intent.client_secret, attempt_id=intent.metadata.get("attempt_id")
    )


# --- refunds and disputes -----------------------------------------------------------------


def _charge_refunded(event: Event, charge: Charge, account: BillingAccount) -> str:
    payment = _payment_for(charge.payment_intent, charge.id)
    payment_id = payment.id if payment is not None else charge.payment_intent
    if payment_id is None:
        return "refund of a charge with no payment of ours: nothing to reverse"
    # amount_refunded is cumulative: the refunded share of the charge, in its own currency,
    # is the share of what the payment granted that is taken back (never more in total).
    result = ledger.reverse_payment(
        account,
        payment_id,
        kind=ledger.ReversalKind.refund,
        share=ledger.share_of(charge.amount_refunded, charge.amount),
        reference_id=charge.id,
        charge_id=charge.id,
    )
    if result.payment is None or not result.payment.granted_amount:
        return "refund: the payment bought no credits (yet)"
    return f"refund: reversed {result.reversed_now}"


def _dispute_report(dispute: Dispute) -> disputes.DisputeReport:
    payment = _payment_for(dispute.payment_intent, dispute.charge)
    return disputes.DisputeReport(
        dispute_id=dispute.id,
        payment_id=payment.id if payment is not None else dispute.payment_intent,
        status=dispute.status,
        amount=dispute.amount,
        currency=dispute.currency,
    )


def _dispute_created(event: Event, dispute: Dispute, account: BillingAccount) -> str:
    return disputes.opened(account, _dispute_report(dispute))


def _dispute_closed(event: Event, dispute: Dispute, account: BillingAccount) -> str:
    return disputes.closed(account, _dispute_report(dispute))


Handler = Callable[[Event, Any, BillingAccount], str]

HANDLERS: dict[str, Handler] = {
    "checkout.session.completed": _checkout_completed,
    "customer.subscription.created": _subscription_changed,
    "customer.subscription.updated": _subscription_changed,
    "customer.subscription.deleted": _subscription_changed,
    "invoice.payment_succeeded": _invoice_paid,
    "invoice.paid": _invoice_paid,
    "invoice.payment_failed": _invoice_failed,
    "payment_intent.succeeded": _payment_succeeded,
    "payment_intent.payment_failed": _payment_failed,
    "payment_intent.requires_action": _payment_requires_action,
    "charge.refunded": _charge_refunded,
    "charge.dispute.created": _dispute_created,
    "charge.dispute.closed": _dispute_closed,
}


def _dispatch(event: Event) -> tuple[str | None, str]:
    handler = HANDLERS.get(event.type)
    obj = event.object
    if handler is None or obj is None:
        return None, "ignored"
    org = _organization_of(obj)
    if org is None:
        return None, "ignored"
    account = lock_account(org)  # the event's one account lock
    try:
        with database.atomic():  # a savepoint: a refused event leaves no partial effect
            return org, handler(event, obj, account)
    except Conflict as exc:
        # An object of ours already tied to another organization: Stripe cannot fix that by
        # retrying, so it is recorded and acknowledged, and the log says why.
        log.warning("stripe event %s refused: %s", event.id, exc.detail)
        return org, f"refused: {exc.detail}"
    except IntegrityError:
        # Another delivery recorded the same Stripe object (for another organization) while
        # this one ran: a 409 makes Stripe retry, and the retry is refused as above.
        raise Conflict("another event recorded this Stripe object at the same time") from None


def _organization_of(obj: StripeModel) -> str | None:
    if isinstance(obj, Dispute | Charge):
        charge = obj.charge if isinstance(obj, Dispute) else obj.id
        payment = _payment_for(obj.payment_intent, charge)
        if payment is not None:
            return payment.organization_id
        if obj.payment_intent:  # granted before payments were tracked
            for ref in ("topup:", "recharge:"):
                entry = CreditEntry.get_or_none(
                    CreditEntry.idempotency_ref == f"{ref}{obj.payment_intent}"
                )
                if entry is not None:
                    return entry.organization_id
    return _organization_for(obj) if isinstance(obj, Owned) else None
