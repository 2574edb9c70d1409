"""The platform's directory (organizations, members) and operators' actions (credit
adjustments, suspension, the ledger audit), through the service API and `scripts.admin`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid

import pytest

from billing import ledger, operators
from billing.accounts import locked_account
from billing.units import DOLLAR
from models import CreditEntry, OperatorAction, database
from scripts.local_server import ROOT
from tests.conftest import SERVICE_HEADERS, bearer
from tests.ledger_checks import assert_ledger_invariants

S = "/v1/service/organizations"


def put_org(client, org_id: str, name: str):
    return client.put(f"{S}/{org_id}", json={"name": name}, headers=SERVICE_HEADERS)


def put_member(client, org_id: str, user: str, role: str, email: str | None = None):
    body = {"role": role} | ({"email": email} if email else {})
    return client.put(f"{S}/{org_id}/members/{user}", json=body, headers=SERVICE_HEADERS)


def adjust(client, org_id: str, amount: int, reason: str, key: str | None):
    headers = SERVICE_HEADERS | ({"Idempotency-Key": key} if key else {})
    return client.post(
        f"{S}/{org_id}/credit-adjustments",
        json={"amountDecimillicents": amount, "reason": reason},
        headers=headers,
    )


def balance(client, org_id: str, headers) -> int:
    r = client.get(f"/v1/billing/{org_id}/credits", headers=headers)
    assert r.status_code == 200, r.text
    return int(r.json()["creditsBalanceDecimillicents"])


# --- directory ------------------------------------------------------------------------------


def test_put_organization_creates_renames_and_repeats(client, db):
    org_id = str(uuid.uuid4())
    created = put_org(client, org_id.upper(), "Acme")
    assert created.status_code == 200, created.text
    assert created.json()["organizationId"] == org_id and created.json()["name"] == "Acme"
    again = put_org(client, org_id, "Acme")
    assert again.json() == created.json()
    renamed = put_org(client, org_id, "Acme Agents").json()
    assert renamed["name"] == "Acme Agents" and renamed["createdAt"] == created.json()["createdAt"]
    # The new organization works: its first owner (synced next) reads an empty balance.
    assert put_member(client, org_id, "auth0|first", "owner").status_code == 200
    assert balance(client, org_id, bearer("auth0|first")) == 0


def test_members_drive_access(client, db):
    org_id = str(uuid.uuid4())
    put_org(client, org_id, "Roles")
    user = bearer("google-oauth2|dana")
    settings = f"/v1/organizations/{org_id}/billing"
    assert client.get(settings, headers=user).status_code == 404  # not a member yet
    r = put_member(client, org_id, "google-oauth2|dana", "member", "dana@example.com")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "organizationId": org_id,
        "userId": "google-oauth2|dana",
        "role": "member",
        "email": "dana@example.com",
    }
    assert client.get(settings, headers=user).status_code == 200
    assert (
        client.patch(settings, json={"usageCapDecimillicents": 1}, headers=user).status_code == 403
    )
    promoted = put_member(client, org_id, "google-oauth2|dana", "admin").json()
    assert promoted["role"] == "admin" and promoted["email"] == "dana@example.com"  # email kept
    assert (
        client.patch(settings, json={"usageCapDecimillicents": 1}, headers=user).status_code == 200
    )
    removed = client.delete(f"{S}/{org_id}/members/google-oauth2|dana", headers=SERVICE_HEADERS)
    assert removed.status_code == 200 and removed.json()["removed"] is True
    assert client.get(settings, headers=user).status_code == 404
    again = client.delete(f"{S}/{org_id}/members/google-oauth2|dana", headers=SERVICE_HEADERS)
    assert again.status_code == 200 and again.json()["removed"] is False


def test_member_of_unknown_organization_is_404(client, db):
    missing = str(uuid.uuid4())
    assert put_member(client, missing, "u1", "owner").status_code == 404
    r = client.delete(f"{S}/{missing}/members/u1", headers=SERVICE_HEADERS)
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("path", "method", "body"),
    [
        ("{org}", "put", {"name": ""}),
        ("{org}", "put", {"name": "   "}),
        ("{org}", "put", {"name": "x" * 201}),
        ("{org}", "put", {"name": "ok", "extra": 1}),
        ("{org}", "put", {"name": "nul\u0000byte"}),
        ("{org}", "put", {"name": "two\nlines"}),
        ("{org}", "put", {"name": "lone \ud800 surrogate"}),
        ("{org}/suspend", "post", {"reason": "lone \udfff surrogate"}),
        ("not-a-uuid", "put", {"name": "ok"}),
        ("{org}/members/u1", "put", {"role": "superuser"}),
        ("{org}/members/u1", "put", {"role": "admin", "email": "not-an-email"}),
        ("{org}/suspend", "post", {"reason": ""}),
        ("{org}/suspend", "post", {}),
    ],
)
def test_bad_directory_input_is_400_and_changes_nothing(client, org, path, method, body):
    before = client.get(f"/v1/organizations/{org.id}/billing", headers=org.owner).json()
    r = client.request(  # json.dumps escapes lone surrogates, as a real client's JSON would
        method.upper(),
        f"{S}/{path.format(org=org.id)}",
        content=json.dumps(body),
        headers={**SERVICE_HEADERS, "Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    assert r.json()["_tag"] == "BadRequest"
    assert client.get(f"/v1/organizations/{org.id}/billing", headers=org.owner).json() == before


def test_directory_needs_the_service_credential(client, org):
    r = client.put(f"{S}/{org.id}", json={"name": "x"}, headers=org.owner)
    assert r.status_code == 401 and "X-Service-Token" in r.json()["detail"]


# --- credit adjustments ---------------------------------------------------------------------


def test_adjustment_grants_once_per_key(client, org):
    first = adjust(client, org.id, 5 * DOLLAR, "Goodwill credit", "adj-1")
    assert first.status_code == 200, first.text
    entry = first.json()["entry"]
    assert (entry["entryType"], entry["kind"], entry["reason"]) == (
        "adjustment",
        "adjustment",
        "Goodwill credit",
    )
    assert first.json()["availableDecimillicents"] == 5 * DOLLAR
    again = adjust(client, org.id, 5 * DOLLAR, "Goodwill credit", "adj-1")
    assert again.status_code == 200 and again.json()["entry"]["id"] == entry["id"]
    assert balance(client, org.id, org.member) == 5 * DOLLAR
    other = adjust(client, org.id, 6 * DOLLAR, "Goodwill credit", "adj-1")
    assert other.status_code == 409
    history = client.get(f"/v1/billing/{org.id}/credits/history", headers=org.member).json()
    assert [i["id"] for i in history["items"]] == [entry["id"]]
    with database.connection_context():
        actions = list(OperatorAction.select())
        assert [(a.action, a.reason, a.amount) for a in actions] == [
            ("credit_adjustment", "Goodwill credit", 5 * DOLLAR)
        ]
        assert_ledger_invariants(org.id)


def test_negative_adjustment_cannot_overdraw(client, org):
    adjust(client, org.id, DOLLAR, "seed", "seed-1")
    assert adjust(client, org.id, -2 * DOLLAR, "correction", "neg-1").status_code == 402
    assert balance(client, org.id, org.member) == DOLLAR
    taken = adjust(client, org.id, -DOLLAR // 2, "correction", "neg-2")
    assert (
        taken.status_code == 200 and taken.json()["entry"]["amountDecimillicents"] == -DOLLAR // 2
    )
    assert balance(client, org.id, org.member) == DOLLAR // 2


@pytest.mark.parametrize(
    ("amount", "reason", "key"),
    [
        (0, "zero", "k0"),
        (DOLLAR, "", "k1"),
        (DOLLAR, "no key", None),
        (1.5, "float", "k2"),
        (1_000_000 * DOLLAR + 1, "too much", "k3"),
        (DOLLAR, "nul\u0000", "k4"),
    ],
)
def test_bad_adjustment_is_400(client, org, amount, reason, key):
    r = adjust(client, org.id, amount, reason, key)
    assert r.status_code == 400, r.text
    assert balance(client, org.id, org.member) == 0


def test_adjustment_of_unknown_organization_is_404(client, db):
    assert adjust(client, str(uuid.uuid4()), DOLLAR, "x", "k").status_code == 404


def test_concurrent_adjustments_with_one_key_apply_once(org):
    """Eight operators' retries of one adjustment at once: one entry, one action row."""
    threads, results, errors = 8, [], []
    barrier = threading.Barrier(threads)

    def worker() -> None:
        with database.connection_context():
            barrier.wait()
            try:
                results.append(
                    operators.adjust_credits(
                        org.id, amount=DOLLAR, reason="goodwill", idempotency_key="race-1"
                    ).entry.id
                )
            except Exception as exc:
                errors.append(exc)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    assert len(set(results)) == 1
    with database.connection_context():
        assert CreditEntry.select().where(CreditEntry.organization == org.id).count() == 1
        assert OperatorAction.select().count() == 1
        assert_ledger_invariants(org.id)


