-- Queries of the worker runtime (pgq/tasks.py): claims, batched acks, leases,
-- the server heartbeat row. Every state change is fenced on (id, attempt,
-- state = 'active'): a worker whose lease was taken over (the recoverer moved
-- the task, another worker claimed it again) changes nothing, and the rows it
-- could not change are simply missing from RETURNING.

-- name: task_claim_many
-- returns: many
-- Claim up to %(limit)s due tasks from %(queues)s, taking the queues in the
-- order given (the worker picks it per poll: weighted random or strict
-- priority). Paused queues are skipped; rows locked by other claimers are
-- skipped. pending, and scheduled/retry tasks whose run_at has come, are all
-- claimable: no forwarder moves them first. attempt + 1 is the new fencing token.
-- The returned deadline is the effective one: started + timeout or deadline,
-- whichever is first, and 30 minutes when neither is set (as Asynq). payload and
-- headers come as JSON text (the worker decodes them); plain: no retention, so
-- a completion is a plain delete (task_ack_done).
WITH picked AS MATERIALIZED (
    SELECT c.id, q.ord
    FROM unnest(%(queues)s::text[]) WITH ORDINALITY AS q(name, ord)
    CROSS JOIN LATERAL (
        SELECT t.id FROM pgq.task t
        WHERE t.queue = q.name
          AND t.state IN ('pending', 'scheduled', 'retry')
          AND t.run_at <= coalesce(%(now)s::timestamptz, now())
          AND NOT EXISTS (SELECT 1 FROM pgq.queue p WHERE p.name = q.name AND p.paused)
        ORDER BY t.run_at, t.id
        LIMIT %(limit)s
        FOR UPDATE OF t SKIP LOCKED
    ) c
    LIMIT %(limit)s
),
claimed AS (
    UPDATE pgq.task t
    SET state = 'active',
        attempt = t.attempt + 1,
        locked_by = %(worker_id)s,
        started_at = coalesce(%(now)s::timestamptz, now()),
        lease_expires_at = coalesce(%(now)s::timestamptz, now()) + %(lease)s * interval '1 second'
    FROM picked
    -- = ANY(ARRAY(...)) keeps the generic plan (the worker prepares this statement) on
    -- the primary key: it cannot know how many rows LIMIT %(limit)s lets through.
    WHERE t.id = ANY(ARRAY(SELECT id FROM picked)) AND t.id = picked.id
    RETURNING picked.ord, t.run_at, t.id, t.task_id, t.queue, t.type, t.payload, t.headers, t.group_key,
              t.retried, t.max_retry, t.attempt, t.enqueued_at,
              CASE WHEN t.timeout IS NULL AND t.deadline IS NULL
                   THEN t.started_at + interval '30 minutes'
                   ELSE least(t.started_at + t.timeout, t.deadline) END AS deadline,
              t.started_at, t.retention IS NULL AS plain
)
SELECT id, task_id, queue, type, payload::text, headers::text, group_key, retried, max_retry, attempt,
       enqueued_at, deadline, extract(epoch FROM deadline - started_at)::float8 AS remaining, plain
FROM claimed
ORDER BY ord, run_at, id;

-- name: task_next_due
-- returns: one
-- Seconds until the earliest ready or scheduled task of the unpaused queues
-- in %(queues)s is due (<= 0: due now; NULL: nothing waiting).
SELECT extract(epoch FROM min(n.run_at) - coalesce(%(now)s::timestamptz, now()))::float8 AS wait
FROM unnest(%(queues)s::text[]) AS q(name)
CROSS JOIN LATERAL (
    SELECT t.run_at FROM pgq.task t
    WHERE t.queue = q.name AND t.state IN ('pending', 'scheduled', 'retry')
    ORDER BY t.run_at
    LIMIT 1
) n
WHERE NOT EXISTS (SELECT 1 FROM pgq.queue p WHERE p.name = q.name AND p.paused);

