"""Oban for Python workloads, run inside Oban's own virtualenv (benchmarks/.venvs/oban, Python >= 3.12).

Settings, from Oban's documentation: `Oban.create_pool(dsn)` (its psycopg_pool pool with
default sizes), `oban.schema.install(pool)`, a function job declared with `@job`
(`async def`), and a worker `Oban(pool=pool, queues={"default": LIMIT})` where the
queue limit (`--limit`, default 100: pgq's claim size) is both its concurrency and
the most jobs one fetch claims. Enqueue: `Oban.enqueue(job)`; bulk:
`Oban.enqueue_many(jobs)` (one INSERT). Completed jobs are kept (pruned later by
its pruner), as by default.
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
BACKLOG = "FROM oban_jobs WHERE state IN ('available', 'executing', 'scheduled', 'retryable')"
MARKS: c.Marks | None = None


def extra(p) -> None:
    p.add_argument("--limit", dest="x_limit", type=int, default=100)


from oban import Oban, job  # noqa: E402


@job(queue="default")
async def noop(t: float | None = None) -> None:
    if MARKS is not None:
        MARKS.hit(t)


async def worker(args) -> None:
    global MARKS
    MARKS = c.Marks(args.marks, args.mode)
    pool = await Oban.create_pool(args.dsn)
    async with Oban(pool=pool, queues={"default": args.x_limit}):
        c.ready()
        await asyncio.Event().wait()


async def amain(args) -> None:
    from oban.schema import install

    pool = await Oban.create_pool(args.dsn)
    await install(pool)
    oban = Oban(pool=pool)  # client mode: enqueues only
    async with oban:

        async def bulk(n: int) -> None:
            await oban.enqueue_many([noop.new(t=None) for _ in range(n)])

        if args.workload == "enqueue":
            rate = await c.timed_async(args.n, lambda i: oban.enqueue(noop.new(t=None)))
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
            check = c.Backlog(args.dsn, BACKLOG)
            result = await asyncio.to_thread(c.run_drain, SCRIPT, args, sync(bulk), check)
        elif args.workload == "latency":

            async def one(t: float) -> None:
                await oban.enqueue(noop.new(t=t))

            async def steady(rate: float, duration: float) -> int:
                return await c.steady_async(rate, duration, one)

            result = await asyncio.to_thread(c.run_latency, SCRIPT, args, sync(steady))
        else:
            raise SystemExit(f"oban has no {args.workload} workload")
        c.emit(result)


def main() -> None:
    args = c.parse_args(extra=extra)
    if args.workload == "worker":
        asyncio.run(worker(args))
    else:
        asyncio.run(amain(args))


if __name__ == "__main__":
    main()
