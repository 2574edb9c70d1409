"""Second review of "at most one subscription Checkout Session of an organization can be paid"
(9d882df, 610575e).

Tests named `test_break_*` reproduce a break and fail on the reviewed code; `test_holds_*`
probed an attack that the change withstood (kept as regression tests).
"""

from __future__ import annotations

import threading
import time

from peewee import OperationalError

from billing import checkout
from billing.accounts import get_account
from billing.checkout import SESSION_LIFETIME, UNRECORDED_AFTER
from billing.units import DOLLAR
from models import connection
from tests import stripe_events as ev
from tests.checkouts import URLS, customer_of, open_checkout, session_status, subscription_sessions


def _top_up(client, org):
    return client.post(
        f"/v1/billing/{org.id}/top-up",
        json={"amountDecimillicents": DOLLAR, **URLS},
        headers=org.owner,
    )


def _with_stripe_idempotency(front) -> None:
    """Stripe replays a Checkout Session creation sent again with the same Idempotency-Key:
    the same session, in the body first answered (status "open"), whatever became of it
    since. (The fixture front makes a new session every time; sequential tests only.)"""
    make = front.checkout
    answered: dict[str, dict] = {}

    def checkout_replaying(params):
        key = front.idempotency_keys[-1]
        if key is not None and key in answered:
            return answered[key]
        session = make(params)
        if key is not None:
            answered[key] = dict(session)  # the answer as first given: "open"
        return session

    front.checkout = checkout_replaying


# --- breaks -----------------------------------------------------------------------------------


def test_break_subscription_created_incomplete_unblocks_a_second_checkout(client, org, stripe_mode):
    """A Checkout subscription starts `incomplete` (its first invoice not yet paid) and
    becomes `active` with customer.subscription.updated. Once customer.subscription.created
    (incomplete) is processed, the paid checkout's subscription counts as "reported" and the
    account shows `inactive` (not live): a second checkout is handed out, payable, while the
    first subscription exists at Stripe and is about to bill. If .updated is slow (or its
    delivery fails and Stripe retries for days), the window is as long."""
    first = open_checkout(client, org).json()["id"]
    sub = stripe_mode.complete(first, subscription="sub_incomplete_first")
    done = ev.post(
        client,
        "checkout.session.completed",
        ev.subscription_session(org.id, sub=sub, session_id=first),
    )
    assert done.status_code == 200, done.text
    created = ev.post(
        client,
        "customer.subscription.created",
        ev.subscription(org.id, sub=sub, status="incomplete"),
    )
    assert created.status_code == 200, created.text
    second = open_checkout(client, org)
    assert second.status_code == 409, (second.status_code, stripe_mode.payable_sessions())
    assert stripe_mode.payable_sessions() == []


def test_break_subscription_created_incomplete_before_any_checkout_webhook(
    client, org, stripe_mode
):
    """Same hole with no checkout.session.completed at all: the new request expires the paid
    session, Stripe answers "complete, sub_x", the row records sub_x, and the final check
    finds sub_x already reported (incomplete): 200, a second payable subscription checkout."""
    first = open_checkout(client, org).json()["id"]
    sub = stripe_mode.complete(first, subscription="sub_incomplete_second")
    created = ev.post(
        client,
        "customer.subscription.created",
        ev.subscription(org.id, sub=sub, status="incomplete"),
    )
    assert created.status_code == 200, created.text
    second = open_checkout(client, org)
    assert second.status_code == 409, (second.status_code, stripe_mode.payable_sessions())
    assert stripe_mode.payable_sessions() == []


def test_break_paid_session_older_than_session_lifetime_is_never_asked_about(
    client, org, stripe_mode, clock
):
    """The customer pays the checkout 23 hours after it was opened (Stripe keeps it payable
    for 24). None of its webhooks has been processed yet (Stripe retries failed deliveries
    for three days: PAID_CHECKOUT_PATIENCE exists for exactly that). Two hours later the
    row is past SESSION_LIFETIME, so it is neither sent to Stripe nor weighed: a new checkout
    is a 200, payable, two hours after the first subscription was paid for."""
    first = open_checkout(client, org).json()["id"]
    clock.advance(hours=23)
    stripe_mode.complete(first, subscription="sub_paid_late")
    clock.advance(hours=2, minutes=1)
    assert clock.now - SESSION_LIFETIME > clock.now - checkout.PAID_CHECKOUT_PATIENCE
    second = open_checkout(client, org)
    assert second.status_code == 409, (second.status_code, session_status(first))
    assert subscription_sessions(stripe_mode, "open") == []


