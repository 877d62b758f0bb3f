-- Queries of pgq.Inspector (pgq/inspector.py): read the queues, groups, tasks and
-- servers, and operate on them. Conventions: parameters are named and always
-- bound; `now` defaults to the database clock; names of queues and groups are
-- values, never SQL.
--
-- A task is looked up by its public id: a caller-chosen task_id, or (when the
-- task has none) its bigint key written in digits. `%(id)s` is that key, or NULL
-- when the public id is not all digits; `%(task_id)s` is the id as given.

-- name: inspector_queue_list
-- returns: many
SELECT name, paused FROM pgq.queue ORDER BY name;

-- name: inspector_queue_exists
-- returns: one
-- A queue exists when it has a queue row or any task (an enqueue racing a
-- delete_queue can leave tasks without a queue row).
SELECT EXISTS (SELECT 1 FROM pgq.queue WHERE name = %(queue)s)
    OR EXISTS (SELECT 1 FROM pgq.task WHERE queue = %(queue)s) AS found;

-- name: inspector_queue_info
-- returns: one
-- Exact counts per state of one queue, its group count, today's and total
-- stats, pause flag and latency (age of the oldest task that is ready to run:
-- pending, or scheduled/retry whose time has come). NULL row fields: no queue.
WITH clock AS (SELECT coalesce(%(now)s::timestamptz, now()) AS now),
counts AS (
    SELECT count(*) FILTER (WHERE state = 'pending')     AS pending,
           count(*) FILTER (WHERE state = 'active')      AS active,
           count(*) FILTER (WHERE state = 'scheduled')   AS scheduled,
           count(*) FILTER (WHERE state = 'retry')       AS retry,
           count(*) FILTER (WHERE state = 'archived')    AS archived,
           count(*) FILTER (WHERE state = 'completed')   AS completed,
           count(*) FILTER (WHERE state = 'aggregating') AS aggregating,
           count(DISTINCT group_key) FILTER (WHERE state = 'aggregating') AS groups
    FROM pgq.task WHERE queue = %(queue)s
),
oldest AS (
    SELECT t.run_at FROM pgq.task t, clock
    WHERE t.queue = %(queue)s AND t.state IN ('pending', 'scheduled', 'retry') AND t.run_at <= clock.now
    ORDER BY t.run_at, t.id LIMIT 1
),
stats AS (
    SELECT coalesce(sum(processed) FILTER (WHERE day = clock.now::date), 0) AS processed,
           coalesce(sum(failed) FILTER (WHERE day = clock.now::date), 0)    AS failed,
           coalesce(sum(processed), 0) AS processed_total,
           coalesce(sum(failed), 0)    AS failed_total
    FROM pgq.stat_daily, clock WHERE queue = %(queue)s
)
SELECT (SELECT paused FROM pgq.queue WHERE name = %(queue)s) AS paused,
       counts.*, stats.*,
       greatest(clock.now - (SELECT run_at FROM oldest), interval '0') AS latency,
       clock.now AS timestamp
FROM counts, stats, clock;

-- name: inspector_queue_history
-- returns: many
-- Processed/failed per day for the last %(days)s days, newest first, zeros included.
WITH clock AS (SELECT coalesce(%(now)s::timestamptz, now())::date AS today)
SELECT d.day::date AS day, coalesce(s.processed, 0) AS processed, coalesce(s.failed, 0) AS failed
FROM clock,
     generate_series(clock.today, clock.today - (%(days)s::int - 1), interval '-1 day') AS d(day)
LEFT JOIN pgq.stat_daily s ON s.queue = %(queue)s AND s.day = d.day::date
ORDER BY d.day DESC;

-- name: inspector_queue_set_paused
-- returns: one
UPDATE pgq.queue SET paused = %(paused)s WHERE name = %(queue)s RETURNING name, paused;

-- name: inspector_queue_lock
-- returns: one
-- delete_queue: lock the queue row and count what it holds.
SELECT q.name,
       (SELECT count(*) FROM pgq.task t WHERE t.queue = %(queue)s) AS tasks,
       (SELECT count(*) FROM pgq.task t WHERE t.queue = %(queue)s AND t.state = 'active') AS active
