-- Reservations, the auto-recharge outbox, stored Idempotency-Key responses, and an index for
-- period spend (usage caps).

CREATE TABLE reservations (
    id VARCHAR(36) PRIMARY KEY,
    organization_id VARCHAR(36) NOT NULL REFERENCES organizations (id),
    amount BIGINT NOT NULL CHECK (amount > 0),
    status VARCHAR(16) NOT NULL CHECK (status IN ('open', 'finalized', 'released')),
    reference_id VARCHAR(255) NOT NULL,
    final_amount BIGINT,
    credit_entry_id BIGINT REFERENCES credit_entries (id),
    created_at TIMESTAMP NOT NULL,
    closed_at TIMESTAMP
);
CREATE UNIQUE INDEX reservations_org_ref ON reservations (organization_id, reference_id);
CREATE INDEX reservations_org_status ON reservations (organization_id, status);

CREATE TABLE auto_recharge_requests (
    id VARCHAR(36) PRIMARY KEY,
    organization_id VARCHAR(36) NOT NULL REFERENCES organizations (id),
    status VARCHAR(16) NOT NULL,
    amount BIGINT NOT NULL,
    failure_reason VARCHAR(500),
    stripe_payment_intent_id VARCHAR(255),
    client_secret VARCHAR(500),
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE INDEX auto_recharge_requests_org_status ON auto_recharge_requests (organization_id, status);
CREATE INDEX auto_recharge_requests_status ON auto_recharge_requests (status, created_at);

CREATE TABLE idempotency_records (
    id {pk},
    scope VARCHAR(100) NOT NULL,
    idempotency_key VARCHAR(255) NOT NULL,
    fingerprint VARCHAR(64) NOT NULL,
    status_code INTEGER,
    response_body TEXT,
    created_at TIMESTAMP NOT NULL
);
CREATE UNIQUE INDEX idempotency_records_scope_key ON idempotency_records (scope, idempotency_key);

CREATE INDEX credit_entries_org_type_time ON credit_entries (organization_id, entry_type, created_at);
