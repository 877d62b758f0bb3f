"""The Client's trailing-NOTIFY thread: one-task enqueues with the streaming trail
(STREAM_TRAIL) against the earlier rule (a trailing NOTIFY two windows after the
last one), in alternating rounds, next to a plain INSERT.

    python benchmarks/wakeups.py [--dsn postgresql://root@127.0.0.1:5432/postgres]
                                 [--rounds 30] [--n 250] [--busy-core]

--busy-core keeps one core busy with a spinning process meanwhile, as an
application's own work would: the notifier thread's wake-ups then compete for
the other core. Prints the median time per call of each and the median over
rounds of new/old, and how often the notifier thread woke per enqueue.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable

import psycopg
from _scratch import scratch_db

import pgq
from pgq.client import STREAM_TRAIL


class _NeverStreaming(set[str]):
    """A debouncer's set of streaming queues that never takes one in."""

    def add(self, queue: str) -> None:
        pass


def _spin(stop: multiprocessing.synchronize.Event) -> None:
    while not stop.is_set():
        pass


def _counting(client: pgq.Client) -> list[int]:
    """Count the notifier thread's looks at the debouncer (its wake-ups)."""
    wakes = [0]
    take = client._debounce.take_due

    def counted() -> tuple[list[str], float | None]:
        wakes[0] += 1
        return take()

    client._debounce.take_due = counted  # type: ignore[method-assign]
    return wakes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", default="postgresql://root@127.0.0.1:5432/postgres", help="server (admin db)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--n", type=int, default=250, help="calls per system and round")
    ap.add_argument("--busy-core", action="store_true")
    args = ap.parse_args()
    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
    if args.busy_core:
        spinner.start()
    try:
        with scratch_db(args.dsn) as dsn:
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute(
                    "CREATE TABLE t (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                    " payload jsonb NOT NULL)"
                )
                with pgq.Client(dsn) as new, pgq.Client(dsn) as old:
                    old._debounce._streaming = _NeverStreaming()  # the old rule: two windows, always
                    wakes = {"old": _counting(old), "new": _counting(new)}
                    systems: dict[str, Callable[[int], object]] = {
                        "plain INSERT": lambda i: c.execute(
                            "INSERT INTO t (payload) VALUES (%s::jsonb)", (json.dumps({"i": i}),)
                        ),
                        "old": lambda i: old.enqueue(pgq.Task("x", {"i": i})),
                        "new": lambda i: new.enqueue(pgq.Task("x", {"i": i})),
                    }
                    us: dict[str, list[float]] = {k: [] for k in systems}
                    for r in range(args.rounds + 1):  # round 0 warms up
                        order = list(systems) if r % 2 else ["plain INSERT", "new", "old"]
                        for k in order:
                            t0 = time.perf_counter()
                            for i in range(args.n):
                                systems[k](i)
                            if r:
                                us[k].append((time.perf_counter() - t0) / args.n * 1e6)
    finally:
        stop.set()
        if args.busy_core:
            spinner.join()
    calls = (args.rounds + 1) * args.n
    labels = {
        "old": "enqueue, trail two windows (old)",
        "new": f"enqueue, streaming trail {STREAM_TRAIL * 1000:.0f} ms",
    }
    for k, v in us.items():
        extra = f"  notifier wake-ups per enqueue {wakes[k][0] / calls:.2f}" if k in wakes else ""
        print(f"{labels.get(k, k):<42}{statistics.median(v):8.0f} us/call{extra}")
    ratio = statistics.median(n / o for n, o in zip(us["new"], us["old"], strict=True))
    busy = " (one core busy)" if args.busy_core else ""
    print(f"new/old time per call, median over rounds: {ratio:.3f}{busy}")


if __name__ == "__main__":
    main()
