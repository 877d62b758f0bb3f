"""Shared by the workload scripts in benchmarks/peers/ (stdlib only).

Each script runs inside its own system's virtualenv (pgq's, PGQueuer's,
Procrastinate's), so nothing here may import a queue library. A script is
called by benchmarks/compare.py as

    <venv python> peers/<system>.py <workload> --dsn DSN [options]

against a fresh scratch database, installs its system's schema (not timed),
runs one workload and prints one JSON object on its last stdout line.

Workloads (the same protocol for every system):

- ``enqueue``: ``--n`` tasks, one per transaction, after 50 untimed warm-up
  enqueues; rate = n / elapsed.
- ``bulk``: ``--bulk`` tasks in one call (one transaction), ``--reps`` times;
  rate = median over the reps.
- ``drain``: ``--processes`` worker processes (each ``<script> worker``) are
  started and wait idle; one warm-up task is run; then ``--n`` no-op tasks are
  enqueued in ONE transaction, so that no worker can see any of them before all
  are there. The clock starts when that commit returns and stops when the
  database shows no unfinished task (polled every 5 ms on a separate
  connection). Worker start-up is therefore not timed.
- ``latency``: one idle worker process; tasks are enqueued one per transaction
  at ``--rate`` per second for ``--duration`` seconds on an absolute schedule.
  Each payload carries ``time.time()`` taken just before the enqueue call; the
  handler writes ``time.time() - t`` on entry. Reported: p50/p95/p99/max in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

WARMUP = 50


def parse_args(
    argv: list[str] | None = None, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("workload", choices=["enqueue", "bulk", "drain", "latency", "worker", "aggregation"])
    p.add_argument("--dsn", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--bulk", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--budget", type=float, default=20.0, help="drain: stop after this many seconds")
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--marks", default=None, help="worker: file to append latencies to")
    p.add_argument("--mode", default="drain", choices=["drain", "latency"], help="worker mode")
    if extra:
        extra(p)
    return p.parse_args(argv)


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def percentiles_ms(values: list[float]) -> dict[str, float]:
    """Nearest-rank percentiles of seconds, in milliseconds."""
    v = sorted(values)
    if not v:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "max": math.nan, "samples": 0}

    def pct(q: float) -> float:
        return v[max(0, math.ceil(q * len(v)) - 1)] * 1000

    return {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99), "max": v[-1] * 1000, "samples": len(v)}


class Marks:
    """The handler's side: in latency mode, append one latency (seconds) per task."""

    def __init__(self, path: str | None, mode: str) -> None:
        self.latency = mode == "latency"
        self.count = 0
        self._f = open(path, "a", buffering=1) if path else None

    def hit(self, t0: float | None) -> None:
        if self.latency and self._f is not None and t0 is not None:
            self._f.write(f"{time.time() - t0:.7f}\n")
            self._f.flush()
        self.count += 1


def ready() -> None:
    """A worker tells the orchestrator it has started its system's worker loop."""
    print("ready", flush=True)


# -- orchestration (runs in the script's own process) ---------------------------------------


def start_workers(
    script: str, args: argparse.Namespace, processes: int, mode: str, marks: str
) -> list[subprocess.Popen[str]]:
    procs = []
    for _ in range(processes):
        cmd = [sys.executable, script, "worker", "--dsn", args.dsn, "--mode", mode, "--marks", marks]
        for k, v in sorted(vars(args).items()):
            if k.startswith("x_") and v is not None:
                cmd += [f"--{k[2:].replace('_', '-')}", str(v)]
        # Same process group as this script: compare.py kills the whole group if it must.
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    for p in procs:
        assert p.stdout is not None
        while True:
            line = p.stdout.readline()
            if not line:
                stop_workers(procs)
                raise RuntimeError(f"worker exited before it was ready (rc={p.poll()})")
            if line.strip() == "ready":
                break
    time.sleep(0.5)  # let every worker reach its idle wait (LISTEN set up, first poll done)
    return procs


