"""Clients generated from openapi.yaml, used end to end against a running gunicorn server."""

from __future__ import annotations

import importlib
import subprocess
import sys
import uuid

import pytest

from scripts.local_server import ROOT, LocalServer
from tests.contract.tools import needs_npm


@pytest.fixture(scope="module")
def server():
    with LocalServer(credit=50_000_000) as running:
        yield running


@pytest.fixture(scope="module")
def python_client(tmp_path_factory):
    out = tmp_path_factory.mktemp("clients")
    subprocess.run(
        [str(ROOT / "scripts/generate_clients.sh"), str(out)],
        check=True,
        env={"SKIP_TS": "1", "PATH": f"{ROOT}/.venv/bin:/usr/bin:/bin"},
    )
    sys.path.insert(0, str(out / "python"))
    try:
        yield importlib.import_module("billing_api_client")
    finally:
        sys.path.remove(str(out / "python"))


def test_python_client_flow(server, python_client):
    from billing_api_client import AuthenticatedClient
    from billing_api_client.api.billing import (
        get_billing_settings,
        get_credit_balance,
        list_credit_history,
        update_billing_settings,
    )
    from billing_api_client.api.service import record_usage
    from billing_api_client.models import (
        BillingSettings,
        BillingSettingsUpdate,
        CreditBalance,
        CreditHistory,
        Problem,
        UsageCategory,
        UsageRecordRequest,
    )

    org = uuid.UUID(server.organization_id)
    user = AuthenticatedClient(base_url=server.base_url, token=server.token)
    settings = get_billing_settings.sync(org, client=user)
    assert (
        isinstance(settings, BillingSettings) and settings.subscription_status.value == "inactive"
    )

    patched = update_billing_settings.sync(
        org,
        client=user,
        body=BillingSettingsUpdate(
            billing_email="finance@example.com", usage_cap_decimillicents=40_000_000
        ),
    )
    assert isinstance(patched, BillingSettings)
    assert patched.billing_email == "finance@example.com"

    service = AuthenticatedClient(
        base_url=server.base_url,
        token=server.service_token,
        auth_header_name="X-Service-Token",
        prefix="",
    )
    recorded = record_usage.sync(
        org,
        client=service,
        body=UsageRecordRequest(
            category=UsageCategory.API_CALL,
            quantity=3,
            unit_cost_decimillicents=1_000_000,
            reference_id="client-flow-1",
        ),
    )
    assert recorded.cost_decimillicents == 3_000_000

    balance = get_credit_balance.sync(org, client=user)
    assert isinstance(balance, CreditBalance)
    assert balance.available_decimillicents == 47_000_000

    history = list_credit_history.sync(org, client=user, limit="1")
    assert isinstance(history, CreditHistory)
    assert len(history.items) == 1 and history.has_more is True
    assert history.items[0].amount_decimillicents == -3_000_000

    # A 402 comes back as a Problem with its stable code: the usage cap stops spending. One
    # more than the cap on its own, so the answer cannot depend on the month turning over.
    refused = record_usage.sync_detailed(
        org,
        client=service,
        body=UsageRecordRequest(
            category=UsageCategory.API_CALL,
            quantity=1,
            unit_cost_decimillicents=40_000_001,
            reference_id="client-flow-2",
        ),
    )
    assert refused.status_code == 402
    assert isinstance(refused.parsed, Problem) and refused.parsed.code.value == "PaymentRequired"

    missing = get_credit_balance.sync_detailed(uuid.uuid4(), client=user)
    assert missing.status_code == 404
    assert isinstance(missing.parsed, Problem) and missing.parsed.code.value == "NotFound"
    # The platform's clients read `message` and `_tag` (field_tag in Python).
    assert missing.parsed.message == missing.parsed.detail
    assert missing.parsed.field_tag.value == "NotFound"


