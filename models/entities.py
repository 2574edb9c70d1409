"""Peewee models. They describe rows; the rules about money live in the `billing` package.

The schema itself is owned by the versioned SQL files in `models/migrations`; these classes must
match them (a test compares the two on both databases).
"""

from __future__ import annotations

import uuid

import peewee

from models.clock import utcnow
from models.db import database
from models.kinds import AttemptStatus, CheckoutStatus, ReservationStatus, SubscriptionStatus


class BaseModel(peewee.Model):
    class Meta:
        database = database
        legacy_table_names = False


class Organization(BaseModel):
    id = peewee.CharField(primary_key=True, max_length=36)
    name = peewee.CharField(max_length=200)
    created_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "organizations"


class Membership(BaseModel):
    id = peewee.AutoField()
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str  # the raw foreign key, readable without a query
    user_id = peewee.CharField(max_length=255)
    email = peewee.CharField(max_length=254, null=True)
    role = peewee.CharField(max_length=16)
    created_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "memberships"


class BillingAccount(BaseModel):
    """One row per organization: its settings and the running totals the ledger keeps."""

    organization = peewee.ForeignKeyField(
        Organization, primary_key=True, column_name="organization_id"
    )
    organization_id: str  # the raw foreign key, readable without a query
    billing_email = peewee.CharField(max_length=254, null=True)
    stripe_customer_id = peewee.CharField(max_length=255, null=True)
    stripe_subscription_id = peewee.CharField(max_length=255, null=True)
    stripe_payment_method_id = peewee.CharField(max_length=255, null=True)
    stripe_metered_subscription_item_id = peewee.CharField(max_length=255, null=True)
    credits_balance = peewee.BigIntegerField(default=0)
    reserved_credits = peewee.BigIntegerField(default=0)
    auto_recharge_enabled = peewee.BooleanField(default=False)
    auto_recharge_threshold = peewee.BigIntegerField(null=True)
    auto_recharge_amount = peewee.BigIntegerField(null=True)
    usage_cap = peewee.BigIntegerField(null=True)
    subscription_status = peewee.CharField(max_length=16, default=SubscriptionStatus.inactive)
    subscription_plan = peewee.CharField(max_length=16, null=True)
    subscription_started_at = peewee.DateTimeField(null=True)
    subscription_ends_at = peewee.DateTimeField(null=True)
    subscription_current_period_end = peewee.DateTimeField(null=True)
    suspended_at = peewee.DateTimeField(null=True)
    payment_grace_period_ends_at = peewee.DateTimeField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)
    updated_at = peewee.DateTimeField(default=utcnow)
    # `created` of the newest subscription event applied: older events never overwrite it.
    subscription_state_at = peewee.BigIntegerField(null=True)
    welcome_credit_granted_at = peewee.DateTimeField(null=True)
    auto_recharge_disabled_reason = peewee.CharField(max_length=500, null=True)
    # The enqueue decision reads only these (no outbox query per debit): the attempt in
    # flight, when the last one was requested (cooldown), and consecutive counted failures.
    auto_recharge_in_flight_id = peewee.CharField(max_length=36, null=True)
    auto_recharge_last_requested_at = peewee.DateTimeField(null=True)
    auto_recharge_failure_count = peewee.IntegerField(default=0)
    # Why an operator suspended the organization (with `suspended_at`, the operator's hold).
    suspension_reason = peewee.CharField(max_length=500, null=True)
    # Spend (charges) in the UTC month `spend_month` ('YYYY-MM'), kept by the ledger in each
    # charge's own transaction; another month than the current one means 0 spent so far.
    spend_month = peewee.CharField(max_length=7, null=True)
    month_spend = peewee.BigIntegerField(default=0)
    # Since when an open Stripe dispute holds spending (separate from an operator's suspension).
    disputed_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = "billing_accounts"


class CreditEntry(BaseModel):
    """An append-only ledger line. `idempotency_ref` makes each money movement apply once."""

    id = peewee.BigAutoField()
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str  # the raw foreign key, readable without a query
    entry_type = peewee.CharField(max_length=32)
    amount = peewee.BigIntegerField()
    reason = peewee.CharField(max_length=500, null=True)
    reference_id = peewee.CharField(max_length=255, null=True)
    idempotency_ref = peewee.CharField(max_length=300, null=True, unique=True)
    balance_after = peewee.BigIntegerField()
    created_at = peewee.DateTimeField(default=utcnow)
    # The entry's id on the wire (a UUID); `id` stays the commit order that history pages by.
    public_id = peewee.CharField(max_length=36, unique=True, default=lambda: str(uuid.uuid4()))

    class Meta:
        table_name = "credit_entries"


