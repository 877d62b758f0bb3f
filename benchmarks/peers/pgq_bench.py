"""pgq workloads, run in pgq's own environment (the interpreter that runs compare.py).

Settings: `pgq.Client(dsn)` (sync; its own small pool) for enqueue, `enqueue_many`
for bulk (one statement); `--client async` uses `pgq.AsyncClient` instead. The worker
is `pgq.Server(dsn, queues={"default": 1}, concurrency=C)` with an `async def`
handler; C is `--concurrency` (compare.py passes 100 for no-op drains, the same
claim size as the hand-written reference; 10 is pgq's default). Each process of
`--processes 2` is one Server, as `pgq worker --processes 2` runs them.

The `aggregation` workload (pgq only; no peer has task aggregation):

- throughput: `--n` members, `--group-size` per group (groups of that many
  consecutive members), enqueued in one transaction into a queue served by one
  Server with `group_max_size=--group-size` and a one-hour grace period, so every
  group is due by size the moment the enqueue commits. Clock: from that commit
  until every aggregated task has been handled. Reported: members/s and groups/s.
- delay after due: `--groups` groups, each of 3 members enqueued 20 ms apart, with
  `group_grace_period=--grace` (no size or delay limit); a group is due at its
  newest member's enqueue time (database clock, from TaskInfo.enqueued_at) plus
  the grace period. Reported: p50/p95/max of (aggregated task's handler start -
  due time), in ms. Spec G4: within 100 ms.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c
import psycopg

import pgq
import pgq.migrate

BACKLOG = "FROM pgq.task WHERE state IN ('pending', 'active', 'retry', 'scheduled')"


def extra(p) -> None:
    p.add_argument("--concurrency", dest="x_concurrency", type=int, default=100)
    p.add_argument("--client", dest="x_client", default="sync", choices=["sync", "async"])
    p.add_argument("--group-size", type=int, default=100)
    p.add_argument("--groups", type=int, default=20)
    p.add_argument("--grace", type=float, default=0.5)


def serve(server: pgq.Server, mux: pgq.ServeMux) -> None:
    """Start the server, say ready, and run until SIGTERM/SIGINT."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start(mux)
    c.ready()
    while not stop.wait(0.5):
        pass
    server.shutdown(timeout=3)


def worker(args) -> None:
    marks = c.Marks(args.marks, args.mode)
    mux = pgq.ServeMux()
    if marks.latency:

        async def noop(task: pgq.Task) -> None:
            marks.hit(task.payload["t"])
    else:

        async def noop(task: pgq.Task) -> None:
            marks.hit(None)

    mux.handle("noop", noop)
    serve(pgq.Server(args.dsn, queues={"default": 1}, concurrency=args.x_concurrency), mux)


NOOP = pgq.Task("noop", {"t": None})


def main() -> None:
    args = c.parse_args(extra=extra)
    if args.workload == "worker":
        worker(args)
        return
    if args.workload == "aggregation":
        aggregation(args)
        return
    script = os.path.abspath(__file__)
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        pgq.migrate.migrate_conn(conn)
    if args.x_client == "async":
        asyncio.run(async_client(args))
        return
    client = pgq.Client(args.dsn)
    try:
        if args.workload == "enqueue":
            c.emit({"rate": c.timed_sync(args.n, lambda i: client.enqueue(NOOP)), "n": args.n})
        elif args.workload == "bulk":
            c.emit(c.bulk_rates(args.reps, args.bulk, lambda n: client.enqueue_many([NOOP] * n)))
        elif args.workload == "drain":
            bulk = lambda n: client.enqueue_many([NOOP] * n)  # noqa: E731
            c.emit(c.run_drain(script, args, bulk, c.Backlog(args.dsn, BACKLOG)))
        elif args.workload == "latency":

            def one(t: float) -> None:
                client.enqueue(pgq.Task("noop", {"t": t}))

            c.emit(c.run_latency(script, args, lambda rate, duration: c.steady_sync(rate, duration, one)))
    finally:
        client.close()


