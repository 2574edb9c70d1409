"""Outside review of issue 10 on money: sequences of signed Stripe events that moved money
wrongly after the merge. Each test failed before its fix (numbers in the review report).

Races run on PostgreSQL with a barrier (skipped on SQLite, which serializes writers)."""

from __future__ import annotations

import datetime as dt
import json as _json
import os
import threading
import uuid

import pytest

from billing import auto_recharge, ledger, metering, operators
from billing.accounts import locked_account
from billing.audit import ledger_problems
from billing.errors import Conflict, PaymentRequired
from billing.organizations import create_organization
from billing.units import CENT, DOLLAR
from models import (
    BillingAccount,
    CreditEntry,
    Reservation,
    StripeDispute,
    StripeInvoice,
    StripePayment,
    StripeSubscription,
    UsageRecord,
    WebhookEvent,
    database,
    is_postgres,
)
from tests import stripe_events as ev
from tests.conftest import SERVICE_HEADERS
from tests.ledger_checks import assert_ledger_invariants

ROUNDS = int(os.environ.get("RACE_ROUNDS", "15"))
ORDER = 10 * DOLLAR

pytestmark = pytest.mark.usefixtures("stripe_mode")


def _new_org(extra_credit: int = 0) -> str:
    with database.connection_context():
        org_id = create_organization(f"review {uuid.uuid4().hex[:6]}").id
        if extra_credit:
            with locked_account(org_id) as account:
                ledger.grant(account, extra_credit, "adjustment", reason="other credit")
    ev.link_customer(org_id)
    return org_id


def _balance(org_id: str) -> int:
    with database.connection_context():
        assert_ledger_invariants(org_id)
        return int(BillingAccount.get_by_id(org_id).credits_balance)


def _top_up(org_id: str, tag: str) -> str:
    pi = f"pi_{tag}_{org_id[:8]}"
    ev.deliver(
        *ev.signed(
            "checkout.session.completed",
            ev.top_up_session(
                org_id, pi=pi, session_id=f"cs_{tag}_{org_id[:8]}", amount_decimillicents=ORDER
            ),
        )
    )
    return pi


def _spend(org_id: str, amount: int) -> None:
    with database.connection_context(), locked_account(org_id) as account:
        ledger.debit(account, amount, reason="usage", reference_id=uuid.uuid4().hex)


# --- 1. a reversal's shortfall is taken later from credits another payment bought ---------


def test_a_late_event_of_a_refunded_payment_never_takes_a_later_top_ups_credits():
    """Top-up A is spent, then fully refunded: nothing of A remains, so nothing is taken
    (DESIGN: "at most what remains"). Top-up B is bought. A late (or repeated, with a new
    event id) event about A then arrives: it must not take B's credits."""
    org_id = _new_org()
    pi_a = _top_up(org_id, "a")
    _spend(org_id, ORDER)
    ev.deliver(*ev.signed("charge.refunded", ev.charge(org_id, refunded_cents=1000, pi=pi_a)))
    assert ev.reversed_total(org_id) == 0  # A's credits were spent: nothing remained to take
    _top_up(org_id, "b")
    assert _balance(org_id) == ORDER
    # Stripe's payment_intent.succeeded for A, delivered late.
    late = ev.top_up_intent(org_id, pi=pi_a, ordered=ORDER)
    ev.deliver(*ev.signed("payment_intent.succeeded", late))
    assert _balance(org_id) == ORDER, "A's late event took B's credits"


def test_a_repeated_refund_report_never_takes_a_later_top_ups_credits():
    org_id = _new_org()
    pi_a = _top_up(org_id, "a")
    _spend(org_id, ORDER)
    refund = ev.charge(org_id, refunded_cents=1000, pi=pi_a)
    ev.deliver(*ev.signed("charge.refunded", refund))
    _top_up(org_id, "b")
    # The same cumulative refund reported again (charge.refunded and charge.refund.updated-like
    # redeliveries carry new event ids): nothing new was refunded.
    ev.deliver(*ev.signed("charge.refunded", refund))
    assert _balance(org_id) == ORDER, "a repeated refund report took B's credits"


