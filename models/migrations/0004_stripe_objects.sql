-- Per-object Stripe state (issue 10): payments and what they granted and had reversed,
-- disputes (an open one holds spending), subscriptions and invoices with the newest event
-- applied to each, so late, repeated or concurrent events resolve the same way in any order.

CREATE TABLE stripe_payments (
    id VARCHAR(255) PRIMARY KEY,
    organization_id VARCHAR(36) NOT NULL REFERENCES organizations (id),
    kind VARCHAR(16) NOT NULL,
    charge_id VARCHAR(255),
    ordered_amount BIGINT,
    charged_currency VARCHAR(3),
    charged_amount BIGINT,
    granted_amount BIGINT NOT NULL DEFAULT 0 CHECK (granted_amount >= 0),
    refunded_share BIGINT NOT NULL DEFAULT 0,
    disputed_share BIGINT NOT NULL DEFAULT 0,
    reversed_amount BIGINT NOT NULL DEFAULT 0 CHECK (reversed_amount >= 0),
    flagged_reason VARCHAR(500),
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    CHECK (reversed_amount <= granted_amount)
);
CREATE INDEX stripe_payments_charge ON stripe_payments (charge_id);

CREATE TABLE stripe_disputes (
    id VARCHAR(255) PRIMARY KEY,
    organization_id VARCHAR(36) NOT NULL REFERENCES organizations (id),
    payment_id VARCHAR(255),
    status VARCHAR(32) NOT NULL,
    is_open BOOLEAN NOT NULL,
    opened_at TIMESTAMP NOT NULL,
    closed_at TIMESTAMP
);
CREATE INDEX stripe_disputes_org_open ON stripe_disputes (organization_id, is_open);

CREATE TABLE stripe_subscriptions (
    id VARCHAR(255) PRIMARY KEY,
    organization_id VARCHAR(36) NOT NULL REFERENCES organizations (id),
    status VARCHAR(16) NOT NULL,
    plan VARCHAR(16),
    subscription_created BIGINT NOT NULL,
    started_at TIMESTAMP,
    ends_at TIMESTAMP,
    current_period_end TIMESTAMP,
    payment_method_id VARCHAR(255),
    event_created BIGINT NOT NULL,
    event_rank INTEGER NOT NULL,
    event_id VARCHAR(255) NOT NULL
);
CREATE INDEX stripe_subscriptions_org ON stripe_subscriptions (organization_id);

CREATE TABLE stripe_invoices (
    id VARCHAR(255) PRIMARY KEY,
    organization_id VARCHAR(36) NOT NULL REFERENCES organizations (id),
    subscription_id VARCHAR(255),
    status VARCHAR(16) NOT NULL,
    amount_paid BIGINT NOT NULL,
    invoice_created BIGINT NOT NULL,
    event_created BIGINT NOT NULL,
    resolved BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX stripe_invoices_org_status ON stripe_invoices (organization_id, status, resolved);
CREATE INDEX stripe_invoices_sub_status ON stripe_invoices (subscription_id, status);

ALTER TABLE billing_accounts ADD COLUMN disputed_at TIMESTAMP;
