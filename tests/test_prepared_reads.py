"""The hot reads rendered once (models/prepared.py) load exactly what Peewee's own query
loads, on both databases: every column type, nulls, a clean (not dirty) instance, and the row
lock on PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest

from billing import ledger
from billing.accounts import get_account, lock_account, locked_account
from billing.auth import Role, User, require_role
from billing.errors import NotFound
from billing.organizations import add_member, create_organization
from models import (
    BillingAccount,
    CreditEntry,
    CreditEntryType,
    Membership,
    is_postgres,
    write_transaction,
)
from tests.test_metering_scale import statements_of

pytestmark = pytest.mark.usefixtures("conn")

MOMENT = dt.datetime(2026, 3, 4, 5, 6, 7, 890123)


def _account_with_every_field_set() -> str:
    org = create_organization("Prepared")
    BillingAccount.update(
        billing_email="billing@example.com",
        stripe_customer_id="cus_1",
        stripe_subscription_id="sub_1",
        stripe_payment_method_id="pm_1",
        stripe_metered_subscription_item_id="si_1",
        credits_balance=-(2**62),
        reserved_credits=2**40,
        auto_recharge_enabled=True,
        auto_recharge_threshold=5,
        auto_recharge_amount=7,
        usage_cap=2**63 - 1,
        subscription_status="past_due",
        subscription_plan="pro",
        subscription_started_at=MOMENT,
        subscription_ends_at=MOMENT + dt.timedelta(days=1),
        subscription_current_period_end=MOMENT + dt.timedelta(days=2),
        suspended_at=MOMENT + dt.timedelta(days=3),
        payment_grace_period_ends_at=MOMENT + dt.timedelta(days=4),
        subscription_state_at=1_700_000_000,
        welcome_credit_granted_at=MOMENT + dt.timedelta(days=5),
        auto_recharge_disabled_reason="card declined",
        auto_recharge_in_flight_id="7f6b4a52-2b1e-4c8e-9a43-0a9d3d1e2f00",
        auto_recharge_last_requested_at=MOMENT + dt.timedelta(days=6),
        auto_recharge_failure_count=3,
        suspension_reason="review",
        spend_month="2026-03",
        month_spend=12345,
        disputed_at=MOMENT + dt.timedelta(days=7),
    ).where(BillingAccount.organization == org.id).execute()
    return org.id


@pytest.mark.parametrize("read", [get_account, lock_account], ids=["get", "lock"])
def test_a_prepared_read_loads_what_peewee_loads(read):
    org_id = _account_with_every_field_set()
    expected = BillingAccount.get_by_id(org_id)
    with write_transaction():
        account = read(org_id)
    assert account.__data__ == expected.__data__
    assert isinstance(account.suspended_at, dt.datetime)
    assert account.suspended_at == MOMENT + dt.timedelta(days=3)
    assert account.auto_recharge_enabled is True
    assert account.organization_id == org_id
    assert account.dirty_fields == []  # loaded, not changed: save() after one change stays exact


def test_a_prepared_read_keeps_nulls_and_defaults():
    org = create_organization("Fresh")
    account = get_account(org.id)
    assert account.__data__ == BillingAccount.get_by_id(org.id).__data__
    assert account.usage_cap is None and account.suspended_at is None
    assert account.auto_recharge_enabled is False


def test_an_account_changed_after_a_prepared_read_saves_what_changed():
    org_id = _account_with_every_field_set()
    with write_transaction():
        account = lock_account(org_id)
        account.usage_cap = 99
        account.save(only=account.dirty_fields)
    stored = BillingAccount.get_by_id(org_id)
    assert stored.usage_cap == 99
    assert stored.suspended_at == MOMENT + dt.timedelta(days=3)


def test_unknown_organizations_are_not_found():
    with pytest.raises(NotFound):
        get_account("00000000-0000-0000-0000-000000000000")
    with write_transaction(), pytest.raises(NotFound):
        lock_account("00000000-0000-0000-0000-000000000000")


def test_only_the_lock_takes_a_row_lock_and_only_on_postgresql():
    org = create_organization("Locks")

    def lock() -> None:
        with write_transaction():
            lock_account(org.id)

    locking = [s for s in statements_of(lock) if "billing_accounts" in s]
    reading = [s for s in statements_of(lambda: get_account(org.id)) if "billing_accounts" in s]
    assert len(locking) == 1 and len(reading) == 1
    assert ("FOR UPDATE" in locking[0]) is is_postgres()
    assert "FOR UPDATE" not in reading[0]


def test_require_role_reads_the_membership_of_that_user_in_that_organization():
    org = create_organization("Roles")
    other = create_organization("Other")
    add_member(org.id, "alice", "admin", "alice@example.com")
    add_member(other.id, "bob", "owner", "bob@example.com")
    alice = User(user_id="alice", email=None, org_roles=None)
    bob = User(user_id="bob", email=None, org_roles=None)
    assert require_role(org.id.upper(), alice, Role.admin) == org.id
    with pytest.raises(NotFound):
        require_role(org.id, bob, Role.member)  # an owner elsewhere is no member here
    with pytest.raises(NotFound):
        require_role(other.id, alice, Role.member)
    assert Membership.select().count() == 2


@pytest.mark.parametrize("entry_type", [CreditEntryType.charge, CreditEntryType.top_up])
def test_the_entry_a_ledger_write_returns_is_the_row_it_stored(entry_type):
    """The ledger builds the entry it returns in one step (`models.prepared.loaded`), not through
    Peewee's constructor: it must hold what the database holds, clean, with its id."""
    org = create_organization("Entry")
    with locked_account(org.id) as account:
        ledger.grant(account, 1_000, CreditEntryType.adjustment, reason="seed")
    with locked_account(org.id) as account:
        if entry_type == CreditEntryType.charge:
            result = ledger.debit(account, 300, reason="call", reference_id="ref-1")
        else:
            result = ledger.grant(account, 300, entry_type, reason="buy", idempotency_ref="ir-1")
    entry = result.entry
    assert entry is not None and entry.id is not None
    stored = CreditEntry.get_by_id(entry.id)
    assert {k: str(v) for k, v in entry.__data__.items()} == {
        k: str(v) for k, v in stored.__data__.items()
    }
    assert entry.dirty_fields == []
    assert entry.organization_id == org.id
    assert entry.balance_after == (700 if entry_type == CreditEntryType.charge else 1_300)
