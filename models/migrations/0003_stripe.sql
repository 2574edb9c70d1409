-- Checkout/top-up sessions, received Stripe events, and the subscription/auto-recharge state
-- the webhooks keep on the billing account.

CREATE TABLE checkout_sessions (
    id VARCHAR(255) PRIMARY KEY,
    organization_id VARCHAR(36) NOT NULL REFERENCES organizations (id),
    kind VARCHAR(16) NOT NULL CHECK (kind IN ('subscription', 'top_up')),
    plan VARCHAR(16),
    amount BIGINT,
    url VARCHAR(2048) NOT NULL,
    status VARCHAR(16) NOT NULL DEFAULT 'open',
    created_at TIMESTAMP NOT NULL,
    completed_at TIMESTAMP
);
CREATE INDEX checkout_sessions_org_status ON checkout_sessions (organization_id, status, created_at);

CREATE TABLE webhook_events (
    id VARCHAR(255) PRIMARY KEY,
    event_type VARCHAR(255) NOT NULL,
    stripe_created BIGINT NOT NULL,
    payload TEXT NOT NULL,
    organization_id VARCHAR(36),
    outcome VARCHAR(500),
    received_at TIMESTAMP NOT NULL,
    processed_at TIMESTAMP
);

ALTER TABLE billing_accounts ADD COLUMN subscription_state_at BIGINT;
ALTER TABLE billing_accounts ADD COLUMN welcome_credit_granted_at TIMESTAMP;
ALTER TABLE billing_accounts ADD COLUMN auto_recharge_disabled_reason VARCHAR(500);
ALTER TABLE auto_recharge_requests ADD COLUMN completed_at TIMESTAMP;
