-- pgq dashboard views: the documented, stable SQL interface for dashboards
-- (Grafana, Metabase, psql). The tables are internal and may change; these
-- views and functions keep their columns (new columns are only ever added at
-- the end). Every column is described in docs/dashboards.md.
--
-- `pgq migrate` (re)creates this file after the migrations, every run, with
-- CREATE OR REPLACE. The schema name `pgq` is substituted at load time when
-- another is configured.
--
-- Cost: every view answers its documented example queries in well under
-- 100 ms on a table of 1,000,000 tasks (benchmarks/views.py). Counts that
-- would scan many rows are estimated from planner statistics instead; the
-- column counts_exact says whether a row's counts are exact.

-- The planner's estimate of the tasks of one queue in one state, from the
-- table's statistics (including the (queue, state) MCV statistics object).
-- Costs one query planning, never a scan.
CREATE OR REPLACE FUNCTION pgq.estimate_task_count(p_queue text, p_state text)
RETURNS bigint
LANGUAGE plpgsql VOLATILE  -- EXPLAIN is not allowed in a STABLE function
SECURITY DEFINER  -- counts only: a role that may read the views only can use them (roles.sql)
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    plan json;
BEGIN
    EXECUTE format('EXPLAIN (FORMAT JSON) SELECT 1 FROM pgq.task WHERE queue = %L AND state = %L',
                   p_queue, p_state) INTO plan;
    RETURN (plan -> 0 -> 'Plan' ->> 'Plan Rows')::bigint;
END
$fn$;

