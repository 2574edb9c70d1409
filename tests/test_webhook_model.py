"""Signed events that cannot be understood: a 400 problem, nothing written, never a 500.

Each case is a correctly signed event of a handled type whose shape is wrong in one place
(the boundary model in billing/stripe_events.py refuses it before any effect); a generated
sweep then mutates fields of real event shapes at random.
"""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.units import DOLLAR
from models import (
    CreditEntry,
    StripeDispute,
    StripeInvoice,
    StripePayment,
    StripeSubscription,
    WebhookEvent,
    database,
)
from tests.ledger_checks import assert_ledger_invariants
from tests.stripe_events import (
    URL,
    charge,
    dispute,
    invoice,
    link_customer,
    subscription,
    top_up_intent,
    top_up_session,
)
from tests.stripe_fakes import fixtures, signature_for

pytestmark = pytest.mark.usefixtures("stripe_mode")

ORG = "00000000-0000-4000-8000-000000000000"  # replaced by the test's organization id


def base_objects(org_id: str) -> dict[str, dict[str, Any]]:
    return {
        "checkout.session.completed": top_up_session(org_id, amount_decimillicents=10 * DOLLAR),
        "customer.subscription.updated": subscription(org_id),
        "invoice.paid": invoice(org_id, inv="in_bad"),
        "invoice.payment_failed": invoice(org_id, inv="in_bad", paid_cents=0),
        "payment_intent.succeeded": top_up_intent(org_id, ordered=10 * DOLLAR),
        "payment_intent.requires_action": top_up_intent(org_id),
        "charge.refunded": charge(org_id, refunded_cents=1000),
        "charge.dispute.created": dispute(status="needs_response"),
        "charge.dispute.closed": dispute(status="lost"),
    }


def envelope(event_type: str, obj: Any, **overrides: Any) -> dict[str, Any]:
    event = copy.deepcopy(fixtures()["event"])
    event.update(
        id=f"evt_{uuid.uuid4().hex[:24]}",
        type=event_type,
        created=1_800_000_000,
        data={"object": obj},
    )
    event.update(overrides)
    return event


def send(client, event: dict[str, Any]):
    body = json.dumps(event).encode()
    return client.post(
        URL,
        content=body,
        headers={"Content-Type": "application/json", "Stripe-Signature": signature_for(body)},
    )


def nothing_written() -> None:
    with database.connection_context():
        for model in (
            WebhookEvent,
            CreditEntry,
            StripePayment,
            StripeDispute,
            StripeSubscription,
            StripeInvoice,
        ):
            assert model.select().count() == 0, model.__name__


def _with(event_type: str, **fields: Any):
    def make(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        obj = {**objs[event_type], **fields}
        return envelope(event_type, obj)

    return make


def _without(event_type: str, field: str):
    def make(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        obj = {k: v for k, v in objs[event_type].items() if k != field}
        return envelope(event_type, obj)

    return make


def _envelope_with(**overrides: Any):
    def make(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return envelope("invoice.paid", objs["invoice.paid"], **overrides)

    return make


CASES = {
    "metadata is a string": _with("checkout.session.completed", metadata="org"),
    "metadata is a list": _with("payment_intent.succeeded", metadata=["kind", "top_up"]),
    "metadata value not a string": _with("charge.refunded", metadata={"organization_id": 7}),
    "items not an object": _with("customer.subscription.updated", items="si_1"),
    "items.data not a list": _with("customer.subscription.updated", items={"data": {"a": 1}}),
    "lines a list": _with("invoice.paid", lines=[{"price": {"id": "price_pro"}}]),
    "price not an object": _with("invoice.paid", lines={"data": [{"price": 5}]}),
    "no id (session)": _without("checkout.session.completed", "id"),
    "no id (dispute)": _without("charge.dispute.closed", "id"),
    "no amount (charge)": _without("charge.refunded", "amount"),
    "amount a string": _with("charge.refunded", amount_refunded="1000"),
    "amount a float": _with("checkout.session.completed", amount_total=10.5),
    "amount a boolean": _with("payment_intent.succeeded", amount_received=True),
    "amount negative": _with("charge.dispute.closed", amount=-1000),
    "amount huge": _with("charge.refunded", amount=2**70, amount_refunded=2**70),
    "amount_paid huge": _with("invoice.paid", amount_paid=10**30),
    "object created 2**70": _with("customer.subscription.updated", created=2**70),
    "period end 2**70": _with("customer.subscription.updated", current_period_end=2**70),
    "event created 2**70": _envelope_with(created=2**70),
    "event created negative": _envelope_with(created=-1),
    "event created a string": _envelope_with(created="1800000000"),
    "event has no created": lambda objs: {
        k: v for k, v in _envelope_with()(objs).items() if k != "created"
    },
    "NUL in event id": _envelope_with(id="evt_\x00nul"),
    "NUL in type": _envelope_with(type="invoice.paid\x00"),
    "NUL in object id": _with("payment_intent.succeeded", id="pi_\x00"),
    "NUL in metadata": _with(
        "checkout.session.completed", metadata={"organization_id": ORG, "kind": "top\x00up"}
    ),
    "lone surrogate in id": _with("charge.refunded", id="ch_\ud800"),
    "event id too long": _envelope_with(id="evt_" + "x" * 300),
    "type too long": _envelope_with(type="invoice." + "x" * 300),
    "object id too long": _with("invoice.paid", id="in_" + "x" * 300),
    "customer too long": _with("invoice.paid", customer="cus_" + "x" * 300),
    "currency too long": _with("checkout.session.completed", currency="usdollar"),
    "status too long": _with("customer.subscription.updated", status="active" * 20),
    "client_secret too long": _with("payment_intent.requires_action", client_secret="s" * 600),
    "data.object a string": _envelope_with(data={"object": "in_1"}),
    "data missing": lambda objs: {k: v for k, v in _envelope_with()(objs).items() if k != "data"},
    "subscription status missing": _without("customer.subscription.updated", "status"),
    "currency_conversion a string": _with(
        "checkout.session.completed", currency="krw", currency_conversion="usd"
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_signed_event_is_a_400_that_writes_nothing(client, org, case):
    link_customer(org.id)
    event = CASES[case](base_objects(org.id))
    event = json.loads(json.dumps(event).replace(ORG, org.id))
    r = send(client, event)
    assert r.status_code == 400, (case, r.status_code, r.text)
    problem = r.json()
    assert problem["code"] == "BadRequest", problem
    nothing_written()


def test_every_base_object_is_understood(client, org):
    """The cases above break exactly one thing: the unbroken events are accepted."""
    link_customer(org.id)
    for event_type, obj in base_objects(org.id).items():
        r = send(client, envelope(event_type, obj))
        assert r.status_code == 200, (event_type, r.text)


def test_unknown_type_with_any_object_is_stored_and_acknowledged(client, org):
    r = send(client, envelope("customer.tax_id.created", {"id": 5, "metadata": "x"}))
    assert r.status_code == 200 and r.json()["processed"] is False


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_generated_shapes_answer_200_or_400_never_500(client, org, data):
    link_customer(org.id)
    objects = base_objects(org.id)
    event_type = data.draw(st.sampled_from(sorted(objects)))
    obj = dict(objects[event_type])
    for field in data.draw(st.lists(st.sampled_from(sorted(obj)), min_size=1, max_size=3)):
        obj[field] = data.draw(json_values)
    r = send(client, envelope(event_type, obj))
    assert r.status_code in (200, 400), r.text
    with database.connection_context():
        assert_ledger_invariants(org.id)
