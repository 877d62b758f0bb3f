"""Dashboard views benchmark: every example query of docs/dashboards.md on 1,000,000 tasks.

    python benchmarks/views.py [--dsn postgresql://root@127.0.0.1:5432/postgres] [--tasks 1000000] [--keep]

Builds a scratch database on that server (dropped afterwards unless --keep),
migrates it, fills pgq.task with INSERT ... SELECT generate_series:

    1 %  aggregated tasks holding 10 members each (lineage), queue notifications
    40 % completed with retention        15 % archived        20 % pending
    5 %  scheduled    2 % retry    200 active    the rest (~17 %) aggregating
         members in groups of 10 (queue notifications, groups user<N>:email)

spread over the queues default, critical, low, bulk and notifications, plus
five small queues, 90 days of stats, a summary row per group (1 % with an
aggregation error) and 5 servers. Then VACUUM ANALYZE (what autovacuum does on
a live table), and times each ```sql block of docs/dashboards.md that is not
marked "not an example query": one warm-up run, then --runs runs; prints
median and max in ms per query, and a final JSON line. Target: < 100 ms each.
Also prints, for comparison, the exact Inspector.get_queue_info (not a target).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg
from _scratch import dsn_for

import pgq
import pgq.migrate

DOCS = Path(__file__).resolve().parents[1] / "docs" / "dashboards.md"
TARGET_MS = 100.0

FILL = """
WITH n AS (SELECT %(n)s::int AS n),
bounds AS (
    SELECT n,
           (n * 0.01)::int AS agg_end,
           (n * 0.41)::int AS completed_end,
           (n * 0.56)::int AS archived_end,
           (n * 0.76)::int AS pending_end,
           (n * 0.81)::int AS scheduled_end,
           (n * 0.83)::int AS retry_end,
           (n * 0.83)::int + 200 AS active_end
    FROM n
),
rows AS (
    SELECT i, b.*,
           (ARRAY['default', 'critical', 'low', 'bulk'])[1 + i %% 4] AS plain_queue
    FROM bounds b, generate_series(1, b.n) AS i
)
INSERT INTO pgq.task (queue, type, payload, state, group_key, members, retention, enqueued_at, run_at,
                      started_at, completed_at, expires_at, last_error, last_failed_at, locked_by,
                      lease_expires_at, retried)
SELECT
    CASE WHEN i <= agg_end OR i > active_end THEN 'notifications' ELSE plain_queue END,
    CASE WHEN i <= agg_end THEN 'digest' ELSE 'email:send' END,
    jsonb_build_object('i', i),
    CASE WHEN i <= agg_end THEN (CASE WHEN i %% 2 = 0 THEN 'completed' ELSE 'pending' END)
         WHEN i <= completed_end THEN 'completed'
         WHEN i <= archived_end THEN 'archived'
         WHEN i <= pending_end THEN 'pending'
         WHEN i <= scheduled_end THEN 'scheduled'
         WHEN i <= retry_end THEN 'retry'
         WHEN i <= active_end THEN 'active'
         ELSE 'aggregating' END,
    CASE WHEN i > active_end THEN 'user' || ((i - active_end - 1) / 10) || ':email' END,
    CASE WHEN i <= agg_end
         THEN ARRAY(SELECT (5000000 + i * 10 + k)::text FROM generate_series(0, 9) AS k) END,
    CASE WHEN i <= completed_end THEN interval '7 days' END,
    now() - (n - i) * interval '10 ms',
    CASE WHEN i > retry_end OR i <= pending_end THEN now() - (n - i) * interval '10 ms'
         ELSE now() + interval '1 hour' END,
    CASE WHEN i > retry_end AND i <= active_end THEN now() - interval '5 s' END,
    CASE WHEN i <= completed_end THEN now() - (n - i) * interval '10 ms' END,
    CASE WHEN i <= completed_end THEN now() + interval '7 days' END,
    CASE WHEN i > completed_end AND i <= archived_end OR i > scheduled_end AND i <= retry_end
         THEN 'RuntimeError: boom' END,
    CASE WHEN i > completed_end AND i <= archived_end THEN now() - (n - i) * interval '10 ms' END,
    CASE WHEN i > retry_end AND i <= active_end THEN 'host' || (i %% 5) || ':1:x' END,
    CASE WHEN i > retry_end AND i <= active_end THEN now() + interval '30 s' END,
    0
