"""Auto-recharge rules the mutation run of `billing/auto_recharge.py` found unchecked: a
worker or a webhook changes only the attempt it owns (never another organization's, never
one a newer claim took over), the backoff's exact range, what a failure records and counts,
which saved card a payment replaces, and which challenge is surfaced.

The worker runs against a scripted gateway and the test clock; Stripe's reports arrive as
signed webhooks through `webhooks.receive`."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import uuid
from typing import Any

import pytest

from billing import auto_recharge
from billing.config import Settings, get_settings
from billing.errors import UpstreamUnavailable
from billing.organizations import create_organization
from billing.stripe_gateway import ChargeOutcome
from billing.units import DOLLAR
from models import AutoRechargeRequest, BillingAccount, CreditEntry, WebhookEvent, utcnow
from tests.ledger_checks import auto_recharge_on
from tests.stripe_events import deliver, signed, top_up_intent
from tests.stripe_fakes import ScriptedGateway, stripe_object

AMOUNT = 20 * DOLLAR


pytestmark = pytest.mark.usefixtures("stripe_webhooks_only")


@pytest.fixture(autouse=True)
def held_connection(conn):
    """Every test here reads and writes on the test thread's own connection."""
    yield


def outage(_attempt_id: str) -> Exception:
    return UpstreamUnavailable("Stripe is down")


def with_card(org_id: str, *, method: str | None = "pm_saved", failures: int = 0) -> None:
    auto_recharge_on(
        org_id,
        card=method,
        amount=AMOUNT,
        stripe_customer_id=f"cus_{org_id[:8]}",
        auto_recharge_failure_count=failures,
    )


def attempt(org_id: str, *, status: str = "pending", attempts: int = 0, **fields: Any):
    now = utcnow()
    values: dict[str, Any] = {
        "created_at": now,
        "updated_at": now,
        "next_attempt_at": now,
        **fields,
    }
    return AutoRechargeRequest.create(
        id=str(uuid.uuid4()),
        organization=org_id,
        amount=AMOUNT,
        status=status,
        attempts=attempts,
        **values,
    )


def in_flight(org_id: str, request: AutoRechargeRequest) -> None:
    BillingAccount.update(auto_recharge_in_flight_id=request.id).where(
        BillingAccount.organization == org_id
    ).execute()


def fresh(request: AutoRechargeRequest) -> AutoRechargeRequest:
    return AutoRechargeRequest.get_by_id(request.id)


def account(org_id: str) -> BillingAccount:
    return BillingAccount.get_by_id(org_id)


@pytest.fixture
def other_org(conn) -> str:
    """A second organization whose claimed attempt (leased, one claim) nobody may touch."""
    return create_organization(f"Other {uuid.uuid4().hex[:8]}").id


def claimed_elsewhere(org_id: str) -> AutoRechargeRequest:
    lease = utcnow() + dt.timedelta(hours=1)
    return attempt(org_id, status="processing", attempts=1, lease_expires_at=lease)


def unchanged(request: AutoRechargeRequest) -> None:
    now = fresh(request)
    assert (now.status, now.attempts, now.failure_reason, now.stripe_payment_intent_id) == (
        request.status,
        request.attempts,
        request.failure_reason,
        request.stripe_payment_intent_id,
    )


def settings_with(**values: Any) -> Settings:
    return get_settings().model_copy(update=values)


# --- the worker ----------------------------------------------------------------------------


def test_an_outage_puts_back_only_the_workers_own_claim(org, other_org, clock):
    with_card(org.id)
    mine = attempt(org.id)
    theirs = claimed_elsewhere(other_org)
    assert auto_recharge.process_one(ScriptedGateway(outage), get_settings()) == "pending"
    retried = fresh(mine)
    assert (retried.status, retried.attempts) == ("pending", 1)
    assert retried.failure_reason == "the payment provider was unavailable; retrying"
    assert retried.next_attempt_at > utcnow()
    unchanged(theirs)


