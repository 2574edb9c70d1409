"""Constant-cost guards: the month's spend and the daily usage rollups are running totals.

- one debit (and one usage record) issues the same statements with 10 entries in the month as
  with 10,000, and none aggregates over the ledger or the usage records;
- the usage cap reads the running month spend, which a new month resets (write and read);
- the usage summary over any half-open period equals a recount from the records;
- migration 0007 backfills both from existing rows; the audit notices when they drift.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import re

import peewee
import pytest

from billing import ledger, metering
from billing.accounts import locked_account
from billing.audit import ledger_problems
from billing.errors import PaymentRequired
from billing.usage import summarize_usage
from models import BillingAccount, CreditEntry, UsageRecord, database, is_postgres, utcnow
from models.migrate import available_migrations, migrate
from tests.ledger_checks import assert_ledger_invariants

pytestmark = pytest.mark.usefixtures("conn")


class StatementLog(logging.Handler):
    """Collects the SQL Peewee sends (logger "peewee" at DEBUG), parameters left out."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.statements: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, tuple):
            self.statements.append(record.msg[0])


def statements_of(action) -> list[str]:
    log = StatementLog()
    logger = logging.getLogger("peewee")
    previous = logger.level
    logger.addHandler(log)
    logger.setLevel(logging.DEBUG)
    try:
        action()
    finally:
        logger.removeHandler(log)
        logger.setLevel(previous)
    return log.statements


def add_history(organization_id: str, entries: int) -> None:
    """`entries` charges this month, written in bulk (the running totals are not the point)."""
    now = utcnow()
    rows = [
        {
            "organization": organization_id,
            "entry_type": "charge",
            "amount": -1,
            "reason": "history",
            "balance_after": 0,
            "created_at": now,
        }
        for _ in range(entries)
    ]
    with database.atomic():
        for start in range(0, entries, 500):
            CreditEntry.insert_many(rows[start : start + 500]).execute()
    UsageRecord.insert_many(
        [
            {
                "organization": organization_id,
                "category": "api_call",
                "quantity": 1,
                "unit_cost": 1,
                "cost": 1,
                "reference_id": f"history-{i}",
                "created_at": now,
            }
            for i in range(min(entries, 500))
        ]
    ).execute()


AGGREGATE = re.compile(r"\b(SUM|COUNT|MAX|MIN|AVG)\s*\(", re.I)


def _shapes(statements: list[str]) -> list[str]:
    return [re.sub(r"\s+", " ", s) for s in statements]


@pytest.mark.parametrize("operation", ["debit", "record_usage", "batch"])
def test_one_debit_costs_the_same_with_10_or_10000_entries(org, operation):
    with locked_account(org.id) as account:
        ledger.grant(account, 10**12, "top_up", reason="seed")
    BillingAccount.update(usage_cap=10**15).execute()
    counter = iter(range(10**6))

    def act() -> None:
        if operation == "debit":
            with locked_account(org.id) as account:
                ledger.debit(account, 1, reason="x")
        elif operation == "record_usage":
            metering.record_usage(org.id, "api_call", 1, 1, f"ref-{next(counter)}")
        else:
            events = [
                metering.UsageEvent(org.id, "api_call", 1, 1, f"ref-{next(counter)}", None)
                for _ in range(3)
            ]
            metering.record_usage_batch(events)

    for _ in range(10):
        act()
    small = statements_of(act)
    add_history(org.id, 10_000)
    large = statements_of(act)
    assert _shapes(small) == _shapes(large)
    # The lock, the writes, and for a usage record its reference lookup and the rollup.
    assert len(small) <= (3 if operation == "debit" else 6), small  # 2 and 3 on PostgreSQL
    for statement in small:
        touches_history = "credit_entries" in statement or "usage_records" in statement
        assert not (touches_history and AGGREGATE.search(statement)), statement
        assert "usage_daily_rollups" not in statement or not AGGREGATE.search(statement)