-- name: task_ack_many
-- returns: many
-- Write a batch of outcomes in one statement. Each input row is
-- (id, attempt, kind, delay, error, result, failed) with kind:
--   done     completed: deleted (and its unique lock released) without retention,
--            else kept as 'completed' until completed_at + retention;
--   retry    back to 'retry' at now + delay seconds; retried + 1 when failed;
--   archive  'archived' (retries spent, or SkipRetry);
--   requeue  back to 'pending' now, no retry counted (graceful shutdown);
--   result   only write the result (task.result_writer.write), state unchanged.
-- result (JSON text or NULL) is written with any kind. The input must be
-- ordered by id. Rows not fenced
-- (another attempt owns the task, or it is no longer active) are left alone;
-- the ids returned are those applied. processed/failed counts go to
-- stat_daily (on the database's current date, as the inspector reads it):
-- done counts processed; retry/archive with failed count processed and failed.
WITH owned AS MATERIALIZED (
    -- Lock the fenced rows, driven by the input (ordered by id, so concurrent
    -- writers of one worker lock in the same order). `(state = 'active') IS
    -- TRUE` keeps the planner on the primary key (it cannot use the partial
    -- index on active rows, whose statistics lag during a drain).
    SELECT t.id, t.queue, t.unique_key, t.retention, i.kind, i.delay, i.error,
           i.result::jsonb AS result, i.failed
    FROM unnest(%(id)s::bigint[], %(attempt)s::int[], %(kind)s::text[], %(delay)s::float8[],
                %(error)s::text[], %(result)s::text[], %(failed)s::bool[])
         AS i(id, attempt, kind, delay, error, result, failed)
    CROSS JOIN LATERAL (
        SELECT t.id, t.queue, t.unique_key, t.retention FROM pgq.task t
        WHERE t.id = i.id AND t.attempt = i.attempt AND (t.state = 'active') IS TRUE
        FOR UPDATE
    ) t
),
changed AS MATERIALIZED (
    SELECT * FROM owned WHERE NOT (kind = 'done' AND retention IS NULL)
),
deleted AS (
    DELETE FROM pgq.task t
    WHERE t.id = ANY(ARRAY(SELECT id FROM owned WHERE kind = 'done' AND retention IS NULL))
    RETURNING t.id, t.queue, t.unique_key, 'done'::text AS kind, false AS failed
),
updated AS (
    UPDATE pgq.task t
    SET state = CASE i.kind WHEN 'done' THEN 'completed' WHEN 'retry' THEN 'retry'
                            WHEN 'archive' THEN 'archived' WHEN 'requeue' THEN 'pending'
                            ELSE t.state END,
        retried = t.retried + CASE WHEN i.kind = 'retry' AND i.failed THEN 1 ELSE 0 END,
        run_at = CASE i.kind
                     WHEN 'retry' THEN coalesce(%(now)s::timestamptz, now()) + i.delay * interval '1 second'
                     WHEN 'requeue' THEN coalesce(%(now)s::timestamptz, now())
                     ELSE t.run_at END,
        last_error = CASE WHEN i.kind IN ('retry', 'archive') THEN i.error ELSE t.last_error END,
        last_failed_at = CASE WHEN i.kind IN ('retry', 'archive')
                              THEN coalesce(%(now)s::timestamptz, now()) ELSE t.last_failed_at END,
        completed_at = CASE WHEN i.kind = 'done'
                            THEN coalesce(%(now)s::timestamptz, now()) ELSE t.completed_at END,
        expires_at = CASE WHEN i.kind = 'done'
                          THEN coalesce(%(now)s::timestamptz, now()) + t.retention ELSE t.expires_at END,
        result = coalesce(i.result, t.result),
        lease_expires_at = CASE WHEN i.kind = 'result' THEN t.lease_expires_at END,
        locked_by = CASE WHEN i.kind = 'result' THEN t.locked_by END
    FROM changed i
    WHERE t.id = ANY(ARRAY(SELECT id FROM changed)) AND t.id = i.id
    RETURNING t.id, t.queue, t.unique_key, i.kind, i.failed
),
finished AS (
    SELECT * FROM deleted UNION ALL SELECT * FROM updated
),
unlocked AS (
    DELETE FROM pgq.unique_lock u
    USING finished f
    WHERE f.kind = 'done' AND f.unique_key IS NOT NULL
      AND u.queue = f.queue AND u.key = f.unique_key AND u.task = f.id
),
stats AS (
    INSERT INTO pgq.stat_daily AS s (queue, day, processed, failed)
    SELECT f.queue, coalesce(%(now)s::timestamptz, now())::date,
           count(*), count(*) FILTER (WHERE f.kind <> 'done')
    FROM finished f
    WHERE f.kind = 'done' OR (f.kind IN ('retry', 'archive') AND f.failed)
    GROUP BY f.queue
    ON CONFLICT (queue, day) DO UPDATE
        SET processed = s.processed + excluded.processed, failed = s.failed + excluded.failed
)
SELECT id FROM finished;

-- name: task_ack_done
-- returns: many
-- The hot path of task_ack_many: plain completions (kind done, no result) of
-- tasks the worker knows have no retention. Deleted in one statement fenced on
-- (id, attempt, active, retention IS NULL), without locking them first; the
-- input must be ordered by id (locks are taken in that order, as in
-- task_ack_many). Returns the ids applied. Counts go to stat_daily as done.
WITH deleted AS (
    DELETE FROM pgq.task t
    USING unnest(%(id)s::bigint[], %(attempt)s::int[]) AS i(id, attempt)
    WHERE t.id = i.id AND t.attempt = i.attempt AND (t.state = 'active') IS TRUE
      AND t.retention IS NULL
    RETURNING t.id, t.queue, t.unique_key
),
unlocked AS (
    DELETE FROM pgq.unique_lock u
    USING deleted f
    WHERE f.unique_key IS NOT NULL AND u.queue = f.queue AND u.key = f.unique_key AND u.task = f.id
),
stats AS (
    INSERT INTO pgq.stat_daily AS s (queue, day, processed, failed)
    SELECT f.queue, coalesce(%(now)s::timestamptz, now())::date, count(*), 0
    FROM deleted f
    GROUP BY f.queue
    ON CONFLICT (queue, day) DO UPDATE SET processed = s.processed + excluded.processed
)
SELECT id FROM deleted;

-- name: task_extend_leases
-- returns: many
-- The heartbeat: extend the leases of this worker's running tasks, fenced on
-- (id, attempt, active). Returns the ids still owned; the others are lost.
-- Locks in id order (the input must be sorted), as task_ack_many does.
WITH owned AS MATERIALIZED (
    SELECT t.id
    FROM unnest(%(id)s::bigint[], %(attempt)s::int[]) AS i(id, attempt)
    CROSS JOIN LATERAL (
        SELECT t.id FROM pgq.task t
        WHERE t.id = i.id AND t.attempt = i.attempt AND (t.state = 'active') IS TRUE
        FOR UPDATE
    ) t
)
UPDATE pgq.task t
SET lease_expires_at = coalesce(%(now)s::timestamptz, now()) + %(lease)s * interval '1 second'
WHERE t.id = ANY(ARRAY(SELECT id FROM owned))
RETURNING t.id;

-- name: server_heartbeat
-- returns: none
-- Insert or refresh this server's row (pgq.server), with the aggregation policy
-- of each queue it aggregates (the Inspector works out when groups are due).
INSERT INTO pgq.server AS s (id, host, pid, queues, concurrency, strict_priority, status,
                             started_at, heartbeat_at, group_policies)
VALUES (%(id)s, %(host)s, %(pid)s, %(queues)s::jsonb, %(concurrency)s, %(strict_priority)s,
        %(status)s, coalesce(%(now)s::timestamptz, now()), coalesce(%(now)s::timestamptz, now()),
        %(group_policies)s::jsonb)
ON CONFLICT (id) DO UPDATE
    SET status = excluded.status, heartbeat_at = excluded.heartbeat_at,
        group_policies = excluded.group_policies;

-- name: server_delete
-- returns: none
DELETE FROM pgq.server WHERE id = %(id)s;