def test_a_lost_dispute_takes_only_what_the_refund_left_and_what_remains():
    """Half of A refunded while only $2 of A remained: $2 taken. B bought. A's dispute for
    the other half is lost: it takes its own half ($5), not the refund's shortfall too."""
    org_id = _new_org()
    pi_a = _top_up(org_id, "a")
    _spend(org_id, 8 * DOLLAR)
    ev.deliver(*ev.signed("charge.refunded", ev.charge(org_id, refunded_cents=500, pi=pi_a)))
    assert ev.reversed_total(org_id) == 2 * DOLLAR
    _top_up(org_id, "b")
    lost = ev.dispute(status="lost", amount=500, pi=pi_a, dispute_id=f"dp_{org_id[:8]}")
    ev.deliver(*ev.signed("charge.dispute.closed", lost))
    assert ev.reversed_total(org_id) == 2 * DOLLAR + 5 * DOLLAR


# --- 2. a partial lost dispute of an auto-recharge reverses the whole recharge -----------


def test_a_partial_lost_dispute_of_an_auto_recharge_reverses_its_share_only():
    org_id = _new_org(50 * DOLLAR)
    pi = f"pi_ar_{org_id[:8]}"
    with database.connection_context(), locked_account(org_id) as account:
        auto_recharge.payment_succeeded(account, pi, ORDER, None)
    lost = ev.dispute(status="lost", amount=300, pi=pi, dispute_id=f"dp_{org_id[:8]}")
    ev.deliver(*ev.signed("charge.dispute.closed", lost))
    assert ev.reversed_total(org_id) == 300 * CENT


# --- races ------------------------------------------------------------------------------


@pytest.fixture
def _postgres(db):
    if not is_postgres():
        pytest.skip("the race needs PostgreSQL's concurrent transactions")


@pytest.mark.usefixtures("_postgres")
def test_a_late_event_of_a_spent_refunded_payment_racing_a_new_top_up_takes_nothing():
    """A spent and refunded; B's checkout and A's late payment_intent.succeeded at once: in
    either order B's credits stay whole."""
    wrong = 0
    for _ in range(ROUNDS):
        org_id = _new_org()
        pi_a = _top_up(org_id, "a")
        _spend(org_id, ORDER)
        ev.deliver(*ev.signed("charge.refunded", ev.charge(org_id, refunded_cents=1000, pi=pi_a)))
        ev.deliver_together(
            [
                ev.signed(
                    "checkout.session.completed",
                    ev.top_up_session(
                        org_id,
                        pi=f"pi_b_{org_id[:8]}",
                        session_id=f"cs_b_{org_id[:8]}",
                        amount_decimillicents=ORDER,
                    ),
                ),
                ev.signed(
                    "payment_intent.succeeded", ev.top_up_intent(org_id, pi=pi_a, ordered=ORDER)
                ),
            ]
        )
        wrong += _balance(org_id) != ORDER
    print(f"late event vs new top-up: {wrong}/{ROUNDS} rounds wrong")
    assert wrong == 0


# --- 3. a signed event refused with a 400 by the domain still left its event row ---------


def _rows(org_id: str) -> dict[str, int]:
    with database.connection_context():
        return {
            "events": WebhookEvent.select().count(),
            "entries": CreditEntry.select().where(CreditEntry.organization == org_id).count(),
            "payments": StripePayment.select().count(),
            "disputes": StripeDispute.select().count(),
            "invoices": StripeInvoice.select().count(),
            "subscriptions": StripeSubscription.select().count(),
        }


def test_an_auto_recharge_of_nothing_is_a_400_that_writes_nothing(client):
    org_id = _new_org()
    intent = ev.top_up_intent(org_id, cents=0, pi=f"pi_zero_{org_id[:8]}")
    intent["metadata"] = {"organization_id": org_id, "kind": "auto_recharge"}
    before = _rows(org_id)
    r = ev.post(client, "payment_intent.succeeded", intent)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert _rows(org_id) == before
    assert _balance(org_id) == 0


# --- 4. one Stripe object named by two organizations at once: a 500 -----------------------


