"""The aggregator service's own loop (`Aggregator.run`) in a process of its own, for R8.

    python -m tests.fault.agg_tick_proc

Runs the product's loop with leadership on and a floor poll of FAULT_AGG_TICK
seconds (the "tick": it sleeps until the next due moment, never longer than
that), until SIGTERM. It prints `ready` after its first round (it leads the queue), and one JSON
line of totals when it stops: rounds, tasks, members, contended, failed,
round errors and the failpoint hits of this process. The failpoints come from
PGQ_FAILPOINTS, read at every hit (pgq/_failpoints.py).
Settings: PGQ_DSN, FAULT_AGG_QUEUE, FAULT_AGG_GRACE, FAULT_AGG_MAX_DELAY,
FAULT_AGG_MAX_SIZE, FAULT_AGG_TICK.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

from pgq import _failpoints, db
from pgq.config import resolve_group_policies
from pgq.services.aggregator import AggregationResult, Aggregator
from tests.fault.app import aggregate


async def main() -> dict[str, Any]:
    dsn = os.environ["PGQ_DSN"]
    queue = os.environ.get("FAULT_AGG_QUEUE", "agg")
    policies = resolve_group_policies(
        {queue: 1},
        aggregator=aggregate,
        grace_period=float(os.environ.get("FAULT_AGG_GRACE", "0.2")),
        max_delay=float(os.environ.get("FAULT_AGG_MAX_DELAY", "1")),
        max_size=int(os.environ.get("FAULT_AGG_MAX_SIZE", "50")),
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    pool = await db.pool_async(dsn, "aggregator", min_size=1, max_size=2)
    agg = Aggregator(
        dsn,
        pool,
        policies,
        worker_id=f"agg:{os.getpid()}",
        poll_interval=float(os.environ.get("FAULT_AGG_TICK", "0.1")),
    )
    totals: dict[str, Any] = {"rounds": 0, "tasks": 0, "members": 0, "contended": 0, "failed": 0, "errors": 0}
    run_once = agg.run_once

    led = asyncio.Event()
    durations: list[float] = []
    gaps: list[float] = []
    last = [0.0]

    async def counted(*args: Any, **kwargs: Any) -> AggregationResult:
        t0 = time.monotonic()
        if last[0]:
            gaps.append(t0 - last[0])
        try:
            res = await run_once(*args, **kwargs)
        except Exception:
            totals["errors"] += 1
            raise
        finally:
            last[0] = time.monotonic()
            durations.append(last[0] - t0)
        totals["rounds"] += 1
        led.set()  # the loop runs rounds only while it leads the queue
        for k in ("tasks", "members", "contended", "failed"):
            totals[k] += getattr(res, k)
        return res

    agg.run_once = counted  # type: ignore[method-assign]  # count the rounds of the real loop
    loop_task = asyncio.create_task(agg.run(stop))
    try:
        ready = asyncio.create_task(led.wait())
        await asyncio.wait({ready, loop_task}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if led.is_set():
            print("ready", flush=True)
        await loop_task
    finally:
        await pool.close()
    totals["failpoint_hits"] = dict(_failpoints._hits)
    totals["round_max_s"] = round(max(durations, default=0.0), 3)
    totals["round_mean_s"] = round(sum(durations) / len(durations), 3) if durations else None
    totals["between_rounds_max_s"] = round(max(gaps, default=0.0), 3)
    return totals


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())), flush=True)