def test_usage_cap_reads_the_running_month_spend(org, monkeypatch):
    with locked_account(org.id) as account:
        ledger.grant(account, 10**9, "top_up", reason="seed")
    BillingAccount.update(usage_cap=100).execute()
    clock = {"now": dt.datetime(2026, 11, 30, 23, 59, 59, 999000)}
    monkeypatch.setattr(ledger, "utcnow", lambda: clock["now"])
    with locked_account(org.id) as account:
        ledger.debit(account, 80)
    with pytest.raises(PaymentRequired), locked_account(org.id) as account:
        ledger.debit(account, 30)  # 110 > 100 in November
    account = BillingAccount.get_by_id(org.id)
    assert (account.spend_month, account.month_spend) == ("2026-11", 80)
    # A read at the boundary: December has spent nothing, before any December write.
    assert ledger.month_spend(account, dt.datetime(2026, 12, 1)) == 0
    assert ledger.month_spend(account, dt.datetime(2026, 11, 30, 23, 59, 59)) == 80
    clock["now"] = dt.datetime(2026, 12, 1)
    with locked_account(org.id) as account:
        ledger.debit(account, 80)  # the first debit of December starts from zero
    account = BillingAccount.get_by_id(org.id)
    assert (account.spend_month, account.month_spend) == ("2026-12", 80)
    with pytest.raises(PaymentRequired), locked_account(org.id) as account:
        ledger.debit(account, 30)
    with locked_account(org.id) as account:
        ledger.debit(account, 20)
    assert BillingAccount.get_by_id(org.id).month_spend == 100


def test_reservations_count_and_finalization_moves_the_month_spend(org):
    with locked_account(org.id) as account:
        ledger.grant(account, 10**9, "top_up", reason="seed")
    BillingAccount.update(usage_cap=1000).execute()
    held = ledger.reserve(org.id, 600, reference_id="job-1")
    with pytest.raises(PaymentRequired), locked_account(org.id) as account:
        ledger.debit(account, 500)  # 600 held + 500 > 1000
    ledger.finalize_reservation(org.id, held.reservation.id, 700)
    account = assert_ledger_invariants(org.id)
    assert account.month_spend == 700 and account.reserved_credits == 0
    with pytest.raises(PaymentRequired):
        metering.record_usage(org.id, "api_call", 301, 1, "over")
    metering.record_usage(org.id, "api_call", 300, 1, "fits")
    assert assert_ledger_invariants(org.id).month_spend == 1000


def _recount(organization_id: str, category: str, start: dt.datetime, end: dt.datetime):
    records = UsageRecord.select().where(
        (UsageRecord.organization == organization_id) & (UsageRecord.category == category)
    )
    chosen = [r for r in records if start <= r.created_at < end]
    return sum(r.quantity for r in chosen), sum(r.cost for r in chosen)


def test_summary_over_any_period_equals_a_recount(org, monkeypatch):
    with locked_account(org.id) as account:
        ledger.grant(account, 10**12, "top_up", reason="seed")
    rng = random.Random(13)
    base = dt.datetime(2026, 10, 28)
    moments = sorted(
        base + dt.timedelta(seconds=rng.randrange(0, 9 * 86400), microseconds=rng.randrange(10**6))
        for _ in range(120)
    )
    moments += [dt.datetime(2026, 11, 1), dt.datetime(2026, 11, 2) - dt.timedelta(microseconds=1)]
    for i, moment in enumerate(sorted(moments)):
        monkeypatch.setattr(ledger, "utcnow", lambda moment=moment: moment)
        category = ("api_call", "workflow_execution")[i % 2]
        metering.record_usage(
            org.id, category, rng.randrange(1, 50), rng.randrange(0, 900), f"r{i}"
        )
    monkeypatch.undo()
    assert ledger_problems(org.id) == []
    periods = [
        (dt.datetime(2026, 11, 1), dt.datetime(2026, 12, 1)),  # whole days only
        (dt.datetime(2026, 11, 1), dt.datetime(2026, 11, 2)),  # exactly one day
        (dt.datetime(2026, 11, 1, 12), dt.datetime(2026, 11, 1, 13)),  # inside one day
        (dt.datetime(2026, 11, 1, 12), dt.datetime(2026, 11, 2, 13)),  # two partial days
        (dt.datetime(2026, 11, 1), dt.datetime(2026, 11, 1)),  # empty
        (dt.datetime(2026, 11, 2) - dt.timedelta(microseconds=1), dt.datetime(2026, 11, 2)),
    ]
    for _ in range(40):
        a = base + dt.timedelta(seconds=rng.randrange(-86400, 10 * 86400))
        b = a + dt.timedelta(seconds=rng.randrange(0, 6 * 86400), microseconds=rng.randrange(10**6))
        periods.append((a, b))
    for start, end in periods:
        for category in ("api_call", "workflow_execution"):
            summary = summarize_usage(org.id, category, start, end)
            assert (summary.total_quantity, summary.total_cost) == _recount(
                org.id, category, start, end
            ), (start, end, category)


