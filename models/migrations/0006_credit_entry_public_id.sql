-- Credit entries get a public UUID: the id the platform's clients see in the credit history.
-- The internal auto-increment id stays the commit order that history pages by.
-- Tokens: {uuid} is a random version-4 UUID string on either database.

ALTER TABLE credit_entries ADD COLUMN public_id VARCHAR(36);
UPDATE credit_entries SET public_id = {uuid} WHERE public_id IS NULL;
CREATE UNIQUE INDEX credit_entries_public_id ON credit_entries (public_id);
