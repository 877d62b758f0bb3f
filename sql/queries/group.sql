-- Queries of the aggregator (pgq/services/aggregator.py; its docstring has the
-- design). pgq.task_group is a per-group summary that only steers the due
-- check; every aggregation re-reads, locks and deletes the member rows
-- themselves, so a stale summary can delay work but never lose or duplicate a
-- member. Times compare against coalesce(%(now)s, now()): tests pin the clock.

-- name: group_fold_arrivals
-- returns: one
-- Move up to %(limit)s arrival rows into the per-group summary, additively
-- (size += n, oldest = least, newest = greatest): commutative, so folders may
-- run concurrently; SKIP LOCKED splits the arrivals between them. Summary rows
-- are written in (queue, group_key) order, the order every locker uses.
WITH batch AS (
    SELECT ctid FROM pgq.group_arrival LIMIT %(limit)s FOR UPDATE SKIP LOCKED
),
gone AS (
    -- a join, not ctid = ANY(ARRAY(...)): that filter is a linear search per row
    DELETE FROM pgq.group_arrival a USING batch b
    WHERE a.ctid = b.ctid
    RETURNING a.queue, a.group_key, a.size, a.oldest_at, a.newest_at
),
summed AS (
    SELECT queue, group_key, sum(size)::int AS size, min(oldest_at) AS oldest_at,
           max(newest_at) AS newest_at
    FROM gone GROUP BY queue, group_key
),
up AS (
    INSERT INTO pgq.task_group AS g (queue, group_key, size, oldest_at, newest_at)
    SELECT queue, group_key, size, oldest_at, newest_at FROM summed ORDER BY queue, group_key
    ON CONFLICT (queue, group_key) DO UPDATE
    SET size = g.size + excluded.size,
        oldest_at = least(g.oldest_at, excluded.oldest_at),
        newest_at = greatest(g.newest_at, excluded.newest_at)
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone)::int AS arrivals, (SELECT count(*) FROM up)::int AS groups;

-- name: group_due
-- returns: many
-- Groups whose summary says they are due, per queue with that queue's policy
-- (parallel arrays; grace and max_delay in seconds, NULL max_delay/max_size:
-- no limit). Each arm is a range scan of one task_group index that stops at
-- the first group not due, so the cost follows the due groups, not the
-- members or groups waiting (G13). Groups backing off after a failed
-- aggregation (retry_at in the future) are left out. Oldest due first.
SELECT d.queue, d.group_key, d.size, d.due_at
FROM unnest(%(queue)s::text[], %(grace)s::float8[], %(max_delay)s::float8[], %(max_size)s::int[])
     AS p(queue, grace, max_delay, max_size)
CROSS JOIN LATERAL (
    SELECT u.queue, u.group_key, max(u.size) AS size, min(u.due_at) AS due_at
    FROM (
        (SELECT g.queue, g.group_key, g.size, g.newest_at AS due_at FROM pgq.task_group g
         WHERE g.queue = p.queue
           AND g.newest_at <= coalesce(%(now)s::timestamptz, now()) - p.grace * interval '1 second'
           AND (g.retry_at IS NULL OR g.retry_at <= coalesce(%(now)s::timestamptz, now()))
         ORDER BY g.newest_at LIMIT %(limit)s)
        UNION ALL
        (SELECT g.queue, g.group_key, g.size, g.oldest_at FROM pgq.task_group g
         WHERE g.queue = p.queue AND p.max_delay IS NOT NULL
           AND g.oldest_at <= coalesce(%(now)s::timestamptz, now()) - p.max_delay * interval '1 second'
           AND (g.retry_at IS NULL OR g.retry_at <= coalesce(%(now)s::timestamptz, now()))
         ORDER BY g.oldest_at LIMIT %(limit)s)
        UNION ALL
        (SELECT g.queue, g.group_key, g.size, g.oldest_at FROM pgq.task_group g
         WHERE g.queue = p.queue AND p.max_size IS NOT NULL AND g.size >= p.max_size
           AND (g.retry_at IS NULL OR g.retry_at <= coalesce(%(now)s::timestamptz, now()))
         ORDER BY g.size DESC LIMIT %(limit)s)
    ) u
    GROUP BY u.queue, u.group_key
) d
ORDER BY d.due_at, d.queue, d.group_key
LIMIT %(limit)s;

-- name: group_next_due
-- returns: one
-- Seconds from now until the earliest moment a group of these queues becomes
-- due by its summary (<= 0: due now; NULL: no group waits). Index endpoint
-- lookups only, plus the few groups backing off after an error (partial index).
SELECT extract(epoch FROM min(n.at) - coalesce(%(now)s::timestamptz, now()))::float8 AS wait
FROM unnest(%(queue)s::text[], %(grace)s::float8[], %(max_delay)s::float8[], %(max_size)s::int[])
     AS p(queue, grace, max_delay, max_size)