def test_the_last_allowed_outage_fails_only_the_workers_own_claim(org, other_org, clock):
    settings = get_settings()
    with_card(org.id)
    mine = attempt(org.id, attempts=settings.auto_recharge_max_attempts - 1)
    in_flight(org.id, mine)
    theirs = claimed_elsewhere(other_org)
    assert auto_recharge.process_one(ScriptedGateway(outage), settings) == "failed"
    failed = fresh(mine)
    assert (failed.status, failed.failure_kind) == ("failed", "transient")
    assert failed.failure_reason == (
        f"the payment provider was unavailable for {settings.auto_recharge_max_attempts} attempts"
    )
    assert account(org.id).auto_recharge_in_flight_id is None
    assert account(org.id).auto_recharge_failure_count == 0  # an outage never counts
    unchanged(theirs)


@pytest.mark.parametrize("outcome", ["outage", "declined"])
def test_a_worker_that_lost_its_claim_during_the_charge_writes_nothing(org, clock, outcome):
    """Its lease ran out while Stripe answered and another worker claimed the attempt: the
    newer claim's state stands, and the stale decline counts toward nothing."""
    with_card(org.id)
    request = attempt(org.id)
    in_flight(org.id, request)

    def taken_over(attempt_id: str) -> ChargeOutcome | Exception:
        AutoRechargeRequest.update(attempts=AutoRechargeRequest.attempts + 1).where(
            AutoRechargeRequest.id == attempt_id
        ).execute()
        if outcome == "outage":
            return UpstreamUnavailable("timeout")
        return ChargeOutcome("failed", "pi_stale", failure_reason="card_declined")

    auto_recharge.process_one(ScriptedGateway(taken_over), get_settings())
    now = fresh(request)
    assert (now.status, now.attempts, now.failure_reason) == ("processing", 2, None)
    assert account(org.id).auto_recharge_failure_count == 0
    assert account(org.id).auto_recharge_in_flight_id == request.id


def test_a_drain_handles_at_most_its_limit(org, clock):
    orgs = [org.id] + [create_organization(f"Due {n}").id for n in range(2)]
    requests = []
    for org_id in orgs:
        with_card(org_id)
        requests.append(attempt(org_id))
        clock.advance(seconds=1)  # due one after the other
    gateway = ScriptedGateway(lambda attempt_id: ChargeOutcome("succeeded", f"pi_{attempt_id}"))
    assert auto_recharge.drain(gateway, get_settings(), limit=2) == 2
    assert gateway.charged == [r.id for r in requests[:2]]
    assert fresh(requests[2]).status == "pending"


def test_a_claim_whose_lease_ends_now_is_taken_over(org, clock):
    """A lease is over at its expiry instant: the claim is due again then, not a tick later."""
    with_card(org.id)
    request = attempt(org.id, status="processing", attempts=1, lease_expires_at=utcnow())
    gateway = ScriptedGateway(lambda _id: ChargeOutcome("failed", "pi_due", failure_reason="no"))
    assert auto_recharge.process_one(gateway, get_settings()) == "failed"
    assert gateway.charged == [request.id]
    assert fresh(request).attempts == 2


def test_a_claim_without_a_lease_is_taken_over(org, clock):
    """A processing attempt with no lease on record (no worker holds it) is due at once."""
    with_card(org.id)
    request = attempt(org.id, status="processing", attempts=1, lease_expires_at=None)
    gateway = ScriptedGateway(lambda _id: ChargeOutcome("failed", "pi_due", failure_reason="no"))
    assert auto_recharge.process_one(gateway, get_settings()) == "failed"
    assert gateway.charged == [request.id]


def test_a_claim_whose_lease_runs_is_left_alone(org, clock):
    with_card(org.id)
    request = attempt(
        org.id, status="processing", attempts=1, lease_expires_at=utcnow() + dt.timedelta(seconds=1)
    )
    gateway = ScriptedGateway(lambda _id: ChargeOutcome("failed", "pi_due", failure_reason="no"))
    assert auto_recharge.process_one(gateway, get_settings()) is None
    unchanged(request)


