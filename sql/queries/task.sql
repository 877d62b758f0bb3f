-- Queries on pgq.task used by the Client (enqueue) and shared lookups.
-- Conventions: parameters are named and always bound; `now` defaults to the
-- database clock; names of queues, groups and types are values, never SQL.

-- name: task_enqueue
-- returns: many
-- Insert tasks given as parallel arrays, in input order (ids ascend with it). Handles
-- unique= locks (a row is skipped when its lock is held: the caller raises
-- DuplicateTaskError), queue rows, group arrivals and the wake-up NOTIFY for the
-- queues in %(notify)s, all in one statement. Arrays travel in binary (%(x)b): no
-- per-element quoting of JSON text. Returns one row per inserted task, in input order.
WITH expanded AS (
    -- payload has one element per task; any other column whose values are all equal
    -- may come as a one-element array (the Client sends it so): unnest pads it with
    -- NULLs and the CASE repeats its one value.
    SELECT i.payload,
           CASE WHEN cardinality(%(task_id)b::text[]) = 1 THEN (%(task_id)b::text[])[1] ELSE i.task_id END AS task_id,
           CASE WHEN cardinality(%(queue)b::text[]) = 1 THEN (%(queue)b::text[])[1] ELSE i.queue END AS queue,
           CASE WHEN cardinality(%(type)b::text[]) = 1 THEN (%(type)b::text[])[1] ELSE i.type END AS type,
           CASE WHEN cardinality(%(headers)b::text[]) = 1 THEN (%(headers)b::text[])[1] ELSE i.headers END AS headers,
           CASE WHEN cardinality(%(group_key)b::text[]) = 1 THEN (%(group_key)b::text[])[1] ELSE i.group_key END AS group_key,
           CASE WHEN cardinality(%(max_retry)b::int[]) = 1 THEN (%(max_retry)b::int[])[1] ELSE i.max_retry END AS max_retry,
           CASE WHEN cardinality(%(timeout)b::float8[]) = 1 THEN (%(timeout)b::float8[])[1] ELSE i.timeout END AS timeout,
           CASE WHEN cardinality(%(deadline)b::timestamptz[]) = 1 THEN (%(deadline)b::timestamptz[])[1] ELSE i.deadline END AS deadline,
           CASE WHEN cardinality(%(retention)b::float8[]) = 1 THEN (%(retention)b::float8[])[1] ELSE i.retention END AS retention,
           CASE WHEN cardinality(%(unique_ttl)b::float8[]) = 1 THEN (%(unique_ttl)b::float8[])[1] ELSE i.unique_ttl END AS unique_ttl,
           CASE WHEN cardinality(%(process_at)b::timestamptz[]) = 1 THEN (%(process_at)b::timestamptz[])[1] ELSE i.process_at END AS process_at,
           CASE WHEN cardinality(%(process_in)b::float8[]) = 1 THEN (%(process_in)b::float8[])[1] ELSE i.process_in END AS process_in
    FROM unnest(%(payload)b::text[], %(task_id)b::text[], %(queue)b::text[], %(type)b::text[],
                %(headers)b::text[], %(group_key)b::text[], %(max_retry)b::int[],
                %(timeout)b::float8[], %(deadline)b::timestamptz[], %(retention)b::float8[],
                %(unique_ttl)b::float8[], %(process_at)b::timestamptz[], %(process_in)b::float8[])
         AS i(payload, task_id, queue, type, headers, group_key, max_retry, timeout,
              deadline, retention, unique_ttl, process_at, process_in)
),
input AS (
    SELECT nextval('pgq.task_id_seq') AS id, i.task_id, i.queue, i.type,
           i.payload::jsonb AS payload, i.headers::jsonb AS headers, i.group_key, i.max_retry,
           i.timeout * interval '1 second' AS timeout, i.deadline,
           i.retention * interval '1 second' AS retention, i.unique_ttl,
           coalesce(statement_timestamp() + i.process_in * interval '1 second',
                    i.process_at, statement_timestamp()) AS run_at
    FROM expanded i
),
numbered AS (
    SELECT input.*,
           CASE WHEN unique_ttl IS NOT NULL THEN md5(type || chr(31) || payload::text) END AS unique_key,
           CASE WHEN run_at > statement_timestamp() THEN 'scheduled'
                WHEN group_key IS NOT NULL THEN 'aggregating'
                ELSE 'pending' END AS state
    FROM input
),
locked AS (
    INSERT INTO pgq.unique_lock AS u (queue, key, task, expires_at)
    SELECT queue, unique_key, id, statement_timestamp() + unique_ttl * interval '1 second'
    FROM numbered WHERE unique_key IS NOT NULL
    ON CONFLICT (queue, key) DO UPDATE SET task = excluded.task, expires_at = excluded.expires_at
        WHERE u.expires_at <= statement_timestamp()
    RETURNING u.task
),
queues AS (
    INSERT INTO pgq.queue (name) SELECT DISTINCT queue FROM numbered ON CONFLICT DO NOTHING
),
ins AS (
    INSERT INTO pgq.task (id, task_id, queue, type, payload, headers, state, group_key, max_retry,
                          timeout, deadline, retention, unique_key, enqueued_at, run_at)
    OVERRIDING SYSTEM VALUE
    SELECT n.id, n.task_id, n.queue, n.type, n.payload, n.headers, n.state, n.group_key,
           n.max_retry, n.timeout, n.deadline, n.retention, n.unique_key,
           statement_timestamp(), greatest(n.run_at, statement_timestamp())
    FROM numbered n
    WHERE n.unique_key IS NULL OR n.id IN (SELECT task FROM locked)
    RETURNING id, task_id, queue, state, group_key, enqueued_at, run_at
),
arrivals AS (
    INSERT INTO pgq.group_arrival (queue, group_key, size, oldest_at, newest_at)
    SELECT queue, group_key, count(*), min(enqueued_at), max(enqueued_at)
    FROM ins WHERE state = 'aggregating' GROUP BY queue, group_key
)
SELECT ins.id, ins.task_id, ins.queue, ins.state, ins.group_key, ins.enqueued_at, ins.run_at,
       (SELECT count(pg_notify('pgq_wake', q)) FROM unnest(%(notify)s::text[]) AS q) AS notified