CROSS JOIN LATERAL (
    SELECT (SELECT g.newest_at FROM pgq.task_group g
            WHERE g.queue = p.queue AND g.retry_at IS NULL
            ORDER BY g.newest_at LIMIT 1) + p.grace * interval '1 second' AS at
    UNION ALL
    SELECT (SELECT g.oldest_at FROM pgq.task_group g
            WHERE g.queue = p.queue AND g.retry_at IS NULL AND p.max_delay IS NOT NULL
            ORDER BY g.oldest_at LIMIT 1) + p.max_delay * interval '1 second'
    UNION ALL
    SELECT (SELECT coalesce(%(now)s::timestamptz, now()) FROM pgq.task_group g
            WHERE g.queue = p.queue AND g.retry_at IS NULL AND p.max_size IS NOT NULL
              AND g.size >= p.max_size
            ORDER BY g.size DESC LIMIT 1)
    UNION ALL
    SELECT min(greatest(g.retry_at,
                        least(g.newest_at + p.grace * interval '1 second',
                              g.oldest_at + p.max_delay * interval '1 second',
                              CASE WHEN g.size >= p.max_size THEN g.retry_at END)))
    FROM pgq.task_group g
    WHERE g.queue = p.queue AND g.retry_at IS NOT NULL
) n;

-- name: group_lock
-- returns: many
-- Inside the aggregation transaction: lock the summary rows of the candidate
-- groups, in (queue, group_key) order, each by a primary-key lookup (a join
-- would scan the whole task_group). SKIP LOCKED: a group another aggregator
-- holds is left to it (so an aggregator never waits on a row lock). This row lock is the per-group mutex between aggregators and folds of
-- these rows wait for it; the back-off is re-checked under the lock. `now` is
-- the time the caller checks the rules at.
SELECT g.queue, g.group_key, g.errors, coalesce(%(now)s::timestamptz, now()) AS now
FROM (SELECT DISTINCT queue, group_key FROM unnest(%(queue)s::text[], %(group_key)s::text[])
          AS c(queue, group_key)
      ORDER BY queue, group_key) c
CROSS JOIN LATERAL (
    SELECT g.queue, g.group_key, g.errors
    FROM pgq.task_group g
    WHERE g.queue = c.queue AND g.group_key = c.group_key
      AND (g.retry_at IS NULL OR g.retry_at <= coalesce(%(now)s::timestamptz, now()))
    FOR UPDATE SKIP LOCKED
) g
ORDER BY c.queue, c.group_key;

