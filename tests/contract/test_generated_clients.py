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
        },
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "typescript client flow ok" in result.stdout
