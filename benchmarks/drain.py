"""Drain throughput: one pgq Server process next to a hand-written SKIP LOCKED loop.

    python benchmarks/drain.py [--dsn postgresql://root@127.0.0.1:5432/postgres]
                               [-n 20000] [--rounds 5] [--concurrency 100] [--json]

Creates a scratch database (dropped at the end). Each round runs both, the order
alternating round by round:

  handrolled  N rows pre-inserted into a minimal table (id, state, payload, run_at,
              a partial index on pending); one asyncio connection loops: claim 100 with
              UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 100),
              call a no-op async handler per row, DELETE the batch by id.
  pgq         N no-op tasks pre-enqueued with Client.enqueue_many into a paused queue;
              a pgq.Server (async no-op handler, `--concurrency`, default 100: the
              setting for no-op async handlers that compare.py also uses; the worker
              claims up to its free slots per statement, 100 like the hand-written
              loop) starts in this process, the queue
              is unpaused with a NOTIFY, and the clock stops when every task's outcome
              has been written (pgq.task empty).

Prints per round the tasks/s of each, their ratio, and the CPU each spent per task
(this process, and the PostgreSQL backends of the scratch database, read from /proc
when the server is local): on a shared machine the CPU per task moves much less
than the rate. Then the medians (the ratio is the median of the per-round ratios)
and one JSON line.
Target: pgq >= 20,000 tasks/s in one process on the 2-core reference machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import threading
import time
from typing import Any

import psycopg
from _scratch import scratch_db

import pgq
import pgq.migrate


def backend_cpu(dsn: str) -> float | None:
    """CPU seconds spent so far by the backends connected to dsn's database (None: not readable)."""
    try:
        with psycopg.connect(dsn, autocommit=True) as c:
            pids = [
                r[0] for r in c.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            ]
        total = 0
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Cpu:
    """CPU per task of this process and of the database backends over a measured span."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.proc_us = self.db_us = float("nan")

    def start(self) -> None:
        self._p, self._d = time.process_time(), backend_cpu(self.dsn)

    def stop(self, n: int) -> None:
        self.proc_us = (time.process_time() - self._p) * 1e6 / n
        d = backend_cpu(self.dsn)
        if d is not None and self._d is not None:
            self.db_us = (d - self._d) * 1e6 / n


def settle(c: psycopg.Connection[Any]) -> None:
    """Leave no background work from the previous measurement to the next one: vacuum
    both systems' tables (else autovacuum cleans the other run's garbage during this
    run) and write the dirty buffers out (CHECKPOINT, when this role may)."""
    c.execute(HANDROLLED_DDL)  # so that VACUUM finds it
    c.execute("VACUUM ANALYZE bench_job, pgq.task")
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        c.execute("CHECKPOINT")


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


def handrolled(dsn: str, n: int, cpu: Cpu, batch: int = 100) -> float:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(HANDROLLED_DDL)
        c.execute("TRUNCATE bench_job")
        c.execute(
            "INSERT INTO bench_job (payload) SELECT jsonb_build_object('i', g) FROM generate_series(1, %s) g",
            (n,),
        )
        settle(c)

    async def run() -> float:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        done = 0
        async with conn:
            cpu.start()
            t0 = time.perf_counter()
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
            cpu.stop(n)
        assert done == n, (done, n)
        return n / elapsed

    return asyncio.run(run())


def pgq_drain(dsn: str, n: int, concurrency: int, cpu: Cpu) -> float:
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
        settle(c)

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
            cpu.start()
            t0 = time.perf_counter()
            c.execute("UPDATE pgq.queue SET paused = false WHERE name = %s", (queue,))
            c.execute("SELECT pg_notify('pgq_wake', %s)", (queue,))
            if not all_run.wait(600):
                raise RuntimeError(f"only {count} of {n} tasks ran")
            # Every task has run, so what is left is active until its outcome is written. Asked
            # through the partial index on active tasks: a count(*) over the drained table
            # scans all of its dead rows, several ms of database CPU per poll.
            active = "SELECT EXISTS (SELECT 1 FROM pgq.task WHERE state = 'active')"
            while c.execute(active).fetchone() != (False,):
                time.sleep(0.001)
            elapsed = time.perf_counter() - t0
            cpu.stop(n)
            left = c.execute("SELECT count(*) FROM pgq.task").fetchone()
            if left != (0,):
                raise RuntimeError(f"{left} tasks left in pgq.task after the drain")
    finally:
        server.shutdown()
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", default="postgresql://root@127.0.0.1:5432/postgres")
    ap.add_argument("-n", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with scratch_db(args.dsn) as dsn:
        hand: list[float] = []
        mine: list[float] = []
        ratios: list[float] = []
        cpus: dict[str, list[tuple[float, float]]] = {"handrolled": [], "pgq": []}
        for r in range(args.rounds):
            hc, pc = Cpu(dsn), Cpu(dsn)
            if r % 2 == 0:
                hand.append(handrolled(dsn, args.n, hc))
                mine.append(pgq_drain(dsn, args.n, args.concurrency, pc))
            else:
                mine.append(pgq_drain(dsn, args.n, args.concurrency, pc))
                hand.append(handrolled(dsn, args.n, hc))
            ratios.append(mine[-1] / hand[-1])
            cpus["handrolled"].append((hc.proc_us, hc.db_us))
            cpus["pgq"].append((pc.proc_us, pc.db_us))
            if not args.json:
                print(
                    f"round {r + 1}: handrolled {hand[-1]:,.0f}/s  pgq {mine[-1]:,.0f}/s  "
                    f"({ratios[-1]:.2f}x)  CPU us/task python+db: handrolled "
                    f"{hc.proc_us:.1f}+{hc.db_us:.1f}  pgq {pc.proc_us:.1f}+{pc.db_us:.1f}",
                    file=sys.stderr,
                )
        h, p, ratio = statistics.median(hand), statistics.median(mine), statistics.median(ratios)

        def med(who: str, i: int) -> float:
            return round(statistics.median(c[i] for c in cpus[who]), 1)

        if not args.json:
            print(f"handrolled (claim 100, batched DELETE): {h:,.0f} tasks/s")
            print(
                f"pgq Server, 1 process, concurrency {args.concurrency}: {p:,.0f} tasks/s "
                f"(median of per-round ratios {ratio:.2f}x)"
            )
            print(
                "CPU per task (median; this process + database backends): "
                f"handrolled {med('handrolled', 0)} + {med('handrolled', 1)} us, "
                f"pgq {med('pgq', 0)} + {med('pgq', 1)} us"
            )
        print(
            json.dumps(
                {
                    "bench": "drain",
                    "n": args.n,
                    "rounds": args.rounds,
                    "concurrency": args.concurrency,
                    "handrolled_per_s": round(h),
                    "pgq_per_s": round(p),
                    "ratio": round(ratio, 3),
                    "handrolled_all": [round(x) for x in hand],
                    "pgq_all": [round(x) for x in mine],
                    "cpu_us_per_task": {
                        "handrolled": {"process": med("handrolled", 0), "db": med("handrolled", 1)},
                        "pgq": {"process": med("pgq", 0), "db": med("pgq", 1)},
                    },
                }
            )
        )


if __name__ == "__main__":
    main()
