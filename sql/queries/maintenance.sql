-- Queries of the background services (pgq/services/): the recoverer and the
-- cleaner. Each is one idempotent statement that is safe to run concurrently
-- on every server (SKIP LOCKED, fenced re-checks), in batches of %(limit)s.

-- name: task_recover_expired
-- returns: one
-- Tasks whose lease expired (their worker died, stalled or lost its
-- connection) go back to 'retry', due at once, with retried + 1 and
-- last_error = %(error)s; those whose retries are spent go to 'archived'.
-- Counted in stat_daily as processed and failed.
WITH expired AS (
    SELECT t.id FROM pgq.task t
    WHERE t.state = 'active' AND t.lease_expires_at < coalesce(%(now)s::timestamptz, now())
    ORDER BY t.lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
moved AS (
    UPDATE pgq.task t
    SET state = CASE WHEN t.retried >= t.max_retry THEN 'archived' ELSE 'retry' END,
        retried = CASE WHEN t.retried >= t.max_retry THEN t.retried ELSE t.retried + 1 END,
        run_at = coalesce(%(now)s::timestamptz, now()),
        last_error = %(error)s,
        last_failed_at = coalesce(%(now)s::timestamptz, now()),
        lease_expires_at = NULL,
        locked_by = NULL
    FROM expired
    WHERE t.id = expired.id AND t.state = 'active'
    RETURNING t.queue, t.state
),
stats AS (
    INSERT INTO pgq.stat_daily AS s (queue, day, processed, failed)
    SELECT m.queue, coalesce(%(now)s::timestamptz, now())::date, count(*), count(*)
    FROM moved m GROUP BY m.queue
    ON CONFLICT (queue, day) DO UPDATE
        SET processed = s.processed + excluded.processed, failed = s.failed + excluded.failed
)
SELECT count(*) FILTER (WHERE state = 'retry') AS retried,
       count(*) FILTER (WHERE state = 'archived') AS archived
FROM moved;

-- name: task_clean_completed
-- returns: one
-- Delete up to %(limit)s completed tasks whose retention has expired.
WITH gone AS (
    DELETE FROM pgq.task t
    WHERE t.id IN (
        SELECT c.id FROM pgq.task c
        WHERE c.state = 'completed' AND c.expires_at <= coalesce(%(now)s::timestamptz, now())
        ORDER BY c.expires_at
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
      AND t.state = 'completed'
    RETURNING t.id, t.queue, t.unique_key
),
unlocked AS (
    DELETE FROM pgq.unique_lock u USING gone g
    WHERE g.unique_key IS NOT NULL AND u.queue = g.queue AND u.key = g.unique_key AND u.task = g.id
)
SELECT count(*) AS deleted FROM gone;

-- name: task_clean_archived
-- returns: one
-- Delete up to %(limit)s archived tasks that failed more than %(max_age)s
-- seconds ago (Asynq keeps archived tasks for 90 days), with their unique locks.
WITH gone AS (
    DELETE FROM pgq.task t
    WHERE t.id IN (
        SELECT a.id FROM pgq.task a
        WHERE a.state = 'archived'
          AND a.last_failed_at < coalesce(%(now)s::timestamptz, now()) - %(max_age)s * interval '1 second'
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
      AND t.state = 'archived'
    RETURNING t.id, t.queue, t.unique_key
),
unlocked AS (
    DELETE FROM pgq.unique_lock u USING gone g
    WHERE g.unique_key IS NOT NULL AND u.queue = g.queue AND u.key = g.unique_key AND u.task = g.id
)
SELECT count(*) AS deleted FROM gone;

-- name: server_clean_stale
-- returns: one
-- Delete server rows whose heartbeat is older than %(max_age)s seconds.
WITH gone AS (
    DELETE FROM pgq.server s
    WHERE s.heartbeat_at < coalesce(%(now)s::timestamptz, now()) - %(max_age)s * interval '1 second'
    RETURNING 1
)
SELECT count(*) AS deleted FROM gone;

-- name: stat_clean_old
-- returns: one
-- Delete daily counts older than %(max_age)s seconds (a year by default).
WITH gone AS (
    DELETE FROM pgq.stat_daily s
    WHERE s.day < (coalesce(%(now)s::timestamptz, now()) - %(max_age)s * interval '1 second')::date
    RETURNING 1
)
SELECT count(*) AS deleted FROM gone;
