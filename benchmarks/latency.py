"""Enqueue-to-handler-start latency on an idle worker.

    python benchmarks/latency.py [--dsn postgresql://root@127.0.0.1:5432/postgres]
                                 [-n 300] [--rate 50] [--json]

Creates a scratch database (dropped at the end), starts one pgq.Server (async
handler) in this process, then enqueues one task at a time with pgq.Client at
`--rate` tasks/s. For each task: t0 just before Client.enqueue(), t1 first thing
in the handler; prints p50/p90/p99/max of t1 - t0 in ms (and the p50 of the
enqueue call alone, for scale: it includes the commit), then one JSON line.
The path measured: INSERT + NOTIFY commit, the listener's dedicated connection,
one claim statement, the handler's start on the event loop.
Target on the 2-core reference machine: p50 <= 2 ms, p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
import uuid

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgq
import pgq.migrate


def dsn_for(server: str, dbname: str) -> str:
    params = conninfo_to_dict(server)
    params["dbname"] = dbname
    return make_conninfo("", **params)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def measure(dsn: str, n: int, rate: float) -> tuple[list[float], list[float]]:
    """(enqueue-to-handler-start, the enqueue call alone), in ms."""
    sent: dict[int, float] = {}
    lat: list[float] = []
    call: list[float] = []
    got = threading.Event()

    async def handler(task: pgq.Task) -> None:
        t1 = time.perf_counter()
        lat.append(t1 - sent[task.payload])
        got.set()

    mux = pgq.ServeMux()
    mux.handle("ping", handler)
    server = pgq.Server(dsn, queues={"lat": 1}, concurrency=10)
    server.start(mux)
    try:
        with pgq.Client(dsn) as client:
            for i in range(-20, n):  # 20 warm-up tasks (prepared statements, pools)
                got.clear()
                sent[i] = time.perf_counter()
                client.enqueue(pgq.Task("ping", i), queue="lat")
                call.append(time.perf_counter() - sent[i])
                if not got.wait(5):
                    raise RuntimeError(f"task {i} did not start within 5 s")
                time.sleep(1 / rate)
    finally:
        server.shutdown()
    return [x * 1000 for x in lat[20:]], [x * 1000 for x in call[20:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", default="postgresql://root@127.0.0.1:5432/postgres")
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    name = f"pgq_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = dsn_for(args.dsn, name)
        pgq.migrate.migrate(dsn)
        ms, call = measure(dsn, args.n, args.rate)
        out = {
            "bench": "latency",
            "n": len(ms),
            "rate": args.rate,
            "p50_ms": round(statistics.median(ms), 3),
            "p90_ms": round(pct(ms, 90), 3),
            "p99_ms": round(pct(ms, 99), 3),
            "max_ms": round(max(ms), 3),
            "enqueue_call_p50_ms": round(statistics.median(call), 3),
        }
        if not args.json:
            print(
                f"enqueue -> handler start, {len(ms)} tasks at {args.rate:g}/s: p50 {out['p50_ms']} ms, "
                f"p90 {out['p90_ms']} ms, p99 {out['p99_ms']} ms, max {out['max_ms']} ms "
                f"(the enqueue call alone: p50 {out['enqueue_call_p50_ms']} ms)"
            )
        print(json.dumps(out))
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
