"""Typed Stripe events, parsed at the boundary before any effect.

Every handled event type's `data.object` is parsed into a pydantic model that lists only the
fields the service reads, strictly typed: ids and strings bounded by their columns and free of
NUL bytes (PostgreSQL refuses NUL in text) and lone surrogates, amounts integers within what
int64 decimillicents can hold, timestamps within datetime's range, metadata a map of strings.

Decision (README "Decisions"): a correctly signed event that cannot be understood is refused
with a 400 problem and nothing is written. Stripe retries a non-2xx delivery for up to three
days and shows the endpoint failing on its dashboard, so a bug of ours or a new API shape gets
noticed, fixed, and the retried event is then processed; acknowledging it with 200 would drop a
money event silently. Unknown event types are still stored and acknowledged.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    ValidationError,
)

from billing.errors import InvalidRequest

# Amounts in a currency's minor unit: a cents amount times 100,000 decimillicents stays in int64.
MAX_MINOR_UNITS = 10**12
MAX_TIMESTAMP = 253_402_300_799  # 9999-12-31T23:59:59Z


def _storable(value: str) -> str:
    if "\x00" in value:
        raise ValueError("contains a NUL byte")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid UTF-8") from None
    return value


def _id_of(value: Any) -> Any:
    """An expandable reference: the id, or the expanded object's id."""
    return value.get("id") if isinstance(value, dict) else value


def _empty_if_null(value: Any) -> Any:
    return {} if value is None else value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


Text = Annotated[str, StringConstraints(max_length=500), AfterValidator(_storable)]
StripeId = Annotated[
    str, StringConstraints(min_length=1, max_length=255), AfterValidator(_storable)
]
Ref = Annotated[StripeId, BeforeValidator(_id_of)]
Amount = Annotated[StrictInt, Field(ge=0, le=MAX_MINOR_UNITS)]
Timestamp = Annotated[StrictInt, Field(ge=0, le=MAX_TIMESTAMP)]
Currency = Annotated[str, BeforeValidator(_lower), StringConstraints(pattern=r"^[a-z]{3}$")]
Metadata = Annotated[
    dict[Annotated[str, StringConstraints(max_length=40)], Text],
    BeforeValidator(_empty_if_null),
]


class StripeModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class Owned(StripeModel):
    """Fields that name the organization: our metadata, the reference id, the customer."""

    id: StripeId
    metadata: Metadata = {}
    customer: Ref | None = None
    client_reference_id: StripeId | None = None


class Price(StripeModel):
    id: StripeId | None = None
    lookup_key: Text | None = None
    metadata: Metadata = {}


class Item(StripeModel):
    price: Price | None = None
    current_period_end: Timestamp | None = None


class ItemList(StripeModel):
    data: list[Item] = Field(default=[], max_length=100)


class Subscription(Owned):
    status: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    created: Timestamp | None = None
    start_date: Timestamp | None = None
    ended_at: Timestamp | None = None
    cancel_at: Timestamp | None = None
    current_period_end: Timestamp | None = None
    items: ItemList | None = None
    default_payment_method: Ref | None = None


class CurrencyConversion(StripeModel):
    source_currency: Currency
    amount_total: Amount


class CheckoutSession(Owned):
    mode: Text | None = None
    payment_status: Text | None = None
    amount_total: Amount | None = None
    currency: Currency | None = None
    currency_conversion: CurrencyConversion | None = None
    payment_intent: Ref | None = None
    subscription: Ref | None = None


class SubscriptionDetails(StripeModel):
    subscription: Ref | None = None


class InvoiceParent(StripeModel):
    subscription_details: SubscriptionDetails | None = None


class Invoice(Owned):
    subscription: Ref | None = None
    parent: InvoiceParent | None = None
    amount_paid: Amount = 0
    created: Timestamp | None = None
    payment_intent: Ref | None = None
    lines: ItemList | None = None

    @property
    def subscription_id(self) -> str | None:
        """Older API versions name it at the top, newer ones under `parent`."""
        details = self.parent.subscription_details if self.parent else None
        return self.subscription or (details.subscription if details else None)


class PaymentError(StripeModel):
    code: Text | None = None


class PaymentIntent(Owned):
    amount: Amount | None = None
    amount_received: Amount | None = None
    currency: Currency | None = None
    payment_method: Ref | None = None
    latest_charge: Ref | None = None
    client_secret: Text | None = None
    last_payment_error: PaymentError | None = None


class Charge(Owned):
    payment_intent: Ref | None = None
    amount: Amount
    amount_refunded: Amount = 0
    currency: Currency | None = None


class Dispute(Owned):
    charge: Ref | None = None
    payment_intent: Ref | None = None
    amount: Amount
    currency: Currency | None = None
    status: Annotated[str, StringConstraints(min_length=1, max_length=32)]


OBJECT_MODELS: dict[str, type[StripeModel]] = {
    "checkout.session.completed": CheckoutSession,
    "customer.subscription.created": Subscription,
    "customer.subscription.updated": Subscription,
    "customer.subscription.deleted": Subscription,
    "invoice.payment_succeeded": Invoice,
    "invoice.paid": Invoice,
    "invoice.payment_failed": Invoice,
    "payment_intent.succeeded": PaymentIntent,
    "payment_intent.payment_failed": PaymentIntent,
    "payment_intent.requires_action": PaymentIntent,
    "charge.refunded": Charge,
    "charge.dispute.created": Dispute,
    "charge.dispute.closed": Dispute,
}


class EventData(StripeModel):
    object: dict[str, Any]


class Envelope(StripeModel):
    id: StripeId
    type: Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(_storable)]
    created: Timestamp
    data: EventData


class Event(BaseModel):
    """A verified event: its envelope, and its object typed when the type is one we handle."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    id: str
    type: str
    created: int
    object: StripeModel | None


def parse_event(raw: Any) -> Event:
    """The event, or InvalidRequest naming the first field that cannot be understood."""
    try:
        envelope = Envelope.model_validate(raw)
        model = OBJECT_MODELS.get(envelope.type)
        obj = model.model_validate(envelope.data.object) if model else None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "".join(
            c if c.isprintable() else "?" for c in ".".join(str(p) for p in first["loc"])[:200]
        )
        raise InvalidRequest(
            f"the event cannot be understood: {where}: {first['msg'][:200]}"
        ) from None
    return Event(id=envelope.id, type=envelope.type, created=envelope.created, object=obj)
