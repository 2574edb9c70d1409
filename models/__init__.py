"""Peewee models, the database binding and the migration runner."""

from models.db import (
    after_rollback,
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
    "UsageRecord",
    "WebhookEvent",
    "after_rollback",
    "connect_database",
    "connection",
    "database",
    "is_postgres",
    "locked",
    "utcnow",
    "write_transaction",
]