-- name: group_members
-- returns: one
-- The first %(cap)s members of each group locked by group_lock (NULL cap: all),
-- in enqueue order (G5), as ONE JSON document: an array of
-- [group ordinal (1-based position in the arrays), id, task_id, type, payload,
-- headers, max_retry, retried, enqueued_at, ctid]. One document decodes in a single
-- C call, far cheaper than a row and a jsonb value per member (payloads are
-- embedded as they are stored, so they decode as psycopg would decode them;
-- enqueued_at is ISO 8601 with microseconds and the session's offset).
-- Its own statement, so its snapshot is taken after the summary locks:
-- members another aggregator removed before we got the lock are not seen. No
-- row locks on members: the summary lock keeps other aggregators away, and
-- group_delete_members checks that every member read here is still
-- 'aggregating' (anything else removed one, say the inspector: the batch
-- rolls back).
SELECT json_agg(json_build_array(c.ord, m.id, m.task_id, m.type, m.payload, m.headers,
                                 m.max_retry, m.retried, m.enqueued_at, m.ctid)
                ORDER BY c.ord, m.enqueued_at, m.id)::text AS members
FROM unnest(%(queue)s::text[], %(group_key)s::text[], %(cap)s::int[]) WITH ORDINALITY
     AS c(queue, group_key, cap, ord)
CROSS JOIN LATERAL (
    SELECT t.id, t.task_id, t.type, t.payload, t.headers, t.max_retry, t.retried, t.enqueued_at,
           t.ctid
    FROM pgq.task t
    WHERE t.queue = c.queue AND t.group_key = c.group_key AND t.state = 'aggregating'
    ORDER BY t.enqueued_at, t.id
    LIMIT c.cap
) m;

-- name: group_insert_aggregates
-- returns: many
-- Insert aggregated tasks, given as one JSON array of objects (%(rows)s: the
-- fields of pgq.client.build_params, queue forced to the group's queue and no
-- group, so never 'aggregating'; payload and headers as JSON text; members:
-- the member ids, the lineage). One JSON document is far cheaper to send than
-- a dozen text arrays. Like task_enqueue: unique= locks (a row whose lock is
-- held is skipped and missing from the result), queue rows, and one NOTIFY
-- per queue in %(notify)s; the day's aggregation counts in stat_daily. Rows
-- come back in input order.
WITH input AS (
    SELECT i.ord, i.task_id, i.queue, i.type, i.payload::jsonb AS payload,
           i.headers::jsonb AS headers, i.max_retry,
           i.timeout * interval '1 second' AS timeout, i.deadline,
           i.retention * interval '1 second' AS retention, i.unique_ttl,
           ARRAY(SELECT jsonb_array_elements_text(i.members)) AS members,
           coalesce(statement_timestamp() + i.process_in * interval '1 second',
                    i.process_at, statement_timestamp()) AS run_at
    FROM ROWS FROM (jsonb_to_recordset(%(rows)s::jsonb) AS (
             task_id text, queue text, type text, payload text, headers text, max_retry int,
             timeout float8, deadline timestamptz, retention float8, unique_ttl float8,
             process_at timestamptz, process_in float8, members jsonb))
         WITH ORDINALITY AS i(task_id, queue, type, payload, headers, max_retry, timeout, deadline,
                              retention, unique_ttl, process_at, process_in, members, ord)
),
numbered AS (
    SELECT input.*, nextval('pgq.task_id_seq') AS id,
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
                          timeout, deadline, retention, unique_key, enqueued_at, run_at, members)
    OVERRIDING SYSTEM VALUE
    SELECT n.id, n.task_id, n.queue, n.type, n.payload, n.headers,
           CASE WHEN n.run_at > statement_timestamp() THEN 'scheduled' ELSE 'pending' END,
           NULL, n.max_retry, n.timeout, n.deadline, n.retention, n.unique_key,
           statement_timestamp(), greatest(n.run_at, statement_timestamp()), n.members
    FROM numbered n
    WHERE n.unique_key IS NULL OR n.id IN (SELECT task FROM locked)
    ORDER BY n.id
    RETURNING id, task_id, queue, state, cardinality(members) AS members
),
stats AS (
    INSERT INTO pgq.stat_daily AS s (queue, day, aggregated, aggregated_members)
    SELECT queue, now()::date, count(*), sum(members) FROM ins GROUP BY queue
    ON CONFLICT (queue, day) DO UPDATE
        SET aggregated = s.aggregated + excluded.aggregated,
            aggregated_members = s.aggregated_members + excluded.aggregated_members
)
SELECT ins.id, ins.task_id, ins.queue, ins.state,
       (SELECT count(pg_notify('pgq_wake', q)) FROM unnest(%(notify)s::text[]) AS q) AS notified
FROM ins ORDER BY ins.id;

-- name: group_delete_members
-- returns: one
-- Remove aggregated members and release their unique= locks. %(tids)s: the
-- members' row addresses as group_members read them, a tid array literal
-- ('{"(0,1)","(0,2)"}'); %(ids)s: their ids, a bigint array literal. Deleting
-- by address (a TID scan) costs half of an index probe per member. Every one
-- must still be 'aggregating' and still be the row read: the caller checks
-- deleted = matched = the number sent and rolls back otherwise. A row updated
-- or deleted meanwhile is not at its address any more (or waits for the other
-- writer and is then left out); a slot reused by another row is deleted but
-- not matched by id, so the rollback undoes it.
WITH gone AS (
    DELETE FROM pgq.task t
    WHERE t.ctid = ANY(%(tids)s::text::tid[]) AND t.state = 'aggregating'
    RETURNING t.id, t.queue, t.unique_key
),
unlocked AS (
    DELETE FROM pgq.unique_lock u USING gone
    WHERE gone.unique_key IS NOT NULL AND u.queue = gone.queue AND u.key = gone.unique_key
      AND u.task = gone.id
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone)::int AS deleted,
       (SELECT count(*) FROM gone JOIN unnest(%(ids)s::text::bigint[]) AS x(id) ON x.id = gone.id)::int
           AS matched,
       (SELECT count(*) FROM unlocked)::int AS unlocked;

