"""Enqueue throughput: pgq next to a plain INSERT baseline, measured in the same run.

    python benchmarks/enqueue.py [--dsn postgresql://root@127.0.0.1:5432/postgres]
                                 [--rounds 5] [--single 2000] [--bulk 10000] [--json]

Creates a scratch database (dropped at the end) and runs the four workloads in
alternating rounds, so drift on a shared machine hits all of them alike:

  a  plain INSERT, one row per transaction (psycopg, autocommit)
  b  pgq Client.enqueue, one task per call (its own pooled connection)
  c  plain bulk INSERT ... SELECT unnest(%s::jsonb[]) of --bulk rows
  d  pgq Client.enqueue_many of --bulk tasks
  e  (for reference) c with the JSON texts sent as a binary text[]: psycopg's text
     format quotes every element of (c) in Python, which is most of (c)'s cost
  f  (for reference) a, into pgq's own task table: the same row pgq writes, by a
     hand-written INSERT. The wider row and its claim index cost more than (a)'s
     two-column table; b/f is what pgq's own code adds on top of its table

It prints the median tasks/s of each and the ratio of pgq to its baseline
(targets: b/a >= 0.9, d >= 100,000 tasks/s), the single-row ratios also taken
within each round (median over rounds: what a drifting machine distorts least),
then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg
from _scratch import scratch_db

import pgq
import pgq.migrate


def payload(i: int) -> dict[str, Any]:
    return {"user_id": i, "email": f"user{i}@example.com"}


def timed(fn: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", default="postgresql://root@127.0.0.1:5432/postgres", help="server (admin db)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--single", type=int, default=2000, help="tasks per round, one per transaction")
    ap.add_argument("--bulk", type=int, default=10_000, help="tasks per bulk call")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()

    with scratch_db(args.dsn) as dsn:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(
                "CREATE TABLE t (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, payload jsonb NOT NULL)"
            )
        results = run(dsn, args)

    med = {k: statistics.median(v) for k, v in results.items()}

    def per_round(key: str, base: str) -> float:
        """The median over rounds of key/base taken within each round (drift hits both)."""
        return statistics.median(x / y for x, y in zip(results[key], results[base], strict=True))

    out = {
        "rounds": args.rounds,
        "single_n": args.single,
        "bulk_n": args.bulk,
        **{f"{k}_per_s": round(v) for k, v in med.items()},
        "single_ratio": round(med["pgq_enqueue"] / med["plain_insert"], 3),
        "bulk_ratio": round(med["pgq_enqueue_many"] / med["plain_bulk"], 3),
        "single_vs_task_table": round(med["pgq_enqueue"] / med["plain_task_insert"], 3),
        "single_ratio_per_round": round(per_round("pgq_enqueue", "plain_insert"), 3),
        "single_vs_task_table_per_round": round(per_round("pgq_enqueue", "plain_task_insert"), 3),
    }
    if not args.json:
        print(f"{'workload':<34}{'median tasks/s':>16}{'min':>10}{'max':>10}{'vs baseline':>13}")
        rows = [
            ("a plain INSERT, 1 per tx", "plain_insert", None),
            ("b pgq Client.enqueue", "pgq_enqueue", "plain_insert"),
            (f"c plain unnest INSERT of {args.bulk}", "plain_bulk", None),
            (f"d pgq enqueue_many of {args.bulk}", "pgq_enqueue_many", "plain_bulk"),
            ("e plain unnest, binary text[]", "plain_bulk_binary", "plain_bulk"),
            ("f plain INSERT into pgq.task", "plain_task_insert", "plain_insert"),
        ]
        for label, key, base in rows:
            ratio = f"{med[key] / med[base]:.2f}x" if base else "1.00x"
            print(
                f"{label:<34}{med[key]:>16,.0f}{min(results[key]):>10,.0f}{max(results[key]):>10,.0f}{ratio:>13}"
            )
        print(f"pgq Client.enqueue vs the same row by hand (b/f): {out['single_vs_task_table']:.2f}x")
        print(
            "the same ratios taken within each round, median over rounds: "
            f"b/a {out['single_ratio_per_round']:.2f}x, b/f {out['single_vs_task_table_per_round']:.2f}x"
        )
        print(
            f"targets: enqueue >= 0.9x plain INSERT ({'met' if out['single_ratio'] >= 0.9 else 'NOT met'}); "
            f"enqueue_many >= 100,000/s ({'met' if med['pgq_enqueue_many'] >= 100_000 else 'NOT met'})"
        )
    print(json.dumps(out))
    return 0


def run(dsn: str, args: argparse.Namespace) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {
        "plain_insert": [],
        "pgq_enqueue": [],
        "plain_bulk": [],
        "pgq_enqueue_many": [],
        "plain_bulk_binary": [],
        "plain_task_insert": [],
    }
    with psycopg.connect(dsn, autocommit=True) as plain, pgq.Client(dsn) as client:

        def plain_insert() -> int:
            for i in range(args.single):
                plain.execute("INSERT INTO t (payload) VALUES (%s::jsonb)", (json.dumps(payload(i)),))
            return int(args.single)

        def pgq_enqueue() -> int:
            for i in range(args.single):
                client.enqueue(pgq.Task("email:deliver", payload(i)))
            return int(args.single)

        def plain_task_insert() -> int:
            for i in range(args.single):
                plain.execute(
                    "INSERT INTO pgq.task (queue, type, payload, state)"
                    " VALUES ('default', 'email:deliver', %s::jsonb, 'pending')",
                    (json.dumps(payload(i)),),
                )
            return int(args.single)

        def plain_bulk() -> int:
            rows = [json.dumps(payload(i)) for i in range(args.bulk)]
            plain.execute("INSERT INTO t (payload) SELECT unnest(%s::jsonb[])", (rows,))
            return int(args.bulk)

        def plain_bulk_binary() -> int:
            rows = [json.dumps(payload(i)) for i in range(args.bulk)]
            plain.execute("INSERT INTO t (payload) SELECT unnest(%b::text[])::jsonb", (rows,))
            return int(args.bulk)

        def pgq_enqueue_many() -> int:
            client.enqueue_many([pgq.Task("email:deliver", payload(i)) for i in range(args.bulk)])
            return int(args.bulk)

        # warm up: connections, prepared statements, caches
        plain_insert()
        pgq_enqueue()
        plain_task_insert()
        plain_bulk()
        pgq_enqueue_many()
        for r in range(args.rounds):
            plain.execute("TRUNCATE t, pgq.task, pgq.group_arrival, pgq.unique_lock")
            plain.execute("CHECKPOINT")
            singles = [
                ("plain_insert", plain_insert),
                ("pgq_enqueue", pgq_enqueue),
                ("plain_task_insert", plain_task_insert),
            ]
            bulks = [("plain_bulk", plain_bulk), ("pgq_enqueue_many", pgq_enqueue_many)]
            first = r % 3  # rotate which side goes first
            order = singles[first:] + singles[:first] + (bulks if r % 2 == 0 else bulks[::-1])
            order.append(("plain_bulk_binary", plain_bulk_binary))
            for key, fn in order:
                results[key].append(timed(fn))
            print(
                f"round {r + 1}: " + "  ".join(f"{k}={v[-1]:,.0f}/s" for k, v in results.items()),
                file=sys.stderr,
            )
    return results


if __name__ == "__main__":
    sys.exit(main())