-- Counts per state of one queue, exact while small, estimated when large.
-- Each family of states is counted by reading at most p_cap index entries;
-- when a family holds p_cap rows or more, its states are estimated (never
-- below what was counted) and `exact` is false. Completed tasks have no
-- per-queue index: they are counted exactly only while the whole table holds
-- fewer than 10 x p_cap of them (by its index's statistics).
CREATE OR REPLACE FUNCTION pgq.queue_counts(p_queue text, p_cap integer DEFAULT 1000)
RETURNS TABLE (pending bigint, scheduled bigint, retry bigint, active bigint, aggregating bigint,
               completed bigint, archived bigint, groups bigint, exact boolean)
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER  -- counts only: queue_stats works for a views-only role (sql/roles.sql)
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    n bigint;
    completed_rows real;
BEGIN
    exact := true;
    -- pending, scheduled and retry share task_ready_idx: sample up to p_cap of them.
    SELECT count(*) FILTER (WHERE x.state = 'pending'), count(*) FILTER (WHERE x.state = 'scheduled'),
           count(*) FILTER (WHERE x.state = 'retry'), count(*)
      INTO pending, scheduled, retry, n
      FROM (SELECT t.state FROM pgq.task t
            WHERE t.queue = p_queue AND t.state IN ('pending', 'scheduled', 'retry') LIMIT p_cap) x;
    IF n >= p_cap THEN
        exact := false;
        pending := greatest(pending, pgq.estimate_task_count(p_queue, 'pending'));
        scheduled := greatest(scheduled, pgq.estimate_task_count(p_queue, 'scheduled'));
        retry := greatest(retry, pgq.estimate_task_count(p_queue, 'retry'));
    END IF;

    SELECT count(*) INTO active
      FROM (SELECT 1 FROM pgq.task t WHERE t.state = 'active' AND t.queue = p_queue LIMIT p_cap) x;
    IF active >= p_cap THEN
        exact := false;
        active := greatest(active, pgq.estimate_task_count(p_queue, 'active'));
    END IF;

    SELECT count(*) INTO archived
      FROM (SELECT 1 FROM pgq.task t WHERE t.state = 'archived' AND t.queue = p_queue LIMIT p_cap) x;
    IF archived >= p_cap THEN
        exact := false;
        archived := greatest(archived, pgq.estimate_task_count(p_queue, 'archived'));
    END IF;

    SELECT count(*) INTO aggregating
      FROM (SELECT 1 FROM pgq.task t WHERE t.state = 'aggregating' AND t.queue = p_queue LIMIT p_cap) x;
    IF aggregating >= p_cap THEN
        exact := false;
        aggregating := greatest(aggregating, pgq.estimate_task_count(p_queue, 'aggregating'));
        -- the aggregator's per-group summary rows (folded arrivals), one per waiting group
        SELECT count(*) INTO groups FROM pgq.task_group g WHERE g.queue = p_queue;
    ELSE
        -- a loose index scan: one probe per group, fewer than p_cap of them
        WITH RECURSIVE g AS (
            (SELECT t.group_key FROM pgq.task t
             WHERE t.queue = p_queue AND t.state = 'aggregating' ORDER BY t.group_key LIMIT 1)
            UNION ALL
            SELECT (SELECT t.group_key FROM pgq.task t
                    WHERE t.queue = p_queue AND t.state = 'aggregating' AND t.group_key > g.group_key
                    ORDER BY t.group_key LIMIT 1)
            FROM g WHERE g.group_key IS NOT NULL
        )
        SELECT count(g.group_key) INTO groups FROM g;
    END IF;

    SELECT c.reltuples INTO completed_rows FROM pg_class c WHERE c.oid = 'pgq.task_expires_idx'::regclass;
    IF completed_rows IS NULL OR completed_rows < 10 * p_cap::real THEN
        SELECT count(*) INTO completed
          FROM (SELECT 1 FROM pgq.task t WHERE t.state = 'completed' AND t.queue = p_queue LIMIT p_cap) x;
        IF completed >= p_cap THEN
            exact := false;
            completed := greatest(completed, pgq.estimate_task_count(p_queue, 'completed'));
        END IF;
    ELSE
        -- no per-queue index on completed tasks: counting would walk every completed row
        exact := false;
        completed := pgq.estimate_task_count(p_queue, 'completed');
    END IF;
    RETURN NEXT;
END
$fn$;

-- One row per queue: tasks per state, groups, latency, today's and total stats.
CREATE OR REPLACE VIEW pgq.queue_stats AS
SELECT q.name AS queue,
       q.paused,
       c.pending + c.active + c.scheduled + c.retry + c.aggregating + c.archived AS size,
       c.pending,
       c.active,
       c.scheduled,
       c.retry,
       c.aggregating,
       c.archived,
       c.completed,
       c.groups,
       c.exact AS counts_exact,
       o.oldest_ready_at,
       coalesce(extract(epoch FROM now() - o.oldest_ready_at), 0)::float8 AS latency_seconds,
       coalesce(d.processed, 0) AS processed_today,
       coalesce(d.failed, 0) AS failed_today,
       coalesce(tot.processed, 0) AS processed_total,
       coalesce(tot.failed, 0) AS failed_total,
       now() AS measured_at,
       coalesce(d.aggregated, 0) AS aggregated_today,
       coalesce(tot.aggregated, 0) AS aggregated_total,
       coalesce(tot.aggregated_members, 0) AS aggregated_members_total
FROM pgq.queue q
CROSS JOIN LATERAL pgq.queue_counts(q.name) c
LEFT JOIN LATERAL (
    SELECT t.run_at AS oldest_ready_at FROM pgq.task t
    WHERE t.queue = q.name AND t.state IN ('pending', 'scheduled', 'retry') AND t.run_at <= now()
    ORDER BY t.run_at LIMIT 1
) o ON true
LEFT JOIN pgq.stat_daily d ON d.queue = q.name AND d.day = current_date
LEFT JOIN LATERAL (
    SELECT sum(s.processed)::bigint AS processed, sum(s.failed)::bigint AS failed,
           sum(s.aggregated)::bigint AS aggregated,
           sum(s.aggregated_members)::bigint AS aggregated_members
    FROM pgq.stat_daily s WHERE s.queue = q.name
) tot ON true;

-- Processed/failed and aggregations made per queue per day (days with neither have no row).
CREATE OR REPLACE VIEW pgq.task_history AS
SELECT s.queue,
       s.day,
       s.processed,
       s.failed,
       s.processed - s.failed AS succeeded,
       CASE WHEN s.processed > 0 THEN s.failed::float8 / s.processed END AS error_rate,
       s.aggregated,
       s.aggregated_members
FROM pgq.stat_daily s;

-- When a waiting group is due, by the aggregation policies that the running
-- servers aggregating its queue publish (pgq.server.group_policies), with the
-- aggregator's rules: newest member + grace period, capped at oldest member +
-- max delay, at once (its newest member) when it has max size members; the
-- earliest when servers differ; and not before p_retry_at, the retry time after
-- a failed aggregation. due_by names the rule ('grace_period', 'max_delay',
-- 'max_size', 'retry'); both NULL when no server aggregates the queue and no
-- aggregation failed. Used by pgq.group_stats and Inspector.groups().
CREATE OR REPLACE FUNCTION pgq.group_due(
    p_queue text, p_size bigint, p_oldest_at timestamptz, p_newest_at timestamptz,
    p_retry_at timestamptz, OUT due_at timestamptz, OUT due_by text)
LANGUAGE sql STABLE
SECURITY DEFINER  -- reads only the servers' published policies: group_stats works for a views-only role
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT CASE WHEN p_retry_at >= pol.due_at OR pol.due_at IS NULL THEN p_retry_at ELSE pol.due_at END,
           CASE WHEN p_retry_at >= pol.due_at OR (pol.due_at IS NULL AND p_retry_at IS NOT NULL)
                THEN 'retry' ELSE pol.due_by END
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (
        SELECT d.due_at, d.due_by
        FROM pgq.server s
        CROSS JOIN LATERAL jsonb_each(s.group_policies) AS p(queue, policy)
        CROSS JOIN LATERAL (
            SELECT p_newest_at + (p.policy->>'grace_period')::float8 * interval '1 second' AS grace_at,
                   p_oldest_at + (p.policy->>'max_delay')::float8 * interval '1 second' AS delay_at,
                   p_size >= (p.policy->>'max_size')::int AS full
        ) x
        CROSS JOIN LATERAL (
            SELECT CASE WHEN x.full THEN p_newest_at
                        WHEN x.delay_at < x.grace_at THEN x.delay_at
                        ELSE x.grace_at END AS due_at,
                   CASE WHEN x.full THEN 'max_size'
                        WHEN x.delay_at < x.grace_at THEN 'max_delay'
                        ELSE 'grace_period' END AS due_by
        ) d
        WHERE p.queue = p_queue
        ORDER BY d.due_at
        LIMIT 1
    ) pol ON true
$fn$;

-- Exact group statistics, computed from the waiting members themselves.
-- Cost grows with the members read: filter on queue (and group_key).
CREATE OR REPLACE VIEW pgq.group_stats AS
SELECT m.queue,
       m.group_key,
       m.size,
       m.oldest_at,
       m.newest_at,
       extract(epoch FROM now() - m.oldest_at)::float8 AS oldest_age_seconds,
       extract(epoch FROM now() - m.newest_at)::float8 AS idle_seconds,
       g.retry_at,
       coalesce(g.errors, 0) AS errors,
       g.last_error,
       g.last_error_at,
       due.due_at AS next_due_at,
       due.due_by
FROM (SELECT t.queue, t.group_key, count(*) AS size,
             min(t.enqueued_at) AS oldest_at, max(t.enqueued_at) AS newest_at
      FROM pgq.task t WHERE t.state = 'aggregating'
      GROUP BY t.queue, t.group_key) m
LEFT JOIN pgq.task_group g ON g.queue = m.queue AND g.group_key = m.group_key
CROSS JOIN LATERAL pgq.group_due(m.queue, m.size, m.oldest_at, m.newest_at, g.retry_at) AS due;

-- The aggregators' per-group summary: cheap on any number of groups (indexed
-- by queue and size, oldest and newest member), for "largest / oldest / failing
-- groups" panels. size is an upper bound and oldest_at a lower bound (members
-- removed by the inspector are re-checked at aggregation); only groups whose
-- arrivals a running aggregator has folded appear.
CREATE OR REPLACE VIEW pgq.group_backlog AS
SELECT g.queue,
       g.group_key,
       g.size AS size_estimate,
       g.oldest_at,
       g.newest_at,
       extract(epoch FROM now() - g.oldest_at)::float8 AS oldest_age_seconds,
       g.retry_at,
       g.errors,
       g.last_error,
       g.last_error_at