def _answers_with_retry(deliveries: list[tuple[bytes, str]]) -> list[str]:
    """Deliver together; a 409 is retried once afterwards, as Stripe would."""
    from billing.errors import Conflict

    barrier = threading.Barrier(len(deliveries))
    answers: list[str] = []

    def run(body: bytes, signature: str) -> None:
        barrier.wait()
        try:
            ev.deliver(body, signature)
            answers.append("200")
        except Conflict:
            answers.append("409")
            ev.deliver(body, signature)  # Stripe's retry
        except Exception as exc:  # a 500: the caller counts it
            answers.append(type(exc).__name__)

    threads = [threading.Thread(target=run, args=d) for d in deliveries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


@pytest.mark.usefixtures("_postgres")
def test_one_payment_claimed_by_two_organizations_at_once_is_never_a_500():
    """Sequentially the second claim is refused and acknowledged; concurrently the loser hit
    the primary key (IntegrityError, a 500). Stripe retries what is not acknowledged, so a
    retryable answer is fine, a 500 is not; in the end one organization has the credit."""
    failures = 0
    for _ in range(ROUNDS):
        a, b = _new_org(), _new_org()
        pi = f"pi_shared_{a[:8]}"
        deliveries = [
            ev.signed(
                "checkout.session.completed",
                ev.top_up_session(
                    org, pi=pi, session_id=f"cs_{org[:8]}", amount_decimillicents=ORDER
                ),
            )
            for org in (a, b)
        ]
        answers = _answers_with_retry(deliveries)
        credited = sorted([_balance(a), _balance(b)])
        failures += not (set(answers) <= {"200", "409"} and credited == [0, ORDER])
    print(f"one payment, two organizations: {failures}/{ROUNDS} rounds wrong")
    assert failures == 0


# --- 5. a late failure of a replaced, canceled subscription blocks a paying organization -


def _account(org_id: str) -> BillingAccount:
    with database.connection_context():
        return BillingAccount.get_by_id(org_id)


@pytest.mark.parametrize("failure_first", [False, True])
def test_a_canceled_subscriptions_failure_never_blocks_its_paid_successor(failure_first):
    """The organization's old subscription is canceled and a new one is active and paid
    (the newest invoice is paid). The old subscription's last invoice failure, delivered
    late or before the switch, must not hold the organization in a grace period (402) that
    nothing could ever end: invoices of the new subscription never resolve the old one's."""
    org_id = _new_org()
    t = 1_800_000_000
    old, new = f"sub_old_{org_id[:8]}", f"sub_new_{org_id[:8]}"
    failed = ev.signed(
        "invoice.payment_failed",
        ev.invoice(
            org_id, inv=f"in_old_{org_id[:8]}", sub=old, paid_cents=0, status="open", created=t
        ),
        created=t + 100,
    )
    ev.deliver(
        *ev.signed(
            "customer.subscription.created", ev.subscription(org_id, sub=old, created=t), created=t
        )
    )
    if failure_first:
        ev.deliver(*failed)
        assert _account(org_id).payment_grace_period_ends_at is not None
    deleted = ev.subscription(org_id, sub=old, status="canceled", created=t)
    ev.deliver(*ev.signed("customer.subscription.deleted", deleted, created=t + 500))
    created = ev.subscription(org_id, sub=new, created=t + 600)
    ev.deliver(*ev.signed("customer.subscription.created", created, created=t + 600))
    paid = ev.invoice(org_id, inv=f"in_new_{org_id[:8]}", sub=new, created=t + 600)
    ev.deliver(*ev.signed("invoice.paid", paid, created=t + 600))
    if not failure_first:
        ev.deliver(*failed)
    account = _account(org_id)
    assert account.stripe_subscription_id == new and account.subscription_status == "active"
    assert account.payment_grace_period_ends_at is None


def test_the_current_subscriptions_failure_still_starts_the_grace_period():
    """The guard of the rule above: a failure of the current subscription, even canceled and
    alone, still holds spending (the fix must not lift every canceled subscription's debt)."""
    org_id = _new_org()
    t = 1_800_000_000
    sub = f"sub_only_{org_id[:8]}"
    ev.deliver(
        *ev.signed(
            "customer.subscription.created", ev.subscription(org_id, sub=sub, created=t), created=t
        )
    )
    failed = ev.invoice(
        org_id, inv=f"in_{org_id[:8]}", sub=sub, paid_cents=0, status="open", created=t + 100
    )
    ev.deliver(*ev.signed("invoice.payment_failed", failed, created=t + 100))
    deleted = ev.subscription(org_id, sub=sub, status="canceled", created=t)
    ev.deliver(*ev.signed("customer.subscription.deleted", deleted, created=t + 500))
    assert _account(org_id).payment_grace_period_ends_at is not None


# =========================================================================================
# Review round 3 (review-money): different events about the same money at the same moment,
# month boundaries, replays, hostile bodies, long histories. Races need PostgreSQL.
# =========================================================================================


@pytest.fixture
def pg_only(db):
    if not is_postgres():
        pytest.skip("races need PostgreSQL row locks")


needs_pg = pytest.mark.usefixtures("pg_only")
BATCH_URL = "/v1/service/usage/batch"


def _race(*jobs, expected: tuple[type[BaseException], ...] = ()) -> list:
    """Run each job on its own thread and connection, released together by a barrier.
    Returns the results (or the expected exceptions); any other exception fails."""
    barrier = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i, job):
        try:
            with database.connection_context():
                barrier.wait()
                results[i] = job()
        except expected as exc:
            results[i] = exc
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def _events(org_id: str, tag: str, count: int, cost: int) -> list[metering.UsageEvent]:
    return [
        metering.UsageEvent(org_id, "api_call", 1, cost, f"{tag}-{i}", None) for i in range(count)
    ]