def test_break_retry_after_a_failed_row_write_answers_an_expired_session(
    client, org, stripe_mode, monkeypatch
):
    """The row write fails (the database blinked), so the new session is expired at Stripe
    and the answer is a 500. The client retries with the same Idempotency-Key, as it should:
    the Stripe key derived from it makes Stripe replay that same session (now expired), the
    row is written `open`, and the answer is a 200 whose URL cannot be paid."""
    _with_stripe_idempotency(stripe_mode)
    record = checkout._record
    calls = {"n": 0}

    def write_fails_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return record(*args, **kwargs)

    monkeypatch.setattr(checkout, "_record", write_fails_once)
    failed = open_checkout(client, org, key="retry-me")
    assert failed.status_code == 500, failed.text
    retried = open_checkout(client, org, key="retry-me")
    assert retried.status_code in (200, 409), retried.text
    if retried.status_code == 200:
        handed_out = retried.json()["id"]
        assert handed_out in stripe_mode.payable_sessions(), (
            handed_out,
            stripe_mode.sessions[handed_out]["status"],
            session_status(handed_out),
        )


def test_break_open_top_ups_hide_an_unrecorded_subscription_session_from_the_sweep(
    client, org, stripe_mode
):
    """The sweep reads one page of the customer's open sessions (limit 100, newest first)
    and keeps the subscription ones. A hundred open top-up sessions (a customer clicking
    "buy credits" repeatedly; each stays open 24 h) fill the page: a crash's leftover
    subscription session is never seen and stays payable next to the new one."""
    # The fixture front pages its listing as Stripe does (limit, starting_after, has_more).
    first = open_checkout(client, org).json()["id"]
    customer = customer_of(org.id)
    leftover = stripe_mode.checkout({"mode": "subscription", "customer": customer})["id"]
    stripe_mode.sessions[leftover]["created"] -= int(UNRECORDED_AFTER.total_seconds()) + 1
    for _ in range(100):
        assert _top_up(client, org).status_code == 200
    second = open_checkout(client, org)
    assert second.status_code == 200, second.text
    assert session_status(first) == "expired"
    assert sorted(subscription_sessions(stripe_mode, "open")) == [second.json()["id"]], leftover