FROM pgq.queue q WHERE q.name = %(queue)s FOR UPDATE OF q;

-- name: inspector_queue_delete
-- returns: one
-- Remove a queue and everything it holds: tasks, unique locks, group
-- bookkeeping and its daily stats. The caller has checked emptiness (or force).
WITH tasks AS (DELETE FROM pgq.task WHERE queue = %(queue)s RETURNING id),
locks AS (DELETE FROM pgq.unique_lock WHERE queue = %(queue)s RETURNING 1),
groups AS (DELETE FROM pgq.task_group WHERE queue = %(queue)s RETURNING 1),
arrivals AS (DELETE FROM pgq.group_arrival WHERE queue = %(queue)s RETURNING 1),
stats AS (DELETE FROM pgq.stat_daily WHERE queue = %(queue)s RETURNING 1),
q AS (DELETE FROM pgq.queue WHERE name = %(queue)s RETURNING 1)
SELECT (SELECT count(*) FROM tasks) AS tasks, (SELECT count(*) FROM q) AS queues;

-- name: inspector_group_list
-- returns: many
-- The groups of a queue, from the members themselves (exact), with the
-- aggregator's bookkeeping: a retry time and the last error after a failed
-- aggregation. Uses task_aggregating_idx.
-- due_at / due_by: when the group is due and by which rule (pgq.group_due).
SELECT m.group_key, m.size, m.oldest_at, m.newest_at,
       g.errors, g.last_error, g.last_error_at, due.due_at, due.due_by
FROM (SELECT group_key, count(*) AS size, min(enqueued_at) AS oldest_at, max(enqueued_at) AS newest_at
      FROM pgq.task WHERE queue = %(queue)s AND state = 'aggregating'
      GROUP BY group_key) AS m
LEFT JOIN pgq.task_group g ON g.queue = %(queue)s AND g.group_key = m.group_key
CROSS JOIN LATERAL pgq.group_due(%(queue)s, m.size, m.oldest_at, m.newest_at, g.retry_at) AS due
ORDER BY m.oldest_at, m.group_key;

-- name: inspector_group_lock
-- returns: many
-- Lock the aggregation summary rows of some groups (%(groups)s NULL: every
-- group of the queue) before removing members, so that no aggregator folds
-- new arrivals into them until this transaction ends.
SELECT group_key FROM pgq.task_group
WHERE queue = %(queue)s AND (%(groups)s::text[] IS NULL OR group_key = ANY(%(groups)s::text[]))
ORDER BY group_key
FOR UPDATE;

