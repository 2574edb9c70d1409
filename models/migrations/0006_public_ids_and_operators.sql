-- Credit entries get a public UUID: the id the platform's clients see in the credit history.
-- The internal auto-increment id stays the commit order that history pages by.
-- Operators' suspensions keep their reason, and every operator action (suspend, unsuspend,
-- credit adjustment) is recorded with its reason.
-- Tokens: {uuid} is a random version-4 UUID string and {pk} an auto-increment key on either
-- database.

ALTER TABLE credit_entries ADD COLUMN public_id VARCHAR(36);
UPDATE credit_entries SET public_id = {uuid} WHERE public_id IS NULL;
CREATE UNIQUE INDEX credit_entries_public_id ON credit_entries (public_id);

ALTER TABLE billing_accounts ADD COLUMN suspension_reason VARCHAR(500);

CREATE TABLE operator_actions (
    id {pk},
    organization_id VARCHAR(36) NOT NULL REFERENCES organizations (id),
    action VARCHAR(32) NOT NULL,
    reason VARCHAR(500) NOT NULL,
    amount BIGINT,
    credit_entry_id BIGINT REFERENCES credit_entries (id),
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX operator_actions_org_time ON operator_actions (organization_id, created_at);

-- Local billing mode's checkout pages redirect where the caller asked (Stripe keeps these
-- on its own sessions).
ALTER TABLE checkout_sessions ADD COLUMN success_url VARCHAR(2048);
ALTER TABLE checkout_sessions ADD COLUMN cancel_url VARCHAR(2048);
