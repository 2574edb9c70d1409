"""The code's constants equal the contract's: bounds, enums, patterns and plan prices.

The contract is written by hand and the code keeps its own constants (the spec is not read at
run time by the services), so this is what stops the two drifting apart.
"""

from __future__ import annotations

import re

import pytest

from billing import history, usage
from billing.auth import Role
from billing.plans import PLANS, SUBSCRIPTION_STATUSES
from billing.units import (
    AUTO_RECHARGE_AMOUNT_MAX,
    AUTO_RECHARGE_AMOUNT_MIN,
    AUTO_RECHARGE_THRESHOLD_MAX,
    AUTO_RECHARGE_THRESHOLD_MIN,
    CENT,
    INT64_MAX,
    TOP_UP_MAX,
    TOP_UP_MIN,
    USAGE_QUANTITY_MAX,
    USAGE_UNIT_COST_MAX,
)
from handlers.problems import STATUS_BY_CODE
from tests.contract.test_spec import NINE, load_spec

SPEC = load_spec()
SCHEMAS = SPEC["components"]["schemas"]


def prop(schema: str, name: str) -> dict:
    return SCHEMAS[schema]["properties"][name]


def test_enums_equal_the_codes():
    assert SCHEMAS["UsageCategory"]["enum"] == list(usage.CATEGORIES)
    assert SCHEMAS["EntryType"]["enum"] == [t.value for t in history.EntryType]
    assert SCHEMAS["SubscriptionPlan"]["enum"] == list(PLANS)
    assert SCHEMAS["SubscriptionStatus"]["enum"] == list(SUBSCRIPTION_STATUSES)
    sent = {code for code, status in STATUS_BY_CODE.items() if str(status) in NINE}
    assert set(SCHEMAS["ProblemCode"]["enum"]) == sent


def test_wire_types_map_only_onto_documented_entry_types():
    documented = set(SCHEMAS["EntryType"]["enum"])
    assert {wire for wire, _reason in history.WIRE_TYPES.values()} <= documented


def test_plan_prices_equal_the_codes():
    plans = SCHEMAS["SubscriptionPlan"]["x-plans"]
    assert set(plans) == set(PLANS)
    for slug, plan in PLANS.items():
        assert plans[slug] == {
            "monthlyPriceDecimillicents": plan.monthly_price,
            "welcomeCreditDecimillicents": plan.welcome_credit,
        }
        dollars = plan.monthly_price // 10_000_000
        assert (
            f"{slug}: ${dollars} a month, ${dollars} welcome credit"
            in (SCHEMAS["SubscriptionPlan"]["description"])
        )


def test_money_bounds_equal_the_codes():
    top_up = prop("TopUpRequest", "amountDecimillicents")
    assert (top_up["minimum"], top_up["maximum"], top_up["multipleOf"]) == (
        TOP_UP_MIN,
        TOP_UP_MAX,
        CENT,
    )
    for schema in ("BillingSettingsUpdate", "BillingSettings"):
        threshold = prop(schema, "autoRechargeThresholdDecimillicents")
        amount = prop(schema, "autoRechargeAmountDecimillicents")
        assert (threshold["minimum"], threshold["maximum"]) == (
            AUTO_RECHARGE_THRESHOLD_MIN,
            AUTO_RECHARGE_THRESHOLD_MAX,
        )
        assert (amount["minimum"], amount["maximum"]) == (
            AUTO_RECHARGE_AMOUNT_MIN,
            AUTO_RECHARGE_AMOUNT_MAX,
        )
    assert prop("BillingSettingsUpdate", "autoRechargeAmountDecimillicents")["multipleOf"] == CENT


@pytest.mark.parametrize("schema", ["UsageRecordRequest", "UsageBatchEvent"])
def test_usage_maxima_keep_the_cost_within_int64(schema):
    quantity = prop(schema, "quantity")
    unit_cost = prop(schema, "unitCostDecimillicents")
    assert (quantity["minimum"], quantity["maximum"]) == (1, USAGE_QUANTITY_MAX)
    assert (unit_cost["minimum"], unit_cost["maximum"]) == (0, USAGE_UNIT_COST_MAX)
    assert quantity["maximum"] * unit_cost["maximum"] <= INT64_MAX


def test_period_pattern_equals_the_codes():
    assert SCHEMAS["PeriodBound"]["pattern"] == usage.PERIOD_PATTERN


@pytest.mark.parametrize("value", [str(n) for n in range(0, 102)] + ["01", "007", "1e2", ""])
def test_history_limit_pattern_accepts_exactly_what_the_code_does(value):
    op = SPEC["paths"]["/v1/billing/{organizationId}/credits/history"]["get"]
    pattern = next(p for p in op["parameters"] if p["name"] == "limit")["schema"]["pattern"]
    spec_accepts = re.search(pattern, value) is not None
    try:
        history.parse_limit(value)
        code_accepts = True
    except Exception:
        code_accepts = False
    if spec_accepts:
        assert code_accepts, value
    assert (1 <= int(value) <= history.MAX_LIMIT) if spec_accepts else True


def test_identifiers_are_uuids_in_the_spec():
    assert prop("AutoRechargeRequiresAction", "attemptId") == {"$ref": "#/components/schemas/Uuid"}
    assert prop("CreditEntry", "id") == {"$ref": "#/components/schemas/Uuid"}


def test_roles_equal_the_codes():
    roles = SCHEMAS.get("MemberRole")
    if roles is None:
        pytest.skip("no directory operations in the contract")
    assert roles["enum"] == [r.name for r in sorted(Role, reverse=True)]


def test_directory_and_operator_rules_equal_the_codes():
    from billing.directory import MAX_NAME, TEXT_PATTERN
    from billing.operators import MAX_REASON
    from billing.units import ADJUSTMENT_MAX

    for schema, length in (("OneLineText", MAX_NAME), ("ReasonText", MAX_REASON)):
        assert SCHEMAS[schema]["pattern"] == TEXT_PATTERN
        assert (SCHEMAS[schema]["minLength"], SCHEMAS[schema]["maxLength"]) == (1, length)
    amount = prop("CreditAdjustmentRequest", "amountDecimillicents")
    assert (amount["minimum"], amount["maximum"]) == (-ADJUSTMENT_MAX, ADJUSTMENT_MAX)
    assert amount["not"] == {"enum": [0]}
