"""Rules of usage recording that mutation testing (issue 14) found no test for.

Each test names the rule it checks; all go through `billing.metering`'s public functions (or
HTTP), so they hold whatever the ledger's internals become.
"""

from __future__ import annotations

import json

import pytest
from prometheus_client import REGISTRY

from billing import ledger, metering
from billing.errors import Conflict, InvalidRequest, NotFound, PaymentRequired
from billing.organizations import create_organization
from billing.units import USAGE_QUANTITY_MAX, USAGE_UNIT_COST_MAX
from billing.usage import CATEGORIES
from models import AutoRechargeRequest, BillingAccount, CreditEntry, UsageRecord
from tests import units

pytestmark = pytest.mark.usefixtures("conn")

UNKNOWN_ORG = "00000000-0000-4000-8000-000000000000"


def funded(amount: int) -> str:
    org_id = create_organization("mutants").id
    if amount:
        units.grant(org_id, amount, "top_up", reason="seed")
    return org_id


def wire(org_id: str, ref: str, **fields: object) -> dict[str, object]:
    return {
        "organizationId": org_id,
        "category": "api_call",
        "quantity": 1,
        "unitCostDecimillicents": 100,
        "referenceId": ref,
        **fields,
    }


def rejection(**fields: object) -> str:
    """The detail a batch whose third event has `fields` is rejected with."""
    org_id = "org"
    items = [wire(org_id, "a"), wire(org_id, "b"), wire(org_id, "c", **fields)]
    with pytest.raises(InvalidRequest) as raised:
        metering.usage_events(items)
    return raised.value.detail


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"quantity": 0}, f"quantity must be an integer from 1 to {USAGE_QUANTITY_MAX}"),
        (
            {"quantity": USAGE_QUANTITY_MAX + 1},
            f"quantity must be an integer from 1 to {USAGE_QUANTITY_MAX}",
        ),
        ({"quantity": True}, f"quantity must be an integer from 1 to {USAGE_QUANTITY_MAX}"),
        ({"quantity": "2"}, f"quantity must be an integer from 1 to {USAGE_QUANTITY_MAX}"),
        (
            {"unitCostDecimillicents": -1},
            f"unitCostDecimillicents must be an integer from 0 to {USAGE_UNIT_COST_MAX}",
        ),
        (
            {"unitCostDecimillicents": USAGE_UNIT_COST_MAX + 1},
            f"unitCostDecimillicents must be an integer from 0 to {USAGE_UNIT_COST_MAX}",
        ),
        (
            {"unitCostDecimillicents": False},
            f"unitCostDecimillicents must be an integer from 0 to {USAGE_UNIT_COST_MAX}",
        ),
    ],
)
def test_an_invalid_number_is_named_by_its_wire_field_bounds_and_event_index(fields, detail):
    assert rejection(**fields) == f"events[2]: {detail}"


def test_an_unknown_category_is_rejected_with_the_categories_listed():
    detail = rejection(category="nope")
    prefix = "events[2]: category must be one of "
    assert detail.startswith(prefix)
    assert detail.removeprefix(prefix).split(", ") == list(CATEGORIES)


def test_a_batch_over_the_limit_says_the_limit():
    items = [wire("org", f"r{i}") for i in range(metering.MAX_BATCH_EVENTS + 1)]
    with pytest.raises(InvalidRequest) as raised:
        metering.usage_events(items)
    assert raised.value.detail == f"a batch holds at most {metering.MAX_BATCH_EVENTS} events"


def test_the_bounds_themselves_are_accepted():
    for quantity, unit_cost in ((1, 0), (USAGE_QUANTITY_MAX, USAGE_UNIT_COST_MAX)):
        event = metering.usage_event("org", "api_call", quantity, unit_cost, "r")
        assert (event.quantity, event.unit_cost) == (quantity, unit_cost)


def test_metadata_is_stored_canonically_and_absent_metadata_as_null():
    """The same object in another key order is stored as the same text; no metadata (or an
    empty object) stores NULL, not the text 'null' or '{}'."""
    one = metering.usage_event("org", "api_call", 1, 1, "r", {"b": 1, "a": {"y": 2, "x": 3}})
    other = metering.usage_event("org", "api_call", 1, 1, "r", {"a": {"x": 3, "y": 2}, "b": 1})
    assert one.metadata == other.metadata
    assert json.loads(one.metadata or "") == {"a": {"x": 3, "y": 2}, "b": 1}
    assert metering.usage_event("org", "api_call", 1, 1, "r").metadata is None
    assert metering.usage_event("org", "api_call", 1, 1, "r", {}).metadata is None


def test_without_an_overdraft_argument_no_credit_may_be_overdrawn():
    org_id = funded(100)
    with pytest.raises(PaymentRequired):
        metering.record_usage(org_id, "api_call", 1, 101, "single")
    (outcome,) = metering.record_usage_batch(
        [metering.usage_event(org_id, "api_call", 1, 101, "b")]
    )
    assert outcome.status is metering.EventStatus.refused
    assert outcome.refusal_code == "insufficient_credits"
    assert BillingAccount.get_by_id(org_id).credits_balance == 100
    assert UsageRecord.select().count() == 0


