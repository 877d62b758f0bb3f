"""Aggregation benchmark: promptness, throughput, and the cost of the due check.

    python benchmarks/aggregation.py [--dsn postgresql://root@127.0.0.1:5432/postgres]

Each part runs in a scratch database created on that server and dropped after.

1. latency after the due moment (targets: p99 <= 100 ms), with a real
   pgq.Server: time triggers (grace period 300 ms, one member per group) and
   size triggers (max_size 5, the fifth member completes the group). Measured
   on the database clock: the aggregated task's enqueued_at minus the due
   moment (newest member + grace; for size, the completing member's
   enqueue time, which precedes its commit by the enqueue's own duration).
2. members aggregated per second with 10,000 groups of 10 (target >= 50,000/s):
   members inserted with INSERT ... SELECT generate_series, then Aggregator
   rounds (fold + due check + batched aggregation) until none is left.
3. the cost of one due check with 1,000,000 members waiting in 100,000
   groups, none due (target <= 20 ms): the full run_once round (fold, due
   check, next-due computation) and the due query alone (server time).

Prints one line per figure and a final JSON line. With --rounds N each part runs N
times (a fresh scratch database each time) and a "median of N rounds" line follows:
on a shared machine, report the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import psycopg
from _scratch import scratch_db
from psycopg.rows import dict_row

import pgq
import pgq.migrate
from pgq import _sql, db
from pgq.config import resolve_group_policies
from pgq.services.aggregator import Aggregator

Q = "bench"


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


# --- 1. latency --------------------------------------------------------------------------------------


def latency(admin: str, groups: int) -> dict[str, float]:
    grace = 0.3

    def aggregate(group: str, tasks: list[pgq.Task]) -> pgq.Task:
        newest = max(t.enqueued_at for t in tasks if t.enqueued_at is not None)
        due = newest if len(tasks) == 5 else newest + timedelta(seconds=grace)
        return pgq.Task("digest", {"due": due.isoformat(), "n": len(tasks)}, retention=3600)

    out: dict[str, float] = {}
    with scratch_db(admin) as dsn:
        done = threading.Event()
        mux = pgq.ServeMux()
        mux.handle("digest", lambda t: None)
        server = pgq.Server(
            dsn, queues={Q: 1}, group_aggregator=aggregate, group_grace_period=grace, group_max_size=5
        )
        server.start(mux)
        try:
            time.sleep(1.5)  # leadership
            with pgq.Client(dsn, notify_window=0) as client:
                for i in range(groups):  # time triggers: one member per group, spaced
                    client.enqueue(pgq.Task("item", i), queue=Q, group=f"t{i}")
                    time.sleep(0.02)
                time.sleep(grace + 0.5)
                for i in range(groups):  # size triggers: the fifth member completes the group
                    client.enqueue_many([pgq.Task("item", k) for k in range(4)], queue=Q, group=f"s{i}")
                    client.enqueue(pgq.Task("item", 4), queue=Q, group=f"s{i}")
                    time.sleep(0.02)
            with psycopg.connect(dsn, row_factory=dict_row) as conn:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    row = conn.execute(
                        "SELECT count(*) AS n FROM pgq.task WHERE members IS NOT NULL"
                    ).fetchone()
                    if row and row["n"] >= 2 * groups:
                        break
                    time.sleep(0.05)
                rows = conn.execute(
                    "SELECT enqueued_at, payload FROM pgq.task WHERE members IS NOT NULL"
                ).fetchall()
            done.set()
        finally:
            server.shutdown(timeout=30)
    by_kind: dict[str, list[float]] = {"time": [], "size": []}
    for r in rows:
        due = datetime.fromisoformat(r["payload"]["due"])
        kind = "size" if r["payload"]["n"] == 5 else "time"
        by_kind[kind].append((r["enqueued_at"] - due).total_seconds() * 1000)
    for kind, lat in by_kind.items():
        out[f"{kind}_n"] = len(lat)
        out[f"{kind}_p50_ms"] = round(statistics.median(lat), 2)
        out[f"{kind}_p99_ms"] = round(pct(lat, 99), 2)
        out[f"{kind}_max_ms"] = round(max(lat), 2)
        print(
            f"latency after the due moment, {kind} trigger: n={len(lat)} "
            f"p50={out[f'{kind}_p50_ms']} ms p99={out[f'{kind}_p99_ms']} ms max={out[f'{kind}_max_ms']} ms"
        )
    return out


# --- 2. throughput ------------------------------------------------------------------------------------


def insert_members(conn: psycopg.Connection[Any], members: int, groups: int, ago: str) -> None:
    conn.execute(
        "INSERT INTO pgq.task (queue, type, payload, state, group_key, enqueued_at) "
        "SELECT %s, 'item', to_jsonb(i), 'aggregating', 'g' || (i %% %s), now() - %s::interval "
        "FROM generate_series(1, %s) AS i",
        (Q, groups, ago, members),
    )
    conn.execute(
        "INSERT INTO pgq.group_arrival (queue, group_key, size, oldest_at, newest_at) "
        "SELECT queue, group_key, count(*), min(enqueued_at), max(enqueued_at) FROM pgq.task "
        "WHERE state = 'aggregating' GROUP BY 1, 2"
    )
    conn.execute("VACUUM ANALYZE pgq.task")
    conn.execute("VACUUM ANALYZE pgq.group_arrival")


def throughput(admin: str, groups: int, size: int, batch: int) -> dict[str, float]:
    def aggregate(group: str, tasks: list[pgq.Task]) -> pgq.Task:
        return pgq.Task("digest", [t.payload for t in tasks])

    with scratch_db(admin) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            insert_members(conn, groups * size, groups, "0")
        pols = resolve_group_policies([Q], aggregator=aggregate, grace_period=3600, max_size=size)

        async def main() -> tuple[int, float, int]:
            pool = await db.pool_async(dsn, "aggregator", max_size=2)
            agg = Aggregator(dsn, pool, pols, worker_id="bench", leadership=False, batch_size=batch)
            t0 = time.perf_counter()
            members = rounds = 0
            while True:
                r = await agg.run_once()
                rounds += 1
                members += r.members
                if not r.more and r.due == 0:
                    break
            elapsed = time.perf_counter() - t0
            await pool.close()
            return members, elapsed, rounds

        members, elapsed, rounds = asyncio.run(main())
        with psycopg.connect(dsn, row_factory=dict_row) as conn:
            row = conn.execute("SELECT count(*) AS n FROM pgq.task WHERE state = 'aggregating'").fetchone()
            assert row is not None and row["n"] == 0, row
    rate = members / elapsed
    print(
        f"throughput: {members:,} members in {groups:,} groups of {size} aggregated in {elapsed:.2f} s "
        f"({rounds} rounds of up to {batch} groups): {rate:,.0f} members/s"
    )
    return {"members": members, "seconds": round(elapsed, 3), "members_per_s": round(rate)}


# --- 3. due check cost --------------------------------------------------------------------------------


def due_check(admin: str, members: int, groups: int, repeat: int) -> dict[str, float]:
    def aggregate(group: str, tasks: list[pgq.Task]) -> pgq.Task:
        raise AssertionError("nothing is due")

    with scratch_db(admin) as dsn:
        t = time.perf_counter()
        with psycopg.connect(dsn, autocommit=True) as conn:
            insert_members(conn, members, groups, "1 minute")
        build = time.perf_counter() - t
        pols = resolve_group_policies(
            [Q], aggregator=aggregate, grace_period=3600, max_delay=7200, max_size=1000
        )

        async def main() -> tuple[int, list[float], list[float]]:
            pool = await db.pool_async(dsn, "aggregator", max_size=1)
            try:
                return await measure(pool)
            finally:
                await pool.close()

        async def measure(pool: Any) -> tuple[int, list[float], list[float]]:
            agg = Aggregator(dsn, pool, pols, worker_id="bench", leadership=False)
            folded = 0
            r = await agg.run_once()
            folded += r.arrivals
            while r.more or r.arrivals:
                r = await agg.run_once()
                folded += r.arrivals
            times = await rounds(agg)
            # The fold leaves the folded arrivals as dead rows until autovacuum (scale factor
            # 0.01) cleans group_arrival; measure again as it will be once it has.
            async with pool.connection() as c:
                await c.execute("VACUUM pgq.group_arrival")
            return folded, times, await rounds(agg)

        async def rounds(agg: Aggregator) -> list[float]:
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                r = await agg.run_once()
                times.append((time.perf_counter() - t0) * 1000)
                assert r.due == 0 and r.tasks == 0
            return times

        folded, times, vacuumed = asyncio.run(main())
        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
            conn.execute("ANALYZE pgq.task_group")
            plan_ms = []
            for _ in range(repeat):
                row = conn.execute(
                    "EXPLAIN (ANALYZE, FORMAT JSON) " + _sql.query("group_due"),
                    {
                        "queue": [Q],
                        "grace": [3600.0],
                        "max_delay": [7200.0],
                        "max_size": [1000],
                        "now": None,
                        "limit": 500,
                    },
                ).fetchone()
                assert row is not None
                plan_ms.append(row["QUERY PLAN"][0]["Execution Time"])
    out = {
        "members": members,
        "groups": groups,
        "build_s": round(build, 1),
        "folded_groups_arrivals": folded,
        "round_p50_ms": round(statistics.median(times), 2),
        "round_max_ms": round(max(times), 2),
        "round_after_vacuum_p50_ms": round(statistics.median(vacuumed), 2),
        "round_after_vacuum_max_ms": round(max(vacuumed), 2),
        "due_query_server_p50_ms": round(statistics.median(plan_ms), 3),
    }
    print(
        f"due check with {members:,} members waiting in {groups:,} groups, none due: "
        f"full round (fold + due check + next due) p50={out['round_p50_ms']} ms "
        f"max={out['round_max_ms']} ms; due query alone (server) p50={out['due_query_server_p50_ms']} ms "
        f"[data built in {build:.1f} s]"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument(
        "--dsn",
        default="postgresql://root@127.0.0.1:5432/postgres",
        help="a server where scratch databases may be created",
    )
    ap.add_argument("--latency-groups", type=int, default=100)
    ap.add_argument("--groups", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--check-members", type=int, default=1_000_000)
    ap.add_argument("--check-groups", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--only", choices=["latency", "throughput", "check"], default=None)
    ap.add_argument("--rounds", type=int, default=1, help="run each part this many times; print medians")
    a = ap.parse_args()
    result: dict[str, Any] = {"bench": "aggregation", "rounds": a.rounds}
    parts: list[tuple[str, Any]] = []
    if a.only in (None, "latency"):
        parts.append(("latency", lambda: latency(a.dsn, a.latency_groups)))
    if a.only in (None, "throughput"):
        parts.append(("throughput", lambda: throughput(a.dsn, a.groups, a.size, a.batch)))
    if a.only in (None, "check"):
        parts.append(("due_check", lambda: due_check(a.dsn, a.check_members, a.check_groups, a.repeat)))
    for name, run in parts:
        runs = [run() for _ in range(a.rounds)]
        if a.rounds == 1:
            result[name] = runs[0]
            continue
        med = {
            k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], int | float)
        }
        print(f"{name}, median of {a.rounds} rounds: " + ", ".join(f"{k}={v:g}" for k, v in med.items()))
        result[name] = {"median": med, "runs": runs}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