# --- suspension -----------------------------------------------------------------------------


def record(client, org_id: str, ref: str):
    return client.post(
        f"{S}/{org_id}/usage",
        json={
            "category": "storage",
            "quantity": 1,
            "unitCostDecimillicents": 10,
            "referenceId": ref,
        },
        headers=SERVICE_HEADERS,
    )


def test_suspend_blocks_spending_until_unsuspended(client, org):
    adjust(client, org.id, DOLLAR, "seed", "seed")
    first = client.post(
        f"{S}/{org.id}/suspend", json={"reason": "chargeback"}, headers=SERVICE_HEADERS
    )
    assert first.status_code == 200, first.text
    assert first.json()["isSuspended"] is True and first.json()["reason"] == "chargeback"
    again = client.post(f"{S}/{org.id}/suspend", json={"reason": "other"}, headers=SERVICE_HEADERS)
    assert again.json() == first.json()  # the first suspension stands
    assert record(client, org.id, "u1").status_code == 402
    credits = client.get(f"/v1/billing/{org.id}/credits", headers=org.member).json()
    assert credits["isSuspended"] is True and credits["suspendedAt"] == first.json()["suspendedAt"]
    lifted = client.post(
        f"{S}/{org.id}/unsuspend", json={"reason": "resolved"}, headers=SERVICE_HEADERS
    )
    assert lifted.json() == {
        "organizationId": org.id,
        "isSuspended": False,
        "suspendedAt": None,
        "reason": None,
    }
    assert record(client, org.id, "u2").status_code == 200
    lifted_again = client.post(
        f"{S}/{org.id}/unsuspend", json={"reason": "again"}, headers=SERVICE_HEADERS
    )
    assert lifted_again.status_code == 200 and lifted_again.json()["isSuspended"] is False
    with database.connection_context():
        trail = [(a.action, a.reason) for a in OperatorAction.select().order_by(OperatorAction.id)]
    assert trail == [
        ("credit_adjustment", "seed"),
        ("suspend", "chargeback"),
        ("unsuspend", "resolved"),
    ]