FROM rows
"""

FILL_SMALL = """
INSERT INTO pgq.task (queue, type, payload, state)
SELECT 'small' || (i % 5), 'ping', 'null', 'pending' FROM generate_series(1, 25) AS i
"""

FILL_REST = [
    "INSERT INTO pgq.queue (name) SELECT DISTINCT queue FROM pgq.task ON CONFLICT DO NOTHING",
    """INSERT INTO pgq.task_group (queue, group_key, size, oldest_at, newest_at, errors, last_error,
                                   last_error_at, retry_at)
       SELECT queue, group_key, count(*), min(enqueued_at), max(enqueued_at),
              CASE WHEN hashtext(group_key) % 100 = 0 THEN 3 ELSE 0 END,
              CASE WHEN hashtext(group_key) % 100 = 0 THEN 'ValueError: bad template' END,
              CASE WHEN hashtext(group_key) % 100 = 0 THEN now() - interval '1 min' END,
              CASE WHEN hashtext(group_key) % 100 = 0 THEN now() + interval '1 min' END
       FROM pgq.task WHERE state = 'aggregating' GROUP BY queue, group_key""",
    """INSERT INTO pgq.stat_daily (queue, day, processed, failed)
       SELECT q.name, current_date - d, 1000 + d * 7, d % 13
       FROM pgq.queue q, generate_series(0, 89) AS d""",
    """INSERT INTO pgq.server (id, host, pid, queues, concurrency, heartbeat_at)
       SELECT 'host' || i || ':1:x', 'host' || i, 1, '{"default": 1}', 50, now() - interval '2 s'
       FROM generate_series(0, 4) AS i""",
]


def examples(text: str) -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", text, re.S)
    return [b.strip() for b in blocks if "not an example query" not in b]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", default="postgresql://root@127.0.0.1:5432/postgres")
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = ap.parse_args()

    name = f"pgq_bench_views_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    target = dsn_for(args.dsn, name)
    results: dict[str, dict[str, float]] = {}
    try:
        pgq.migrate.migrate(target)
        with psycopg.connect(target, autocommit=True) as conn:
            t0 = time.perf_counter()
            conn.execute(FILL, {"n": args.tasks})
            conn.execute(FILL_SMALL)
            for q in FILL_REST:
                conn.execute(q)
            conn.execute("VACUUM ANALYZE")
            total = conn.execute("SELECT count(*) FROM pgq.task").fetchone()
            print(f"filled {total[0] if total else 0} tasks in {time.perf_counter() - t0:.1f} s", flush=True)
            counts = conn.execute("SELECT state, count(*) FROM pgq.task GROUP BY 1 ORDER BY 1").fetchall()
            print("  " + ", ".join(f"{s}: {n}" for s, n in counts))

            for sql in examples(DOCS.read_text()):
                conn.execute(sql).fetchall()  # warm-up
                times = []
                for _ in range(args.runs):
                    t = time.perf_counter()
                    rows = conn.execute(sql).fetchall()
                    times.append((time.perf_counter() - t) * 1000)
                label = " ".join(sql.split())[:100]
                med, worst = statistics.median(times), max(times)
                flag = "ok" if worst < TARGET_MS else "SLOW"
                print(
                    f"{med:8.2f} ms median {worst:8.2f} ms max  {len(rows):4d} rows  {flag}  {label}",
                    flush=True,
                )
                results[label] = {"median_ms": round(med, 2), "max_ms": round(worst, 2), "rows": len(rows)}

            row = conn.execute("SELECT * FROM pgq.queue_stats WHERE queue = 'default'").fetchone()
            print(f"queue_stats for default (estimated where large): {row}")

        with pgq.Inspector(target) as insp:
            t = time.perf_counter()
            info = insp.get_queue_info("default")
            ms = (time.perf_counter() - t) * 1000
            print(
                f"for comparison, exact Inspector.get_queue_info('default'): {ms:.1f} ms -> "
                f"pending={info.pending} archived={info.archived} completed={info.completed}"
            )
    finally:
        if not args.keep:
            with psycopg.connect(args.dsn, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            print(f"kept database {name}")
    worst_all = max((r["max_ms"] for r in results.values()), default=0.0)
    print(
        json.dumps(
            {
                "benchmark": "views",
                "tasks": args.tasks,
                "queries": len(results),
                "worst_max_ms": worst_all,
                "target_ms": TARGET_MS,
                "results": results,
            }
        )
    )
    return 0 if worst_all < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
