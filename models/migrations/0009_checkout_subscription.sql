-- The subscription a paid subscription checkout created (from checkout.session.completed, or
-- from Stripe's answer when we tried to expire the session). Until that subscription is
-- reported, a new subscription checkout is refused: it would be a second subscription.

ALTER TABLE checkout_sessions ADD COLUMN stripe_subscription_id VARCHAR(255);