def test_suspend_unknown_organization_is_404(client, db):
    r = client.post(f"{S}/{uuid.uuid4()}/suspend", json={"reason": "x"}, headers=SERVICE_HEADERS)
    assert r.status_code == 404


# --- audit ----------------------------------------------------------------------------------


def test_audit_reports_a_sound_ledger_and_a_broken_one(client, org):
    adjust(client, org.id, DOLLAR, "seed", "seed")
    record(client, org.id, "u1")
    r = client.get(f"{S}/{org.id}/audit", headers=SERVICE_HEADERS)
    assert r.status_code == 200, r.text
    assert r.json()["sound"] is True and r.json()["problems"] == []
    assert r.json()["entryCount"] == 2
    assert r.json()["creditsBalanceDecimillicents"] == DOLLAR - 10
    with database.connection_context():
        newest = CreditEntry.select().order_by(CreditEntry.id.desc()).get()
        CreditEntry.update(balance_after=newest.balance_after + 1).where(
            CreditEntry.id == newest.id
        ).execute()
    broken = client.get(f"{S}/{org.id}/audit", headers=SERVICE_HEADERS).json()
    assert broken["sound"] is False and len(broken["problems"]) == 1
    assert "balance_after" in broken["problems"][0]


def test_audit_unknown_organization_is_404(client, db):
    assert client.get(f"{S}/{uuid.uuid4()}/audit", headers=SERVICE_HEADERS).status_code == 404


