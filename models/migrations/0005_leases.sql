-- Issue 11, nothing wedges: claims are leases that expire, idempotency scopes are
-- fixed-length digests, the auto-recharge queue is ordered by due time, and the enqueue
-- decision reads only the locked account row.

ALTER TABLE idempotency_records ADD COLUMN lease_expires_at TIMESTAMP;

ALTER TABLE auto_recharge_requests ADD COLUMN next_attempt_at TIMESTAMP;
ALTER TABLE auto_recharge_requests ADD COLUMN lease_expires_at TIMESTAMP;
ALTER TABLE auto_recharge_requests ADD COLUMN failure_kind VARCHAR(16);
UPDATE auto_recharge_requests SET next_attempt_at = created_at;
UPDATE auto_recharge_requests SET lease_expires_at = updated_at WHERE status = 'processing';
CREATE INDEX auto_recharge_requests_due ON auto_recharge_requests (status, next_attempt_at);

ALTER TABLE billing_accounts ADD COLUMN auto_recharge_in_flight_id VARCHAR(36);
ALTER TABLE billing_accounts ADD COLUMN auto_recharge_last_requested_at TIMESTAMP;
ALTER TABLE billing_accounts ADD COLUMN auto_recharge_failure_count INTEGER NOT NULL DEFAULT 0;
UPDATE billing_accounts SET auto_recharge_in_flight_id = (
    SELECT MAX(r.id) FROM auto_recharge_requests r
    WHERE r.organization_id = billing_accounts.organization_id
      AND r.status IN ('pending', 'processing')
);
UPDATE billing_accounts SET auto_recharge_last_requested_at = (
    SELECT MAX(r.created_at) FROM auto_recharge_requests r
    WHERE r.organization_id = billing_accounts.organization_id
);