def _clean(org_id: str) -> BillingAccount:
    with database.connection_context():
        problems = ledger_problems(org_id)
        assert problems == [], problems
        return BillingAccount.get_by_id(org_id)


@needs_pg
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_usage_batch_racing_a_full_refund_leaves_nothing_and_never_goes_negative(round_):
    org_id = _new_org()
    pi = _top_up(org_id, f"r{round_}")
    refund = ev.signed(
        "charge.refunded",
        ev.charge(org_id, refunded_cents=1000, pi=pi, charge_id=f"ch_{round_}_{org_id[:6]}"),
    )
    batch = _events(org_id, "b", 5, DOLLAR)
    _race(lambda: metering.record_usage_batch(batch), lambda: ev.deliver(*refund))
    account = _clean(org_id)
    assert account.credits_balance == 0  # spent + refunded = the top-up, in either order


@needs_pg
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_usage_batch_racing_a_dispute_opening_then_lost(round_):
    org_id = _new_org()
    pi = _top_up(org_id, f"d{round_}")
    ch = f"ch_d{round_}_{org_id[:6]}"
    dp = f"dp_{round_}_{org_id[:6]}"
    opened = ev.signed(
        "charge.dispute.created",
        ev.dispute(status="needs_response", pi=pi, charge_id=ch, dispute_id=dp),
    )
    batch = _events(org_id, "b", 5, DOLLAR)
    _race(lambda: metering.record_usage_batch(batch), lambda: ev.deliver(*opened))
    ev.deliver(
        *ev.signed(
            "charge.dispute.closed", ev.dispute(status="lost", pi=pi, charge_id=ch, dispute_id=dp)
        )
    )
    account = _clean(org_id)
    assert account.credits_balance == 0


def _reserved_org(balance: int, hold: int, ref: str = "job") -> tuple[str, str]:
    org_id = _new_org(extra_credit=balance)
    with database.connection_context():
        rid = ledger.reserve(org_id, hold, reference_id=ref).reservation.id
    return org_id, rid


@needs_pg
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_finalize_racing_release_of_one_hold_settles_it_once(round_):
    org_id, rid = _reserved_org(10 * DOLLAR, 4 * DOLLAR)
    results = _race(
        lambda: ledger.finalize_reservation(org_id, rid, 3 * DOLLAR),
        lambda: ledger.release_reservation(org_id, rid),
        expected=(Conflict,),
    )
    assert sum(isinstance(r, Conflict) for r in results) == 1
    account = _clean(org_id)
    assert account.reserved_credits == 0
    charged = 10 * DOLLAR - account.credits_balance
    assert charged in (0, 3 * DOLLAR)


@needs_pg
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_finalize_above_the_hold_racing_a_batch_never_overdraws(round_):
    org_id, rid = _reserved_org(10 * DOLLAR, 2 * DOLLAR)
    batch = _events(org_id, "b", 8, DOLLAR)  # 8 + finalize 6 > 10
    _race(
        lambda: ledger.finalize_reservation(org_id, rid, 6 * DOLLAR),
        lambda: metering.record_usage_batch(batch),
        expected=(PaymentRequired,),
    )
    account = _clean(org_id)
    assert account.credits_balance - account.reserved_credits >= 0


