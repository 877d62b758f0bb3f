-- Read-only queries of the web dashboard (pgq/dashboard/), for what the
-- Inspector does not offer. Parameters are bound; `now` defaults to the
-- database clock.

-- name: dashboard_now
-- returns: one
-- The database clock, for "3 s ago" and "in 5 s" on the pages.
SELECT coalesce(%(now)s::timestamptz, now()) AS now;

-- name: dashboard_task_aggregate_of
-- returns: one
-- Lineage, member side: the aggregated task whose members hold %(task_id)s
-- (a member's public id). Aggregated tasks live in their group's queue. The
-- members are deleted when their aggregate is inserted, so this is how a
-- member's page finds where it went (while the aggregate is still stored:
-- a completed aggregate without retention is gone too). Scans the queue's
-- aggregated tasks; no index on members.
SELECT * FROM pgq.task
WHERE queue = %(queue)s AND members IS NOT NULL AND members @> ARRAY[%(task_id)s::text]
ORDER BY id DESC
LIMIT 1;