class UsageRecord(BaseModel):
    id = peewee.BigAutoField()
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str  # the raw foreign key, readable without a query
    category = peewee.CharField(max_length=32)
    quantity = peewee.BigIntegerField()
    unit_cost = peewee.BigIntegerField()
    cost = peewee.BigIntegerField()
    reference_id = peewee.CharField(max_length=255)
    metadata = peewee.TextField(null=True)
    credit_entry = peewee.ForeignKeyField(CreditEntry, null=True, column_name="credit_entry_id")
    created_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "usage_records"


class ReminderDismissal(BaseModel):
    id = peewee.AutoField()
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str  # the raw foreign key, readable without a query
    user_id = peewee.CharField(max_length=255)
    dismissed_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "reminder_dismissals"


class Reservation(BaseModel):
    """Credits held for work in progress; finalized for the actual amount or released."""

    id = peewee.CharField(primary_key=True, max_length=36)
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str  # the raw foreign key, readable without a query
    amount = peewee.BigIntegerField()
    status = peewee.CharField(max_length=16, default=ReservationStatus.open)
    reference_id = peewee.CharField(max_length=255)
    final_amount = peewee.BigIntegerField(null=True)
    credit_entry = peewee.ForeignKeyField(CreditEntry, null=True, column_name="credit_entry_id")
    created_at = peewee.DateTimeField(default=utcnow)
    closed_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = "reservations"


class AutoRechargeRequest(BaseModel):
    """Outbox row: written with the debit that crossed the threshold, drained by the worker."""

    id = peewee.CharField(primary_key=True, max_length=36)
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str  # the raw foreign key, readable without a query
    status = peewee.CharField(max_length=16, default=AttemptStatus.pending)
    amount = peewee.BigIntegerField()
    failure_reason = peewee.CharField(max_length=500, null=True)
    stripe_payment_intent_id = peewee.CharField(max_length=255, null=True)
    client_secret = peewee.CharField(max_length=500, null=True)
    attempts = peewee.IntegerField(default=0)
    created_at = peewee.DateTimeField(default=utcnow)
    updated_at = peewee.DateTimeField(default=utcnow)
    completed_at = peewee.DateTimeField(null=True)
    # Due time (the queue's order) and the claim's lease: an expired lease is claimable again.
    next_attempt_at = peewee.DateTimeField(default=utcnow)
    lease_expires_at = peewee.DateTimeField(null=True)
    failure_kind = peewee.CharField(max_length=16, null=True)
    # The card the attempt charges, pinned at its first charge (every retry repeats the request).
    stripe_payment_method_id = peewee.CharField(max_length=255, null=True)

    class Meta:
        table_name = "auto_recharge_requests"


class IdempotencyRecord(BaseModel):
    id = peewee.AutoField()
    scope = peewee.CharField(max_length=100)
    idempotency_key = peewee.CharField(max_length=255)
    fingerprint = peewee.CharField(max_length=64)
    status_code = peewee.IntegerField(null=True)
    response_body = peewee.TextField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)
    lease_expires_at = peewee.DateTimeField(null=True)  # an in-progress claim's lease

    class Meta:
        table_name = "idempotency_records"


class CheckoutSession(BaseModel):
    """A checkout (subscription) or top-up session we created, Stripe's or local."""

    id = peewee.CharField(primary_key=True, max_length=255)
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str
    kind = peewee.CharField(max_length=16)
    plan = peewee.CharField(max_length=16, null=True)
    amount = peewee.BigIntegerField(null=True)
    url = peewee.CharField(max_length=2048)
    status = peewee.CharField(max_length=16, default=CheckoutStatus.open)
    created_at = peewee.DateTimeField(default=utcnow)
    completed_at = peewee.DateTimeField(null=True)
    success_url = peewee.CharField(max_length=2048, null=True)
    cancel_url = peewee.CharField(max_length=2048, null=True)
    stripe_subscription_id = peewee.CharField(max_length=255, null=True)  # what paying it made

    class Meta:
        table_name = "checkout_sessions"


class WebhookEvent(BaseModel):
    """A Stripe event, stored once by its id; `processed_at` is set in the same transaction
    as the event's effects, which is what makes processing exactly-once."""

    id = peewee.CharField(primary_key=True, max_length=255)
    event_type = peewee.CharField(max_length=255)
    stripe_created = peewee.BigIntegerField()
    payload = peewee.TextField()
    organization_id = peewee.CharField(max_length=36, null=True)
    outcome = peewee.CharField(max_length=500, null=True)
    received_at = peewee.DateTimeField(default=utcnow)
    processed_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = "webhook_events"


