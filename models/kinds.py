"""The statuses and kinds the tables store, one `StrEnum` each.

Each member's value is the string stored in its column (so no migration): code compares and
writes members, and a row read back compares equal to its member. Models import nothing from
`billing` and nothing from Stripe, so the services and the models share these.
"""

from __future__ import annotations

from enum import StrEnum


class CreditEntryType(StrEnum):
    """`credit_entries.entry_type`: what moved the balance."""

    top_up = "top_up"  # a paid top-up checkout
    recharge = "recharge"  # a paid auto-recharge
    welcome_grant = "welcome_grant"  # a plan's one-time welcome credit
    initial_grant = "initial_grant"
    adjustment = "adjustment"  # an operator's signed correction
    charge = "charge"  # spending: usage, a finalized reservation, a debit
    refund = "refund"  # a refund's reversal of what a payment granted
    dispute = "dispute"  # a lost dispute's reversal


class ReservationStatus(StrEnum):
    open = "open"  # holding credits
    finalized = "finalized"  # charged its actual amount
    released = "released"  # given back whole


class SubscriptionStatus(StrEnum):
    """Our subscription statuses (`stripe_subscriptions.status`, the account's
    `subscription_status`); Stripe's others map onto these (`billing.subscriptions`)."""

    active = "active"
    inactive = "inactive"
    trialing = "trialing"
    past_due = "past_due"
    canceled = "canceled"
    paused = "paused"
    unpaid = "unpaid"


class CheckoutKind(StrEnum):
    subscription = "subscription"
    top_up = "top_up"


class CheckoutStatus(StrEnum):
    open = "open"
    completed = "completed"
    canceled = "canceled"  # the customer left a local session
    expired = "expired"  # no longer payable: a newer subscription checkout replaced it


class PaymentKind(StrEnum):
    """`stripe_payments.kind`: what a Stripe payment bought."""

    top_up = "top_up"
    auto_recharge = "auto_recharge"


class AttemptStatus(StrEnum):
    """`auto_recharge_requests.status`."""

    pending = "pending"
    processing = "processing"
    requires_action = "requires_action"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"
    superseded = "superseded"


class FailureKind(StrEnum):
    """Why an attempt failed; only `declined` and `permanent` count toward turning off."""

    declined = "declined"  # the card said no (also a failed 3-D Secure)
    permanent = "permanent"  # Stripe refused the request: missing customer, card, bad params
    transient = "transient"  # the provider stayed unavailable for every allowed attempt


class InvoiceStatus(StrEnum):
    """`stripe_invoices.status`."""

    paid = "paid"
    failed = "failed"


class OperatorActionKind(StrEnum):
    """`operator_actions.action`."""

    credit_adjustment = "credit_adjustment"
    suspend = "suspend"
    unsuspend = "unsuspend"