def test_the_request_due_first_is_claimed_first_then_the_oldest(org, other_org, clock):
    """Claim order: earliest due first; among requests due at the same instant, the one
    created first. Each is stored before the one it must follow."""
    third_org = create_organization(f"Third {uuid.uuid4().hex[:8]}").id
    for org_id in (org.id, other_org, third_org):
        with_card(org_id)
    now = utcnow()
    created_last_due_first = attempt(
        org.id, created_at=now, next_attempt_at=now - dt.timedelta(minutes=2)
    )
    created_later = attempt(
        other_org, created_at=now, next_attempt_at=now - dt.timedelta(minutes=1)
    )
    created_earlier = attempt(
        third_org,
        created_at=now - dt.timedelta(minutes=5),
        next_attempt_at=now - dt.timedelta(minutes=1),
    )
    gateway = ScriptedGateway(lambda _id: ChargeOutcome("failed", f"pi_{_id}", failure_reason="no"))
    assert auto_recharge.drain(gateway, get_settings()) == 3
    assert gateway.charged == [created_last_due_first.id, created_earlier.id, created_later.id]


def test_a_claim_taken_over_past_the_attempt_cap_fails_without_charging(org, clock):
    """Its workers kept dying: once a takeover would exceed the attempt cap, the attempt is
    failed as transient (uncounted) and its in-flight slot freed, with no further charge."""
    settings = get_settings()
    with_card(org.id)
    request = attempt(
        org.id,
        status="processing",
        attempts=settings.auto_recharge_max_attempts,
        lease_expires_at=utcnow() - dt.timedelta(seconds=1),
    )
    in_flight(org.id, request)
    gateway = ScriptedGateway(lambda _id: ChargeOutcome("succeeded", "pi_never"))
    assert auto_recharge.process_one(gateway, settings) == "failed"
    assert gateway.charged == []
    failed = fresh(request)
    assert (failed.status, failed.failure_kind) == ("failed", "transient")
    assert account(org.id).auto_recharge_in_flight_id is None
    assert account(org.id).auto_recharge_failure_count == 0


def test_a_request_after_auto_recharge_was_turned_off_is_canceled_uncharged(org, other_org, clock):
    """Turned off between the request and its claim: canceled with its reason, the in-flight
    slot freed, nothing charged or counted; another organization's claim is untouched."""
    with_card(org.id, failures=1)
    BillingAccount.update(auto_recharge_enabled=False).where(
        BillingAccount.organization == org.id
    ).execute()
    request = attempt(org.id)
    in_flight(org.id, request)
    theirs = claimed_elsewhere(other_org)
    gateway = ScriptedGateway(lambda _id: ChargeOutcome("succeeded", "pi_never"))
    assert auto_recharge.process_one(gateway, get_settings()) == "canceled"
    assert gateway.charged == []
    canceled = fresh(request)
    assert (canceled.status, canceled.failure_reason) == (
        "canceled",
        "auto-recharge was turned off",
    )
    assert canceled.completed_at == utcnow()
    assert account(org.id).auto_recharge_in_flight_id is None
    assert account(org.id).auto_recharge_failure_count == 1
    unchanged(theirs)


@pytest.mark.parametrize("missing", ["customer", "payment method"])
def test_a_request_with_nothing_to_charge_fails_as_permanent_and_counts(
    org, other_org, clock, missing
):
    with_card(org.id)
    gone = (
        {"stripe_customer_id": None}
        if missing == "customer"
        else {"stripe_payment_method_id": None}
    )
    BillingAccount.update(**gone).where(BillingAccount.organization == org.id).execute()
    request = attempt(org.id)
    in_flight(org.id, request)
    theirs = claimed_elsewhere(other_org)
    gateway = ScriptedGateway(lambda _id: ChargeOutcome("succeeded", "pi_never"))
    assert auto_recharge.process_one(gateway, get_settings()) == "failed"
    assert gateway.charged == []
    failed = fresh(request)
    assert (failed.status, failed.failure_kind, failed.failure_reason) == (
        "failed",
        "permanent",
        "no saved payment method",
    )
    assert account(org.id).auto_recharge_in_flight_id is None
    assert account(org.id).auto_recharge_failure_count == 1
    unchanged(theirs)