class OperatorAction(BaseModel):
    """What an operator did to an organization, and why: the trail behind suspensions and
    credit adjustments (the ledger entry itself is linked for adjustments)."""

    id = peewee.AutoField()
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str
    action = peewee.CharField(max_length=32)
    reason = peewee.CharField(max_length=500)
    amount = peewee.BigIntegerField(null=True)
    credit_entry = peewee.ForeignKeyField(CreditEntry, null=True, column_name="credit_entry_id")
    created_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "operator_actions"


class UsageDailyRollup(BaseModel):
    """Usage of one (organization, category) on one UTC day ('YYYY-MM-DD'), kept in the same
    transaction as each usage record, so a summary reads days instead of events."""

    id = peewee.BigAutoField()
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str  # the raw foreign key, readable without a query
    category = peewee.CharField(max_length=32)
    day = peewee.CharField(max_length=10)
    quantity = peewee.BigIntegerField()
    cost = peewee.BigIntegerField()
    events = peewee.BigIntegerField()

    class Meta:
        table_name = "usage_daily_rollups"
        indexes = ((("organization", "category", "day"), True),)


class StripePayment(BaseModel):
    """One Stripe payment (keyed by PaymentIntent id): what was ordered and charged, what it
    granted, and what refunds and lost disputes took back. Shares are billionths of the payment;
    `reversed_amount <= granted_amount` always. Written only under the account lock."""

    id = peewee.CharField(primary_key=True, max_length=255)
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str
    kind = peewee.CharField(max_length=16)
    charge_id = peewee.CharField(max_length=255, null=True)
    ordered_amount = peewee.BigIntegerField(null=True)
    charged_currency = peewee.CharField(max_length=3, null=True)
    charged_amount = peewee.BigIntegerField(null=True)
    granted_amount = peewee.BigIntegerField(default=0)
    refunded_share = peewee.BigIntegerField(default=0)
    disputed_share = peewee.BigIntegerField(default=0)
    reversed_amount = peewee.BigIntegerField(default=0)
    flagged_reason = peewee.CharField(max_length=500, null=True)
    created_at = peewee.DateTimeField(default=utcnow)
    updated_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "stripe_payments"


class StripeDispute(BaseModel):
    """A dispute on one of our payments; while it is open, spending is held."""

    id = peewee.CharField(primary_key=True, max_length=255)
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str
    payment_id = peewee.CharField(max_length=255, null=True)
    status = peewee.CharField(max_length=32)
    is_open = peewee.BooleanField()
    opened_at = peewee.DateTimeField(default=utcnow)
    closed_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = "stripe_disputes"


class StripeSubscription(BaseModel):
    """A subscription's newest known state; (event_created, event_rank, event_id) orders events."""

    id = peewee.CharField(primary_key=True, max_length=255)
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str
    status = peewee.CharField(max_length=16)
    plan = peewee.CharField(max_length=16, null=True)
    subscription_created = peewee.BigIntegerField()
    started_at = peewee.DateTimeField(null=True)
    ends_at = peewee.DateTimeField(null=True)
    current_period_end = peewee.DateTimeField(null=True)
    payment_method_id = peewee.CharField(max_length=255, null=True)
    event_created = peewee.BigIntegerField()
    event_rank = peewee.IntegerField()
    event_id = peewee.CharField(max_length=255)

    class Meta:
        table_name = "stripe_subscriptions"


class StripeInvoice(BaseModel):
    """An invoice's payment state; `resolved` marks a failure that a later payment settled."""

    id = peewee.CharField(primary_key=True, max_length=255)
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str
    subscription_id = peewee.CharField(max_length=255, null=True)
    status = peewee.CharField(max_length=16)
    amount_paid = peewee.BigIntegerField()
    invoice_created = peewee.BigIntegerField()
    event_created = peewee.BigIntegerField()
    resolved = peewee.BooleanField(default=False)

    class Meta:
        table_name = "stripe_invoices"


ALL_MODELS: list[type[BaseModel]] = [
    Organization,
    Membership,
    BillingAccount,
    CreditEntry,
    UsageRecord,
    ReminderDismissal,
    Reservation,
    AutoRechargeRequest,
    IdempotencyRecord,
    CheckoutSession,
    WebhookEvent,
    OperatorAction,
    UsageDailyRollup,
    StripePayment,
    StripeDispute,
    StripeSubscription,
    StripeInvoice,
]
