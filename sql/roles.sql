-- pgq roles: privilege separation (docs/security.md). Run as the owner of
-- schema pgq after `pgq migrate` (and again after each migration: new tables
-- and views need their grants). Idempotent. Give LOGIN users these roles:
--   GRANT pgq_producer TO app_user;
--
--   pgq_producer  may only enqueue, through the SQL function pgq.enqueue()
--                 (SECURITY DEFINER, search_path pinned): no table access at all.
--   pgq_reader    may only read the dashboard views (sql/views/dashboard.sql),
--                 which carry no payloads, headers or results.
--   pgq_worker    runs `pgq worker` and pgq.Client: DML on pgq's tables, no DDL.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgq_producer') THEN
        CREATE ROLE pgq_producer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgq_reader') THEN
        CREATE ROLE pgq_reader NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgq_worker') THEN
        CREATE ROLE pgq_worker NOLOGIN;
    END IF;
END
$roles$;

-- Nothing for PUBLIC.
REVOKE ALL ON SCHEMA pgq FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pgq FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgq FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgq FROM PUBLIC;

-- pgq_producer: EXECUTE on pgq.enqueue only.
GRANT USAGE ON SCHEMA pgq TO pgq_producer;
GRANT EXECUTE ON FUNCTION pgq.enqueue(text, text, jsonb, text, integer, interval, timestamptz, jsonb,
                                      text, interval, timestamptz, interval) TO pgq_producer;

-- pgq_reader: SELECT on every view of the schema (views read the tables with
-- their owner's rights), and the counting functions the views call.
GRANT USAGE ON SCHEMA pgq TO pgq_reader;
DO $views$
DECLARE
    v record;
BEGIN
    FOR v IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'pgq' AND c.relkind = 'v'
    LOOP
        EXECUTE format('GRANT SELECT ON pgq.%I TO pgq_reader', v.relname);
    END LOOP;
END
$views$;
GRANT EXECUTE ON FUNCTION pgq.queue_counts(text, integer), pgq.estimate_task_count(text, text),
                          pgq.aggregate_of_member(text),
                          pgq.group_due(text, bigint, timestamptz, timestamptz, timestamptz) TO pgq_reader;

-- pgq_worker: claims, acks, aggregation, maintenance, enqueue through pgq.Client.
GRANT USAGE ON SCHEMA pgq TO pgq_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgq TO pgq_worker;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA pgq TO pgq_worker;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgq TO pgq_worker;