@needs_pg
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_finalize_racing_a_usage_cap_change(round_):
    org_id, rid = _reserved_org(10 * DOLLAR, 2 * DOLLAR)
    from billing.accounts import update_settings

    _race(
        lambda: ledger.finalize_reservation(org_id, rid, 5 * DOLLAR),
        lambda: update_settings(org_id, {"usage_cap": 3 * DOLLAR}),
        expected=(PaymentRequired,),
    )
    account = _clean(org_id)
    assert account.usage_cap == 3 * DOLLAR
    # whichever came first, the month's spend never passes a cap it was checked against
    assert account.month_spend in (0, 5 * DOLLAR)
    if account.month_spend:
        assert Reservation.get_by_id(rid).status == "finalized"


@needs_pg
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_an_operator_take_back_racing_a_batch_never_overdraws(round_):
    org_id = _new_org(extra_credit=10 * DOLLAR)
    batch = _events(org_id, "b", 6, DOLLAR)
    _race(
        lambda: metering.record_usage_batch(batch),
        lambda: operators.adjust_credits(
            org_id, amount=-6 * DOLLAR, reason="correction", idempotency_key=f"k{round_}"
        ),
        expected=(PaymentRequired,),
    )
    account = _clean(org_id)
    assert account.credits_balance >= 0


@needs_pg
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_concurrent_batches_over_two_orgs_in_opposite_orders(round_):
    a, b = _new_org(extra_credit=10 * DOLLAR), _new_org(extra_credit=10 * DOLLAR)
    one = _events(a, "x", 3, DOLLAR) + _events(b, "x", 3, DOLLAR)
    two = _events(b, "y", 3, DOLLAR) + _events(a, "y", 3, DOLLAR)
    three = list(reversed(one))  # the same references again, reversed
    _race(*(lambda e=e: metering.record_usage_batch(e) for e in (one, two, three)))
    for org_id in (a, b):
        assert _clean(org_id).credits_balance == 4 * DOLLAR


def _no_500(response) -> None:
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text


def test_metadata_nested_just_under_the_parsers_limit_is_a_400_not_a_500(client):
    """The body validator parses the body on a shallow stack and accepts ~950 levels; the
    handler then parses it again (starlette `request.json()`) some frames deeper and hits
    RecursionError: a 500. Found at depth ~950 on the test client; the window moves with the
    stack, so every depth from 900 to 1000 is tried. The batch route fails so even when the
    deep value is in a field the schema refuses (`category`). Nothing may be written."""
    org_id = _new_org(extra_credit=DOLLAR)
    headers = {**SERVICE_HEADERS, "Content-Type": "application/json"}
    failures = []
    for depth in range(900, 1001, 2):
        inner = "[" * depth + "1" + "]" * depth
        one = (
            '{"category":"api_call","quantity":1,"unitCostDecimillicents":1,'
            f'"referenceId":"deep-{depth}","metadata":{{"m":{inner}}}}}'
        )
        batch = f'{{"events":[{{"organizationId":"{org_id}",{one[1:]}]}}'
        # an event the schema refuses anyway (category is not a string): still a 500 in a batch
        invalid = batch.replace('"category":"api_call"', f'"category":{inner}')
        for url, body in (
            (f"/v1/service/organizations/{org_id}/usage", one),
            (BATCH_URL, batch),
            (BATCH_URL, invalid),
        ):
            response = client.post(url, content=body.encode(), headers=headers)
            if response.status_code >= 500:
                failures.append((depth, url.rsplit("/", 1)[-1], response.status_code))
    assert failures == []
    assert _clean(org_id).credits_balance <= DOLLAR


@needs_pg
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_one_idempotency_key_with_two_bodies_at_once_applies_one(round_):
    from billing.idempotency import run_once

    org_id = _new_org(extra_credit=10 * DOLLAR)

    def call(ref: str, cost: int):
        return lambda: run_once(
            f"service:recordUsage:{org_id}",
            "same-key",
            {"referenceId": ref, "unitCostDecimillicents": cost},
            lambda: {"balance": metering.record_usage(org_id, "api_call", 1, cost, ref).balance},
        )

    results = _race(call("a", DOLLAR), call("b", 2 * DOLLAR), expected=(Conflict,))
    assert sum(isinstance(r, Conflict) for r in results) == 1
    account = _clean(org_id)
    assert account.credits_balance in (9 * DOLLAR, 8 * DOLLAR)
    assert UsageRecord.select().where(UsageRecord.organization == org_id).count() == 1


