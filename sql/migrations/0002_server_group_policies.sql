-- 0002: every server publishes the aggregation policy of each queue it
-- aggregates, so that the Inspector, the CLI and the dashboard can tell when a
-- waiting group is due (GroupInfo.next_due_at) instead of estimating it.
ALTER TABLE pgq.server
    ADD COLUMN group_policies jsonb NOT NULL DEFAULT '{}'::jsonb;
