-- pgq: the canonical schema. Read this file to learn the data model.
--
-- `pgq migrate` builds the same schema from sql/migrations/*.sql; a test
-- (tests/integration/test_migrate.py) proves that the two are identical.
-- The schema name `pgq` is substituted at load time when another is configured.
--
-- Time: every timestamp comes from the database clock (now(), statement_timestamp()).

CREATE SCHEMA IF NOT EXISTS pgq;

-- The checked values of a task row, as domains (migration 0003): PostgreSQL
-- caches a domain's checks, where it rebuilds a table's CHECK expressions for
-- every statement, which one-row INSERTs and UPDATEs paid for.
CREATE DOMAIN pgq.task_state AS text CONSTRAINT task_state_check CHECK (VALUE IN
    ('pending', 'scheduled', 'retry', 'active', 'aggregating', 'completed', 'archived'));
CREATE DOMAIN pgq.retry_count AS integer CONSTRAINT task_retry_check CHECK (VALUE >= 0);
CREATE DOMAIN pgq.payload AS jsonb CONSTRAINT task_payload_size_check
    CHECK (pg_column_size(VALUE) <= 16777216);

-- One row per task, whatever its state. Completed tasks without retention are
-- deleted at once, aggregated members are deleted when their aggregate is
-- inserted, so the table holds the live queue plus retained/archived history.
CREATE TABLE pgq.task (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id          text,          -- a caller-chosen id (enqueue task_id=); NULL: the id is str(id)
    queue            text NOT NULL,
    type             text NOT NULL,
    payload          pgq.payload NOT NULL,
    headers          jsonb,
    state            pgq.task_state NOT NULL,
    group_key        text,          -- aggregation group (G1); kept on scheduled tasks for inspection
    max_retry        pgq.retry_count NOT NULL DEFAULT 25,
    retried          pgq.retry_count NOT NULL DEFAULT 0,   -- retries counted so far
    attempt          integer NOT NULL DEFAULT 0,   -- claims so far: the fencing token of a lease
    timeout          interval,
    deadline         timestamptz,
    retention        interval,
    unique_key       text,          -- set when enqueued with unique=; see pgq.unique_lock
    enqueued_at      timestamptz NOT NULL DEFAULT statement_timestamp(),
    run_at           timestamptz NOT NULL DEFAULT statement_timestamp(),  -- next_process_at
    started_at       timestamptz,
    lease_expires_at timestamptz,
    locked_by        text,          -- worker id (host:pid:random) holding the lease
    last_error       text,
    last_failed_at   timestamptz,
    completed_at     timestamptz,
    expires_at       timestamptz,   -- completed_at + retention: the cleaner deletes after it
    result           jsonb,
    members          text[],        -- lineage: ids of the members aggregated into this task
    CONSTRAINT task_group_check CHECK (state <> 'aggregating' OR group_key IS NOT NULL)
) WITH (fillfactor = 90, autovacuum_vacuum_scale_factor = 0.01,
        autovacuum_analyze_scale_factor = 0.02);

-- Claim: ready tasks of a queue, oldest due first (pending, and scheduled/retry once due).
CREATE INDEX task_ready_idx ON pgq.task (queue, run_at, id)
    WHERE state IN ('pending', 'scheduled', 'retry');
-- Recovery: active tasks whose lease expired.
CREATE INDEX task_active_idx ON pgq.task (lease_expires_at) WHERE state = 'active';
-- Aggregation: members of a group in enqueue order (G5), and group listings.
CREATE INDEX task_aggregating_idx ON pgq.task (queue, group_key, enqueued_at, id)
    WHERE state = 'aggregating';
-- Caller-chosen ids are unique within a queue (TaskIDConflictError).
CREATE UNIQUE INDEX task_task_id_idx ON pgq.task (queue, task_id) WHERE task_id IS NOT NULL;
-- Cleaner: completed tasks past retention, archived tasks past the archive horizon.
CREATE INDEX task_expires_idx ON pgq.task (expires_at) WHERE state = 'completed';
CREATE INDEX task_archived_idx ON pgq.task (queue, last_failed_at) WHERE state = 'archived';
-- Lineage (G8): member id -> aggregated task (pgq.aggregate_of_member, dashboards).
CREATE INDEX task_members_idx ON pgq.task USING gin (members) WHERE members IS NOT NULL;
-- Joint statistics of (queue, state): the dashboard views estimate big counts from them.
CREATE STATISTICS pgq.task_queue_state_stats (mcv) ON queue, state FROM pgq.task;

-- Queues: a row per queue ever enqueued to; the pause flag.
CREATE TABLE pgq.queue (
    name       text PRIMARY KEY,
    paused     boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- unique=ttl: a lock on (queue, type, payload) held by one task until it is
-- completed, aggregated or deleted, or until the TTL ends. Index-backed: two
-- concurrent enqueues of the same key serialise on the primary key.
CREATE TABLE pgq.unique_lock (
    queue      text NOT NULL,
    key        text NOT NULL,
    task       bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (queue, key)
);

-- Daily counts per queue: processed (successes and failures), failed, and the
-- aggregations made (aggregated tasks inserted, and the members they took).
CREATE TABLE pgq.stat_daily (
    queue     text NOT NULL,
    day       date NOT NULL,
    processed bigint NOT NULL DEFAULT 0,
    failed    bigint NOT NULL DEFAULT 0,
    aggregated bigint NOT NULL DEFAULT 0,
    aggregated_members bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, day)
);

-- Aggregation bookkeeping (see pgq/services/aggregator.py for the design).
-- Every grouped enqueue appends one row per (queue, group) to group_arrival in
-- its own transaction; no row is shared between enqueuers (G12). Aggregators
-- fold arrivals into task_group, a per-group summary that makes the due check
-- cost proportional to due groups (G13). task_group is a hint: every
-- aggregation re-reads the members themselves.
CREATE TABLE pgq.group_arrival (
    queue     text NOT NULL,
    group_key text NOT NULL,
    size      integer NOT NULL,
    oldest_at timestamptz NOT NULL,
    newest_at timestamptz NOT NULL
) WITH (autovacuum_vacuum_scale_factor = 0.01);

CREATE TABLE pgq.task_group (
    queue       text NOT NULL,
    group_key   text NOT NULL,
    size        integer NOT NULL,       -- an upper bound of the members waiting
    oldest_at   timestamptz NOT NULL,   -- a lower bound of the oldest member's enqueue time
    newest_at   timestamptz NOT NULL,   -- the newest member's enqueue time
    retry_at    timestamptz,            -- after a failed aggregation: not before this time
    errors      integer NOT NULL DEFAULT 0,
    last_error  text,
    last_error_at timestamptz,
    PRIMARY KEY (queue, group_key)
);
CREATE INDEX task_group_newest_idx ON pgq.task_group (queue, newest_at);
CREATE INDEX task_group_oldest_idx ON pgq.task_group (queue, oldest_at);
CREATE INDEX task_group_size_idx ON pgq.task_group (queue, size);
CREATE INDEX task_group_retry_idx ON pgq.task_group (queue, retry_at) WHERE retry_at IS NOT NULL;

-- Periodic tasks (see pgq/scheduler.py for the design). Every scheduler that runs
-- an entry upserts its row and refreshes seen_at; `pgq cron ls` reads it.
CREATE TABLE pgq.cron_entry (
    id          text PRIMARY KEY,       -- derived from spec, location, type, payload, options; or named
    spec        text NOT NULL,          -- '*/5 * * * *', '@every 30s', '@daily', ...
    location    text NOT NULL,          -- IANA time zone of the spec's fields
    type        text NOT NULL,
    payload     jsonb NOT NULL,
    headers     jsonb,
    options     jsonb NOT NULL DEFAULT '{}',  -- enqueue options (durations in seconds)
    missed      text NOT NULL DEFAULT 'skip', -- after downtime: 'skip' or 'latest'
    created_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now()   -- last refreshed by a running scheduler
);