@needs_pg
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_batches_repeating_a_reference_with_other_values_in_both_orders(round_):
    org_id = _new_org(extra_credit=10 * DOLLAR)
    cheap = metering.UsageEvent(org_id, "api_call", 1, DOLLAR, "dup", None)
    dear = metering.UsageEvent(org_id, "api_call", 3, DOLLAR, "dup", None)
    results = _race(
        lambda: metering.record_usage_batch([cheap, dear, cheap]),
        lambda: metering.record_usage_batch([dear, cheap, dear]),
    )
    statuses = [[o.status.value for o in r] for r in results]
    recorded = sum(s.count("recorded") for s in statuses)
    assert recorded == 1, statuses
    account = _clean(org_id)
    assert account.credits_balance in (9 * DOLLAR, 7 * DOLLAR)


class _SkewedClock:
    """Two workers on either side of midnight at a month's end: threads named 'ahead' read
    Dec 1 00:00:00.5, every other thread Nov 30 23:59:59.5."""

    def __call__(self):
        if threading.current_thread().name.startswith("ahead"):
            return dt.datetime(2026, 12, 1, 0, 0, 0, 500000)
        return dt.datetime(2026, 11, 30, 23, 59, 59, 500000)


@needs_pg
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_skewed_workers_across_a_month_end_keep_the_cap_and_the_running_spend(round_):
    from models.clock import use_clock

    a = _new_org(extra_credit=100 * DOLLAR)
    b = _new_org(extra_credit=100 * DOLLAR)
    with database.connection_context():
        BillingAccount.update(usage_cap=5 * DOLLAR).where(
            BillingAccount.organization.in_([a, b])
        ).execute()
    with use_clock(_SkewedClock()):
        with database.connection_context():  # November: b at its cap, a at 4 of 5
            metering.record_usage_batch(_events(b, "nov", 5, DOLLAR) + _events(a, "nov", 4, DOLLAR))
            rid = ledger.reserve(a, DOLLAR, reference_id="hold").reservation.id
        barrier = threading.Barrier(3)
        errors: list[BaseException] = []

        def job(fn):
            def run():
                try:
                    with database.connection_context():
                        barrier.wait()
                        fn()
                except PaymentRequired:
                    pass
                except BaseException as exc:
                    errors.append(exc)

            return run

        threads = [
            threading.Thread(
                name="ahead-1",
                target=job(lambda: metering.record_usage_batch(_events(a, "dec", 3, DOLLAR))),
            ),
            threading.Thread(
                name="behind-1",
                target=job(
                    lambda: metering.record_usage_batch(
                        _events(b, "late", 2, DOLLAR) + _events(a, "late", 2, DOLLAR)
                    )
                ),
            ),
            threading.Thread(
                name="behind-2", target=job(lambda: ledger.finalize_reservation(a, rid, DOLLAR))
            ),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
    for org_id in (a, b):
        account = _clean(org_id)
        if account.spend_month == "2026-12":
            assert account.month_spend + account.reserved_credits <= 5 * DOLLAR


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_a_body_with_non_json_number_literals_is_a_400_and_writes_nothing(client, literal):
    """`NaN`/`Infinity` are not JSON (RFC 8259); Python's parser takes them, so the usage is
    charged and its metadata stored as text no JSON reader can load back."""
    org_id = _new_org(extra_credit=DOLLAR)
    headers = {**SERVICE_HEADERS, "Content-Type": "application/json"}
    one = (
        '{"category":"api_call","quantity":1,"unitCostDecimillicents":7,'
        f'"referenceId":"nan-1","metadata":{{"score":{literal}}}}}'
    )
    batch = f'{{"events":[{{"organizationId":"{org_id}",{one[1:].replace("nan-1", "nan-2")}]}}'
    answers = [
        client.post(
            f"/v1/service/organizations/{org_id}/usage", content=one.encode(), headers=headers
        ),
        client.post(BATCH_URL, content=batch.encode(), headers=headers),
    ]
    for response in answers:
        _no_500(response)
    with database.connection_context():
        stored = [
            r.metadata for r in UsageRecord.select().where(UsageRecord.organization == org_id)
        ]
    for text in stored:  # whatever was stored must at least be JSON a strict reader accepts
        _json.loads(text, parse_constant=lambda c, t=text: pytest.fail(f"stored {c}: {t}"))
    assert [r.status_code for r in answers] == [400, 400]
    assert _clean(org_id).credits_balance == DOLLAR


def test_a_batch_of_1001_events_is_a_short_400_that_does_not_echo_the_body(client):
    """maxItems is enforced, but the 400's detail is the validator's message, which repeats the
    whole `events` array as a Python repr: ~1,001 x 4 KiB of metadata comes back (and goes to
    the log) as one multi-megabyte problem detail."""
    org_id = _new_org(extra_credit=DOLLAR)
    metadata = {f"k{i:02d}": "v" * 70 for i in range(50)}  # ~4 KiB encoded, as allowed
    events = [
        {
            "organizationId": org_id,
            "category": "api_call",
            "quantity": 1,
            "unitCostDecimillicents": 1,
            "referenceId": f"e{i}",
            "metadata": metadata,
        }
        for i in range(1001)
    ]
    response = client.post(BATCH_URL, json={"events": events}, headers=SERVICE_HEADERS)
    assert response.status_code == 400
    assert len(response.content) < 2000, f"{len(response.content)} bytes"
    assert _clean(org_id).credits_balance == DOLLAR


def test_a_year_of_history_pages_once_each_and_summaries_match_a_recount(client, org, clock):
    """A year of daily usage across month ends (each day: a batch at 23:59:59.9 and one at
    00:00:00 the next day), then: paging the whole history with cursors returns every entry
    once, newest first; usage summaries over the year and over odd edges equal a recount from
    the records; the audit is clean."""
    from billing.usage import summarize_usage

    with database.connection_context(), locked_account(org.id) as account:
        ledger.grant(account, 10**12, "adjustment", reason="seed")
    start = dt.datetime(2025, 11, 30, 12, 0, 0)
    for day in range(366):
        moment = start + dt.timedelta(days=day)
        clock.set(moment.replace(hour=23, minute=59, second=59, microsecond=900000))
        with database.connection_context():
            metering.record_usage_batch(
                [metering.UsageEvent(org.id, "api_call", 2, 3, f"late-{day}", None)]
            )
        clock.set(moment.replace(hour=0, minute=0, second=0, microsecond=0) + dt.timedelta(days=1))
        with database.connection_context():
            metering.record_usage_batch(
                [metering.UsageEvent(org.id, "api_call", 1, 5, f"early-{day}", None)]
            )
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        url = f"/v1/billing/{org.id}/credits/history?limit=100"
        response = client.get(url + (f"&cursor={cursor}" if cursor else ""), headers=org.owner)
        assert response.status_code == 200, response.text
        body = response.json()
        seen += [item["id"] for item in body["items"]]
        pages += 1
        cursor = body["cursor"]
        if not body["hasMore"]:
            break
    with database.connection_context():
        total = CreditEntry.select().where(CreditEntry.organization == org.id).count()
        assert len(seen) == len(set(seen)) == total, (len(seen), total, pages)
        records = list(UsageRecord.select().where(UsageRecord.organization == org.id))
        for lo, hi in [
            (dt.datetime(2025, 11, 1), dt.datetime(2027, 1, 1)),
            (dt.datetime(2025, 11, 30, 23, 59, 59, 950000), dt.datetime(2026, 12, 1, 0, 0, 0, 1)),
            (dt.datetime(2026, 2, 28, 23, 59, 59, 900000), dt.datetime(2026, 3, 1)),
            (dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 1)),
        ]:
            summary = summarize_usage(org.id, "api_call", lo, hi)
            want = [r for r in records if lo <= r.created_at < hi]
            assert (summary.total_quantity, summary.total_cost) == (
                sum(r.quantity for r in want),
                sum(r.cost for r in want),
            ), (lo, hi)
        assert ledger_problems(org.id) == []