def test_the_worker_charges_the_organizations_saved_card_for_the_requested_amount(org, clock):
    with_card(org.id, method="pm_this_org")
    request = attempt(org.id)
    gateway = ScriptedGateway(lambda _id: ChargeOutcome("failed", "pi_x", failure_reason="no"))
    auto_recharge.process_one(gateway, get_settings())
    assert gateway.calls == [(org.id, f"cus_{org.id[:8]}", "pm_this_org", AMOUNT, request.id)]
    assert fresh(request).stripe_payment_intent_id == "pi_x"  # the failed payment, kept


def test_a_decline_without_a_reason_is_recorded_as_a_failed_charge_and_counts(org, clock):
    with_card(org.id)
    request = attempt(org.id)
    gateway = ScriptedGateway(lambda _id: ChargeOutcome("failed", "pi_quiet"))
    assert auto_recharge.process_one(gateway, get_settings()) == "failed"
    failed = fresh(request)
    assert (failed.failure_kind, failed.failure_reason) == ("declined", "the charge failed")
    assert account(org.id).auto_recharge_failure_count == 1


@pytest.mark.parametrize(("claims", "ceiling"), [(1, 30), (3, 120), (6, 960), (8, 1000)])
@pytest.mark.parametrize("jitter", ["lowest", "highest"])
def test_the_backoff_doubles_from_the_base_up_to_the_cap_then_jitters_to_half_of_it(
    org, clock, monkeypatch, claims, ceiling, jitter
):
    """Retry n waits base * 2**(n-1) (capped), jittered to 50-100% of it; the jitter is
    pinned to each end of its range."""
    settings = settings_with(
        auto_recharge_retry_base_seconds=30.0,
        auto_recharge_retry_max_seconds=1000.0,
        auto_recharge_max_attempts=20,
    )
    monkeypatch.setattr(
        auto_recharge.random, "uniform", lambda a, b: a if jitter == "lowest" else b
    )
    with_card(org.id)
    request = attempt(org.id, attempts=claims - 1)
    auto_recharge.process_one(ScriptedGateway(outage), settings)
    waited = (fresh(request).next_attempt_at - utcnow()).total_seconds()
    assert waited == ceiling * (0.5 if jitter == "lowest" else 1.0)


def test_a_failure_reason_is_kept_to_what_the_column_holds(org, clock):
    with_card(org.id)
    request = attempt(org.id)
    long_reason = "declined: " + "x" * 600
    gateway = ScriptedGateway(
        lambda _id: ChargeOutcome("failed", "pi_long", failure_reason=long_reason)
    )
    auto_recharge.process_one(gateway, get_settings())
    assert fresh(request).failure_reason == long_reason[:500]


# --- webhooks settling attempts ------------------------------------------------------------


def report(org_id: str, event_type: str, pi: str, attempt_id: str | None, **fields: Any):
    metadata = {"organization_id": org_id, "kind": "auto_recharge"}
    if attempt_id is not None:
        metadata["attempt_id"] = attempt_id
    intent = stripe_object("payment_intent", id=pi, metadata=metadata, **fields)
    result = deliver(*signed(event_type, intent))
    return result, WebhookEvent.get_by_id(result.event_id).outcome


def test_a_recharge_is_granted_as_auto_recharge_under_its_payment(org, conn):
    with_card(org.id)
    request = attempt(org.id, status="processing", attempts=1)
    _result, outcome = report(
        org.id,
        "payment_intent.succeeded",
        "pi_recharge_ok",
        request.id,
        amount=2000,
        amount_received=2000,
        status="succeeded",
    )
    assert outcome == "recharge granted"
    [entry] = CreditEntry.select().where(CreditEntry.entry_type == "recharge")
    assert (entry.amount, entry.reason, entry.reference_id) == (
        AMOUNT,
        "auto-recharge",
        "pi_recharge_ok",
    )
    assert fresh(request).status == "succeeded"