-- name: group_refresh
-- returns: one
-- Set the summary rows of the groups this transaction holds locked. Per
-- group: %(taken)s members aggregated now; %(size)s, %(oldest_at)s,
-- %(newest_at)s the members left, when the caller knows them exactly (it read
-- every member of the group after taking the lock: every member whose arrival
-- was folded is among them, since a fold of this row commits before our lock
-- or waits for our commit); NULL size: recount them here (the caller read
-- only the first `cap`). A recount runs as its own statement after the lock
-- and the deletes, so its snapshot sees every member whose arrival has been
-- folded: the summary never undercounts. A recount is exact up to
-- %(count_cap)s members; beyond that the size stays an upper bound (old size -
-- taken). A group left empty loses its row. %(error)s the aggregator's error
-- (errors + 1, retry_at = now + %(hold)s s) or NULL; %(hold)s without an error
-- holds the group back that long (members skipped as locked by someone else).
WITH x AS (
    SELECT * FROM unnest(%(queue)s::text[], %(group_key)s::text[], %(taken)s::int[],
                         %(error)s::text[], %(hold)s::float8[], %(size)s::int[],
                         %(oldest_at)s::timestamptz[], %(newest_at)s::timestamptz[])
        AS x(queue, group_key, taken, error, hold, size, oldest_at, newest_at)
),
r AS (
    SELECT x.queue, x.group_key, x.taken, x.error, x.hold,
           coalesce(x.size, a.cnt) AS cnt,
           x.size IS NOT NULL OR a.cnt < %(count_cap)s AS exact,
           coalesce(x.oldest_at, a.oldest_at) AS oldest_at,
           CASE WHEN x.size IS NOT NULL THEN x.newest_at
                WHEN a.cnt < %(count_cap)s THEN a.newest_at
                ELSE (SELECT t.enqueued_at FROM pgq.task t
                      WHERE t.queue = x.queue AND t.group_key = x.group_key AND t.state = 'aggregating'
                      ORDER BY t.enqueued_at DESC, t.id DESC LIMIT 1) END AS newest_at
    FROM x
    CROSS JOIN LATERAL (
        SELECT count(*)::int AS cnt, min(s.enqueued_at) AS oldest_at, max(s.enqueued_at) AS newest_at
        FROM (SELECT t.enqueued_at FROM pgq.task t
              WHERE x.size IS NULL
                AND t.queue = x.queue AND t.group_key = x.group_key AND t.state = 'aggregating'
              ORDER BY t.enqueued_at, t.id LIMIT %(count_cap)s) s
    ) a
),
dropped AS (
    DELETE FROM pgq.task_group g USING r
    WHERE g.queue = r.queue AND g.group_key = r.group_key AND r.cnt = 0
    RETURNING 1
),
updated AS (
    UPDATE pgq.task_group g
    SET size = CASE WHEN r.exact THEN r.cnt ELSE greatest(g.size - r.taken, r.cnt) END,
        oldest_at = r.oldest_at,
        newest_at = r.newest_at,
        errors = CASE WHEN r.error IS NOT NULL THEN g.errors + 1 WHEN r.taken > 0 THEN 0 ELSE g.errors END,
        last_error = coalesce(r.error, g.last_error),
        last_error_at = CASE WHEN r.error IS NOT NULL THEN coalesce(%(now)s::timestamptz, now())
                             ELSE g.last_error_at END,
        retry_at = CASE WHEN r.hold IS NOT NULL
                        THEN coalesce(%(now)s::timestamptz, now()) + r.hold * interval '1 second' END
    FROM r
    WHERE g.queue = r.queue AND g.group_key = r.group_key AND r.cnt > 0
    RETURNING 1
)
SELECT (SELECT count(*) FROM dropped)::int AS dropped, (SELECT count(*) FROM updated)::int AS updated;

-- name: group_record_error
-- returns: one
-- A failed aggregation, recorded in a short transaction of its own after the
-- aggregation rolled back: errors + 1, the error text, and a back-off of
-- backoff_base * 2^errors seconds, at most backoff_max.
UPDATE pgq.task_group g
SET errors = g.errors + 1, last_error = %(error)s,
    last_error_at = coalesce(%(now)s::timestamptz, now()),
    retry_at = coalesce(%(now)s::timestamptz, now())
               + least(%(backoff_max)s::float8, %(backoff_base)s::float8 * 2 ^ least(g.errors, 30))
                 * interval '1 second'
WHERE g.queue = %(queue)s AND g.group_key = %(group_key)s
RETURNING g.errors;

-- name: group_leader_elect
-- returns: many
-- On the leader's own session: try the per-queue aggregation leadership
-- (session advisory lock, two int4 keys hashed from %(ns)s, which names the
-- schema, and the queue)
-- of the queues not yet held; returns those won. A dead session frees them.
SELECT q.name AS queue
FROM unnest(%(queues)s::text[]) AS q(name)
WHERE pg_try_advisory_lock(hashtext(%(ns)s || q.name), hashtext(q.name || %(ns)s));

-- name: group_leader_resign
-- returns: many
-- Give up the leadership of these queues (graceful shutdown).
SELECT q.name AS queue
FROM unnest(%(queues)s::text[]) AS q(name)
WHERE pg_advisory_unlock(hashtext(%(ns)s || q.name), hashtext(q.name || %(ns)s));

-- name: group_analyze
-- returns: none
-- Refresh the planner's statistics of task_group after a large fold, so the
-- due check and next-due lookups keep their index plans (a freshly filled
-- table looks tiny to the planner until autovacuum analyzes it).
ANALYZE pgq.task_group;
