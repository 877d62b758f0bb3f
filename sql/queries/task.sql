-- Queries on pgq.task used by the Client (enqueue) and shared lookups.
-- Conventions: parameters are named and always bound; `now` defaults to the
-- database clock; names of queues, groups and types are values, never SQL.

-- name: task_enqueue
-- returns: many
-- Insert tasks given as parallel arrays, in input order. Handles unique= locks
-- (a row is skipped when its lock is held), queue rows, group arrivals and the
-- wake-up NOTIFY for the queues in %(notify)s, all in one statement.
WITH input AS (
    SELECT i.ord, i.task_id, i.queue, i.type, i.payload::jsonb AS payload,
           i.headers::jsonb AS headers, i.group_key, i.max_retry,
           i.timeout * interval '1 second' AS timeout, i.deadline,
           i.retention * interval '1 second' AS retention, i.unique_ttl,
           coalesce(statement_timestamp() + i.process_in * interval '1 second',
                    i.process_at, statement_timestamp()) AS run_at
    FROM unnest(%(task_id)s::text[], %(queue)s::text[], %(type)s::text[], %(payload)s::text[],
                %(headers)s::text[], %(group_key)s::text[], %(max_retry)s::int[],
                %(timeout)s::float8[], %(deadline)s::timestamptz[], %(retention)s::float8[],
                %(unique_ttl)s::float8[], %(process_at)s::timestamptz[], %(process_in)s::float8[])
         WITH ORDINALITY AS i(task_id, queue, type, payload, headers, group_key, max_retry, timeout,
                              deadline, retention, unique_ttl, process_at, process_in, ord)
),
numbered AS (
    SELECT input.*, nextval(pg_get_serial_sequence('pgq.task', 'id')) AS id,
           CASE WHEN unique_ttl IS NOT NULL
                THEN md5(type || chr(31) || payload::text) END AS unique_key
    FROM input ORDER BY ord
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
    SELECT n.id, n.task_id, n.queue, n.type, n.payload, n.headers,
           CASE WHEN n.run_at > statement_timestamp() THEN 'scheduled'
                WHEN n.group_key IS NOT NULL THEN 'aggregating'
                ELSE 'pending' END,
           n.group_key, n.max_retry, n.timeout, n.deadline, n.retention, n.unique_key,
           statement_timestamp(), greatest(n.run_at, statement_timestamp())
    FROM numbered n
    WHERE n.unique_key IS NULL OR n.id IN (SELECT task FROM locked)
    ORDER BY n.id
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

-- name: task_notify
-- returns: none
-- A wake-up for queues whose enqueue skipped its NOTIFY (debounced).
SELECT count(pg_notify('pgq_wake', q)) FROM unnest(%(queues)s::text[]) AS q;
