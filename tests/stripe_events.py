"""Builders for signed Stripe events in Stripe's own shapes (the fixtures), shared by the
webhook ordering, reversal, race and model tests."""

from __future__ import annotations

import json
import threading
from typing import Any

from billing import webhooks
from billing.stripe_gateway import get_gateway
from models import BillingAccount, CreditEntry, connection, database
from tests.ledger_checks import assert_ledger_invariants
from tests.stripe_fakes import event_body, signature_for, stripe_object

URL = "/v1/webhooks/stripe"


def customer_of(org_id: str) -> str:
    return f"cus_{org_id.replace('-', '')[:20]}"


def link_customer(org_id: str) -> str:
    customer = customer_of(org_id)
    with database.connection_context():
        BillingAccount.update(stripe_customer_id=customer).where(
            BillingAccount.organization == org_id
        ).execute()
    return customer


def top_up_session(
    org_id: str,
    *,
    cents: int = 1000,
    pi: str = "pi_topup_1",
    session_id: str = "cs_test_topup",
    currency: str = "usd",
    conversion: dict[str, Any] | None = None,
    amount_decimillicents: int | None = None,
) -> dict[str, Any]:
    metadata = {"organization_id": org_id, "kind": "top_up"}
    if amount_decimillicents is not None:
        metadata["amount_decimillicents"] = str(amount_decimillicents)
    return stripe_object(
        "checkout.session",
        id=session_id,
        mode="payment",
        client_reference_id=org_id,
        metadata=metadata,
        amount_total=cents,
        amount_subtotal=cents,
        currency=currency,
        currency_conversion=conversion,
        payment_status="paid",
        status="complete",
        payment_intent=pi,
        customer=customer_of(org_id),
    )


def subscription_session(org_id: str, *, sub: str, session_id: str = "cs_test_sub"):
    return stripe_object(
        "checkout.session",
        id=session_id,
        mode="subscription",
        client_reference_id=org_id,
        metadata={"organization_id": org_id, "kind": "subscription", "plan": "pro"},
        amount_total=2000,
        amount_subtotal=2000,
        currency="usd",
        currency_conversion=None,
        payment_status="paid",
        status="complete",
        payment_intent=None,
        subscription=sub,
        customer=customer_of(org_id),
    )


def top_up_intent(
    org_id: str,
    *,
    cents: int = 1000,
    pi: str = "pi_topup_1",
    currency: str = "usd",
    ordered: int | None = None,
) -> dict[str, Any]:
    metadata = {"organization_id": org_id, "kind": "top_up"}
    if ordered is not None:
        metadata["amount_decimillicents"] = str(ordered)
    return stripe_object(
        "payment_intent",
        id=pi,
        amount=cents,
        amount_received=cents,
        currency=currency,
        status="succeeded",
        metadata=metadata,
        customer=customer_of(org_id),
        payment_method="pm_card_saved",
    )


def charge(
    org_id: str,
    *,
    refunded_cents: int,
    amount: int = 1000,
    pi: str = "pi_topup_1",
    charge_id: str = "ch_test_1",
    currency: str = "usd",
) -> dict[str, Any]:
    return stripe_object(
        "charge",
        id=charge_id,
        payment_intent=pi,
        customer=customer_of(org_id),
        amount=amount,
        amount_refunded=refunded_cents,
        currency=currency,
        refunded=refunded_cents >= amount,
        metadata={},
    )


def dispute(
    *,
    status: str,
    amount: int = 1000,
    pi: str = "pi_topup_1",
    charge_id: str = "ch_test_1",
    dispute_id: str = "dp_1",
    currency: str = "usd",
) -> dict[str, Any]:
    return stripe_object(
        "dispute",
        id=dispute_id,
        charge=charge_id,
        payment_intent=pi,
        amount=amount,
        currency=currency,
        status=status,
    )


def subscription(
    org_id: str,
    *,
    sub: str = "sub_test_1",
    status: str = "active",
    price: str = "price_pro",
    created: int = 1_800_000_000,
) -> dict[str, Any]:
    return stripe_object(
        "subscription",
        id=sub,
        status=status,
        customer=customer_of(org_id),
        metadata={"organization_id": org_id},
        created=created,
        start_date=created,
        ended_at=None,
        cancel_at=None,
        canceled_at=None,
        current_period_end=created + 30 * 86400,
        items={"object": "list", "data": [{"id": f"si_{sub}", "price": {"id": price}}]},
    )


def invoice(
    org_id: str,
    *,
    inv: str,
    sub: str | None = "sub_test_1",
    paid_cents: int = 2000,
    status: str = "paid",
    created: int = 1_800_000_000,
    pi: str | None = None,
) -> dict[str, Any]:
    return stripe_object(
        "invoice",
        id=inv,
        customer=customer_of(org_id),
        subscription=sub,
        amount_due=max(paid_cents, 2000),
        amount_paid=paid_cents,
        status=status,
        created=created,
        payment_intent=pi,
        billing_reason="subscription_cycle",
        metadata={},
        lines={"object": "list", "data": [{"price": {"id": "price_pro"}}]},
    )


def signed(event_type: str, obj: dict[str, Any], **kwargs: Any) -> tuple[bytes, str]:
    body = event_body(event_type, obj, **kwargs)
    return body, signature_for(body)


def post(client, event_type: str, obj: dict[str, Any], **kwargs: Any):
    body, signature = signed(event_type, obj, **kwargs)
    return client.post(
        URL,
        content=body,
        headers={"Content-Type": "application/json", "Stripe-Signature": signature},
    )


def deliver(body: bytes, signature: str) -> webhooks.WebhookResult:
    """The webhook service itself, on this thread's own connection (for race tests)."""
    with connection():
        return webhooks.receive(body, signature, get_gateway())


def event_id(body: bytes) -> str:
    return str(json.loads(body)["id"])


def deliver_together(deliveries: list[tuple[bytes, str]]) -> None:
    """Deliver signed events from one thread each, released at once by a barrier; any error
    (a 500 included) fails the round."""
    barrier = threading.Barrier(len(deliveries))
    errors: list[BaseException] = []

    def run(body: bytes, signature: str) -> None:
        barrier.wait()
        try:
            deliver(body, signature)
        except BaseException as exc:  # surfaced below: a 500 is a failed round too
            errors.append(exc)

    threads = [threading.Thread(target=run, args=d) for d in deliveries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def reversed_total(org_id: str) -> int:
    """What refunds and lost disputes have taken from the organization, by its entries."""
    with database.connection_context():
        assert_ledger_invariants(org_id)
        return -sum(
            e.amount
            for e in CreditEntry.select().where(
                (CreditEntry.organization == org_id)
                & (CreditEntry.entry_type.in_(("refund", "dispute")))
            )
        )
