"""The physical reference: a minimal hand-written queue in plain SQL over psycopg 3.

No library, nothing a real queue needs beyond the hot path: one table, a partial
index for the claim, a statement-level NOTIFY trigger on insert.

- enqueue: one `INSERT` per transaction (autocommit); bulk: one
  `INSERT ... SELECT unnest(...)`.
- worker: claims 100 ready rows at a time with `FOR UPDATE SKIP LOCKED`, runs the
  no-op handler on each, and acks the whole batch with one `DELETE ... = ANY`.
  When a claim comes back empty it waits for a NOTIFY on a dedicated LISTEN
  connection (1 s poll floor).

Runs in pgq's own virtualenv (it needs psycopg only).
"""

from __future__ import annotations

import json
import os
import sys

import psycopg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c

BACKLOG = "FROM bench_job"

SCHEMA = """
CREATE TABLE bench_job (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue    text NOT NULL DEFAULT 'default',
    type     text NOT NULL,
    payload  jsonb NOT NULL,
    state    text NOT NULL DEFAULT 'pending',
    run_at   timestamptz NOT NULL DEFAULT now(),
    locked_at timestamptz
);
CREATE INDEX bench_job_ready_idx ON bench_job (queue, run_at, id) WHERE state = 'pending';
CREATE FUNCTION bench_job_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('bench_job', ''); RETURN NULL; END $$;
CREATE TRIGGER bench_job_notify AFTER INSERT ON bench_job
    FOR EACH STATEMENT EXECUTE FUNCTION bench_job_notify();
"""

INSERT = "INSERT INTO bench_job (type, payload) VALUES (%s, %s)"
INSERT_MANY = "INSERT INTO bench_job (type, payload) SELECT 'noop', p FROM unnest(%s::jsonb[]) AS p"
CLAIM = """
UPDATE bench_job SET state = 'active', locked_at = now()
WHERE id IN (SELECT id FROM bench_job WHERE queue = 'default' AND state = 'pending' AND run_at <= now()
             ORDER BY run_at, id LIMIT 100 FOR UPDATE SKIP LOCKED)
RETURNING id, payload
"""
ACK = "DELETE FROM bench_job WHERE id = ANY(%s)"
BATCH = 100


def connect(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True)


def worker(args) -> None:
    marks = c.Marks(args.marks, args.mode)
    conn = connect(args.dsn)
    listen = connect(args.dsn)
    listen.execute("LISTEN bench_job")
    claim, ack = conn.cursor(), conn.cursor()
    c.ready()
    while True:
        while True:
            rows = claim.execute(CLAIM, prepare=True).fetchall()
            if not rows:
                break
            for _id, payload in rows:
                marks.hit(payload.get("t"))
            ack.execute(ACK, ([r[0] for r in rows],), prepare=True)
        for _ in listen.notifies(timeout=1.0, stop_after=1):
            pass


def main() -> None:
    args = c.parse_args()
    script = os.path.abspath(__file__)
    if args.workload == "worker":
        worker(args)
        return
    conn = connect(args.dsn)
    conn.execute(SCHEMA)

    # Payloads are JSON-encoded per task, as every queue library does for its caller.
    def bulk(n: int) -> None:
        conn.execute(INSERT_MANY, ([json.dumps({"t": None}) for _ in range(n)],))

    if args.workload == "enqueue":
        cur = conn.cursor()
        rate = c.timed_sync(
            args.n, lambda i: cur.execute(INSERT, ("noop", json.dumps({"t": None})), prepare=True)
        )
        c.emit({"rate": rate, "n": args.n})
    elif args.workload == "bulk":
        c.emit(c.bulk_rates(args.reps, args.bulk, bulk))
    elif args.workload == "drain":
        c.emit(c.run_drain(script, args, bulk, c.Backlog(args.dsn, BACKLOG)))
    elif args.workload == "latency":
        cur = conn.cursor()

        def one(t: float) -> None:
            cur.execute(INSERT, ("noop", json.dumps({"t": t})), prepare=True)

        c.emit(c.run_latency(script, args, lambda rate, duration: c.steady_sync(rate, duration, one)))
    else:
        raise SystemExit(f"handrolled has no {args.workload} workload")


if __name__ == "__main__":
    main()