def test_python_client_platform_categories_and_directory(server, python_client):
    """The platform's categories and entry types, and the directory and operator operations."""
    from billing_api_client import AuthenticatedClient
    from billing_api_client.api.billing import get_credit_balance, get_usage_summary
    from billing_api_client.api.service import (
        adjust_credits,
        get_ledger_audit,
        put_member,
        put_organization,
        record_usage,
        remove_member,
        suspend_organization,
        unsuspend_organization,
    )
    from billing_api_client.models import (
        CreditAdjustment,
        CreditAdjustmentRequest,
        EntryType,
        MemberRole,
        MemberUpsert,
        OperatorReason,
        OrganizationUpsert,
        Problem,
        UsageCategory,
        UsageRecordRequest,
    )

    service = AuthenticatedClient(
        base_url=server.base_url,
        token=server.service_token,
        auth_header_name="X-Service-Token",
        prefix="",
    )
    org = uuid.uuid4()
    made = put_organization.sync(org, client=service, body=OrganizationUpsert(name="Py org"))
    assert made.name == "Py org" and made.organization_id == org
    member = put_member.sync(
        org, "py-owner", client=service, body=MemberUpsert(role=MemberRole.OWNER)
    )
    assert member.role == MemberRole.OWNER

    grant = adjust_credits.sync(
        org,
        client=service,
        idempotency_key="py-goodwill-1",
        body=CreditAdjustmentRequest(amount_decimillicents=10_000_000, reason="goodwill"),
    )
    assert isinstance(grant, CreditAdjustment)
    assert grant.entry.entry_type == EntryType.ADJUSTMENT and grant.entry.reason == "goodwill"
    replay = adjust_credits.sync(
        org,
        client=service,
        idempotency_key="py-goodwill-1",
        body=CreditAdjustmentRequest(amount_decimillicents=10_000_000, reason="goodwill"),
    )
    assert replay.entry.id == grant.entry.id

    for n, category in enumerate(
        (UsageCategory.TEXT_GENERATION, UsageCategory.IMAGE_GENERATION, UsageCategory.STORAGE),
        start=1,
    ):
        recorded = record_usage.sync(
            org,
            client=service,
            body=UsageRecordRequest(
                category=category,
                quantity=n,
                unit_cost_decimillicents=1_000,
                reference_id=f"py-{category.value}",
            ),
        )
        assert recorded.category == category

    suspended = suspend_organization.sync(org, client=service, body=OperatorReason(reason="check"))
    assert suspended.is_suspended is True
    refused = record_usage.sync_detailed(
        org,
        client=service,
        body=UsageRecordRequest(
            category=UsageCategory.VIDEO_GENERATION,
            quantity=1,
            unit_cost_decimillicents=1,
            reference_id="py-refused",
        ),
    )
    assert refused.status_code == 402 and isinstance(refused.parsed, Problem)
    assert refused.parsed.field_tag.value == "PaymentRequired"
    unsuspend_organization.sync(org, client=service, body=OperatorReason(reason="ok"))

    owner = AuthenticatedClient(base_url=server.base_url, token=_token(server, "py-owner"))
    summary = get_usage_summary.sync(
        org, client=owner, category=UsageCategory.TEXT_GENERATION, period_start="2020-01-01"
    )
    assert summary.total_quantity == 1
    balance = get_credit_balance.sync(org, client=owner)
    assert balance.credits_balance_decimillicents == 10_000_000 - 6_000

    audit = get_ledger_audit.sync(org, client=service)
    assert audit.sound is True and audit.entry_count == 4
    removed = remove_member.sync(org, "py-owner", client=service)
    assert removed.removed is True
    gone = get_credit_balance.sync_detailed(org, client=owner)
    assert gone.status_code == 404 and gone.parsed.message


def _token(server, user_id: str) -> str:
    """A token for another user of the server (signed with its JWT secret)."""
    out = subprocess.run(
        [sys.executable, "-m", "scripts.admin", "mint-token", user_id],
        cwd=ROOT,
        env={**server.env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@needs_npm
def test_typescript_client_flow(server, tmp_path):
    """openapi-typescript types + openapi-fetch, compiled by tsc, run by node."""
    ts_dir = ROOT / "tests/contract/ts"
    subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=ts_dir, check=True)
    subprocess.run(
        [
            "npx",
            "openapi-typescript",
            str(ROOT / "openapi.yaml"),
            "-o",
            str(ts_dir / "generated/schema.d.ts"),
        ],
        cwd=ts_dir,
        check=True,
    )
    subprocess.run(["npx", "tsc", "-p", "."], cwd=ts_dir, check=True)
    result = subprocess.run(
        ["node", "dist/flow.js"],
        cwd=ts_dir,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin:/usr/local/bin",
            "BASE_URL": server.base_url,
            "ORG_ID": server.organization_id,
            "TOKEN": server.token,
            "SERVICE_TOKEN": server.service_token,
        },
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "typescript client flow ok" in result.stdout