async def async_client(args) -> None:
    async with pgq.AsyncClient(args.dsn) as client:
        if args.workload == "enqueue":
            rate = await c.timed_async(args.n, lambda i: client.enqueue(NOOP))
            c.emit({"rate": rate, "n": args.n})
        elif args.workload == "bulk":
            rates = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                await client.enqueue_many([NOOP] * args.bulk)
                rates.append(args.bulk / (time.perf_counter() - t0))
                if c.bulk_budget_spent(rates, args.bulk):
                    break
            c.emit({"rate": statistics.median(rates), "reps": rates, "size": args.bulk})
        else:
            raise SystemExit("--client async applies to enqueue and bulk only")


# -- aggregation -----------------------------------------------------------------------------


def aggregation(args) -> None:
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        pgq.migrate.migrate_conn(conn)
    out: dict[str, Any] = {}
    out.update(aggregation_throughput(args))
    out.update(aggregation_delay(args))
    c.emit(out)


def _agg_server(
    args, done: list[tuple[str, float, int]], **group_opts: Any
) -> tuple[pgq.Server, pgq.ServeMux]:
    def aggregate(group: str, tasks: list[pgq.Task]) -> pgq.Task:
        return pgq.Task("digest", {"group": group, "n": len(tasks)})

    mux = pgq.ServeMux()

    async def digest(task: pgq.Task) -> None:
        done.append((task.payload["group"], time.time(), task.payload["n"]))

    mux.handle("digest", digest)
    server = pgq.Server(
        args.dsn, queues={"agg": 1}, concurrency=100, group_aggregator=aggregate, **group_opts
    )
    return server, mux


def _wait(pred, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("aggregation did not finish in time")
        time.sleep(0.005)


def aggregation_throughput(args) -> dict[str, Any]:
    size = args.group_size
    groups = max(1, args.n // size)
    n = groups * size
    done: list[tuple[str, float, int]] = []
    server, mux = _agg_server(args, done, group_grace_period=3600, group_max_size=size)
    server.start(mux)
    try:
        with pgq.Client(args.dsn) as client:
            tasks = [pgq.Task("m", i, group=f"g{i // size}") for i in range(n)]
            client.enqueue_many(tasks, queue="agg")
            t0 = time.time()
            _wait(lambda: len(done) >= groups, timeout=120)
            t1 = max(t for _, t, _ in done)
    finally:
        server.shutdown(timeout=3)
    members = sum(k for _, _, k in done)
    return {
        "agg_members_per_s": members / (t1 - t0),
        "agg_groups_per_s": groups / (t1 - t0),
        "agg_members": members,
        "agg_expected": n,
        "agg_group_size": size,
    }


def aggregation_delay(args) -> dict[str, Any]:
    done: list[tuple[str, float, int]] = []
    server, mux = _agg_server(args, done, group_grace_period=args.grace)
    server.start(mux)
    due: dict[str, float] = {}
    try:
        with pgq.Client(args.dsn) as client:
            for g in range(args.groups):
                name = f"d{g}"
                for k in range(3):
                    info = client.enqueue(pgq.Task("m", k), queue="agg", group=name)
                    time.sleep(0.02)
                due[name] = info.enqueued_at.timestamp() + args.grace
                time.sleep(0.05)
            _wait(lambda: len(done) >= args.groups, timeout=30 + args.grace * 4)
    finally:
        server.shutdown(timeout=3)
    delays = [t - due[g] for g, t, _ in done if g in due]
    p = c.percentiles_ms(delays)
    return {
        "agg_delay_p50": p["p50"],
        "agg_delay_p95": p["p95"],
        "agg_delay_max": p["max"],
        "agg_delay_samples": p["samples"],
        "agg_grace": args.grace,
        "agg_min_members": min((k for _, _, k in done), default=0),
    }


if __name__ == "__main__":
    main()