-- One row per enqueued tick. Its key is the exactly-once guarantee: a tick is
-- enqueued in the transaction that inserts its row, so two schedulers can never
-- both enqueue one tick. Pruned to the newest ticks of each entry.
CREATE TABLE pgq.cron_tick (
    entry_id    text NOT NULL,
    tick_at     timestamptz NOT NULL,   -- the scheduled instant
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    task_id     text,                   -- the task's public id; NULL when a unique= lock skipped it
    queue       text NOT NULL,
    PRIMARY KEY (entry_id, tick_at)
);

-- Servers write a heartbeat row; the inspector lists them with their active tasks.
CREATE TABLE pgq.server (
    id           text PRIMARY KEY,      -- host:pid:random, unique per process start
    host         text NOT NULL,
    pid          integer NOT NULL,
    queues       jsonb NOT NULL,
    concurrency  integer NOT NULL,
    strict_priority boolean NOT NULL DEFAULT false,
    status       text NOT NULL DEFAULT 'active',
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    -- {queue: {"grace_period": s, "max_delay": s or null, "max_size": n or null}}
    -- for each queue the server aggregates (migration 0002)
    group_policies jsonb NOT NULL DEFAULT '{}'::jsonb
);

-- pgq.enqueue: enqueue from SQL (triggers, other languages). Returns the task's id.
CREATE FUNCTION pgq.enqueue(
    queue text,
    type text,
    payload jsonb DEFAULT 'null'::jsonb,
    group_key text DEFAULT NULL,
    max_retry integer DEFAULT 25,
    process_in interval DEFAULT NULL,
    process_at timestamptz DEFAULT NULL,
    headers jsonb DEFAULT NULL,
    task_id text DEFAULT NULL,
    timeout interval DEFAULT NULL,
    deadline timestamptz DEFAULT NULL,
    retention interval DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
-- SECURITY DEFINER: a role may enqueue with EXECUTE on this function alone and no
-- table privileges (sql/roles.sql, docs/security.md); search_path is pinned.
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    v_now timestamptz := statement_timestamp();
    v_run timestamptz;
    v_state text;
    v_id bigint;
BEGIN
    IF queue IS NULL OR queue !~ '\S' THEN
        RAISE EXCEPTION 'pgq.enqueue: queue must not be blank' USING ERRCODE = '22023';
    END IF;
    IF type IS NULL OR type !~ '\S' THEN
        RAISE EXCEPTION 'pgq.enqueue: type must not be blank' USING ERRCODE = '22023';
    END IF;
    IF group_key IS NOT NULL AND group_key !~ '\S' THEN
        RAISE EXCEPTION 'pgq.enqueue: group must not be blank' USING ERRCODE = '22023';
    END IF;
    IF length(queue) > 255 OR length(type) > 255 OR length(group_key) > 255 OR length(task_id) > 255 THEN
        RAISE EXCEPTION 'pgq.enqueue: names are limited to 255 characters' USING ERRCODE = '22023';
    END IF;
    IF max_retry IS NULL OR max_retry < 0 THEN
        RAISE EXCEPTION 'pgq.enqueue: max_retry must be >= 0' USING ERRCODE = '22023';
    END IF;
    IF process_in IS NOT NULL AND process_at IS NOT NULL THEN
        RAISE EXCEPTION 'pgq.enqueue: give process_in or process_at, not both' USING ERRCODE = '22023';
    END IF;
    IF task_id ~ '^[0-9]+$' THEN
        RAISE EXCEPTION 'pgq.enqueue: task_id must not be all digits (reserved for generated ids)'
            USING ERRCODE = '22023';
    END IF;
    IF task_id IS NOT NULL AND task_id !~ '\S' THEN
        RAISE EXCEPTION 'pgq.enqueue: task_id must not be blank' USING ERRCODE = '22023';
    END IF;
    IF process_in < interval '0' THEN
        RAISE EXCEPTION 'pgq.enqueue: process_in must not be negative, got %', process_in USING ERRCODE = '22023';
    END IF;
    IF timeout <= interval '0' THEN
        RAISE EXCEPTION 'pgq.enqueue: timeout must be positive, got %', timeout USING ERRCODE = '22023';
    END IF;
    IF retention < interval '0' THEN
        RAISE EXCEPTION 'pgq.enqueue: retention must not be negative, got %', retention USING ERRCODE = '22023';
    END IF;
    v_run := coalesce(v_now + process_in, process_at, v_now);
    v_state := CASE WHEN v_run > v_now THEN 'scheduled'
                    WHEN group_key IS NOT NULL THEN 'aggregating'
                    ELSE 'pending' END;
    INSERT INTO pgq.queue (name) VALUES (enqueue.queue) ON CONFLICT DO NOTHING;
    INSERT INTO pgq.task (task_id, queue, type, payload, headers, state, group_key, max_retry,
                          timeout, deadline, retention, enqueued_at, run_at)
    VALUES (enqueue.task_id, enqueue.queue, enqueue.type, coalesce(enqueue.payload, 'null'::jsonb),
            enqueue.headers, v_state, enqueue.group_key, enqueue.max_retry, enqueue.timeout,
            enqueue.deadline, enqueue.retention, v_now, greatest(v_run, v_now))
    ON CONFLICT (queue, task_id) WHERE task_id IS NOT NULL DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN  -- only a task_id conflict skips the insert
        RAISE EXCEPTION 'pgq.enqueue: a task with task_id % already exists in queue %',
            quote_literal(enqueue.task_id), quote_literal(enqueue.queue)
            USING ERRCODE = '23505', CONSTRAINT = 'task_task_id_idx';
    END IF;
    IF v_state = 'aggregating' THEN
        INSERT INTO pgq.group_arrival (queue, group_key, size, oldest_at, newest_at)
        VALUES (enqueue.queue, enqueue.group_key, 1, v_now, v_now);
    END IF;
    PERFORM pg_notify('pgq_wake', enqueue.queue);
    RETURN coalesce(enqueue.task_id, v_id::text);
END
$fn$;
REVOKE ALL ON FUNCTION pgq.enqueue(text, text, jsonb, text, integer, interval, timestamptz, jsonb,
                                  text, interval, timestamptz, interval) FROM PUBLIC;
