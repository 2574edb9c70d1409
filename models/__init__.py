"""Peewee models, the database binding and the migration runner."""

from models.db import (
    connect_database,
    connection,
    database,
    is_postgres,
    locked,
    write_transaction,
)
from models.entities import (
    ALL_MODELS,
    AutoRechargeRequest,
    BillingAccount,
    CheckoutSession,
    CreditEntry,
    IdempotencyRecord,
    Membership,
    Organization,
    ReminderDismissal,
    Reservation,
    UsageDailyRollup,
    UsageRecord,
    WebhookEvent,
    utcnow,
)

__all__ = [
    "ALL_MODELS",
    "AutoRechargeRequest",
    "BillingAccount",
    "CheckoutSession",
    "CreditEntry",
    "IdempotencyRecord",
    "Membership",
    "Organization",
    "ReminderDismissal",
    "Reservation",
    "UsageDailyRollup",
    "UsageRecord",
    "WebhookEvent",
    "connect_database",
    "connection",
    "database",
    "is_postgres",
    "locked",
    "utcnow",
    "write_transaction",
]
