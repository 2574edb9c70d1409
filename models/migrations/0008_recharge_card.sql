-- The card an auto-recharge attempt charges, pinned at its first charge: every retry of the
-- attempt repeats the same Stripe request (same idempotency key, same parameters), so a card
-- saved while the attempt waits out an outage cannot turn the retry into a request Stripe
-- refuses (idempotency_error) or into a second charge. Attempts in flight pin at their next claim.

ALTER TABLE auto_recharge_requests ADD COLUMN stripe_payment_method_id VARCHAR(255);
