"""Drain throughput: one pgq Server process next to a hand-written SKIP LOCKED loop.

    python benchmarks/drain.py [--dsn postgresql://root@127.0.0.1:5432/postgres]
                               [-n 20000] [--rounds 3] [--concurrency 200] [--json]

Creates a scratch database (dropped at the end). Each round, alternately:

  handrolled  N rows pre-inserted into a minimal table (id, state, payload, run_at,
              a partial index on pending); one asyncio connection loops: claim 100 with
              UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 100),
              call a no-op async handler per row, DELETE the batch by id.
  pgq         N no-op tasks pre-enqueued with Client.enqueue_many into a paused queue;
              a pgq.Server (async no-op handler) starts in this process, the queue is
              unpaused with a NOTIFY, and the clock stops when every task's outcome
              has been written (pgq.task empty).

Prints the median tasks/s of each and their ratio, then one JSON line.
Target: pgq >= 20,000 tasks/s in one process on the 2-core reference machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import threading
import time
import uuid
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgq
import pgq.migrate


def dsn_for(server: str, dbname: str) -> str:
    params = conninfo_to_dict(server)
    params["dbname"] = dbname
    return make_conninfo("", **params)


HANDROLLED_DDL = """
CREATE TABLE IF NOT EXISTS bench_job (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    state text NOT NULL DEFAULT 'pending',
    payload jsonb NOT NULL,
    run_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS bench_job_pending ON bench_job (run_at, id) WHERE state = 'pending';
"""


async def _noop(payload: Any) -> None:
    return None


def handrolled(dsn: str, n: int, batch: int = 100) -> float:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(HANDROLLED_DDL)
        c.execute("TRUNCATE bench_job")
        c.execute(
            "INSERT INTO bench_job (payload) SELECT jsonb_build_object('i', g) FROM generate_series(1, %s) g",
            (n,),
        )
        c.execute("VACUUM ANALYZE bench_job")

    async def run() -> float:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        done = 0
        t0 = time.perf_counter()
        async with conn:
            while True:
                cur = await conn.execute(
                    "UPDATE bench_job SET state = 'active' WHERE id IN ("
                    " SELECT id FROM bench_job WHERE state = 'pending' AND run_at <= now()"
                    " ORDER BY run_at, id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id, payload",
                    (batch,),
                    prepare=True,
                )
                rows = await cur.fetchall()
                if not rows:
                    break
                for _id, payload in rows:
                    await _noop(payload)
                await conn.execute(
                    "DELETE FROM bench_job WHERE id = ANY(%s)", ([r[0] for r in rows],), prepare=True
                )
                done += len(rows)
        elapsed = time.perf_counter() - t0
        assert done == n, (done, n)
        return n / elapsed

    return asyncio.run(run())


def pgq_drain(dsn: str, n: int, concurrency: int) -> float:
    queue = "bench"
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DELETE FROM pgq.task")
        c.execute(
            "INSERT INTO pgq.queue (name, paused) VALUES (%s, true) "
            "ON CONFLICT (name) DO UPDATE SET paused = true",
            (queue,),
        )
    with pgq.Client(dsn) as client:
        for i in range(0, n, 10_000):
            client.enqueue_many(
                [pgq.Task("noop", {"i": j}) for j in range(i, min(n, i + 10_000))], queue=queue
            )
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("VACUUM ANALYZE pgq.task")

    count = 0
    all_run = threading.Event()

    async def noop(task: pgq.Task) -> None:
        nonlocal count
        count += 1
        if count == n:
            all_run.set()

    mux = pgq.ServeMux()
    mux.handle("noop", noop)
    server = pgq.Server(dsn, queues={queue: 1}, concurrency=concurrency, poll_interval=1.0)
    server.start(mux)
    try:
        with psycopg.connect(dsn, autocommit=True) as c:
            t0 = time.perf_counter()
            c.execute("UPDATE pgq.queue SET paused = false WHERE name = %s", (queue,))
            c.execute("SELECT pg_notify('pgq_wake', %s)", (queue,))
            if not all_run.wait(600):
                raise RuntimeError(f"only {count} of {n} tasks ran")
            while True:
                left = c.execute("SELECT count(*) FROM pgq.task").fetchone()
                if left is not None and left[0] == 0:
                    break
                time.sleep(0.001)
            elapsed = time.perf_counter() - t0
    finally:
        server.shutdown()
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", default="postgresql://root@127.0.0.1:5432/postgres")
    ap.add_argument("-n", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    name = f"pgq_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = dsn_for(args.dsn, name)
        pgq.migrate.migrate(dsn)
        hand: list[float] = []
        mine: list[float] = []
        for r in range(args.rounds):
            hand.append(handrolled(dsn, args.n))
            mine.append(pgq_drain(dsn, args.n, args.concurrency))
            if not args.json:
                print(f"round {r + 1}: handrolled {hand[-1]:,.0f}/s  pgq {mine[-1]:,.0f}/s", file=sys.stderr)
        h, p = statistics.median(hand), statistics.median(mine)
        if not args.json:
            print(f"handrolled (claim 100, batched DELETE): {h:,.0f} tasks/s")
            print(f"pgq Server, 1 process, concurrency {args.concurrency}: {p:,.0f} tasks/s ({p / h:.2f}x)")
        print(
            json.dumps(
                {
                    "bench": "drain",
                    "n": args.n,
                    "rounds": args.rounds,
                    "concurrency": args.concurrency,
                    "handrolled_per_s": round(h),
                    "pgq_per_s": round(p),
                    "ratio": round(p / h, 3),
                    "handrolled_all": [round(x) for x in hand],
                    "pgq_all": [round(x) for x in mine],
                }
            )
        )
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
