"""Schemathesis hooks (SCHEMATHESIS_HOOKS) for fuzzing the Stripe webhook in Stripe mode.

Every generated body of `receiveStripeWebhook` is signed with the server's webhook secret, as
Stripe would sign it, so the fuzzer reaches event parsing and processing instead of stopping at
the signature check. Most generated events are steered onto a handled type and the seeded
organization, so processing is reached too. A case whose generator removed the header on
purpose is left unsigned (the server must answer 401).
"""

from __future__ import annotations

import json
import os
import time
import uuid
import zlib
from typing import Any

import schemathesis
import stripe

HANDLED_TYPES = (
    "checkout.session.completed",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.payment_succeeded",
    "invoice.paid",
    "invoice.payment_failed",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "payment_intent.requires_action",
    "charge.refunded",
    "charge.dispute.created",
    "charge.dispute.closed",
)


DEFAULTS: dict[str, Any] = {
    "id": "obj_fuzz_1",
    "status": "active",
    "mode": "payment",
    "payment_status": "paid",
    "amount": 1000,
    "amount_total": 1000,
    "amount_refunded": 500,
    "currency": "usd",
    "payment_intent": "pi_fuzz_1",
    "charge": "ch_fuzz_1",
}


def _steer(body: dict[str, Any]) -> None:
    """Three events in four become a handled type with a fresh id; objects name the seeded
    organization and carry the fields a handled object needs unless generated."""
    DEFAULTS["metadata"] = {
        "organization_id": os.environ.get("FUZZ_ORG_ID", ""),
        "kind": "top_up",
        "amount_decimillicents": "100000000",
    }
    kind = body.get("type")
    if isinstance(kind, str):
        pick = zlib.crc32(kind.encode("utf-8", "surrogatepass"))
        if pick % 4:
            body["type"] = HANDLED_TYPES[pick % len(HANDLED_TYPES)]
            # A fresh id, so the event is processed rather than answered as a repeat.
            body["id"] = f"evt_fuzz_{uuid.uuid4().hex}"
    body.setdefault("created", int(time.time()))
    data = body.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if isinstance(obj, dict):
        # Fields the handled objects need, where the generator left them out: the rest of the
        # shape stays as generated, so the boundary model still sees odd values.
        for name, value in DEFAULTS.items():
            obj.setdefault(name, value)


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if case.operation.definition.raw.get("operationId") != "receiveStripeWebhook":
        return
    if "Stripe-Signature" not in (case.headers or {}):
        return  # the generator removed the credential on purpose: leave it missing
    if isinstance(case.body, dict):
        _steer(case.body)
    if isinstance(case.body, bytes):
        raw = case.body
    else:
        try:  # exactly the bytes `requests` sends for json=body
            raw = json.dumps(case.body, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError):
            return
    try:
        payload = raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    signature = stripe.WebhookSignature.generate_signature_header(
        payload, os.environ["STRIPE_WEBHOOK_SECRET"]
    )
    case.headers["Stripe-Signature"] = signature