FROM pgq.task_group g;

-- Aggregation lineage (G8): one row per member of each stored aggregated task.
CREATE OR REPLACE VIEW pgq.aggregation_lineage AS
SELECT m.member_id,
       m.position::integer AS member_position,
       coalesce(t.task_id, t.id::text) AS aggregated_id,
       t.id AS aggregated_key,
       t.queue,
       t.type AS aggregated_type,
       t.state AS aggregated_state,
       cardinality(t.members) AS member_count,
       t.enqueued_at AS aggregated_at
FROM pgq.task t
CROSS JOIN LATERAL unnest(t.members) WITH ORDINALITY AS m(member_id, position)
WHERE t.members IS NOT NULL;

-- Member -> aggregated task, through the GIN index on task.members.
CREATE OR REPLACE FUNCTION pgq.aggregate_of_member(p_member_id text)
RETURNS SETOF pgq.aggregation_lineage
LANGUAGE sql STABLE
AS $fn$
    SELECT m.member_id, m.position::integer, coalesce(t.task_id, t.id::text), t.id, t.queue, t.type,
           t.state, cardinality(t.members), t.enqueued_at
    FROM pgq.task t
    CROSS JOIN LATERAL unnest(t.members) WITH ORDINALITY AS m(member_id, position)
    WHERE t.members IS NOT NULL AND t.members @> ARRAY[p_member_id] AND m.member_id = p_member_id
$fn$;

-- One row per server (from the heartbeat rows servers write) with its load.
CREATE OR REPLACE VIEW pgq.server_activity AS
SELECT s.id AS server_id,
       s.host,
       s.pid,
       s.queues,
       s.concurrency,
       s.strict_priority,
       s.status,
       s.started_at,
       s.heartbeat_at,
       extract(epoch FROM now() - s.heartbeat_at)::float8 AS heartbeat_age_seconds,
       coalesce(a.active_tasks, 0) AS active_tasks,
       coalesce(a.active_tasks, 0)::float8 / nullif(s.concurrency, 0) AS utilization,
       s.group_policies
FROM pgq.server s
LEFT JOIN LATERAL (
    SELECT count(*) AS active_tasks FROM pgq.task t WHERE t.state = 'active' AND t.locked_by = s.id
) a ON true;

-- One row per active task: who runs what, since when, and its lease.
CREATE OR REPLACE VIEW pgq.worker_activity AS
SELECT t.locked_by AS server_id,
       s.host,
       s.pid,
       t.queue,
       coalesce(t.task_id, t.id::text) AS task_id,
       t.id AS task_key,
       t.type,
       t.retried,
       t.started_at,
       extract(epoch FROM now() - t.started_at)::float8 AS running_seconds,
       t.lease_expires_at,
       t.lease_expires_at < now() AS lease_expired
FROM pgq.task t
LEFT JOIN pgq.server s ON s.id = t.locked_by
WHERE t.state = 'active';
