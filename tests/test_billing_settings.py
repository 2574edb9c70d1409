"""GET/PATCH billing settings through the HTTP app (response validation on)."""

from __future__ import annotations

import pytest

from billing.units import DOLLAR


def url(org_id: str) -> str:
    return f"/v1/organizations/{org_id}/billing"


def test_new_organization_has_empty_settings(client, org):
    r = client.get(url(org.id), headers=org.member)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["organizationId"] == org.id
    assert body["creditsBalanceDecimillicents"] == 0
    assert body["subscriptionStatus"] == "inactive"
    assert body["isSubscribed"] is False
    assert body["subscriptionPlan"] is None
    assert body["usageCapDecimillicents"] is None
    assert r.headers["content-type"] == "application/json"


def test_admin_patches_every_field(client, org):
    patch = {
        "billingEmail": "finance@example.com",
        "autoRechargeEnabled": True,
        "autoRechargeThresholdDecimillicents": 5 * DOLLAR,
        "autoRechargeAmountDecimillicents": 20 * DOLLAR,
        "usageCapDecimillicents": 100 * DOLLAR,
    }
    r = client.patch(url(org.id), json=patch, headers=org.admin)
    assert r.status_code == 200, r.text
    for key, value in patch.items():
        assert r.json()[key] == value
    again = client.get(url(org.id), headers=org.member).json()
    for key, value in patch.items():
        assert again[key] == value


def test_null_clears_a_field(client, org):
    client.patch(url(org.id), json={"usageCapDecimillicents": 5}, headers=org.owner)
    r = client.patch(url(org.id), json={"usageCapDecimillicents": None}, headers=org.owner)
    assert r.status_code == 200
    assert r.json()["usageCapDecimillicents"] is None


def test_member_cannot_patch(client, org):
    r = client.patch(url(org.id), json={"usageCapDecimillicents": 5}, headers=org.member)
    assert r.status_code == 403
    assert r.json()["code"] == "Forbidden"
    assert client.get(url(org.id), headers=org.owner).json()["usageCapDecimillicents"] is None


@pytest.mark.parametrize(
    "patch",
    [
        {"autoRechargeThresholdDecimillicents": 0},
        {"autoRechargeThresholdDecimillicents": 5_000_000_001},
        {"autoRechargeAmountDecimillicents": 99_999},
        {"autoRechargeAmountDecimillicents": 5_000_000_001},
        {"usageCapDecimillicents": -1},
        {"usageCapDecimillicents": 1.5},
        {"usageCapDecimillicents": "100"},
        {"autoRechargeEnabled": "yes"},
        {"billingEmail": "not-an-email"},
        {"creditsBalanceDecimillicents": 10**12},
        {"stripeCustomerId": "cus_steal"},
        {"autoRechargeEnabled": True},
        {"autoRechargeEnabled": True, "autoRechargeThresholdDecimillicents": 10},
    ],
)
def test_bad_patch_is_400_and_changes_nothing(client, org, patch):
    before = client.get(url(org.id), headers=org.owner).json()
    # A valid field alongside the bad one must not be applied either.
    r = client.patch(
        url(org.id),
        json={**patch, "billingEmail": "x@example.com"} if "billingEmail" not in patch else patch,
        headers=org.owner,
    )
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "BadRequest"
    assert client.get(url(org.id), headers=org.owner).json() == before


def test_disabling_auto_recharge_keeps_amounts(client, org):
    client.patch(
        url(org.id),
        json={
            "autoRechargeEnabled": True,
            "autoRechargeThresholdDecimillicents": 10,
            "autoRechargeAmountDecimillicents": 100_000,
        },
        headers=org.owner,
    )
    r = client.patch(url(org.id), json={"autoRechargeEnabled": False}, headers=org.owner)
    assert r.json()["autoRechargeEnabled"] is False
    assert r.json()["autoRechargeThresholdDecimillicents"] == 10


def test_clearing_threshold_while_enabled_is_refused(client, org):
    client.patch(
        url(org.id),
        json={
            "autoRechargeEnabled": True,
            "autoRechargeThresholdDecimillicents": 10,
            "autoRechargeAmountDecimillicents": 100_000,
        },
        headers=org.owner,
    )
    r = client.patch(
        url(org.id), json={"autoRechargeThresholdDecimillicents": None}, headers=org.owner
    )
    assert r.status_code == 400
    assert (
        client.get(url(org.id), headers=org.owner).json()["autoRechargeThresholdDecimillicents"]
        == 10
    )


def test_malformed_json_is_400(client, org):
    r = client.patch(
        url(org.id), content=b"{not json", headers={**org.owner, "Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["code"] == "BadRequest"
