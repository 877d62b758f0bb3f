"""R5-R7: aggregation membership is exactly once under leader kills, concurrent
aggregators and crashes at every failpoint of the aggregation transaction.
Members lost 0, duplicated 0; no aggregate is empty or above max_size."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import psycopg
import pytest

import pgq
from tests.fault.chaos import REPO, Chaos, report, size, wait_ready
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.fault

MAX_SIZE = 50
AGG_ENV = {
    "FAULT_AGG_QUEUE": "agg",
    "FAULT_AGG_GRACE": "0.2",
    "FAULT_AGG_MAX_DELAY": "2",
    "FAULT_AGG_MAX_SIZE": str(MAX_SIZE),
    "FAULT_CONCURRENCY": "4",
}
FAILPOINTS = ("after_select", "after_insert", "after_delete", "before_commit", "after_commit")


def produce(dsn: str, total: int, groups: int, threads: int, start: int = 0) -> list[int]:
    """`threads` producers enqueue members numbered start.. into `groups` groups; the acked numbers."""
    acked: list[int] = []
    lock = threading.Lock()
    counter = itertools.count(start)
    end = start + total

    def producer(client: pgq.Client) -> None:
        while True:
            with lock:
                n = next(counter)
            if n >= end:
                return
            client.enqueue(pgq.Task("m", n), queue="agg", group=f"g{n % groups}")
            with lock:
                acked.append(n)

    with pgq.Client(dsn) as client:
        ts = [threading.Thread(target=producer, args=(client,)) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    return acked


def verify(dsn: str, members: list[int]) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as c:
        got = [
            r[0]
            for r in c.execute(
                "SELECT e::bigint FROM pgq.task t, jsonb_array_elements(t.payload) e WHERE t.type = 'digest'"
            )
        ]
        row = c.execute(
            "SELECT count(*) FILTER (WHERE jsonb_array_length(payload) = 0), "
            "count(*) FILTER (WHERE jsonb_array_length(payload) > %s), count(*), "
            "coalesce(max(jsonb_array_length(payload)), 0), "
            "count(*) FILTER (WHERE cardinality(members) <> jsonb_array_length(payload)) "
            "FROM pgq.task WHERE type = 'digest'",
            (MAX_SIZE,),
        ).fetchone()
        waiting = c.execute("SELECT count(*) FROM pgq.task WHERE state = 'aggregating'").fetchone()
    assert row is not None and waiting is not None
    want = set(members)
    return {
        "members": len(members),
        "aggregated": len(got),
        "missing": len(want - set(got)),
        "duplicated": len(got) - len(set(got)),
        "foreign": len(set(got) - want),
        "aggregates": row[2],
        "empty": row[0],
        "oversize": row[1],
        "largest": row[3],
        "lineage_mismatch": row[4],
        "still_aggregating": waiting[0],
    }


def _drained(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM pgq.task WHERE state = 'aggregating'").fetchone()
    return bool(row and row[0] == 0)


def _assert_exactly_once(v: dict[str, Any]) -> None:
    assert v["missing"] == 0 and v["duplicated"] == 0 and v["foreign"] == 0, v
    assert v["empty"] == 0 and v["oversize"] == 0 and v["lineage_mismatch"] == 0, v
    assert v["still_aggregating"] == 0, v


def test_r5_leader_backend_killed_during_aggregation(fdb: str, workers: Any, chaos: Chaos) -> None:
    procs = [workers(AGG_ENV) for _ in range(2)]
    wait_ready(fdb, procs)
    stop = threading.Event()
    kills = {"leader": 0, "worker": 0}

    def killer() -> None:
        # Kills go on after the producers stop until the leader was killed three times (or
        # 30 s passed): a fast enqueue must not leave the test with too few leader changes.
        deadline = time.monotonic() + 30
        for i in itertools.count():
            if stop.wait(size(0.5, 1.0)) and (kills["leader"] >= 3 or time.monotonic() > deadline):
                return
            kills["leader"] += chaos.terminate("pgq:leader:%")
            if i % 3 == 2:  # also cut aggregation transactions in flight
                kills["worker"] += chaos.terminate("pgq:worker:%")

    k = threading.Thread(target=killer)
    k.start()
    t0 = time.monotonic()
    try:
        members = produce(fdb, size(1500, 20_000), size(30, 200), size(4, 8))
    finally:
        stop.set()
        k.join()
    produced_s = time.monotonic() - t0
    wait_for(lambda: _drained(fdb), 60, "every member aggregated")
    v = verify(fdb, members)
    with psycopg.connect(fdb, autocommit=True) as c:
        at = [r[0] for r in c.execute("SELECT enqueued_at FROM pgq.task WHERE type = 'digest' ORDER BY 1")]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(at)]
    leader_changes = sum(p.log().count("now leading") for p in procs)
    line = report(
        "R5",
        **v,
        leader_kills=kills["leader"],
        worker_backend_kills=kills["worker"],
        leader_changes=leader_changes,
        longest_gap_s=round(max(gaps), 3) if gaps else None,
        produce_s=round(produced_s, 2),
        workers_alive=sum(p.alive() for p in procs),
    )
    _assert_exactly_once(v)
    assert line["leader_kills"] > 0 and line["leader_changes"] > 1
    assert line["workers_alive"] == 2


def test_r6_concurrent_aggregators_without_leadership(fdb: str, workers: Any) -> None:
    argv = [sys.executable, "-m", "tests.fault.agg_proc", "run"]
    procs = [workers(AGG_ENV, argv=argv) for _ in range(3)]
    time.sleep(1.5)  # let them connect before the load starts
    members = produce(fdb, size(1500, 20_000), size(30, 200), size(4, 8))
    wait_for(lambda: _drained(fdb), 60, "every member aggregated")
    totals: list[dict[str, int]] = []
    for p in procs:
        assert p.stop() == 0, p.log()[-2000:]
        totals.append(json.loads(p.log().strip().splitlines()[-1]))
    v = verify(fdb, members)
    report(
        "R6",
        **v,
        aggregators=len(procs),
        rounds=sum(t["rounds"] for t in totals),
        contended=sum(t["contended"] for t in totals),
        tasks_per_aggregator=[t["tasks"] for t in totals],
    )
    _assert_exactly_once(v)
    assert sum(t["tasks"] for t in totals) == v["aggregates"]


def test_r7_sigkill_at_every_aggregation_failpoint(fdb: str, chaos: Chaos) -> None:
    rounds = size(2, 50)
    groups, per_group = 10, 4
    env = {**AGG_ENV, "FAULT_AGG_GRACE": "0.05", "PGQ_DSN": fdb}
    fs = subprocess.Popen(
        [sys.executable, "-m", "tests.fault.agg_proc", "forkserver"],
        cwd=REPO,
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert fs.stdin is not None and fs.stdout is not None
    members: list[int] = []
    by_fp: dict[str, dict[str, int]] = {}
    n = 0
    try:
        with psycopg.connect(fdb, autocommit=True) as c:
            for fp in FAILPOINTS:
                stats = by_fp.setdefault(fp, {"kills": 0, "rolled_back_ok": 0, "committed_ok": 0})
                for _ in range(rounds):
                    batch = [(n + i, f"g{(n + i) % groups}") for i in range(groups * per_group)]
                    n += len(batch)
                    with pgq.Client(fdb) as client:
                        client.enqueue_many([pgq.Task("m", m) for m, _ in batch[:1]], queue="agg", group="g0")
                        for m, g in batch[1:]:
                            client.enqueue(pgq.Task("m", m), queue="agg", group=g)
                    members += [m for m, _ in batch]
                    time.sleep(0.06)  # past the grace period: every group is due
                    before = _count(c, "SELECT count(*) FROM pgq.task WHERE type = 'digest'")
                    fs.stdin.write(f"aggregate.{fp}=kill\n")
                    fs.stdin.flush()
                    out = json.loads(fs.stdout.readline())
                    chaos.record("failpoint_kill", failpoint=fp, **out)
                    assert out["signal"] == 9, out
                    stats["kills"] += 1
                    after = _count(c, "SELECT count(*) FROM pgq.task WHERE type = 'digest'")
                    waiting = _count(c, "SELECT count(*) FROM pgq.task WHERE state = 'aggregating'")
                    if fp == "after_commit":
                        # committed before the crash: done, and never redone
                        assert after > before and waiting < len(batch) + _count_prev(members, batch)
                        stats["committed_ok"] += 1
                    else:
                        # crashed inside the transaction: everything rolled back
                        assert after == before, (fp, before, after)
                        stats["rolled_back_ok"] += 1
            # a clean aggregator drains whatever the crashes left
            fs.stdin.write("\n")
            fs.stdin.flush()
            out = json.loads(fs.stdout.readline())
            assert out["exit"] == 0, out
    finally:
        fs.stdin.close()
        fs.wait(30)
        fs.stdout.close()
    v = verify(fdb, members)
    report("R7", **v, kills=sum(s["kills"] for s in by_fp.values()), by_failpoint=by_fp)
    _assert_exactly_once(v)


def _count_prev(members: list[int], batch: list[tuple[int, str]]) -> int:
    return len(members) - len(batch)


def _count(c: psycopg.Connection[Any], q: str) -> int:
    row = c.execute(q).fetchone()  # type: ignore[arg-type]
    return int(row[0]) if row else 0