def stop_workers(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.005) -> float:
    """Poll pred until true; returns time.time() when it was seen true."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return time.time()
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout:.0f} s")
        time.sleep(interval)


class Backlog:
    """The drain's view of the database: `FROM ... WHERE ...` selecting unfinished tasks.

    Every venv here has psycopg (each peer depends on it, or on it optionally).
    """

    def __init__(self, dsn: str, from_where: str) -> None:
        import psycopg

        self._conn = psycopg.connect(dsn, autocommit=True)
        self._exists = f"SELECT EXISTS (SELECT 1 {from_where})"
        self._count = f"SELECT count(*) {from_where}"

    def empty(self) -> bool:
        return not self._conn.execute(self._exists).fetchone()[0]

    def count(self) -> int:
        return int(self._conn.execute(self._count).fetchone()[0])


def run_drain(
    script: str,
    args: argparse.Namespace,
    enqueue_bulk: Callable[[int], None],
    backlog: Backlog,
) -> dict[str, Any]:
    """The drain protocol; enqueue_bulk(n) must enqueue n no-op tasks in ONE transaction.

    A system that has not finished after `--budget` seconds is stopped there and
    its rate is the tasks finished so far over the time taken (`complete: false`).
    """
    with tempfile.NamedTemporaryFile(prefix="pgqbench-marks-", delete=False) as f:
        marks = f.name
    procs = start_workers(script, args, args.processes, "drain", marks)
    try:
        enqueue_bulk(1)  # warm-up: the workers have claimed and run a task before the clock starts
        wait_until(backlog.empty, timeout=30)
        enqueue_bulk(args.n)
        t0 = time.time()
        deadline = t0 + args.budget
        done = args.n
        first: float | None = None  # when the first task was seen finished (count < n)
        while True:
            if first is None and backlog.count() < args.n:
                first = time.time()
            if backlog.empty():
                t1 = time.time()
                break
            if time.time() > deadline:
                done = args.n - backlog.count()
                t1 = time.time()
                break
            time.sleep(0.005)
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a worker died during the drain (rc={p.returncode})")
    finally:
        stop_workers(procs)
        os.unlink(marks)
    return {
        "rate": done / (t1 - t0),
        "seconds": t1 - t0,
        "n": args.n,
        "done": done,
        "complete": done == args.n,
        "first_s": (first - t0) if first is not None else None,
        "processes": args.processes,
    }


def run_latency(
    script: str,
    args: argparse.Namespace,
    start_enqueuer: Callable[[float, float], int],
) -> dict[str, Any]:
    """The latency protocol; start_enqueuer(rate, duration) enqueues on schedule, returns the count."""
    with tempfile.NamedTemporaryFile(prefix="pgqbench-marks-", delete=False) as f:
        marks = f.name
    procs = start_workers(script, args, 1, "latency", marks)
    try:
        start_enqueuer(args.rate, 0.5)  # warm-up, not counted
        time.sleep(0.5)
        with open(marks, "w"):
            pass  # truncate the warm-up marks
        sent = start_enqueuer(args.rate, args.duration)

        def lines() -> int:
            with open(marks) as fh:
                return sum(1 for _ in fh)

        try:
            wait_until(lambda: lines() >= sent, timeout=5.0, interval=0.05)
        except TimeoutError:
            pass  # report what arrived; `samples` shows the shortfall
        with open(marks) as fh:
            values = [float(x) for x in fh if x.strip()]
    finally:
        stop_workers(procs)
        os.unlink(marks)
    out: dict[str, Any] = percentiles_ms(values)
    out.update(sent=sent, rate=args.rate, duration=args.duration)
    return out


def steady_sync(rate: float, duration: float, enqueue: Callable[[float], None]) -> int:
    """Call enqueue(t) at `rate` per second on an absolute schedule; t = time.time() before the call."""
    n = int(rate * duration)
    start = time.monotonic()
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        enqueue(time.time())
    return n


async def steady_async(rate: float, duration: float, enqueue: Callable[[float], Awaitable[None]]) -> int:
    n = int(rate * duration)
    start = time.monotonic()
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await enqueue(time.time())
    return n


def timed_sync(n: int, fn: Callable[[int], None]) -> float:
    """Rate of n calls of fn(i), after WARMUP untimed calls."""
    for i in range(WARMUP):
        fn(i)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


async def timed_async(n: int, fn: Callable[[int], Awaitable[None]]) -> float:
    for i in range(WARMUP):
        await fn(i)
    t0 = time.perf_counter()
    for i in range(n):
        await fn(i)
    return n / (time.perf_counter() - t0)


def bulk_budget_spent(rates: list[float], size: int) -> bool:
    """Stop repeating a bulk call once 3 s went into it (a slow system gets fewer reps)."""
    return sum(size / r for r in rates) > 3.0


def bulk_rates(reps: int, size: int, fn: Callable[[int], None]) -> dict[str, Any]:
    rates: list[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(size)
        rates.append(size / (time.perf_counter() - t0))
        if bulk_budget_spent(rates, size):
            break
    return {"rate": statistics.median(rates), "reps": rates, "size": size}
