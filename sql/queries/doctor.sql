-- Queries of `pgq doctor` (Inspector.doctor in pgq/inspector.py): what in the
-- cluster slows or blocks pgq. Everything here reads catalogs and statistics
-- views that every role may query; what a role without pg_read_all_stats (or
-- pg_monitor) cannot see comes back as NULL, and doctor says so. Ages are by
-- the database clock.

-- name: doctor_privileges
-- returns: one
-- Whether this session sees other roles' sessions in full (state, xact_start,
-- backend_xmin), and how many client sessions it cannot see.
SELECT pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') AS read_all_stats,
       current_user AS role,
       (SELECT count(*) FROM pg_stat_activity a
        WHERE a.pid <> pg_backend_pid() AND a.datid IS NOT NULL AND a.backend_type IS NULL
       ) AS hidden_sessions;

-- name: doctor_notify_queue
-- returns: one
-- The share of the shared NOTIFY queue in use (0..1). It is not trimmed while
-- a listener sits in a long transaction; when full, a notifying COMMIT fails.
SELECT pg_notification_queue_usage()::float8 AS usage;

-- name: doctor_transactions
-- returns: many
-- Open transactions of the cluster, this database's first, then oldest first
-- (up to %(limit)s): each one holds back the xmin horizon (vacuum) and, when
-- its session LISTENs, the trimming of the NOTIFY queue. Sessions this role
-- cannot see have NULL xact_start and are left out (doctor_privileges counts them).
SELECT a.pid,
       a.datname,
       a.usename,
       a.application_name,
       a.state,
       a.backend_type,
       a.datname = current_database() AS this_database,
       extract(epoch FROM now() - a.xact_start)::float8 AS xact_age_seconds,
       extract(epoch FROM now() - a.state_change)::float8 AS state_age_seconds,
       age(a.backend_xmin) AS xmin_age,
       a.backend_xmin::text AS backend_xmin
FROM pg_stat_activity a
WHERE a.pid <> pg_backend_pid()
  AND (a.xact_start IS NOT NULL OR a.backend_xmin IS NOT NULL)
ORDER BY a.datname = current_database() DESC, a.xact_start NULLS LAST, a.pid
LIMIT %(limit)s;

-- name: doctor_pgq_idle_in_transaction
-- returns: many
-- pgq's own sessions in this database (application_name `pgq:<role>:<pid>`,
-- see pgq/db.py) idle inside a transaction for longer than %(idle_seconds)s. pgq never
-- waits for anything while it holds a transaction open, so any is a bug or a
-- stalled process.
SELECT a.pid,
       a.datname,
       a.usename,
       a.application_name,
       a.state,
       extract(epoch FROM now() - a.state_change)::float8 AS idle_seconds,
       extract(epoch FROM now() - a.xact_start)::float8 AS xact_age_seconds
FROM pg_stat_activity a
WHERE a.pid <> pg_backend_pid()
  AND a.datname = current_database()
  AND a.application_name LIKE 'pgq:%%'
  AND a.state IN ('idle in transaction', 'idle in transaction (aborted)')
  AND a.state_change <= now() - make_interval(secs => %(idle_seconds)s)
ORDER BY a.state_change, a.pid;

-- name: doctor_replication_slots
-- returns: many
-- Replication slots that hold back the xmin or catalog_xmin horizon.
SELECT s.slot_name,
       s.slot_type,
       s.database,
       s.active,
       s.active_pid,
       age(s.xmin) AS xmin_age,
       age(s.catalog_xmin) AS catalog_xmin_age
FROM pg_replication_slots s
WHERE s.xmin IS NOT NULL OR s.catalog_xmin IS NOT NULL
ORDER BY greatest(age(s.xmin), age(s.catalog_xmin)) DESC, s.slot_name;

-- name: doctor_prepared_xacts
-- returns: many
-- Prepared (two-phase) transactions: until committed or rolled back they hold
-- their locks and the xmin horizon, and survive restarts.
SELECT p.gid,
       p.owner,
       p.database,
       p.database = current_database() AS this_database,
       p.transaction::text AS xid,
       age(p.transaction) AS xid_age,
       extract(epoch FROM now() - p.prepared)::float8 AS age_seconds
FROM pg_prepared_xacts p
ORDER BY p.prepared, p.gid;

-- name: doctor_leader_queues
-- returns: many
-- The queues whose aggregation leadership key can matter: every queue, and
-- every queue a server publishes an aggregation policy for.
SELECT name FROM pgq.queue
UNION
SELECT jsonb_object_keys(s.group_policies) FROM pgq.server_activity s;

-- name: doctor_leader_queues_reader
-- returns: many
-- The same from the views alone (pgq_reader may not read pgq.queue).
SELECT DISTINCT jsonb_object_keys(s.group_policies) AS name FROM pgq.server_activity s;

-- name: doctor_leader_holders
-- returns: many
-- Who holds each queue's aggregation leadership key (a session advisory lock
-- on two int4 keys; the same expression as group_leader_elect in group.sql,
-- with %(ns)s from pgq.services.aggregator.leader_namespace), with the pgq
-- server rows whose process could own that session: a leader connection is
-- named `pgq:leader:<client pid>`, and a server row carries that pid and the
-- queues it aggregates. An int4 key is stored in pg_locks as an oid (the same
-- 32 bits).
WITH keys AS (
    SELECT q.name AS queue,
           hashtext(%(ns)s || q.name)::oid AS k1,
           hashtext(q.name || %(ns)s)::oid AS k2
    FROM unnest(%(queues)s::text[]) AS q(name)
)
SELECT k.queue,
       l.pid,
       a.usename,
       a.application_name,
       a.client_addr::text AS client_addr,
       extract(epoch FROM now() - a.backend_start)::float8 AS session_age_seconds,
       (SELECT array_agg(s.server_id ORDER BY s.server_id)
        FROM pgq.server_activity s
        WHERE a.application_name = 'pgq:leader:' || s.pid
          AND s.status = 'active'
          AND s.group_policies ? k.queue) AS servers
FROM keys k
JOIN pg_locks l
  ON l.locktype = 'advisory' AND l.granted
 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
 AND l.classid = k.k1 AND l.objid = k.k2 AND l.objsubid = 2
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
ORDER BY k.queue, l.pid;

-- name: doctor_task_table
-- returns: one
-- Health of pgq.task: size, dead tuples, (auto)vacuum times, and the age of
-- its relfrozenxid (anti-wraparound vacuum must keep finishing). Catalog and
-- statistics reads only: no privilege on the table is needed.
SELECT c.oid::regclass::text AS relation,
       pg_total_relation_size(c.oid) AS total_bytes,
       s.n_live_tup,
       s.n_dead_tup,
       s.last_vacuum,
       s.last_autovacuum,
       s.autovacuum_count,
       extract(epoch FROM now() - greatest(s.last_vacuum, s.last_autovacuum))::float8 AS vacuum_age_seconds,
       age(c.relfrozenxid) AS frozenxid_age,
       current_setting('autovacuum_freeze_max_age')::bigint AS freeze_max_age
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid
WHERE n.nspname = %(schema)s AND c.relname = 'task' AND c.relkind IN ('r', 'p');
