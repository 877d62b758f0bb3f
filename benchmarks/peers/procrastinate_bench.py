"""Procrastinate workloads, run inside Procrastinate's own virtualenv (benchmarks/.venvs/procrastinate).

Settings, from Procrastinate's documentation: `App(connector=PsycopgConnector(conninfo=...))`
(its default asynchronous connector, psycopg 3 with a psycopg_pool pool of default
size), an `async def` task, `run_worker_async(concurrency=10)` (its docs recommend
concurrency for asynchronous I/O-bound tasks; the default is 1 — pass
`--concurrency 1` to measure that), `listen_notify=True` (default), jobs kept
after success (default `delete_jobs="never"`). Enqueue uses `defer_async`; bulk uses
`batch_defer_async` (one INSERT for the whole batch).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c

SCRIPT = os.path.abspath(__file__)
BACKLOG = "FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"


def extra(p) -> None:
    p.add_argument("--concurrency", dest="x_concurrency", type=int, default=10)


def make_app(dsn: str, marks: c.Marks | None = None):
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="noop", queue="default")
    async def noop(t: float | None = None) -> None:
        if marks is not None:
            marks.hit(t)

    return app, noop


async def worker(args) -> None:
    import logging

    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    marks = c.Marks(args.marks, args.mode)
    app, _ = make_app(args.dsn, marks)
    async with app.open_async():
        c.ready()
        await app.run_worker_async(concurrency=args.x_concurrency, queues=["default"])


async def amain(args) -> None:
    script = SCRIPT
    app, noop = make_app(args.dsn)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()

        async def bulk(n: int) -> None:
            await noop.batch_defer_async(*({"t": None} for _ in range(n)))

        if args.workload == "enqueue":
            rate = await c.timed_async(args.n, lambda i: noop.defer_async(t=None))
            c.emit({"rate": rate, "n": args.n})
            return
        if args.workload == "bulk":
            rates = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                await bulk(args.bulk)
                rates.append(args.bulk / (time.perf_counter() - t0))
                if c.bulk_budget_spent(rates, args.bulk):
                    break
            c.emit({"rate": statistics.median(rates), "reps": rates, "size": args.bulk})
            return
        loop = asyncio.get_running_loop()

        def sync(coro_fn):
            return lambda *a: asyncio.run_coroutine_threadsafe(coro_fn(*a), loop).result()

        if args.workload == "drain":
            result = await asyncio.to_thread(
                c.run_drain, script, args, sync(bulk), c.Backlog(args.dsn, BACKLOG)
            )
        elif args.workload == "latency":

            async def one(t: float) -> None:
                await noop.defer_async(t=t)

            async def steady(rate: float, duration: float) -> int:
                return await c.steady_async(rate, duration, one)

            result = await asyncio.to_thread(c.run_latency, script, args, sync(steady))
        else:
            raise SystemExit(f"procrastinate has no {args.workload} workload")
        c.emit(result)


def main() -> None:
    args = c.parse_args(extra=extra)
    if args.workload == "worker":
        asyncio.run(worker(args))
    else:
        asyncio.run(amain(args))


if __name__ == "__main__":
    main()