PAID = {"amount": 2000, "amount_received": 2000, "status": "succeeded"}


def test_a_success_reported_by_payment_intent_alone_settles_that_attempt_once(org, conn):
    """After two declines and a 3-D Secure challenge, Stripe reports the payment with no
    attempt id: the attempt it names succeeds, its challenge and old reason are cleared,
    the failure count restarts, and a second report grants nothing more."""
    with_card(org.id, failures=2)
    request = attempt(
        org.id,
        status="requires_action",
        stripe_payment_intent_id="pi_after_3ds",
        client_secret="pi_after_3ds_secret",
        failure_reason="the payment provider was unavailable; retrying",
    )
    _result, first = report(org.id, "payment_intent.succeeded", "pi_after_3ds", None, **PAID)
    _result, second = report(org.id, "payment_intent.succeeded", "pi_after_3ds", None, **PAID)
    assert (first, second) == ("recharge granted", "recharge already granted")
    done = fresh(request)
    assert (done.status, done.client_secret, done.failure_reason) == ("succeeded", None, None)
    assert account(org.id).auto_recharge_failure_count == 0
    assert CreditEntry.select().where(CreditEntry.entry_type == "recharge").count() == 1


def test_a_recharge_paid_with_no_attempt_on_record_is_still_granted(org, conn):
    with_card(org.id)
    _result, outcome = report(org.id, "payment_intent.succeeded", "pi_orphan", None, **PAID)
    assert outcome == "recharge granted"
    assert account(org.id).credits_balance == AMOUNT


def test_a_report_settles_the_attempt_it_names_not_another(org, other_org):
    """An earlier attempt of the organization, and another organization's attempt named by
    a report that claims this organization: neither is the one settled."""
    with_card(org.id)
    earlier = attempt(org.id, status="failed", stripe_payment_intent_id="pi_earlier")
    named = attempt(org.id, status="processing", attempts=1)
    _result, outcome = report(org.id, "payment_intent.succeeded", "pi_named", named.id, **PAID)
    assert (outcome, fresh(named).status) == ("recharge granted", "succeeded")
    unchanged(earlier)
    theirs = claimed_elsewhere(other_org)
    report(org.id, "payment_intent.succeeded", "pi_foreign", theirs.id, **PAID)
    unchanged(theirs)


def test_a_decline_reported_by_payment_intent_alone_fails_that_attempt_and_counts(org, other_org):
    with_card(org.id)
    request = attempt(org.id, status="requires_action", stripe_payment_intent_id="pi_by_id")
    request.client_secret = "pi_by_id_secret"
    request.save()
    in_flight(org.id, request)
    theirs = claimed_elsewhere(other_org)
    _result, outcome = report(
        org.id,
        "payment_intent.payment_failed",
        "pi_by_id",
        None,  # no attempt id in its metadata: found by the PaymentIntent
        last_payment_error={"code": "card_declined"},
    )
    assert outcome == "auto-recharge failed"
    failed = fresh(request)
    assert (failed.status, failed.failure_kind) == ("failed", "declined")
    assert failed.client_secret is None  # the challenge is over; its secret is not kept
    assert account(org.id).auto_recharge_failure_count == 1
    unchanged(theirs)


@pytest.mark.parametrize("known", ["settled", "unknown"])
def test_a_decline_of_a_settled_or_unknown_attempt_changes_nothing(org, known):
    with_card(org.id)
    request = attempt(org.id, status="succeeded", stripe_payment_intent_id="pi_done")
    pi = "pi_done" if known == "settled" else "pi_never_seen"
    _result, outcome = report(org.id, "payment_intent.payment_failed", pi, None)
    assert outcome == "auto-recharge failure already recorded"
    assert fresh(request).status == "succeeded"
    assert account(org.id).auto_recharge_failure_count == 0


