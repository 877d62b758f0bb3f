"""PGQueuer workloads, run inside PGQueuer's own virtualenv (benchmarks/.venvs/pgqueuer).

Settings, from PGQueuer's documentation and defaults: `QueueManager.run()` with
its default `batch_size=10` (dequeue batch and status-log buffer size), no
`max_concurrent_tasks` cap, entrypoint `concurrency_limit=0` (unlimited), an
`async def` entrypoint; one connection per process as its examples do
(`PsycopgDriver(AsyncConnection(autocommit=True))` or `AsyncpgDriver(asyncpg.connect())`),
selected with `--driver psycopg|asyncpg`. Enqueue uses `Queries.enqueue()`; bulk
passes lists (one `INSERT ... unnest` statement).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c

SCRIPT = os.path.abspath(__file__)
BACKLOG = "FROM pgqueuer"


def payload(t: float | None = None) -> bytes:
    """PGQueuer takes bytes: the caller encodes each payload, as pgq's Client does for it."""
    return json.dumps({"t": t}).encode()


def extra(p) -> None:
    p.add_argument("--driver", dest="x_driver", default="psycopg", choices=["psycopg", "asyncpg"])
    p.add_argument("--batch-size", dest="x_batch_size", type=int, default=10)


async def driver(dsn: str, kind: str):
    if kind == "asyncpg":
        import asyncpg
        from pgqueuer.db import AsyncpgDriver
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(dsn)  # asyncpg takes URLs or keywords, not libpq key=value strings
        keys = {"host": "host", "port": "port", "user": "user", "password": "password", "dbname": "database"}
        return AsyncpgDriver(await asyncpg.connect(**{keys[k]: v for k, v in params.items() if k in keys}))
    import psycopg
    from pgqueuer.db import PsycopgDriver

    return PsycopgDriver(await psycopg.AsyncConnection.connect(dsn, autocommit=True))


async def worker(args) -> None:
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries

    marks = c.Marks(args.marks, args.mode)
    qm = QueueManager(Queries(await driver(args.dsn, args.x_driver)))

    if marks.latency:

        @qm.entrypoint("noop")
        async def noop(job: Job) -> None:
            marks.hit(json.loads(job.payload)["t"])
    else:

        @qm.entrypoint("noop")
        async def noop(job: Job) -> None:
            marks.hit(None)

    c.ready()
    await qm.run(batch_size=args.x_batch_size)


async def amain(args) -> None:
    from pgqueuer.queries import Queries

    script = SCRIPT
    q = Queries(await driver(args.dsn, args.x_driver))
    await q.install()

    async def bulk(n: int) -> None:
        await q.enqueue(["noop"] * n, [payload() for _ in range(n)], [0] * n)

    if args.workload == "enqueue":
        rate = await c.timed_async(args.n, lambda i: q.enqueue("noop", payload()))
        c.emit({"rate": rate, "n": args.n})
        return
    loop = asyncio.get_running_loop()
    if args.workload == "bulk":
        # The measured call is the same coroutine; run off-loop only for the sync helper's timing.
        rates = []
        import time

        for _ in range(args.reps):
            t0 = time.perf_counter()
            await bulk(args.bulk)
            rates.append(args.bulk / (time.perf_counter() - t0))
            if c.bulk_budget_spent(rates, args.bulk):
                break
        import statistics

        c.emit({"rate": statistics.median(rates), "reps": rates, "size": args.bulk})
        return

    # drain / latency: the protocol helpers are synchronous; drive our coroutines from a thread.
    def sync(coro_fn):
        return lambda *a: asyncio.run_coroutine_threadsafe(coro_fn(*a), loop).result()

    if args.workload == "drain":
        result = await asyncio.to_thread(c.run_drain, script, args, sync(bulk), c.Backlog(args.dsn, BACKLOG))
    elif args.workload == "latency":

        async def one(t: float) -> None:
            await q.enqueue("noop", payload(t))

        async def steady(rate: float, duration: float) -> int:
            return await c.steady_async(rate, duration, one)

        result = await asyncio.to_thread(c.run_latency, script, args, sync(steady))
    else:
        raise SystemExit(f"pgqueuer has no {args.workload} workload")
    c.emit(result)


def main() -> None:
    args = c.parse_args(extra=extra)
    if args.workload == "worker":
        asyncio.run(worker(args))
    else:
        asyncio.run(amain(args))


if __name__ == "__main__":
    main()