# --- scripts.admin equivalents --------------------------------------------------------------


def admin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.admin", *args],
        cwd=ROOT,
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_admin_commands_match_the_api(client, db):
    org_id = str(uuid.uuid4())
    made = admin("put-org", org_id, "CLI org")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["name"] == "CLI org"
    assert admin("put-member", org_id, "cli-owner", "--role", "owner").returncode == 0
    owner = bearer("cli-owner")
    granted = admin(
        "adjust-credits", org_id, str(DOLLAR), "--reason", "goodwill", "--idempotency-key", "k1"
    )
    assert granted.returncode == 0, granted.stderr
    # The API with the same key replays the CLI's entry: one grant in all.
    via_api = adjust(client, org_id, DOLLAR, "goodwill", "k1")
    assert via_api.json()["entry"]["id"] == json.loads(granted.stdout)["entry"]["id"]
    assert balance(client, org_id, owner) == DOLLAR
    conflicting = admin(
        "adjust-credits", org_id, str(2 * DOLLAR), "--reason", "goodwill", "--idempotency-key", "k1"
    )
    assert conflicting.returncode == 2 and "Conflict" in conflicting.stderr
    assert admin("suspend", org_id, "--reason", "fraud check").returncode == 0
    assert client.get(f"/v1/billing/{org_id}/credits", headers=owner).json()["isSuspended"]
    assert admin("unsuspend", org_id, "--reason", "cleared").returncode == 0
    audit = admin("audit", org_id)
    assert audit.returncode == 0 and json.loads(audit.stdout)["sound"] is True
    assert admin("remove-member", org_id, "cli-owner").returncode == 0
    assert client.get(f"/v1/billing/{org_id}/credits", headers=owner).status_code == 404
    with database.connection_context():
        with locked_account(org_id) as account:
            ledger.grant(account, 1, "adjustment", reason="x")
        CreditEntry.update(balance_after=999).execute()
    assert admin("audit", org_id).returncode == 1


def test_longest_idempotency_key_fits(client, org):
    """A 255-character key (the contract's maximum) works on PostgreSQL too, where column
    lengths are enforced: the ledger reference stores a digest of the key."""
    key = "k" * 255
    first = adjust(client, org.id, DOLLAR, "goodwill", key)
    assert first.status_code == 200, first.text
    again = adjust(client, org.id, DOLLAR, "goodwill", key)
    assert again.json()["entry"]["id"] == first.json()["entry"]["id"]
    assert adjust(client, org.id, 2 * DOLLAR, "goodwill", key).status_code == 409
    assert balance(client, org.id, org.member) == DOLLAR


def test_finalize_with_an_idempotency_key_is_not_a_500(client, org):
    """The finalize scope (two UUIDs) fits idempotency_records.scope on PostgreSQL."""
    adjust(client, org.id, DOLLAR, "seed", "seed")
    held = client.post(
        f"{S}/{org.id}/reservations",
        json={"amountDecimillicents": 1000, "referenceId": "hold-1"},
        headers=SERVICE_HEADERS,
    ).json()
    url = f"{S}/{org.id}/reservations/{held['id']}/finalize"
    headers = {**SERVICE_HEADERS, "Idempotency-Key": "fin-1"}
    first = client.post(url, json={"actualAmountDecimillicents": 600}, headers=headers)
    assert first.status_code == 200, first.text
    again = client.post(url, json={"actualAmountDecimillicents": 600}, headers=headers)
    assert again.json() == first.json()
