"""Aggregator-only processes for R6 and R7, outside any Server.

    python -m tests.fault.agg_proc run         # aggregate with leadership off until SIGTERM (R6);
                                               # prints one JSON line of totals when it stops
    python -m tests.fault.agg_proc forkserver  # R7: for each stdin line (a PGQ_FAILPOINTS spec),
                                               # fork a child that aggregates until the failpoint
                                               # kills it or nothing is due; prints its exit status

The fork server imports everything once, so a thousand crash rounds do not pay a
thousand interpreter starts. Children open their own connections after the fork.
Settings: PGQ_DSN, FAULT_AGG_QUEUE, FAULT_AGG_GRACE, FAULT_AGG_MAX_SIZE, FAULT_AGG_MAX_DELAY.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

import psycopg_pool

from pgq import db
from pgq.config import resolve_group_policies
from pgq.services.aggregator import AggregationResult, Aggregator
from tests.fault.app import aggregate


def _policies() -> Any:
    queue = os.environ.get("FAULT_AGG_QUEUE", "agg")
    return resolve_group_policies(
        {queue: 1},
        aggregator=aggregate,
        grace_period=float(os.environ.get("FAULT_AGG_GRACE", "0.2")),
        max_delay=float(os.environ.get("FAULT_AGG_MAX_DELAY", "2")),
        max_size=int(os.environ.get("FAULT_AGG_MAX_SIZE", "50")),
    )


async def _rounds(stop: asyncio.Event, *, until_idle: bool) -> dict[str, int]:
    dsn = os.environ["PGQ_DSN"]
    totals = {"rounds": 0, "tasks": 0, "members": 0, "contended": 0, "failed": 0, "errors": 0}
    pool: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
        db.conninfo(dsn, "aggregator"), min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
    )
    await pool.open(wait=True, timeout=30)
    agg = Aggregator(dsn, pool, _policies(), worker_id=f"agg:{os.getpid()}", leadership=False)
    idle = 0
    try:
        while not stop.is_set():
            try:
                res: AggregationResult = await agg.run_once()
            except Exception as exc:  # a killed backend, a restart: count it and go on
                totals["errors"] += 1
                print(f"round failed: {exc!r}", file=sys.stderr, flush=True)
                await asyncio.sleep(0.05)
                continue
            totals["rounds"] += 1
            for k in ("tasks", "members", "contended", "failed"):
                totals[k] += getattr(res, k)
            if res.more:
                continue
            if until_idle:
                idle = idle + 1 if not res.tasks else 0
                if idle >= 3 and (res.next_due is None or res.next_due > 1):
                    break
            wait = 0.02 if res.next_due is None else min(0.2, max(0.0, res.next_due) + 0.001)
            await asyncio.sleep(wait)
    finally:
        await pool.close()
    return totals


def run() -> None:
    async def main() -> dict[str, int]:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        return await _rounds(stop, until_idle=False)

    print(json.dumps(asyncio.run(main())), flush=True)


def forkserver() -> None:
    for line in sys.stdin:
        spec = line.strip()
        pid = os.fork()
        if pid == 0:
            os.environ["PGQ_FAILPOINTS"] = spec
            try:
                totals = asyncio.run(_rounds(asyncio.Event(), until_idle=True))
                print(json.dumps(totals), file=sys.stderr, flush=True)
                code = 0
            except BaseException as exc:
                print(f"child failed: {exc!r}", file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        print(
            json.dumps({"spec": spec, "signal": sig, "exit": os.waitstatus_to_exitcode(status)}), flush=True
        )


if __name__ == "__main__":
    {"run": run, "forkserver": forkserver}[sys.argv[1]]()
