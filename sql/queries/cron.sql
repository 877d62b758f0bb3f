-- Queries of the periodic-task Scheduler (pgq/scheduler.py) and `pgq cron`.
-- Conventions: parameters are named and always bound; `now` defaults to the
-- database clock (tests pin it).

-- name: cron_now
-- returns: one
-- The clock every tick decision uses.
SELECT coalesce(%(now)s::timestamptz, now()) AS now;

-- name: cron_entry_upsert
-- returns: many
-- Record the entries a scheduler runs (arrays, one element per entry) and mark
-- them seen. created_at is kept: it tells 'latest' catch-up which ticks the
-- entry existed for. Returns each entry's newest recorded tick.
WITH input AS (
    SELECT * FROM unnest(%(id)s::text[], %(spec)s::text[], %(location)s::text[], %(type)s::text[],
                         %(payload)s::text[], %(headers)s::text[], %(options)s::text[], %(missed)s::text[])
         AS i(id, spec, location, type, payload, headers, options, missed)
),
up AS (
    INSERT INTO pgq.cron_entry AS e (id, spec, location, type, payload, headers, options, missed,
                                     created_at, seen_at)
    SELECT id, spec, location, type, payload::jsonb, headers::jsonb, options::jsonb, missed,
           coalesce(%(now)s::timestamptz, now()), coalesce(%(now)s::timestamptz, now())
    FROM input
    ON CONFLICT (id) DO UPDATE
        SET spec = excluded.spec, location = excluded.location, type = excluded.type,
            payload = excluded.payload, headers = excluded.headers, options = excluded.options,
            missed = excluded.missed, seen_at = excluded.seen_at
    RETURNING e.id, e.created_at
)
SELECT up.id, up.created_at,
       (SELECT max(t.tick_at) FROM pgq.cron_tick t WHERE t.entry_id = up.id) AS last_tick_at
FROM up;

-- name: cron_entry_delete
-- returns: none
DELETE FROM pgq.cron_entry WHERE id = %(id)s;

-- name: cron_tick_claim
-- returns: one
-- Claim one tick of one entry: inserts its row unless the tick, or a later tick
-- of the entry, is already recorded. A row back means this transaction owns the
-- tick and must enqueue its task before committing; no row: someone else did.
INSERT INTO pgq.cron_tick (entry_id, tick_at, enqueued_at, queue)
SELECT %(entry_id)s, %(tick_at)s, coalesce(%(now)s::timestamptz, now()), %(queue)s
WHERE NOT EXISTS (SELECT 1 FROM pgq.cron_tick
                  WHERE entry_id = %(entry_id)s AND tick_at >= %(tick_at)s)
ON CONFLICT (entry_id, tick_at) DO NOTHING
RETURNING entry_id, tick_at;

-- name: cron_tick_set_task
-- returns: none
UPDATE pgq.cron_tick SET task_id = %(task_id)s
WHERE entry_id = %(entry_id)s AND tick_at = %(tick_at)s;

-- name: cron_tick_prune
-- returns: one
-- Keep the newest %(keep)s ticks of each entry and nothing older than
-- %(max_age)s seconds, except each entry's newest tick (it stops a late scheduler
-- from enqueueing an older tick again). Ticks of entries that no longer exist go
-- once they are older than %(max_age)s.
WITH ranked AS (
    SELECT t.entry_id, t.tick_at,
           row_number() OVER (PARTITION BY t.entry_id ORDER BY t.tick_at DESC) AS rn,
           EXISTS (SELECT 1 FROM pgq.cron_entry e WHERE e.id = t.entry_id) AS live
    FROM pgq.cron_tick t
),
gone AS (
    DELETE FROM pgq.cron_tick t USING ranked r
    WHERE t.entry_id = r.entry_id AND t.tick_at = r.tick_at
      AND (r.rn > %(keep)s
           OR ((r.rn > 1 OR NOT r.live)
               AND t.tick_at < coalesce(%(now)s::timestamptz, now()) - %(max_age)s * interval '1 second'))
    RETURNING 1
)
SELECT count(*) AS deleted FROM gone;

-- name: cron_entry_list
-- returns: many
-- Every entry with its newest tick, for `pgq cron ls`.
SELECT e.id, e.spec, e.location, e.type, e.payload, e.headers, e.options, e.missed,
       e.created_at, e.seen_at, t.tick_at AS last_tick_at, t.task_id AS last_task_id,
       coalesce(%(now)s::timestamptz, now()) AS now
FROM pgq.cron_entry e
LEFT JOIN LATERAL (SELECT tick_at, task_id FROM pgq.cron_tick
                   WHERE entry_id = e.id ORDER BY tick_at DESC LIMIT 1) t ON true
ORDER BY e.id;

-- name: cron_tick_history
-- returns: many
-- The newest ticks of one entry, newest first, with the state of their task if it still exists.
SELECT t.entry_id, t.tick_at, t.enqueued_at, t.task_id, t.queue, k.state
FROM pgq.cron_tick t
LEFT JOIN LATERAL (
    SELECT s.state FROM pgq.task s
    WHERE s.id = CASE WHEN t.task_id ~ '^[0-9]+$' THEN t.task_id::bigint END
    LIMIT 1
) k ON true
WHERE t.entry_id = %(entry_id)s
ORDER BY t.tick_at DESC
LIMIT %(limit)s;

-- name: cron_entry_exists
-- returns: one
SELECT EXISTS (SELECT 1 FROM pgq.cron_entry WHERE id = %(id)s) AS exists;
