"""Domain counters for Prometheus. Under gunicorn they aggregate across workers through
prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set in gunicorn.conf.py)."""

from __future__ import annotations

from prometheus_client import Counter

LEDGER_ENTRIES = Counter(
    "billing_ledger_entries_total", "Ledger entries appended, by entry type.", ["entry_type"]
)
LEDGER_REFUSALS = Counter(
    "billing_ledger_refusals_total", "Spending refused with 402, by reason.", ["reason"]
)
WEBHOOK_EVENTS = Counter(
    "billing_webhook_events_total",
    "Stripe events received, by type and result.",
    ["event_type", "result"],
)
