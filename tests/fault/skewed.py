"""Processes under a skewed wall clock for R9 (libfaketime), and how to find libfaketime.

    python -m tests.fault.skewed probe           # print this process's clocks as JSON
    python -m tests.fault.skewed pgq ARGS...     # run `python -m pgq ARGS...` (a worker)
    python -m tests.fault.skewed produce TAG     # print "ready", wait for a line on stdin, then
                                                 # enqueue R9's scheduled, immediate and grouped
                                                 # tasks; print one JSON line per task

Run them with `env(offset)`: LD_PRELOAD=libfaketime, FAKETIME=offset and
FAKETIME_DONT_FAKE_MONOTONIC=1. Only the wall clock (time.time(), datetime.now(),
CLOCK_REALTIME) is skewed; the monotonic clock stays real, as it does between two
machines whose wall clocks disagree. With the monotonic clock faked too, libfaketime
0.9.10 hands Python absolute monotonic deadlines its sem_clockwait() never reaches
(threading.Event.wait(t) hangs).

One workaround: libfaketime 0.9.10 intercepts clock_nanosleep(CLOCK_MONOTONIC,
TIMER_ABSTIME) and shifts the deadline by the wall-clock offset even when monotonic
is not faked, so Python's time.sleep() fails with EINVAL. This module replaces
time.sleep with a select()-based sleep on the real monotonic clock before anything
else runs: the same duration, not a different clock.
"""

from __future__ import annotations

import glob
import json
import os
import runpy
import select
import sys
import time
from typing import Any


def _sleep(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        select.select([], [], [], left)


def libfaketime() -> str | None:
    """The path of libfaketime.so.1 (PGQ_FAULT_LIBFAKETIME, else Debian's), or None."""
    explicit = os.environ.get("PGQ_FAULT_LIBFAKETIME")
    if explicit:
        return explicit if os.path.exists(explicit) else None
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    found += [p for p in ("/usr/lib/faketime/libfaketime.so.1", "/usr/local/lib/faketime/libfaketime.so.1")]
    return next((p for p in found if os.path.exists(p)), None)


def env(lib: str, offset: str) -> dict[str, str]:
    """The environment of a process whose wall clock is `offset` ('+10m', '-10m') off."""
    return {
        "LD_PRELOAD": lib,
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.fault.skewed", *args]


def probe() -> None:
    from datetime import UTC, datetime

    t0 = time.monotonic()
    time.sleep(0.05)
    print(
        json.dumps(
            {
                "time": time.time(),
                "now": datetime.now(UTC).timestamp(),
                "monotonic": time.monotonic(),
                "slept": time.monotonic() - t0,
            }
        ),
        flush=True,
    )


def produce(tag: str) -> None:
    """R9's tasks from a skewed client: what pgq stores must come from the database clock.

    - scheduled: `work` tasks with process_in 0.5..2.5 s (payload "in" holds it);
    - immediate: `work` tasks;
    - burst groups: 4 members each, enqueued back to back (due by the grace period);
    - a trickle group: a member every 0.2 s for ~2 s (due by max_delay before grace).
    """
    import pgq

    dsn = os.environ["PGQ_DSN"]
    out: list[dict[str, Any]] = []

    def emit(kind: str, info: Any, **extra: Any) -> None:
        out.append({"kind": kind, "id": info.id, "enqueued_at": info.enqueued_at.isoformat(), **extra})

    with pgq.Client(dsn) as client:
        # started with the workers: say when ready, and begin on "go" (the interpreter start
        # overlaps theirs, the workload starts once they are ready)
        emit("immediate", client.enqueue(pgq.Task("work", {"ms": 0}), retention=3600))
        print("ready", flush=True)
        sys.stdin.readline()
        for i in range(12):
            delay = 0.5 + (i % 5) * 0.5
            t = pgq.Task("work", {"ms": 5, "in": delay})
            emit("scheduled", client.enqueue(t, process_in=delay, retention=3600), process_in=delay)
        for _ in range(20):
            emit("immediate", client.enqueue(pgq.Task("work", {"ms": 5}), retention=3600))
        for g in range(4):
            group = f"burst-{tag}-{g}"
            for m in range(4):
                emit("member", client.enqueue(pgq.Task("m", m), queue="agg", group=group), group=group)
        group = f"trickle-{tag}"
        for m in range(10):
            emit("member", client.enqueue(pgq.Task("m", m), queue="agg", group=group), group=group)
            time.sleep(0.2)
    for line in out:
        print(json.dumps(line), flush=True)


def main() -> None:
    time.sleep = _sleep  # type: ignore[assignment]
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "probe":
        probe()
    elif cmd == "produce":
        produce(rest[0])
    elif cmd == "pgq":
        sys.argv = ["pgq", *rest]
        runpy.run_module("pgq", run_name="__main__", alter_sys=True)
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