def test_break_retry_of_a_crashed_request_after_the_sweep_leaves_nothing_payable(
    client, org, stripe_mode, monkeypatch
):
    """kill -9 after Stripe made the session and before our row (no expiry attempted). More
    than two minutes later another admin's checkout sweeps it (expired at Stripe) and gets a
    payable session. Then the first client retries with its Idempotency-Key (its claim's
    lease ran out): Stripe replays the swept session, our row for it is written `open` and
    newest, so this request expires the other admin's payable session and answers 200 with
    the dead one. Two 200s, nothing payable."""
    _with_stripe_idempotency(stripe_mode)
    record = checkout._record
    calls = {"n": 0}

    def killed_before_the_row(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("worker killed after Stripe answered")
        return record(*args, **kwargs)

    monkeypatch.setattr(checkout, "_record", killed_before_the_row)
    stripe_mode.fail_with_on_expire = 503  # kill -9: the except branch never ran
    assert open_checkout(client, org, key="k-crashed").status_code == 500
    stripe_mode.fail_with_on_expire = None
    (crashed,) = stripe_mode.payable_sessions()
    stripe_mode.sessions[crashed]["created"] -= int(UNRECORDED_AFTER.total_seconds()) + 1
    other = open_checkout(client, org, headers=org.admin)
    assert other.status_code == 200, other.text
    assert stripe_mode.sessions[crashed]["status"] == "expired"  # the sweep did its job
    retried = open_checkout(client, org, key="k-crashed")
    assert retried.status_code in (200, 409), retried.text
    payable = stripe_mode.payable_sessions()
    assert payable, (retried.status_code, retried.json(), other.json()["id"])
    if retried.status_code == 200:
        assert payable == [retried.json()["id"]]


# --- held -------------------------------------------------------------------------------------


def test_holds_deleted_before_created_releases_without_a_wedge(client, org, stripe_mode):
    """customer.subscription.deleted lands before .created (the latter then stale): the
    subscription is canceled at Stripe, so a new checkout is rightly allowed."""
    first = open_checkout(client, org).json()["id"]
    sub = stripe_mode.complete(first, subscription="sub_deleted_first")
    ev.post(
        client,
        "checkout.session.completed",
        ev.subscription_session(org.id, sub=sub, session_id=first),
    )
    gone = ev.subscription(org.id, sub=sub, status="canceled")
    assert (
        ev.post(client, "customer.subscription.deleted", gone, created=2_000_000_000).status_code
        == 200
    )
    assert (
        ev.post(
            client,
            "customer.subscription.created",
            ev.subscription(org.id, sub=sub),
            created=1_900_000_000,
        ).status_code
        == 200
    )
    with connection():
        assert get_account(org.id).subscription_status == "canceled"
    again = open_checkout(client, org)
    assert again.status_code == 200, again.text
    assert stripe_mode.payable_sessions() == [again.json()["id"]]


def test_holds_trialing_subscription_refuses(client, org, stripe_mode):
    first = open_checkout(client, org).json()["id"]
    sub = stripe_mode.complete(first, subscription="sub_trial")
    ev.post(
        client, "customer.subscription.created", ev.subscription(org.id, sub=sub, status="trialing")
    )
    assert open_checkout(client, org).status_code == 409
    assert stripe_mode.payable_sessions() == []


def test_holds_sweep_never_expires_top_ups(client, org, stripe_mode):
    paid_for = _top_up(client, org).json()["id"]
    stripe_mode.sessions[paid_for]["created"] -= int(UNRECORDED_AFTER.total_seconds()) + 1
    customer = customer_of(org.id)
    stray = stripe_mode.checkout({"mode": "payment", "customer": customer})["id"]
    stripe_mode.sessions[stray]["created"] -= int(UNRECORDED_AFTER.total_seconds()) + 1
    assert open_checkout(client, org).status_code == 200
    assert stripe_mode.sessions[paid_for]["status"] == "open"
    assert stripe_mode.sessions[stray]["status"] == "open"


def test_holds_checkouts_racing_the_paid_webhooks_on_threads(client, org, stripe_mode):
    """Two checkouts and the paid session's webhooks (active) at once: never a payable
    subscription checkout next to a paid one."""
    first = open_checkout(client, org).json()["id"]
    sub = stripe_mode.complete(first, subscription="sub_race")
    deliveries = [
        ev.signed(
            "checkout.session.completed", ev.subscription_session(org.id, sub=sub, session_id=first)
        ),
        ev.signed("customer.subscription.created", ev.subscription(org.id, sub=sub)),
    ]
    barrier = threading.Barrier(4)
    answers: list = []
    errors: list = []

    def open_one():
        barrier.wait()
        answers.append(open_checkout(client, org))

    def deliver(body, signature):
        barrier.wait()
        try:
            ev.deliver(body, signature)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(2)] + [
        threading.Thread(target=deliver, args=d) for d in deliveries
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(a.status_code == 409 for a in answers), [a.text for a in answers]
    assert stripe_mode.payable_sessions() == []


def test_holds_on_its_way_refusal_ends_after_the_patience(client, org, stripe_mode, clock):
    """The paid checkout's subscription is never reported: refused for three days, then not
    wedged."""
    first = open_checkout(client, org).json()["id"]
    stripe_mode.complete(first, subscription="sub_never_reported")
    clock.advance(seconds=1)  # a frozen clock ties created_at, and ids then pick the "newest"
    assert open_checkout(client, org).status_code == 409  # learns "paid" from Stripe's answer
    clock.advance(days=2, hours=23)
    assert open_checkout(client, org).status_code == 409
    clock.advance(hours=1, minutes=1)
    again = open_checkout(client, org)
    assert again.status_code == 200, again.text
    assert subscription_sessions(stripe_mode, "open") == [again.json()["id"]]


def test_holds_hung_listing_is_a_bounded_500_and_not_a_wedge(client, org, stripe_mode):
    first = open_checkout(client, org).json()["id"]
    listing = stripe_mode.list_sessions

    def hang(request_path):
        time.sleep(6)  # past STRIPE_TIMEOUT_SECONDS=5
        return listing(request_path)

    stripe_mode.list_sessions = hang
    started = time.monotonic()
    answer = open_checkout(client, org)
    assert answer.status_code == 500 and "Traceback" not in answer.text, answer.text
    assert time.monotonic() - started < 6
    stripe_mode.list_sessions = listing
    time.sleep(1.5)
    assert stripe_mode.sessions[first]["status"] == "expired"
    again = open_checkout(client, org)
    assert again.status_code == 200, again.text
    assert subscription_sessions(stripe_mode, "open") == [again.json()["id"]]
