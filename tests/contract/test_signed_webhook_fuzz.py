"""Schemathesis against the webhook in Stripe mode, every generated body correctly signed
(tests/contract/stripe_signing_hooks.py), so event parsing and processing are fuzzed, zero
failures. No Stripe call is needed to process webhooks.

Every check runs except `ignored_auth`: it takes a 2xx to a credential the generator made as
"accepts invalid authentication" (here the hook made it valid) and demands 401/403 for a wrong
signature, which this API answers with 400 by decision (README "Decisions"). The unsigned main
fuzz (test_schemathesis.py) still runs `ignored_auth` on this operation.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from scripts.local_server import BIN, ROOT, LocalServer

WEBHOOK_SECRET = "whsec_fuzz_signed_webhooks_0123456789"


def test_signed_webhooks_fuzz_finds_nothing(capfd):
    extra = {
        "RESPONSE_VALIDATION": "true",
        "RATE_LIMIT_IP": "1000000/minute",
        "RATE_LIMIT_PRINCIPAL": "1000000/minute",
        "RATE_LIMIT_WEBHOOK": "1000000/minute",
        "STRIPE_SECRET_KEY": "sk_test_fuzz_no_calls_are_made",
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STRIPE_MAX_RETRIES": "0",
    }
    examples = os.environ.get("FUZZ_MAX_EXAMPLES", "100")
    with LocalServer(os.environ.get("FUZZ_DATABASE_URL"), extra_env=extra) as server:
        command = [
            str(BIN / "schemathesis"),
            "--config-file",
            str(ROOT / "tests/contract/schemathesis.toml"),
            "run",
            f"{server.base_url}/openapi.json",
            "--checks",
            "all",
            "--exclude-checks",
            "ignored_auth",
            "--include-operation-id",
            "receiveStripeWebhook",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            examples,
            "--workers",
            "1",
            "--seed",
            os.environ.get("FUZZ_SEED", "20261128"),
        ]
        env = {
            **server.env,
            "FUZZ_ORG_ID": server.organization_id,
            # The shared config pins releaseReservation's id too; this run covers the webhook
            # alone, so any well-formed id satisfies it.
            "FUZZ_RESERVATION_ID": "00000000-0000-4000-8000-000000000000",
            "SCHEMATHESIS_HOOKS": "tests.contract.stripe_signing_hooks",
            "PYTHONPATH": str(ROOT),
        }
        result = subprocess.run(command, env=env, cwd=server.tmp)
        log = Path(server.log_path).read_text()
    out = capfd.readouterr().out
    assert "Selected: 1/" in out, out[-3000:]
    assert result.returncode == 0, out[-6000:]
    # The signatures were accepted: events were stored and processed, not refused at the door.
    assert log.count('"status": 200') > 10, log[-3000:]
    assert '"status": 500' not in log, log[-3000:]
