"""3-D Secure on an off-session auto-recharge, as real Stripe answers it (localstripe cannot):
the create call fails with a `card_error` `authentication_required` whose PaymentIntent carries
the client secret, and later Stripe may report `payment_intent.requires_action` by webhook.
Either way the challenge must surface at GET .../auto-recharge/requires-action."""

from __future__ import annotations

from billing.auto_recharge import drain
from billing.config import get_settings
from billing.stripe_gateway import get_gateway
from models import AutoRechargeRequest, BillingAccount
from tests.test_auto_recharge import PAID, arm, conn_stripe, report_intent, saved_card

__all__ = ["conn_stripe"]  # the fixture, shared with the auto-recharge tests


def requires_action(client, org):
    r = client.get(f"/v1/billing/{org.id}/auto-recharge/requires-action", headers=org.admin)
    assert r.status_code == 200, r.text
    return r.json()


def test_authentication_required_card_error_surfaces_the_challenge(client, org, conn_stripe):
    saved_card(conn_stripe.backend, org.id, "ok")
    conn_stripe.require_authentication = True
    arm(org.id)
    assert drain(get_gateway(), get_settings()) == 1
    [intent] = conn_stripe.authentication_intents
    attempt = AutoRechargeRequest.get()
    assert attempt.status == "requires_action"
    assert attempt.stripe_payment_intent_id == intent["id"]
    challenge = requires_action(client, org)
    assert challenge == {
        "attemptId": attempt.id,
        "amountDecimillicents": attempt.amount,
        "stripePaymentIntentId": intent["id"],
        "clientSecret": intent["client_secret"],
    }
    # Not a decline: auto-recharge stays on and no failure is counted.
    account = BillingAccount.get_by_id(org.id)
    assert account.auto_recharge_enabled is True
    assert account.auto_recharge_failure_count == 0
    assert len(conn_stripe.sent("POST", "/v1/payment_intents")) == 1
    # The customer authenticates on-session; Stripe reports the payment by webhook.
    report_intent(client, org.id, attempt, "payment_intent.succeeded", **PAID)
    assert requires_action(client, org) is None
    assert AutoRechargeRequest.get().status == "succeeded"


def test_requires_action_webhook_surfaces_the_challenge_by_attempt_id(client, org, conn_stripe):
    """The worker died after Stripe created the PaymentIntent and before it recorded the id:
    the webhook finds the attempt by the attempt id in the PaymentIntent's metadata."""
    saved_card(conn_stripe.backend, org.id, "ok")
    arm(org.id)
    attempt = AutoRechargeRequest.get()
    AutoRechargeRequest.update(status="processing").where(
        AutoRechargeRequest.id == attempt.id
    ).execute()
    attempt.stripe_payment_intent_id = "pi_3ds_from_webhook"
    r = report_intent(
        client,
        org.id,
        attempt,
        "payment_intent.requires_action",
        status="requires_action",
        amount=2000,
        client_secret="pi_3ds_from_webhook_secret_abc",
    )
    assert r.status_code == 200, r.text
    assert r.json()["processed"] is True
    challenge = requires_action(client, org)
    assert challenge["attemptId"] == attempt.id
    assert challenge["stripePaymentIntentId"] == "pi_3ds_from_webhook"
    assert challenge["clientSecret"] == "pi_3ds_from_webhook_secret_abc"