@pytest.mark.parametrize(
    "event_type", ["payment_intent.payment_failed", "payment_intent.requires_action"]
)
def test_a_report_of_an_unknown_payment_intent_touches_no_attempt(org, event_type):
    with_card(org.id)
    current = attempt(org.id, status="processing", attempts=1, stripe_payment_intent_id="pi_now")
    report(org.id, event_type, "pi_never_seen", None, client_secret="pi_never_seen_secret")
    unchanged(current)
    assert fresh(current).client_secret is None


def test_a_challenge_reported_by_payment_intent_alone_is_stored_on_that_attempt(org, other_org):
    with_card(org.id)
    request = attempt(org.id, status="processing", attempts=1, stripe_payment_intent_id="pi_3ds")
    theirs = claimed_elsewhere(other_org)
    _result, outcome = report(
        org.id,
        "payment_intent.requires_action",
        "pi_3ds",
        None,
        status="requires_action",
        client_secret="pi_3ds_secret_x",
    )
    assert outcome == "auto-recharge requires action"
    challenged = fresh(request)
    assert (challenged.status, challenged.client_secret) == ("requires_action", "pi_3ds_secret_x")
    unchanged(theirs)


def test_a_challenge_just_reported_is_the_one_surfaced(org, clock):
    """A report moves its attempt to the top: the challenge surfaced is the latest reported,
    even when its attempt was last touched before an older open challenge."""
    with_card(org.id)
    now = utcnow()
    attempt(
        org.id,
        status="requires_action",
        stripe_payment_intent_id="pi_open",
        client_secret="pi_open_secret",
        updated_at=now - dt.timedelta(minutes=1),
    )
    request = attempt(
        org.id,
        status="processing",
        attempts=1,
        stripe_payment_intent_id="pi_later",
        updated_at=now - dt.timedelta(minutes=5),
    )
    report(
        org.id,
        "payment_intent.requires_action",
        "pi_later",
        request.id,
        status="requires_action",
        client_secret="pi_later_secret",
    )
    assert auto_recharge.pending_action(org.id) == auto_recharge.RequiresAction(
        request.id, AMOUNT, "pi_later", "pi_later_secret"
    )


@pytest.mark.parametrize("known", ["settled", "unknown"])
def test_a_challenge_for_a_settled_or_unknown_attempt_is_ignored(org, known):
    with_card(org.id)
    request = attempt(org.id, status="failed", stripe_payment_intent_id="pi_failed")
    pi = "pi_failed" if known == "settled" else "pi_never_seen"
    result, outcome = report(
        org.id, "payment_intent.requires_action", pi, None, client_secret="pi_x_secret"
    )
    assert (result.processed, outcome) == (False, "ignored")
    now = fresh(request)
    assert (now.status, now.client_secret) == ("failed", None)


# --- the saved card -------------------------------------------------------------------------


def pay_top_up(org_id: str, method: str) -> None:
    intent = top_up_intent(org_id, pi=f"pi_{uuid.uuid4().hex[:12]}", ordered=10 * DOLLAR)
    intent["payment_method"] = method
    deliver(*signed("payment_intent.succeeded", intent))


@pytest.mark.parametrize(
    ("failures", "saved_after"), [(0, "pm_working"), (1, "pm_new"), (2, "pm_new")]
)
def test_a_paying_card_replaces_the_saved_one_only_when_that_one_has_been_failing(
    org, conn, failures, saved_after
):
    with_card(org.id, method="pm_working", failures=failures)
    pay_top_up(org.id, "pm_new")
    assert account(org.id).stripe_payment_method_id == saved_after


def test_a_paying_card_is_saved_for_its_own_organization_only(org, other_org):
    with_card(org.id, method=None)
    BillingAccount.update(stripe_payment_method_id=None).where(
        BillingAccount.organization == other_org
    ).execute()
    pay_top_up(org.id, "pm_first")
    assert account(org.id).stripe_payment_method_id == "pm_first"
    assert account(other_org).stripe_payment_method_id is None


# --- the challenge surfaced -----------------------------------------------------------------