@needs_pg
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_finalize_racing_a_full_refund_keeps_the_hold_and_never_goes_negative(round_):
    org_id = _new_org()
    pi = _top_up(org_id, f"f{round_}")
    with database.connection_context():
        rid = ledger.reserve(org_id, 4 * DOLLAR, reference_id="job").reservation.id
    refund = ev.signed(
        "charge.refunded",
        ev.charge(org_id, refunded_cents=1000, pi=pi, charge_id=f"ch_f{round_}_{org_id[:6]}"),
    )
    _race(
        lambda: ledger.finalize_reservation(org_id, rid, 3 * DOLLAR),
        lambda: ev.deliver(*refund),
    )
    account = _clean(org_id)
    assert account.reserved_credits == 0
    assert account.credits_balance >= 0
    # the refund took what was available: 6 (hold kept) or 7 (after the finalize freed 1)
    assert account.credits_balance in (DOLLAR, 0)


@needs_pg
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_two_finalizes_with_different_amounts_charge_once(round_):
    org_id, rid = _reserved_org(10 * DOLLAR, 4 * DOLLAR)
    results = _race(
        lambda: ledger.finalize_reservation(org_id, rid, DOLLAR),
        lambda: ledger.finalize_reservation(org_id, rid, 3 * DOLLAR),
        expected=(Conflict,),
    )
    assert sum(isinstance(r, Conflict) for r in results) == 1
    account = _clean(org_id)
    assert account.credits_balance in (9 * DOLLAR, 7 * DOLLAR)


