"""Stripe webhook processing: verified, stored once by event id, processed exactly once.

1. The signature is checked against the raw body (300 s tolerance); a bad one stores nothing.
2. The event is inserted by id; a duplicate insert is ignored.
3. In one write transaction the event row is locked, and unless already processed its effects
   are applied and `processed_at` is set. Effects and the mark commit together, so concurrent
   or repeated deliveries apply once; ledger references guard a second time.

Out-of-order delivery: subscription state carries the event's `created` time and older events
never overwrite newer state; credit grants are keyed by the payment, not the event, so the
checkout and payment_intent events for one top-up grant once whichever comes first.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peewee

from billing import auto_recharge, ledger
from billing.checkout import grant_top_up
from billing.config import get_settings
from billing.metrics import WEBHOOK_EVENTS
from billing.plans import PLANS
from billing.stripe_gateway import BillingGateway
from billing.subscriptions import (
    SubscriptionState,
    apply_subscription_state,
    clear_payment_failure,
    grant_welcome_credit,
    normalize_status,
    start_payment_grace_period,
)
from billing.units import from_stripe_cents
from models import (
    BillingAccount,
    CreditEntry,
    WebhookEvent,
    database,
    locked,
    utcnow,
    write_transaction,
)

log = logging.getLogger("billing.webhooks")


@dataclass(frozen=True)
class WebhookResult:
    event_id: str
    processed: bool
    idempotent: bool


def receive(payload: bytes, signature: str, gateway: BillingGateway) -> WebhookResult:
    event = gateway.verify_event(payload, signature)
    event_id = event["id"]
    seen = WebhookEvent.get_or_none(WebhookEvent.id == event_id)
    if seen is not None and seen.processed_at is not None:
        return _already_applied(seen)  # Stripe's retries: no write lock needed
    with database.atomic():
        WebhookEvent.insert(
            id=event_id,
            event_type=str(event.get("type", ""))[:255],
            stripe_created=int(event.get("created") or 0),
            payload=payload.decode("utf-8"),
        ).on_conflict_ignore().execute()
    with write_transaction():
        stored = locked(WebhookEvent.select().where(WebhookEvent.id == event_id)).get()
        if stored.processed_at is not None:
            return _already_applied(stored)
        organization_id, outcome = _dispatch(event)
        stored.organization_id = organization_id
        stored.outcome = outcome
        stored.processed_at = utcnow()
        stored.save()
    log.info("stripe event %s %s: %s", event_id, event.get("type"), outcome)
    WEBHOOK_EVENTS.labels(
        stored.event_type, "ignored" if outcome == "ignored" else "processed"
    ).inc()
    return WebhookResult(event_id, processed=outcome != "ignored", idempotent=False)


def _already_applied(event: WebhookEvent) -> WebhookResult:
    WEBHOOK_EVENTS.labels(event.event_type, "duplicate").inc()
    return WebhookResult(event.id, processed=event.outcome != "ignored", idempotent=True)


# --- resolving the organization ---------------------------------------------------------


def _organization_for(obj: dict[str, Any]) -> str | None:
    """Our metadata first, then client_reference_id, then the customer id we stored."""
    metadata = obj.get("metadata") or {}
    candidates = [metadata.get("organization_id"), obj.get("client_reference_id")]
    for candidate in candidates:
        if isinstance(candidate, str) and BillingAccount.get_or_none(
            BillingAccount.organization == candidate
        ):
            return candidate
    customer = obj.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    if isinstance(customer, str):
        account = BillingAccount.get_or_none(BillingAccount.stripe_customer_id == customer)
        if account is not None:
            return account.organization_id
    return None


def _ts(value: Any) -> dt.datetime | None:
    if not isinstance(value, int) or value <= 0:
        return None
    return dt.datetime.fromtimestamp(value, dt.UTC).replace(tzinfo=None)


def _plan_from_price(price: dict[str, Any] | None) -> str | None:
    if not price:
        return None
    by_price = {price_id: plan for plan, price_id in get_settings().plan_prices.items()}
    if price.get("id") in by_price:
        return by_price[price["id"]]
    lookup = price.get("lookup_key") or (price.get("metadata") or {}).get("plan")
    return lookup if lookup in PLANS else None


# --- handlers -------------------------------------------------------------------------


def _subscription_changed(event: dict[str, Any], sub: dict[str, Any], org: str) -> str:
    items = (sub.get("items") or {}).get("data") or []
    first_item = items[0] if items else {}
    plan = _plan_from_price(first_item.get("price")) or (sub.get("metadata") or {}).get("plan")
    status = normalize_status(str(sub.get("status", "")))
    if event["type"] == "customer.subscription.deleted":
        status = "canceled"
    state = SubscriptionState(
        subscription_id=str(sub.get("id")),
        status=status,
        plan=plan if plan in PLANS else None,
        started_at=_ts(sub.get("start_date")),
        ends_at=_ts(sub.get("ended_at")) or _ts(sub.get("cancel_at")),
        current_period_end=_ts(sub.get("current_period_end"))
        or _ts(first_item.get("current_period_end")),
        payment_method_id=sub.get("default_payment_method")
        if isinstance(sub.get("default_payment_method"), str)
        else None,
    )
    applied = apply_subscription_state(org, state, int(event.get("created") or 0))
    return f"subscription {state.status}" if applied else "stale subscription update ignored"


def _checkout_completed(event: dict[str, Any], session: dict[str, Any], org: str) -> str:
    if session.get("payment_status") != "paid":
        return f"checkout not paid ({session.get('payment_status')}): no credit"
    if session.get("mode") == "payment":
        reference = session.get("payment_intent") or session.get("id")
        amount = from_stripe_cents(int(session.get("amount_total") or 0))
        if amount <= 0:
            return "top-up with no amount: no credit"
        granted = grant_top_up(org, amount, str(reference))
        return "top-up granted" if granted else "top-up already granted"
    return "subscription checkout completed"


def _invoice_paid(event: dict[str, Any], invoice: dict[str, Any], org: str) -> str:
    clear_payment_failure(org)
    if int(invoice.get("amount_paid") or 0) <= 0:
        return "invoice paid (nothing charged)"
    lines = (invoice.get("lines") or {}).get("data") or []
    plan = None
    for line in lines:
        plan = _plan_from_price(line.get("price")) or plan
    reference = invoice.get("payment_intent") or invoice.get("id")
    granted = grant_welcome_credit(org, plan, str(reference))
    return "welcome credit granted" if granted else "invoice paid"


def _invoice_failed(event: dict[str, Any], invoice: dict[str, Any], org: str) -> str:
    start_payment_grace_period(org, get_settings().payment_grace_period_days)
    return "payment failed: grace period running"


def _payment_succeeded(event: dict[str, Any], intent: dict[str, Any], org: str) -> str:
    metadata = intent.get("metadata") or {}
    kind = metadata.get("kind")
    amount = from_stripe_cents(int(intent.get("amount_received") or intent.get("amount") or 0))
    payment_method = intent.get("payment_method")
    if isinstance(payment_method, str):
        auto_recharge.remember_payment_method(org, payment_method)
    if kind == "top_up" and amount > 0:
        return (
            "top-up granted"
            if grant_top_up(org, amount, str(intent["id"]))
            else "top-up already granted"
        )
    if kind == "auto_recharge":
        return auto_recharge.payment_succeeded(
            org, str(intent["id"]), amount, metadata.get("attempt_id")
        )
    return "payment recorded"


def _payment_failed(event: dict[str, Any], intent: dict[str, Any], org: str) -> str:
    if (intent.get("metadata") or {}).get("kind") != "auto_recharge":
        return "payment failure recorded"
    error = intent.get("last_payment_error") or {}
    return auto_recharge.payment_failed(
        org,
        str(intent["id"]),
        str(error.get("code") or "failed"),
        attempt_id=(intent.get("metadata") or {}).get("attempt_id"),
    )


def _payment_requires_action(event: dict[str, Any], intent: dict[str, Any], org: str) -> str:
    if (intent.get("metadata") or {}).get("kind") != "auto_recharge":
        return "ignored"
    return auto_recharge.payment_requires_action(
        org,
        str(intent["id"]),
        intent.get("client_secret"),
        attempt_id=(intent.get("metadata") or {}).get("attempt_id"),
    )


def _granted_for_payment(org: str, payment_intent: str) -> int:
    """Credits a payment bought (top-up, recharge or welcome grant referencing it)."""
    total = (
        CreditEntry.select(peewee.fn.COALESCE(peewee.fn.SUM(CreditEntry.amount), 0))
        .where(
            (CreditEntry.organization == org)
            & (CreditEntry.reference_id == payment_intent)
            & (CreditEntry.amount > 0)
        )
        .scalar()
    )
    return int(total)


def _reversed_for_charge(org: str, charge_id: str) -> int:
    total = (
        CreditEntry.select(peewee.fn.COALESCE(peewee.fn.SUM(CreditEntry.amount), 0))
        .where((CreditEntry.organization == org) & (CreditEntry.reference_id == charge_id))
        .scalar()
    )
    return -int(total)


def _reverse(org: str, charge: dict[str, Any], requested: int, kind: str, ref: str) -> str:
    payment_intent = charge.get("payment_intent")
    bought = _granted_for_payment(org, str(payment_intent)) if payment_intent else 0
    if bought <= 0:
        return f"{kind}: the payment bought no credits"
    already = _reversed_for_charge(org, str(charge["id"]))
    to_take = min(requested, bought) - already
    if to_take <= 0:
        return f"{kind}: nothing more to reverse"
    result = ledger.take_back(
        org, to_take, kind, f"{kind} of {charge['id']}", str(charge["id"]), ref
    )
    return f"{kind}: reversed {-result.entry.amount if result.entry else 0}"


def _charge_refunded(event: dict[str, Any], charge: dict[str, Any], org: str) -> str:
    refunded = from_stripe_cents(int(charge.get("amount_refunded") or 0))
    # amount_refunded is cumulative: the reference names the cumulative amount, so a repeat
    # of the same refund state applies once and a further partial refund adds only the rest.
    return _reverse(org, charge, refunded, "refund", f"refund:{charge['id']}:{refunded}")


def _dispute_closed(event: dict[str, Any], dispute: dict[str, Any], org: str) -> str:
    if dispute.get("status") != "lost":
        return f"dispute {dispute.get('status')}: no change"
    charge = {"id": dispute.get("charge"), "payment_intent": dispute.get("payment_intent")}
    amount = from_stripe_cents(int(dispute.get("amount") or 0))
    return _reverse(org, charge, amount, "dispute", f"dispute:{dispute.get('id')}")


HANDLERS: dict[str, Callable[[dict[str, Any], dict[str, Any], str], str]] = {
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
    "charge.dispute.closed": _dispute_closed,
}


def _dispatch(event: dict[str, Any]) -> tuple[str | None, str]:
    handler = HANDLERS.get(str(event.get("type")))
    obj = (event.get("data") or {}).get("object")
    if handler is None or not isinstance(obj, dict):
        return None, "ignored"
    if event["type"] == "charge.dispute.closed" and not obj.get("customer"):
        obj = {**obj, "customer": _customer_of_charge(obj)}
    org = _organization_for(obj)
    if org is None:
        return None, "ignored"
    return org, handler(event, obj, org)


def _customer_of_charge(dispute: dict[str, Any]) -> str | None:
    """Disputes name only the charge; find the organization through its credited payment."""
    payment_intent = dispute.get("payment_intent")
    if not payment_intent:
        return None
    entry = CreditEntry.get_or_none(CreditEntry.reference_id == payment_intent)
    if entry is None:
        return None
    account = BillingAccount.get_or_none(BillingAccount.organization == entry.organization_id)
    return account.stripe_customer_id if account else None
