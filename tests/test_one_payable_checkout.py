"""At most one subscription checkout of an organization can be paid (billing.checkout).

Two paid subscription checkouts are two subscriptions billing every month. Before this, a second
checkout opened while the first was still open (another tab, a double click, two admins) left
both payable at Stripe. The newest now stands; the older open ones are expired at Stripe (the
fixture front keeps sessions' state as Stripe does: only an open session can be expired or
paid); one already paid, whose webhook has not arrived, makes the new one a 409.
"""

from __future__ import annotations

import datetime as dt
import threading

from billing import checkout
from billing.accounts import locked_account
from billing.checkout import PAID_CHECKOUT_PATIENCE, SESSION_LIFETIME, UNRECORDED_AFTER
from billing.config import get_settings
from billing.stripe_gateway import CheckoutEnd, get_gateway
from models import BillingAccount, CheckoutSession, connection, utcnow
from tests import stripe_events as ev
from tests.checkouts import open_checkout, session_status


def test_a_second_checkout_expires_the_first(client, org, stripe_mode):
    first = open_checkout(client, org)
    second = open_checkout(client, org)
    assert (first.status_code, second.status_code) == (200, 200), second.text
    first_id, second_id = first.json()["id"], second.json()["id"]
    assert stripe_mode.payable_sessions() == [second_id]
    assert [path for _, path, _ in stripe_mode.requests if path.endswith("/expire")] == [
        f"/v1/checkout/sessions/{first_id}/expire"
    ]
    assert (session_status(first_id), session_status(second_id)) == ("expired", "open")


def test_a_first_checkout_paid_before_its_webhook_refuses_the_second(client, org, stripe_mode):
    first = open_checkout(client, org).json()["id"]
    made = stripe_mode.complete(first)  # the customer paid; the webhooks are on their way
    second = open_checkout(client, org)
    assert second.status_code == 409, second.text
    assert "just paid" in second.json()["detail"]
    assert stripe_mode.payable_sessions() == []  # the new session was expired, not handed out
    assert stripe_mode.sessions[first]["status"] == "complete"
    with connection():  # Stripe's answer is kept: the subscription it made is on its way
        row = CheckoutSession.get_by_id(first)
    assert (row.status, row.stripe_subscription_id) == ("completed", made)
    third = open_checkout(client, org)  # refused before any session is made
    assert third.status_code == 409 and "just paid" in third.json()["detail"]
    assert len(stripe_mode.sent("POST", "/v1/checkout/sessions")) == 1  # no second one made


def test_concurrent_checkouts_leave_exactly_one_payable(client, org, stripe_mode):
    answers: list = []
    barrier = threading.Barrier(4)

    def open_one() -> None:
        barrier.wait()
        answers.append(open_checkout(client, org))

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(a.status_code in (200, 409) for a in answers), [a.text for a in answers]
    payable = stripe_mode.payable_sessions()
    assert len(payable) == 1, payable
    assert payable[0] in {a.json()["id"] for a in answers if a.status_code == 200}
    with connection():
        open_rows = [
            s.id
            for s in CheckoutSession.select().where(
                (CheckoutSession.organization == org.id) & (CheckoutSession.status == "open")
            )
        ]
    assert open_rows == payable


def test_a_completed_checkout_expires_nothing_later(client, org, stripe_mode):
    """Once Stripe reports the checkout completed, it is not payable any more: a checkout
    after that subscription ended asks Stripe to expire nothing."""
    first = open_checkout(client, org).json()["id"]
    stripe_mode.complete(first, subscription="sub_done")
    paid = ev.subscription_session(org.id, sub="sub_done", session_id=first)
    ev.post(client, "checkout.session.completed", paid)
    assert session_status(first) == "completed"
    waiting = open_checkout(client, org)  # its subscription is not reported yet
    assert waiting.status_code == 409 and "on its way" in waiting.json()["detail"]
    ev.post(client, "customer.subscription.created", ev.subscription(org.id, sub="sub_done"))
    assert open_checkout(client, org).status_code == 409  # live now
    ended = ev.subscription(org.id, sub="sub_done", status="canceled", created=1_800_000_000)
    ev.post(client, "customer.subscription.deleted", ended, created=2_000_000_000)
    stripe_mode.requests.clear()
    again = open_checkout(client, org)
    assert again.status_code == 200, again.text
    assert not [path for _, path, _ in stripe_mode.requests if path.endswith("/expire")]


