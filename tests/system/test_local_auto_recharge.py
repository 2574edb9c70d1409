"""Local billing mode end to end under gunicorn: the in-process worker recharges on its own."""

from __future__ import annotations

import time

import httpx

from scripts.local_server import LocalServer

DOLLAR = 10_000_000


def test_in_process_worker_recharges_in_local_mode():
    # The suite turns the in-process worker off for itself; this server runs the default.
    with LocalServer(credit=2 * DOLLAR, extra_env={"AUTO_RECHARGE_IN_PROCESS": "true"}) as server:
        org = server.organization_id
        user = {"Authorization": f"Bearer {server.token}"}
        with httpx.Client(base_url=server.base_url, timeout=10) as http:
            r = http.patch(
                f"/v1/organizations/{org}/billing",
                headers=user,
                json={
                    "autoRechargeEnabled": True,
                    "autoRechargeThresholdDecimillicents": DOLLAR,
                    "autoRechargeAmountDecimillicents": 5 * DOLLAR,
                },
            )
            assert r.status_code == 200, r.text
            # Local mode saves a card when a checkout completes; top up once to get one.
            http.post(
                f"/v1/billing/{org}/top-up",
                headers=user,
                json={
                    "amountDecimillicents": DOLLAR,
                    "successUrl": "https://x.example.com",
                    "cancelUrl": "https://x.example.com",
                },
            )
            http.post(f"/v1/billing/{org}/dev/complete-local", headers=user)
            r = http.post(
                f"/v1/service/organizations/{org}/usage",
                headers={"X-Service-Token": server.service_token},
                json={
                    "category": "api_call",
                    "quantity": 1,
                    "unitCostDecimillicents": int(2.5 * DOLLAR),
                    "referenceId": "cross-threshold",
                },
            )
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 20
            types: list[str] = []
            while time.monotonic() < deadline:
                items = http.get(f"/v1/billing/{org}/credits/history", headers=user).json()["items"]
                types = [item["entryType"] for item in items]
                if "auto_recharge" in types:
                    break
                time.sleep(0.5)
            assert types.count("auto_recharge") == 1, types
            balance = http.get(f"/v1/billing/{org}/credits", headers=user).json()
            assert balance["creditsBalanceDecimillicents"] == int(5.5 * DOLLAR)
