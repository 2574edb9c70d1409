"""Two workers drain one outbox at the same time (production runs several `scripts.worker`):
every organization's recharge is charged exactly once, by one of them, and granted once."""

from __future__ import annotations

import collections
import threading

from billing.auto_recharge import drain
from billing.config import get_settings
from billing.organizations import create_organization
from billing.stripe_gateway import get_gateway
from billing.units import DOLLAR
from models import AutoRechargeRequest, BillingAccount, CreditEntry, database
from tests.ledger_checks import assert_ledger_invariants
from tests.test_auto_recharge import arm, conn_stripe, saved_card

__all__ = ["conn_stripe"]  # the fixture, shared with the auto-recharge tests
ORGS = 8
WORKERS = 2


def test_two_workers_share_the_outbox(conn_stripe):
    orgs = [create_organization(f"shared-{i}").id for i in range(ORGS)]
    for org_id in orgs:
        saved_card(conn_stripe.backend, org_id, "ok")
        arm(org_id)
    assert AutoRechargeRequest.select().count() == ORGS
    start = threading.Barrier(WORKERS)
    handled: list[int] = []

    def worker() -> None:
        with database.connection_context():
            start.wait()
            handled.append(drain(get_gateway(), get_settings()))

    threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sum(handled) == ORGS  # each request handled by exactly one worker
    assert {a.status for a in AutoRechargeRequest.select()} == {"succeeded"}
    creates = conn_stripe.sent("POST", "/v1/payment_intents")
    attempts = collections.Counter(sent["metadata"]["attempt_id"] for sent in creates)
    assert sorted(attempts) == sorted(a.id for a in AutoRechargeRequest.select())
    assert set(attempts.values()) == {1}  # one PaymentIntent per attempt
    for org_id in orgs:
        account = assert_ledger_invariants(org_id)
        assert account.credits_balance == 24 * DOLLAR  # 10 - 6 + 20, granted once
        recharges = CreditEntry.select().where(
            (CreditEntry.organization == org_id) & (CreditEntry.entry_type == "recharge")
        )
        assert recharges.count() == 1
        assert BillingAccount.get_by_id(org_id).auto_recharge_in_flight_id is None