def test_sessions_too_old_to_be_paid_unreported_are_not_sent(client, org, stripe_mode):
    first = open_checkout(client, org).json()["id"]
    with connection():
        CheckoutSession.update(
            created_at=utcnow() - SESSION_LIFETIME - PAID_CHECKOUT_PATIENCE
        ).where(CheckoutSession.id == first).execute()
    assert open_checkout(client, org).status_code == 200
    assert not [path for _, path, _ in stripe_mode.requests if path.endswith("/expire")]


def test_an_outage_while_expiring_hands_out_no_second_session(client, org, stripe_mode):
    first = open_checkout(client, org).json()["id"]
    stripe_mode.fail_with_on_expire = 503
    second = open_checkout(client, org)
    assert second.status_code in (500, 503) and "unavailable" in second.json()["detail"]
    stripe_mode.fail_with_on_expire = None
    third = open_checkout(client, org)
    assert third.status_code == 200, third.text
    assert stripe_mode.payable_sessions() == [third.json()["id"]]
    assert session_status(first) == "expired"


def test_local_mode_keeps_one_open_session_too(client, org):
    get_gateway.cache_clear()
    assert get_settings().local_billing
    first = open_checkout(client, org).json()["id"]
    second = open_checkout(client, org).json()["id"]
    assert (session_status(first), session_status(second)) == ("expired", "open")
    done = client.post(f"/v1/billing/{org.id}/dev/complete-local", headers=org.owner)
    assert done.status_code == 200, done.text
    assert (session_status(first), session_status(second)) == ("expired", "completed")


def test_a_request_whose_session_is_not_the_newest_expires_its_own(
    client, org, stripe_mode, monkeypatch
):
    """Two requests at once: the other recorded a newer session after this one recorded its
    own and before it looked. The newer stands; this one expires its own and answers 409."""
    newer = stripe_mode.checkout({"mode": "subscription"})["id"]
    record = checkout._record

    def record_then_another_arrives(session, organization_id, kind, **details):
        recorded = record(session, organization_id, kind, **details)
        with connection():
            CheckoutSession.insert(
                id=newer,
                organization=organization_id,
                kind=kind,
                url="https://checkout.stripe.com/c/pay/newer",
                created_at=utcnow() + dt.timedelta(seconds=1),
            ).execute()
        return recorded

    monkeypatch.setattr(checkout, "_record", record_then_another_arrives)
    answer = open_checkout(client, org)
    assert answer.status_code == 409, answer.text
    assert "newer subscription checkout" in answer.json()["detail"]
    assert stripe_mode.payable_sessions() == [newer]


def test_a_local_session_paid_while_a_second_opens_refuses_the_second(client, org, monkeypatch):
    """Local mode: the page completes the older session between the second checkout's look
    and its expiry of that session. The second is refused and left unpayable."""
    get_gateway.cache_clear()
    first = open_checkout(client, org).json()["id"]
    gateway = get_gateway()

    def paid_on_the_page_first(session_id: str) -> CheckoutEnd:
        if session_id == first:
            with connection(), locked_account(org.id) as account:
                checkout.complete_local_session(account, CheckoutSession.get_by_id(first))
        return CheckoutEnd(paid=False)

    monkeypatch.setattr(gateway, "expire_checkout_session", paid_on_the_page_first)
    second = open_checkout(client, org)
    assert second.status_code == 409, second.text
    with connection():
        others = [
            s.status
            for s in CheckoutSession.select().where(
                (CheckoutSession.organization == org.id) & (CheckoutSession.id != first)
            )
        ]
    assert (session_status(first), others) == ("completed", [])  # refused before making one


def test_a_session_a_dead_process_never_recorded_is_expired_by_the_next_checkout(
    client, org, stripe_mode
):
    """kill -9 between Stripe's answer and our row: the session exists only at Stripe. The
    next checkout finds it in the customer's open sessions and expires it, once it is older
    than any request still in flight could be (a fresh one may be a racing request's)."""
    first = open_checkout(client, org).json()["id"]
    with connection():
        customer = BillingAccount.get_by_id(org.id).stripe_customer_id
    leftover = stripe_mode.checkout({"mode": "subscription", "customer": customer})["id"]
    in_flight = stripe_mode.checkout({"mode": "subscription", "customer": customer})["id"]
    stripe_mode.sessions[leftover]["created"] -= int(UNRECORDED_AFTER.total_seconds()) + 1
    second = open_checkout(client, org)
    assert second.status_code == 200, second.text
    assert sorted(stripe_mode.payable_sessions()) == sorted([second.json()["id"], in_flight])
    assert stripe_mode.sessions[leftover]["status"] == "expired"
    assert session_status(first) == "expired"