-- name: inspector_group_forget_empty
-- returns: one
-- After members left their group: drop the bookkeeping of groups that have no
-- member left. Run as its own statement after inspector_group_lock, so its
-- snapshot sees every member committed before the lock was taken; an arrival
-- visible here belongs to a committed member, so it is stale when no member
-- is left. Groups that still have members keep their (over-estimating)
-- summary: the aggregator re-reads the real rows.
WITH gone AS (
    DELETE FROM pgq.task_group g
    WHERE g.queue = %(queue)s AND (%(groups)s::text[] IS NULL OR g.group_key = ANY(%(groups)s::text[]))
      AND NOT EXISTS (SELECT 1 FROM pgq.task t
                      WHERE t.queue = g.queue AND t.group_key = g.group_key AND t.state = 'aggregating')
    RETURNING 1
),
stale AS (
    DELETE FROM pgq.group_arrival a
    WHERE a.queue = %(queue)s AND (%(groups)s::text[] IS NULL OR a.group_key = ANY(%(groups)s::text[]))
      AND NOT EXISTS (SELECT 1 FROM pgq.task t
                      WHERE t.queue = a.queue AND t.group_key = a.group_key AND t.state = 'aggregating')
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS groups, (SELECT count(*) FROM stale) AS arrivals;

-- name: inspector_task_list
-- returns: many
-- One page of a queue's tasks in one state, in the order that state is worked
-- or looked at: ready states by due time, active by start, aggregating by group
-- then enqueue order, completed and archived newest first.
SELECT * FROM pgq.task
WHERE queue = %(queue)s AND state = %(state)s
ORDER BY
    CASE WHEN %(state)s IN ('pending', 'scheduled', 'retry') THEN run_at END,
    CASE WHEN %(state)s = 'active' THEN started_at END,
    CASE WHEN %(state)s = 'aggregating' THEN group_key END,
    CASE WHEN %(state)s = 'aggregating' THEN enqueued_at END,
    CASE WHEN %(state)s = 'completed' THEN completed_at END DESC,
    CASE WHEN %(state)s = 'archived' THEN last_failed_at END DESC,
    id
LIMIT %(limit)s OFFSET %(offset)s;

-- name: inspector_task_list_group
-- returns: many
-- One page of a group's members in enqueue order (G5, G14).
SELECT * FROM pgq.task
WHERE queue = %(queue)s AND group_key = %(group)s AND state = 'aggregating'
ORDER BY enqueued_at, id
LIMIT %(limit)s OFFSET %(offset)s;

-- name: inspector_task_get
-- returns: one
SELECT * FROM pgq.task
WHERE queue = %(queue)s AND (task_id = %(task_id)s OR (task_id IS NULL AND id = %(id)s::bigint));

-- name: inspector_task_run
-- returns: one
-- scheduled/retry/archived/aggregating -> pending now. A member leaves its group
-- and is processed on its own as its original type (G14); its group_key stays
-- on the record for inspection. Returns the old state; no row: not found or
-- not in a runnable state.
WITH t AS (
    SELECT id, state AS old_state FROM pgq.task
    WHERE queue = %(queue)s AND (task_id = %(task_id)s OR (task_id IS NULL AND id = %(id)s::bigint))
    FOR UPDATE
),
upd AS (
    UPDATE pgq.task SET state = 'pending', run_at = coalesce(%(now)s::timestamptz, now())
    FROM t
    WHERE pgq.task.id = t.id AND t.old_state IN ('scheduled', 'retry', 'archived', 'aggregating')
    RETURNING pgq.task.*, t.old_state
)
SELECT upd.*, pg_notify('pgq_wake', upd.queue) AS notified FROM upd;

-- name: inspector_task_archive
-- returns: one
-- pending/scheduled/retry/aggregating -> archived (a member leaves its group).
-- last_failed_at is set to the archiving time: the archive horizon counts from it.
WITH t AS (
    SELECT id, state AS old_state FROM pgq.task
    WHERE queue = %(queue)s AND (task_id = %(task_id)s OR (task_id IS NULL AND id = %(id)s::bigint))
    FOR UPDATE
)
UPDATE pgq.task SET state = 'archived', last_failed_at = coalesce(%(now)s::timestamptz, now())
FROM t
WHERE pgq.task.id = t.id AND t.old_state IN ('pending', 'scheduled', 'retry', 'aggregating')
RETURNING pgq.task.*, t.old_state;

-- name: inspector_task_delete
-- returns: one
-- Delete a task in any state but active, releasing its unique lock.
WITH del AS (
    DELETE FROM pgq.task
    WHERE queue = %(queue)s AND (task_id = %(task_id)s OR (task_id IS NULL AND id = %(id)s::bigint))
      AND state <> 'active'
    RETURNING *
),
unlocked AS (
    DELETE FROM pgq.unique_lock u USING del
    WHERE u.queue = del.queue AND u.key = del.unique_key AND u.task = del.id
    RETURNING 1
)
SELECT del.*, del.state AS old_state FROM del;

-- name: inspector_task_run_all
-- returns: one
-- Every task of a queue in %(state)s (scheduled, retry, archived, aggregating)
-- -> pending now; %(group)s narrows aggregating to one group. Returns the count
-- and the groups that lost members.
WITH upd AS (
    UPDATE pgq.task SET state = 'pending', run_at = coalesce(%(now)s::timestamptz, now())
    WHERE queue = %(queue)s AND state = %(state)s
      AND state IN ('scheduled', 'retry', 'archived', 'aggregating')
      AND (%(group)s::text IS NULL OR group_key = %(group)s)
    RETURNING id, group_key
),
wake AS (SELECT pg_notify('pgq_wake', %(queue)s) FROM (SELECT 1 FROM upd LIMIT 1) x)
SELECT (SELECT count(*) FROM upd) AS n,
       (SELECT coalesce(array_agg(DISTINCT group_key), '{}') FROM upd WHERE group_key IS NOT NULL) AS groups,
       (SELECT count(*) FROM wake) AS notified;

-- name: inspector_task_archive_all
-- returns: one
WITH upd AS (
    UPDATE pgq.task SET state = 'archived', last_failed_at = coalesce(%(now)s::timestamptz, now())
    WHERE queue = %(queue)s AND state = %(state)s
      AND state IN ('pending', 'scheduled', 'retry', 'aggregating')
      AND (%(group)s::text IS NULL OR group_key = %(group)s)
    RETURNING id, group_key
)
SELECT (SELECT count(*) FROM upd) AS n,
       (SELECT coalesce(array_agg(DISTINCT group_key), '{}') FROM upd WHERE group_key IS NOT NULL) AS groups;

-- name: inspector_task_delete_all
-- returns: one
WITH del AS (
    DELETE FROM pgq.task
    WHERE queue = %(queue)s AND state = %(state)s AND state <> 'active'
      AND (%(group)s::text IS NULL OR group_key = %(group)s)
    RETURNING id, queue, unique_key, group_key
),
unlocked AS (
    DELETE FROM pgq.unique_lock u USING del
    WHERE u.queue = del.queue AND u.key = del.unique_key AND u.task = del.id
    RETURNING 1
)
SELECT (SELECT count(*) FROM del) AS n,
       (SELECT coalesce(array_agg(DISTINCT group_key), '{}') FROM del WHERE group_key IS NOT NULL) AS groups;

-- name: inspector_task_cancel
-- returns: one
-- Ask the worker running an active task to cancel its handler (best effort:
-- the NOTIFY on <schema>_cancel reaches workers listening at that moment).
-- No row: not active.
SELECT id, locked_by, pg_notify(%(channel)s, id::text) AS notified
FROM pgq.task
WHERE queue = %(queue)s AND (task_id = %(task_id)s OR (task_id IS NULL AND id = %(id)s::bigint))
  AND state = 'active';

-- name: inspector_server_list
-- returns: many
SELECT s.*, coalesce(%(now)s::timestamptz, now()) - s.heartbeat_at AS heartbeat_age
FROM pgq.server s ORDER BY s.host, s.pid, s.id;

-- name: inspector_server_active_tasks
-- returns: many
-- Active tasks held by the given servers (locked_by = server id).
SELECT * FROM pgq.task
WHERE state = 'active' AND locked_by = ANY(%(servers)s::text[])
ORDER BY started_at, id;

-- name: metrics_queues
-- returns: many
-- The Prometheus exporter's per-queue gauges (estimates where large: see
-- pgq.queue_stats in sql/views/dashboard.sql).
SELECT * FROM pgq.queue_stats ORDER BY queue;

-- name: metrics_groups
-- returns: many
-- Per queue: the oldest waiting group (from the aggregators' summary, a lower
-- bound), groups whose last aggregation failed and wait for a retry, and their
-- failed attempts. Index range scans per queue.
SELECT q.name AS queue,
       extract(epoch FROM coalesce(%(now)s::timestamptz, now()) - o.oldest_at)::float8 AS oldest_age_seconds,
       coalesce(f.failing, 0) AS failing, coalesce(f.errors, 0) AS errors
FROM pgq.queue q
LEFT JOIN LATERAL (
    SELECT g.oldest_at FROM pgq.task_group g WHERE g.queue = q.name ORDER BY g.oldest_at LIMIT 1
) o ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS failing, sum(g.errors)::bigint AS errors
    FROM pgq.task_group g WHERE g.queue = q.name AND g.retry_at IS NOT NULL
) f ON true
ORDER BY q.name;

-- name: metrics_servers
-- returns: many
SELECT * FROM pgq.server_activity ORDER BY server_id;
