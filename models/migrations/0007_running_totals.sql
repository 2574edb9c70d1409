-- Constant-cost guards: each organization's spend in its latest spending month kept on the
-- account row (the usage-cap check reads it under the account lock), and per-day usage rollups
-- per (organization, category) (the usage summary reads days, not events). Both are backfilled
-- from the existing rows. Days and months are the UTC calendar's, written 'YYYY-MM-DD' and
-- 'YYYY-MM' (text, so the same on SQLite and PostgreSQL and ordered like the dates).

ALTER TABLE billing_accounts ADD COLUMN spend_month VARCHAR(7);
ALTER TABLE billing_accounts ADD COLUMN month_spend BIGINT NOT NULL DEFAULT 0;

-- The month of the newest charge, and what the charges of that month add up to: a month that
-- is not the current one reads as 0, so the backfill is right whenever it runs.
UPDATE billing_accounts SET spend_month = (
    SELECT MAX(SUBSTR(CAST(e.created_at AS VARCHAR(32)), 1, 7)) FROM credit_entries e
    WHERE e.organization_id = billing_accounts.organization_id AND e.entry_type = 'charge'
);
UPDATE billing_accounts SET month_spend = COALESCE((
    SELECT -SUM(e.amount) FROM credit_entries e
    WHERE e.organization_id = billing_accounts.organization_id AND e.entry_type = 'charge'
      AND SUBSTR(CAST(e.created_at AS VARCHAR(32)), 1, 7) = billing_accounts.spend_month
), 0);

CREATE TABLE usage_daily_rollups (
    id {pk},
    organization_id VARCHAR(36) NOT NULL REFERENCES organizations (id),
    category VARCHAR(32) NOT NULL,
    day VARCHAR(10) NOT NULL,
    quantity BIGINT NOT NULL,
    cost BIGINT NOT NULL,
    events BIGINT NOT NULL
);
CREATE UNIQUE INDEX usage_daily_rollups_org_cat_day ON usage_daily_rollups (organization_id, category, day);

INSERT INTO usage_daily_rollups (organization_id, category, day, quantity, cost, events)
SELECT organization_id, category, SUBSTR(CAST(created_at AS VARCHAR(32)), 1, 10),
       SUM(quantity), SUM(cost), COUNT(*)
FROM usage_records
GROUP BY organization_id, category, SUBSTR(CAST(created_at AS VARCHAR(32)), 1, 10);
