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
-- (a member's public id), through the view function pgq.aggregate_of_member
-- (sql/views/dashboard.sql, GIN index on task.members). Aggregated tasks live
-- in their group's queue. Members are deleted when their aggregate is
-- inserted, so this is how a member's page finds where it went, while the
-- aggregate is stored (a completed aggregate without retention is gone too).
SELECT t.* FROM pgq.aggregate_of_member(%(task_id)s) a
JOIN pgq.task t ON t.id = a.aggregated_key
WHERE a.queue = %(queue)s
ORDER BY t.id DESC
LIMIT 1;

-- name: dashboard_queue_overview
-- returns: many
-- The overview's table: one row per queue from the documented view
-- pgq.queue_stats (counts capped and estimated on big queues: counts_exact).
SELECT * FROM pgq.queue_stats ORDER BY queue;

-- name: dashboard_daily_totals
-- returns: many
-- The overview's charts: processed/failed per day over all queues for the
-- last %(days)s days, oldest first, zeros included (view pgq.task_history).
WITH clock AS (SELECT coalesce(%(now)s::timestamptz, now())::date AS today)
SELECT d.day::date AS day,
       coalesce(sum(h.processed), 0)::bigint AS processed,
       coalesce(sum(h.failed), 0)::bigint AS failed
FROM clock,
     generate_series(clock.today - (%(days)s::int - 1), clock.today, interval '1 day') AS d(day)
LEFT JOIN pgq.task_history h ON h.day = d.day::date
GROUP BY d.day
ORDER BY d.day;