def test_a_single_record_may_use_the_overdraft_it_is_given():
    org_id = funded(100)
    recorded = metering.record_usage(org_id, "api_call", 1, 150, "into-overdraft", overdraft=50)
    assert recorded.balance == -50
    with pytest.raises(PaymentRequired):
        metering.record_usage(org_id, "api_call", 1, 1, "past-overdraft", overdraft=50)
    assert BillingAccount.get_by_id(org_id).credits_balance == -50


def test_a_conflicting_single_record_says_why():
    org_id = funded(1_000)
    metering.record_usage(org_id, "api_call", 1, 100, "ref")
    with pytest.raises(Conflict) as raised:
        metering.record_usage(org_id, "api_call", 2, 100, "ref")
    assert raised.value.detail == metering.CONFLICT_DETAIL


def test_a_batch_naming_an_unknown_organization_is_refused_as_a_single_record_is():
    org_id = funded(1_000)
    with pytest.raises(NotFound) as single:
        metering.record_usage(UNKNOWN_ORG, "api_call", 1, 1, "r")
    events = [
        metering.usage_event(org_id, "api_call", 1, 1, "r"),
        metering.usage_event(UNKNOWN_ORG, "api_call", 1, 1, "r"),
    ]
    with pytest.raises(NotFound) as batch:
        metering.record_usage_batch(events)
    assert batch.value.detail == single.value.detail == "organization not found"
    assert UsageRecord.select().count() == 0


def test_a_batch_of_two_references_recorded_before_is_two_duplicates():
    org_id = funded(1_000)
    first = [metering.record_usage(org_id, "api_call", 1, 100, ref).record for ref in "ab"]
    again = [metering.usage_event(org_id, "api_call", 1, 100, ref) for ref in "ab"]
    outcomes = metering.record_usage_batch(again)
    assert [o.status for o in outcomes] == [metering.EventStatus.duplicate] * 2
    assert [o.record.id for o in outcomes if o.record] == [r.id for r in first]
    assert BillingAccount.get_by_id(org_id).credits_balance == 800
    assert UsageRecord.select().count() == 2


def test_each_outcome_carries_the_totals_after_it_and_only_refusals_and_conflicts_a_detail():
    org_id = funded(1_000)
    ledger.reserve(org_id, 200, reference_id="hold")
    events = [
        metering.usage_event(org_id, "api_call", 1, 100, "ok"),
        metering.usage_event(org_id, "api_call", 1, 10_000, "too-big"),
        metering.usage_event(org_id, "api_call", 1, 100, "ok"),
        metering.usage_event(org_id, "api_call", 2, 100, "ok"),
    ]
    recorded, refused, duplicate, conflict = metering.record_usage_batch(events)
    assert (recorded.balance, recorded.reserved) == (900, 200)
    assert (refused.balance, refused.reserved) == (900, 200)
    assert (duplicate.balance, duplicate.reserved) == (900, 200)
    assert (conflict.balance, conflict.reserved) == (900, 200)
    assert refused.refusal_code == "insufficient_credits" and refused.refusal_detail
    assert conflict.refusal_detail == metering.CONFLICT_DETAIL
    assert recorded.refusal_detail is None and recorded.refusal_code is None
    assert duplicate.refusal_detail is None and duplicate.refusal_code is None


def test_a_refusal_for_lack_of_credit_asks_for_a_recharge_even_above_the_threshold():
    """Available credit (5,000) is above the threshold (1,000), but an event of 6,000 was
    refused: the organization needs credit now, so a recharge is requested."""
    org_id = funded(5_000)
    BillingAccount.update(
        auto_recharge_enabled=True,
        auto_recharge_threshold=1_000,
        auto_recharge_amount=10_000,
        stripe_customer_id="cus_mutants",
        stripe_payment_method_id="pm_mutants",
    ).where(BillingAccount.organization == org_id).execute()
    requests = AutoRechargeRequest.select().where(AutoRechargeRequest.organization == org_id)
    (small,) = metering.record_usage_batch([metering.usage_event(org_id, "api_call", 1, 10, "s")])
    assert small.status is metering.EventStatus.recorded and requests.count() == 0
    (big,) = metering.record_usage_batch([metering.usage_event(org_id, "api_call", 1, 6_000, "b")])
    assert big.refusal_code == "insufficient_credits"
    assert [r.amount for r in requests] == [10_000]


def test_a_batch_counts_each_charge_it_writes_in_the_ledger_metric():
    org_id = funded(1_000)

    def charges() -> float:
        return REGISTRY.get_sample_value("billing_ledger_entries_total", {"entry_type": "charge"})

    before = charges() or 0.0
    events = [metering.usage_event(org_id, "api_call", 1, 100, f"r{i}") for i in range(3)]
    events.append(metering.usage_event(org_id, "api_call", 1, 10_000, "refused"))
    metering.record_usage_batch(events)
    assert charges() == before + 3


def test_each_record_links_the_charge_that_paid_for_it():
    org_id = funded(1_000)
    events = [metering.usage_event(org_id, "api_call", i + 1, 10, f"r{i}") for i in range(3)]
    outcomes = metering.record_usage_batch(events)
    for outcome in outcomes:
        assert outcome.record is not None
        stored = UsageRecord.get_by_id(outcome.record.id)
        entry = CreditEntry.get_by_id(stored.credit_entry_id)
        assert (entry.reference_id, entry.amount) == (stored.reference_id, -stored.cost)
        assert outcome.record.credit_entry_id == stored.credit_entry_id