def test_audit_notices_running_totals_that_drift(org):
    with locked_account(org.id) as account:
        ledger.grant(account, 10**6, "top_up", reason="seed")
    metering.record_usage(org.id, "api_call", 2, 10, "a")
    assert ledger_problems(org.id) == []
    BillingAccount.update(month_spend=BillingAccount.month_spend + 1).execute()
    assert any("month spend" in p for p in ledger_problems(org.id))
    BillingAccount.update(month_spend=20).execute()
    assert ledger_problems(org.id) == []
    UsageRecord.update(quantity=3).execute()
    assert any("usage rollup" in p for p in ledger_problems(org.id))


# --- migration 0007 backfills the running totals from existing rows ------------------------


@pytest.fixture
def bare_database(db):
    """A separate, empty database (a temporary SQLite file, or a scratch PostgreSQL schema)."""
    if is_postgres():
        params = dict(db.connect_params)
        scratch = peewee.PostgresqlDatabase(
            db.database, options="-csearch_path=backfill_0007", **params
        )
        with database.connection_context():
            database.execute_sql("DROP SCHEMA IF EXISTS backfill_0007 CASCADE")
            database.execute_sql("CREATE SCHEMA backfill_0007")
        yield scratch
        scratch.close()
        with database.connection_context():
            database.execute_sql("DROP SCHEMA backfill_0007 CASCADE")
    else:
        import tempfile

        scratch = peewee.SqliteDatabase(f"{tempfile.mkdtemp()}/backfill.sqlite3")
        yield scratch
        scratch.close()


def test_migration_0007_backfills_month_spend_and_rollups(bare_database, monkeypatch):
    db = bare_database
    before = [m for m in available_migrations() if m[0] < "0007"]
    monkeypatch.setattr("models.migrate.available_migrations", lambda: before)
    migrate(db)
    p = db.param
    rows = [
        ("o1", "charge", -5, "2026-10-31 23:59:59.999999"),
        ("o1", "charge", -7, "2026-11-01 00:00:00"),
        ("o1", "charge", -11, "2026-11-20 10:00:00.5"),
        ("o1", "top_up", 100, "2026-11-21 10:00:00"),
        ("o2", "top_up", 100, "2026-11-21 10:00:00"),
    ]
    with db.connection_context():
        for org_id in ("o1", "o2"):
            db.execute_sql(
                f"INSERT INTO organizations (id, name, created_at) VALUES ({p}, {p}, {p})",
                (org_id, org_id, dt.datetime(2026, 1, 1)),
            )
            db.execute_sql(
                "INSERT INTO billing_accounts (organization_id, created_at, updated_at) "
                f"VALUES ({p}, {p}, {p})",
                (org_id, dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 1)),
            )
        for i, (org_id, kind, amount, at) in enumerate(rows):
            db.execute_sql(
                "INSERT INTO credit_entries (organization_id, entry_type, amount, balance_after, "
                f"created_at) VALUES ({p}, {p}, {p}, 0, {p})",
                (org_id, kind, amount, dt.datetime.fromisoformat(at)),
            )
            if kind == "charge":
                db.execute_sql(
                    "INSERT INTO usage_records (organization_id, category, quantity, unit_cost, "
                    "cost, reference_id, created_at) "
                    f"VALUES ({p}, 'api_call', {p}, 1, {p}, {p}, {p})",
                    (org_id, -amount, -amount, f"ref{i}", dt.datetime.fromisoformat(at)),
                )
        monkeypatch.undo()
        assert [v for v in migrate(db) if v.startswith("0007")]
        accounts = dict(
            (r[0], (r[1], r[2]))
            for r in db.execute_sql(
                "SELECT organization_id, spend_month, month_spend FROM billing_accounts"
            )
        )
        assert accounts == {"o1": ("2026-11", 18), "o2": (None, 0)}
        rollups = sorted(
            tuple(r)
            for r in db.execute_sql(
                "SELECT organization_id, category, day, quantity, cost, events "
                "FROM usage_daily_rollups"
            )
        )
        assert rollups == [
            ("o1", "api_call", "2026-10-31", 5, 5, 1),
            ("o1", "api_call", "2026-11-01", 7, 7, 1),
            ("o1", "api_call", "2026-11-20", 11, 11, 1),
        ]