def test_the_latest_challenge_of_the_organization_is_surfaced(org, other_org, clock):
    attempt(  # stored first, so an unordered read would find it first
        org.id,
        status="requires_action",
        stripe_payment_intent_id="pi_older",
        client_secret="pi_older_secret",
        updated_at=utcnow() - dt.timedelta(minutes=5),
    )
    newer = attempt(
        org.id,
        status="requires_action",
        stripe_payment_intent_id="pi_newer",
        client_secret="pi_newer_secret",
        updated_at=utcnow(),
    )
    action = auto_recharge.pending_action(org.id)
    assert action == auto_recharge.RequiresAction(newer.id, AMOUNT, "pi_newer", "pi_newer_secret")


def test_another_organizations_challenge_is_not_surfaced(org, other_org):
    attempt(
        other_org,
        status="requires_action",
        stripe_payment_intent_id="pi_theirs",
        client_secret="pi_theirs_secret",
    )
    assert auto_recharge.pending_action(org.id) is None


def test_a_challenge_without_its_client_secret_is_not_surfaced(org, conn):
    attempt(org.id, status="requires_action", stripe_payment_intent_id="pi_no_secret")
    assert auto_recharge.pending_action(org.id) is None


def test_a_new_charge_supersedes_the_organizations_open_challenge_only(org, other_org, clock):
    """A worker charging a newer attempt retires the organization's unanswered 3-D Secure
    challenge (it is no longer surfaced); another organization's challenge stays open."""
    with_card(org.id)
    old = attempt(
        org.id,
        status="requires_action",
        stripe_payment_intent_id="pi_old",
        client_secret="pi_old_secret",
    )
    theirs = attempt(
        other_org,
        status="requires_action",
        stripe_payment_intent_id="pi_theirs",
        client_secret="pi_theirs_secret",
    )
    clock.advance(seconds=1)
    new = attempt(org.id)
    gateway = ScriptedGateway(lambda _id: ChargeOutcome("failed", "pi_new", failure_reason="no"))
    assert auto_recharge.process_one(gateway, get_settings()) == "failed"
    assert gateway.charged == [new.id]
    assert fresh(old).status == "superseded"
    assert fresh(new).status == "failed"
    assert auto_recharge.pending_action(org.id) is None
    assert fresh(theirs).status == "requires_action"
    assert auto_recharge.pending_action(other_org) == auto_recharge.RequiresAction(
        theirs.id, AMOUNT, "pi_theirs", "pi_theirs_secret"
    )


def test_a_new_challenge_supersedes_the_older_one_not_itself(org, clock):
    with_card(org.id)
    old = attempt(
        org.id,
        status="requires_action",
        stripe_payment_intent_id="pi_old",
        client_secret="pi_old_secret",
    )
    clock.advance(seconds=1)
    new = attempt(org.id)
    gateway = ScriptedGateway(
        lambda _id: ChargeOutcome("requires_action", "pi_new", client_secret="pi_new_secret")
    )
    assert auto_recharge.process_one(gateway, get_settings()) == "requires_action"
    assert fresh(old).status == "superseded"
    assert fresh(new).completed_at is None  # a challenge is not an outcome
    assert auto_recharge.pending_action(org.id) == auto_recharge.RequiresAction(
        new.id, AMOUNT, "pi_new", "pi_new_secret"
    )


def test_a_challenge_reported_while_the_worker_charges_is_not_retired_by_that_worker(org, clock):
    """Stripe may deliver `payment_intent.requires_action` before its answer to the charge
    reaches the worker: the attempt is already a challenge when the worker retires the
    organization's open challenges, and it must keep its own (the one the customer has to
    answer). Its own outcome then changes nothing: the webhook's report stands."""
    with_card(org.id)
    request = attempt(org.id)

    def answer(attempt_id: str) -> ChargeOutcome:
        _result, outcome = report(
            org.id,
            "payment_intent.requires_action",
            "pi_3ds_early",
            attempt_id,
            status="requires_action",
            client_secret="pi_3ds_early_secret",
        )
        assert outcome == "auto-recharge requires action"
        return ChargeOutcome("requires_action", "pi_3ds_early", client_secret="pi_3ds_early_secret")

    assert auto_recharge.process_one(ScriptedGateway(answer), get_settings()) == "requires_action"
    assert fresh(request).status == "requires_action"
    assert auto_recharge.pending_action(org.id) == auto_recharge.RequiresAction(
        request.id, AMOUNT, "pi_3ds_early", "pi_3ds_early_secret"
    )


