-- Organizations, members, billing accounts, the credit ledger, usage and reminder dismissals.
-- Tokens: {pk} is an auto-incrementing 64-bit primary key on either database.

CREATE TABLE organizations (
    id VARCHAR(36) PRIMARY KEY,
    name VARCHAR(200) NOT NULL,
    created_at TIMESTAMP NOT NULL
);

CREATE TABLE memberships (
    id {pk},
    organization_id VARCHAR(36) NOT NULL REFERENCES organizations (id),
    user_id VARCHAR(255) NOT NULL,
    email VARCHAR(254),
    role VARCHAR(16) NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at TIMESTAMP NOT NULL
);
CREATE UNIQUE INDEX memberships_org_user ON memberships (organization_id, user_id);
CREATE INDEX memberships_user ON memberships (user_id);

CREATE TABLE billing_accounts (
    organization_id VARCHAR(36) PRIMARY KEY REFERENCES organizations (id),
    billing_email VARCHAR(254),
    stripe_customer_id VARCHAR(255) UNIQUE,
    stripe_subscription_id VARCHAR(255),
    stripe_payment_method_id VARCHAR(255),
    stripe_metered_subscription_item_id VARCHAR(255),
    credits_balance BIGINT NOT NULL DEFAULT 0,
    reserved_credits BIGINT NOT NULL DEFAULT 0 CHECK (reserved_credits >= 0),
    auto_recharge_enabled BOOLEAN NOT NULL DEFAULT FALSE,
    auto_recharge_threshold BIGINT,
    auto_recharge_amount BIGINT,
    usage_cap BIGINT CHECK (usage_cap IS NULL OR usage_cap >= 0),
    subscription_status VARCHAR(16) NOT NULL DEFAULT 'inactive',
    subscription_plan VARCHAR(16),
    subscription_started_at TIMESTAMP,
    subscription_ends_at TIMESTAMP,
    subscription_current_period_end TIMESTAMP,
    suspended_at TIMESTAMP,
    payment_grace_period_ends_at TIMESTAMP,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);

CREATE TABLE credit_entries (
    id {pk},
    organization_id VARCHAR(36) NOT NULL REFERENCES organizations (id),
    entry_type VARCHAR(32) NOT NULL,
    amount BIGINT NOT NULL,
    reason VARCHAR(500),
    reference_id VARCHAR(255),
    idempotency_ref VARCHAR(300) UNIQUE,
    balance_after BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX credit_entries_org_id ON credit_entries (organization_id, id);

CREATE TABLE usage_records (
    id {pk},
    organization_id VARCHAR(36) NOT NULL REFERENCES organizations (id),
    category VARCHAR(32) NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity >= 1),
    unit_cost BIGINT NOT NULL CHECK (unit_cost >= 0),
    cost BIGINT NOT NULL CHECK (cost >= 0),
    reference_id VARCHAR(255) NOT NULL,
    metadata TEXT,
    credit_entry_id BIGINT REFERENCES credit_entries (id),
    created_at TIMESTAMP NOT NULL
);
CREATE UNIQUE INDEX usage_records_org_ref ON usage_records (organization_id, reference_id);
CREATE INDEX usage_records_org_cat_time ON usage_records (organization_id, category, created_at);

CREATE TABLE reminder_dismissals (
    id {pk},
    organization_id VARCHAR(36) NOT NULL REFERENCES organizations (id),
    user_id VARCHAR(255) NOT NULL,
    dismissed_at TIMESTAMP NOT NULL
);
CREATE UNIQUE INDEX reminder_dismissals_org_user ON reminder_dismissals (organization_id, user_id);
