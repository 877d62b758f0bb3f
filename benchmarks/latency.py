"""Enqueue-to-handler-start latency on an idle worker.

    python benchmarks/latency.py [--dsn postgresql://root@127.0.0.1:5432/postgres]
                                 [-n 300] [--rate 50] [--rounds 3] [--in-process] [--json]

Creates a scratch database (dropped at the end) and starts one pgq.Server (async
handler, concurrency 10, the default) in a worker process of its own, as a
deployment runs it (`--in-process`: in a thread of this process instead, where the
enqueuing thread and the server share the GIL). This process then enqueues one task
at a time with pgq.Client at a steady `--rate` (an absolute schedule, as compare.py
does), 20 warm-up tasks first. Each payload carries the time just before its
Client.enqueue() call; the handler records the difference first thing. Reported per
round and as the median over rounds: p50/p90/p99/max in ms, and the p50 of the
enqueue call alone (it includes the INSERT + NOTIFY commit). One JSON line at the end.

Each round also measures, alternating with pgq, the physical reference of the same
path: a hand-written queue (one table, a statement-level NOTIFY trigger on insert,
one INSERT per enqueue; a worker process that LISTENs on a dedicated connection and
claims with UPDATE ... FOR UPDATE SKIP LOCKED, as benchmarks/peers/handrolled.py).
On a shared machine its figures show how much of the latency is the commit, the
NOTIFY and the scheduler rather than pgq.
The path measured: INSERT + NOTIFY commit, the listener's dedicated connection,
one claim statement, the handler's start on the event loop.
Target on the 2-core reference machine: p50 <= 2 ms, p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
import sys
import time
from typing import Any

import psycopg
from _scratch import scratch_db

import pgq
import pgq.migrate

WARMUP = 20


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def _server(dsn: str, marks: list[tuple[int, float]]) -> pgq.Server:
    async def handler(task: pgq.Task) -> None:
        marks.append((task.payload["i"], time.time() - task.payload["t"]))

    mux = pgq.ServeMux()
    mux.handle("ping", handler)
    server = pgq.Server(dsn, queues={"lat": 1})
    server.start(mux)
    return server


def _worker_process(dsn: str, ready: Any, stop: Any, out: Any) -> None:
    logging.basicConfig(level=logging.WARNING)
    marks: list[tuple[int, float]] = []
    server = _server(dsn, marks)
    ready.set()
    stop.wait()
    server.shutdown()
    out.put(marks)


HAND_SCHEMA = """
CREATE TABLE IF NOT EXISTS lat_job (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payload  jsonb NOT NULL,
    state    text NOT NULL DEFAULT 'pending',
    run_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS lat_job_ready_idx ON lat_job (run_at, id) WHERE state = 'pending';
CREATE OR REPLACE FUNCTION lat_job_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('lat_job', ''); RETURN NULL; END $$;
CREATE OR REPLACE TRIGGER lat_job_notify AFTER INSERT ON lat_job
    FOR EACH STATEMENT EXECUTE FUNCTION lat_job_notify();
"""
HAND_CLAIM = """
UPDATE lat_job SET state = 'active'
WHERE id IN (SELECT id FROM lat_job WHERE state = 'pending' AND run_at <= now()
             ORDER BY run_at, id LIMIT 100 FOR UPDATE SKIP LOCKED)
RETURNING id, payload
"""


def _hand_worker_process(dsn: str, ready: Any, stop: Any, out: Any) -> None:
    marks: list[tuple[int, float]] = []
    with psycopg.connect(dsn, autocommit=True) as conn, psycopg.connect(dsn, autocommit=True) as listen:
        listen.execute("LISTEN lat_job")
        ready.set()
        while not stop.is_set():
            while True:
                rows = conn.execute(HAND_CLAIM, prepare=True).fetchall()
                if not rows:
                    break
                for _id, payload in rows:
                    marks.append((payload["i"], time.time() - payload["t"]))
                conn.execute("DELETE FROM lat_job WHERE id = ANY(%s)", ([r[0] for r in rows],), prepare=True)
            for _ in listen.notifies(timeout=0.2, stop_after=1):
                pass
    out.put(marks)


def _hand_enqueue(dsn: str, n: int, rate: float) -> list[float]:
    calls: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        start = time.monotonic()
        for k, i in enumerate(range(-WARMUP, n)):
            delay = start + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t0 = time.time()
            conn.execute(
                "INSERT INTO lat_job (payload) VALUES (%s)", (json.dumps({"i": i, "t": t0}),), prepare=True
            )
            calls.append(time.time() - t0)
    return calls


def _enqueue(dsn: str, n: int, rate: float) -> list[float]:
    """Enqueue WARMUP + n tasks at `rate`; the duration of each enqueue call (s)."""
    calls: list[float] = []
    with pgq.Client(dsn) as client:
        start = time.monotonic()
        for k, i in enumerate(range(-WARMUP, n)):
            delay = start + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t0 = time.time()
            client.enqueue(pgq.Task("ping", {"i": i, "t": t0}), queue="lat")
            calls.append(time.time() - t0)
    return calls


def measure(
    dsn: str, n: int, rate: float, in_process: bool, hand: bool = False
) -> tuple[list[float], list[float]]:
    """(enqueue-to-handler-start, the enqueue call alone), in ms, warm-up excluded."""
    if in_process and not hand:
        marks: list[tuple[int, float]] = []
        server = _server(dsn, marks)
        try:
            calls = _enqueue(dsn, n, rate)
            deadline = time.monotonic() + 5
            while len(marks) < WARMUP + n and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            server.shutdown()
    else:
        ctx = multiprocessing.get_context("spawn")
        ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
        target = _hand_worker_process if hand else _worker_process
        proc = ctx.Process(target=target, args=(dsn, ready, stop, out), daemon=True)
        proc.start()
        try:
            if not ready.wait(60):
                raise RuntimeError("the worker process did not start")
            calls = (_hand_enqueue if hand else _enqueue)(dsn, n, rate)
            time.sleep(0.5)  # the last task starts within ms; leave it time
            stop.set()
            marks = out.get(timeout=60)
        finally:
            stop.set()
            proc.join(30)
    got = {i: x for i, x in marks if i >= 0}
    if len(got) < n:
        raise RuntimeError(f"only {len(got)} of {n} tasks started")
    return [got[i] * 1000 for i in range(n)], [x * 1000 for x in calls[WARMUP:]]


def summary(ms: list[float], call: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p90_ms": round(pct(ms, 90), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "max_ms": round(max(ms), 3),
        "enqueue_call_p50_ms": round(statistics.median(call), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", default="postgresql://root@127.0.0.1:5432/postgres")
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--in-process", action="store_true", help="run the Server in a thread of this process")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with scratch_db(args.dsn) as dsn:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(HAND_SCHEMA)
        rounds: list[dict[str, float]] = []
        hands: list[dict[str, float]] = []
        for r in range(args.rounds):
            if r % 2:
                rounds.append(summary(*measure(dsn, args.n, args.rate, args.in_process)))
            hands.append(summary(*measure(dsn, args.n, args.rate, args.in_process, hand=True)))
            if r % 2 == 0:
                rounds.append(summary(*measure(dsn, args.n, args.rate, args.in_process)))
            if not args.json:
                for who, s in (("pgq", rounds[-1]), ("handrolled", hands[-1])):
                    print(
                        f"round {r + 1} {who:10s}: p50 {s['p50_ms']} ms, p90 {s['p90_ms']} ms, "
                        f"p99 {s['p99_ms']} ms, max {s['max_ms']} ms "
                        f"(enqueue call p50 {s['enqueue_call_p50_ms']} ms)",
                        file=sys.stderr,
                    )
        out: dict[str, Any] = {
            "bench": "latency",
            "n": args.n,
            "rate": args.rate,
            "rounds": args.rounds,
            "worker": "thread" if args.in_process else "process",
        }
        for key in rounds[0]:
            out[key] = round(statistics.median(s[key] for s in rounds), 3)
        out["p99_all"] = [s["p99_ms"] for s in rounds]
        out["handrolled"] = {key: round(statistics.median(s[key] for s in hands), 3) for key in hands[0]}
        out["handrolled"]["p99_all"] = [s["p99_ms"] for s in hands]
        if not args.json:
            where = "in this process" if args.in_process else "in its own process"
            h = out["handrolled"]
            print(
                f"enqueue -> handler start, {args.n} tasks at {args.rate:g}/s, worker {where}, "
                f"median of {args.rounds} rounds: pgq p50 {out['p50_ms']} ms, p90 {out['p90_ms']} ms, "
                f"p99 {out['p99_ms']} ms, max {out['max_ms']} ms "
                f"(the enqueue call alone: p50 {out['enqueue_call_p50_ms']} ms); "
                f"handrolled p50 {h['p50_ms']} ms, p99 {h['p99_ms']} ms "
                f"(its enqueue call p50 {h['enqueue_call_p50_ms']} ms)"
            )
        print(json.dumps(out))


if __name__ == "__main__":
    main()