# --- the worker loop ------------------------------------------------------------------------


def run_worker_until_stopped(gateway: ScriptedGateway, stop: threading.Event) -> None:
    """The worker loop on its own thread, as the worker process runs it. The join's deadline
    only guards against a hang: a loop that never reaches the charges fails the test."""
    worker = threading.Thread(
        target=auto_recharge.run_worker, args=(stop, gateway, get_settings(), 0.01)
    )
    worker.start()
    worker.join(timeout=60)
    stop.set()
    worker.join()


def test_the_worker_loop_stops_between_charges_when_told(org, other_org):
    with_card(org.id)
    with_card(other_org)
    first = attempt(org.id)
    attempt(other_org, next_attempt_at=utcnow() + dt.timedelta(microseconds=1))
    stop = threading.Event()

    def charge_then_stop(attempt_id: str) -> ChargeOutcome:
        stop.set()  # SIGTERM arrives while the first charge is in hand
        return ChargeOutcome("succeeded", f"pi_{attempt_id[:8]}")

    gateway = ScriptedGateway(charge_then_stop)
    run_worker_until_stopped(gateway, stop)
    assert gateway.charged == [first.id]
    assert fresh(first).status == "succeeded"


def test_the_worker_loop_logs_a_failed_drain_and_polls_again(org, other_org, caplog):
    with_card(org.id)
    with_card(other_org)
    broken = attempt(org.id)
    stop = threading.Event()

    def answer(attempt_id: str) -> ChargeOutcome | Exception:
        if attempt_id == broken.id:
            # A bug, not an outage; the next request is due only after this drain failed.
            attempt(other_org)
            return RuntimeError("unexpected answer")
        stop.set()
        return ChargeOutcome("succeeded", f"pi_{attempt_id[:8]}")

    gateway = ScriptedGateway(answer)
    with caplog.at_level(logging.ERROR, logger="billing.auto_recharge"):
        run_worker_until_stopped(gateway, stop)
    assert len(gateway.charged) == 2 and gateway.charged[0] == broken.id
    [failure] = [r for r in caplog.records if r.exc_info]
    assert failure.getMessage() == "auto-recharge drain failed"
    assert str(failure.exc_info[1]) == "unexpected answer"


@pytest.mark.skipif(
    not __import__("os").environ.get("TEST_DATABASE_URL", "").startswith("postgres"),
    reason="SKIP LOCKED needs PostgreSQL's row locks (SQLite has one writer lock)",
)
def test_a_claim_skips_a_request_another_worker_holds_instead_of_waiting_for_it(db):
    """Workers share the outbox: while another worker's transaction holds the request due first,
    a claim takes the next one. Without SKIP LOCKED it would queue behind that worker; here the
    wait is cut short by a lock timeout, so the mutant fails instead of hanging."""
    import psycopg2

    from models import database

    org_a = create_organization("held").id
    org_b = create_organization("free").id
    earlier = utcnow() - dt.timedelta(minutes=5)
    held = attempt(org_a, next_attempt_at=earlier)
    free = attempt(org_b)
    other = psycopg2.connect(dbname=database.obj.database, **database.obj.connect_params)
    try:
        with other.cursor() as cursor:  # another worker's open claim transaction
            cursor.execute(
                "SELECT id FROM auto_recharge_requests WHERE id = %s FOR UPDATE", (held.id,)
            )
            database.execute_sql("SET lock_timeout = '3s'")
            try:
                claimed = auto_recharge._claim_next(get_settings())
            finally:
                database.execute_sql("SET lock_timeout = 0")
        assert claimed is not None and claimed.id == free.id
        assert fresh(free).status == "processing"
        other.rollback()
        assert fresh(held).status == "pending"
    finally:
        other.close()