@needs_pg
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_release_racing_a_batch_that_needs_the_released_credits(round_):
    org_id, rid = _reserved_org(5 * DOLLAR, 4 * DOLLAR)
    batch = _events(org_id, "b", 3, DOLLAR)
    results = _race(
        lambda: ledger.release_reservation(org_id, rid),
        lambda: metering.record_usage_batch(batch),
    )
    recorded = sum(o.status.value == "recorded" for o in results[1])
    account = _clean(org_id)
    assert account.reserved_credits == 0
    assert account.credits_balance == 5 * DOLLAR - recorded * DOLLAR
    assert recorded in (1, 3)


REFS = [
    "NULL",
    "null",
    "a\\b",
    "{a,b}",
    '"q"',
    "'s",
    "a,b",
    "\\N",
    "%s",
    "%(x)s",
    "E'\\x00'",
    "~" * 255,
]


def test_a_replayed_batch_of_odd_references_finds_each_first_record(client):
    """Several events take the `unnest(%s::varchar[], ...)` lookup (one event takes another
    query): each odd-looking reference must be found again on replay, never recorded twice."""
    org_id = _new_org(extra_credit=DOLLAR)
    events = [
        {
            "organizationId": org_id,
            "category": "api_call",
            "quantity": 1,
            "unitCostDecimillicents": 3,
            "referenceId": ref,
        }
        for ref in REFS
    ]
    first = client.post(BATCH_URL, json={"events": events}, headers=SERVICE_HEADERS)
    again = client.post(BATCH_URL, json={"events": list(reversed(events))}, headers=SERVICE_HEADERS)
    for response in (first, again):
        _no_500(response)
    assert [r["status"] for r in first.json()["results"]] == ["recorded"] * len(REFS)
    assert [r["status"] for r in again.json()["results"]] == ["duplicate"] * len(REFS)
    assert _clean(org_id).credits_balance == DOLLAR - 3 * len(REFS)


def test_a_signed_event_nested_too_deeply_is_a_400_not_a_500(client):
    """DESIGN: "A signed event that cannot be understood never causes a 500". The body
    validator accepts ~950 levels; the gateway's `_parse_event` parses again deeper in the stack
    and catches ValueError from json.loads, not RecursionError. Every depth 900..1000 is tried."""
    org_id = _new_org()
    obj = ev.top_up_session(org_id, pi="pi_deep", session_id="cs_deep", amount_decimillicents=ORDER)
    failures = []
    for depth in range(900, 1001, 2):
        body = ev.event_body("checkout.session.completed", obj)
        nested = "[" * depth + "1" + "]" * depth
        body = body.replace(b'"metadata": {', b'"metadata": {"deep": ' + nested.encode() + b", ", 1)
        response = client.post(
            ev.URL,
            content=body,
            headers={
                "Content-Type": "application/json",
                "Stripe-Signature": ev.signature_for(body),
            },
        )
        if response.status_code >= 500:
            failures.append((depth, response.status_code))
    assert failures == []
    assert _balance(org_id) == 0