FROM ins ORDER BY ins.id;

-- name: task_enqueue_plain
-- returns: one
-- The common single enqueue (no group, no unique): the same row as task_enqueue
-- builds, in a statement without the unnest, unique-lock and arrival steps, which
-- cost more than the insert itself for one row. Same parameters (scalars). The
-- Client runs a copy without the NOTIFY subquery when %(notify)s is empty.
WITH queues AS (
    INSERT INTO pgq.queue (name) VALUES (%(queue)s) ON CONFLICT DO NOTHING
)
INSERT INTO pgq.task (task_id, queue, type, payload, headers, state, max_retry, timeout, deadline,
                      retention, enqueued_at, run_at)
VALUES (%(task_id)s::text, %(queue)s::text, %(type)s::text, %(payload)s::jsonb, %(headers)s::jsonb,
        CASE WHEN coalesce(statement_timestamp() + %(process_in)s::float8 * interval '1 second',
                           %(process_at)s::timestamptz) > statement_timestamp()
             THEN 'scheduled' ELSE 'pending' END,
        %(max_retry)s::int, %(timeout)s::float8 * interval '1 second', %(deadline)s::timestamptz,
        %(retention)s::float8 * interval '1 second', statement_timestamp(),
        greatest(coalesce(statement_timestamp() + %(process_in)s::float8 * interval '1 second',
                          %(process_at)s::timestamptz), statement_timestamp()))
RETURNING id, task_id, queue, state, group_key, enqueued_at, run_at,
          (SELECT count(pg_notify('pgq_wake', q)) FROM unnest(%(notify)s::text[]) AS q) AS notified;

-- name: task_enqueue_lean
-- returns: one
-- The commonest enqueue of all: one task with no option but its queue and no
-- headers. Every other column takes its default (state pending, run_at and
-- enqueued_at the statement time, max_retry 25), so the statement binds three
-- values and returns two: on a fast commit the client's work per call is what
-- separates a queue from a plain INSERT. It wakes the queue's workers itself;
-- task_enqueue_lean_quiet is the same insert without the NOTIFY.
WITH queues AS (
    INSERT INTO pgq.queue (name) VALUES (%(queue)s) ON CONFLICT DO NOTHING
)
INSERT INTO pgq.task (queue, type, payload, state)
VALUES (%(queue)s::text, %(type)s::text, %(payload)s::jsonb, 'pending')
RETURNING id, enqueued_at, pg_notify('pgq_wake', %(queue)s::text) AS notified;

-- name: task_enqueue_lean_quiet
-- returns: one
-- task_enqueue_lean without the wake-up (notify=False, or debounced).
WITH queues AS (
    INSERT INTO pgq.queue (name) VALUES (%(queue)s) ON CONFLICT DO NOTHING
)
INSERT INTO pgq.task (queue, type, payload, state)
VALUES (%(queue)s::text, %(type)s::text, %(payload)s::jsonb, 'pending')
RETURNING id, enqueued_at;

-- name: task_copy_in
-- returns: none
-- enqueue_many's bulk path for tasks that need no unique lock and no schedule
-- (state pending, or aggregating with a group): COPY with ids taken beforehand by
-- task_reserve_ids; enqueued_at and run_at default to the COPY's statement time.
-- task_enqueue_copied then does what task_enqueue does besides the insert. The
-- column order is the one pgq/client.py's _CopyPlan.chunks writes.
COPY pgq.task (id, payload, queue, type, group_key, state, headers, task_id, max_retry, timeout,
               deadline, retention) FROM STDIN;

-- name: task_reserve_ids
-- returns: one
-- %(n)s ids for tasks about to be copied in, ascending, as one bigint[] (one value
-- to read, not %(n)s rows).
SELECT array_agg(nextval('pgq.task_id_seq')) FROM generate_series(1, %(n)s);

-- name: task_enqueue_copied
-- returns: one
-- After task_copy_in (same transaction): queue rows, group arrivals and the NOTIFY;
-- returns the enqueue time of the copied tasks (that of the first one, %(first_id)s).
WITH t AS (
    SELECT enqueued_at FROM pgq.task WHERE id = %(first_id)s
),
queues AS (
    INSERT INTO pgq.queue (name) SELECT unnest(%(queues)s::text[]) ON CONFLICT DO NOTHING
),
arrivals AS (
    INSERT INTO pgq.group_arrival (queue, group_key, size, oldest_at, newest_at)
    SELECT a.queue, a.group_key, a.size, t.enqueued_at, t.enqueued_at
    FROM unnest(%(arrival_queue)s::text[], %(arrival_group)s::text[], %(arrival_size)s::int[])
             AS a(queue, group_key, size),
         t
)
SELECT t.enqueued_at,
       (SELECT count(pg_notify('pgq_wake', q)) FROM unnest(%(notify)s::text[]) AS q) AS notified
FROM t;

-- name: task_notify
-- returns: none
-- A wake-up for queues whose enqueue skipped its NOTIFY (debounced).
SELECT count(pg_notify('pgq_wake', q)) FROM unnest(%(queues)s::text[]) AS q;
