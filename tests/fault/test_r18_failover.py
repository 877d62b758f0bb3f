"""R18: failover to a streaming replica (documents the boundary).

A primary and a `pg_basebackup -R` replica (tests/fault/replica.py); workers
and producers use `host=127.0.0.1,127.0.0.1 port=A,B
target_session_attrs=read-write`. Under load the replication link is cut
(the replica lags, as behind a slow network), then the primary is stopped with
`pg_ctl stop -m immediate` and the replica promoted. Run twice: asynchronous
replication, and synchronous with `synchronous_commit=remote_apply`.

What is measured where: the producers' acknowledgements (id and a unique key
per task, since a promoted asynchronous replica may hand out the lost tasks'
ids again) are kept in this process's memory; the completions committed before
the crash are read from the old primary just before it is stopped. The ledger
(chaos.exec_log) is in the failed-over database, so only its rows written after
the promote are used to count executions.

Guarantees, both modes: the same worker processes (no restart) run tasks on
the new primary, the aggregation leader is re-elected there, producers enqueue
there, and every acknowledged task that survived completes. Synchronous: no
acknowledged enqueue is lost and no committed completion is reverted (its task
run again). Asynchronous: the losses are reported, never asserted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import pgq
from tests.fault.chaos import (
    Chaos,
    WorkerProc,
    backends,
    db_now,
    lost,
    report,
    resumed_after,
    size,
    wait_ready,
)
from tests.fault.replica import Pair, replica_pair
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.fault

#: Load before the replication link is cut, and how long the replica lags before the crash.
LOAD_EXECUTIONS = size(100, 2000)
LAG = size(0.5, 3.0)
PRODUCERS = 3
#: Slower than the producers enqueue (asynchronously), so a backlog builds: tasks enqueued before
#: the cut complete during it, and a lost completion of theirs shows as a re-run.
TASK_MS = 20
WORKERS = 2

Pairs = set[tuple[int, str]]


@pytest.fixture(params=["async", "sync"])
def pair(request: pytest.FixtureRequest, golden: Path) -> Iterator[Pair]:
    with replica_pair(synchronous=request.param == "sync", golden=golden) as p:
        yield p


def _count(dsn: str, sql: str, *params: Any) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


def _keyed(dsn: str, state: str | None = None) -> dict[int, tuple[str | None, str]]:
    """id -> (payload key, state) of the work tasks (in `state` only, if given)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute(
            "SELECT id, payload->>'k', state::text FROM pgq.task "
            "WHERE type = 'work' AND (%(s)s::text IS NULL OR state::text = %(s)s)",
            {"s": state},
        )
        return {r[0]: (r[1], r[2]) for r in rows}


def sync_guarantee(figures: dict[str, Any]) -> None:
    """What synchronous replication promises; the async run is the same check's counter-example."""
    assert figures["enqueues_lost"] == 0, figures
    assert figures["completions_reverted"] == 0, figures
    assert figures["completions_lost_with_task"] == 0, figures
    assert figures["completions_rerun"] == 0, figures


def test_r18_failover_to_replica(pair: Pair, tmp_path: Path) -> None:
    mode = "sync" if pair.synchronous else "async"
    dsn = pair.new_db()
    dbname = conninfo_to_dict(dsn)["dbname"]
    old_dsn = pair.primary.dsn(str(dbname))  # the primary alone: what it has committed
    new_dsn = pair.replica.dsn(str(dbname))
    chaos = Chaos(old_dsn, tmp_path / "chaos.jsonl")
    env = {
        "FAULT_CONCURRENCY": "4",
        "FAULT_LEASE": "2",
        "FAULT_RECOVER": "0.5",
        "FAULT_POLL": "0.5",
        "FAULT_AGG_QUEUE": "agg",
    }
    procs = [WorkerProc(dsn, tmp_path, n, env).start() for n in range(WORKERS)]
    acked: list[tuple[int, str, float]] = []  # (id, key, monotonic time of the acknowledgement)
    unknown = 0
    stop = threading.Event()
    lock = threading.Lock()

    def producer(n: int, client: pgq.Client) -> None:
        nonlocal unknown
        seq = 0
        while not stop.is_set():
            seq += 1
            key = f"{n}-{seq}"
            try:
                info = client.enqueue(pgq.Task("work", {"ms": TASK_MS, "k": key}), retention=3600)
            except (psycopg.Error, pgq.PgqError):
                # No acknowledgement: the outcome is unknown (the crash, or no primary yet).
                with lock:
                    unknown += 1
                time.sleep(0.05)
                continue
            with lock:
                acked.append((int(info.id), key, time.monotonic()))
            time.sleep(0.002)

    try:
        wait_ready(dsn, procs)
        with pgq.Client(dsn) as client:
            ts = [threading.Thread(target=producer, args=(n, client)) for n in range(PRODUCERS)]
            for t in ts:
                t.start()
            try:
                wait_for(
                    lambda: _count(old_dsn, "SELECT count(*) FROM chaos.exec_log") >= LOAD_EXECUTIONS,
                    30,
                    f"{LOAD_EXECUTIONS} executions on the primary",
                )
                pair.replica.disconnect()
                chaos.record("replication_cut", mode=mode)
                time.sleep(LAG)  # the fault's length: the replica lags this long
                # Just before the crash: what the primary has committed (completed tasks, ledger).
                completed_before = {
                    (i, k) for i, (k, s) in _keyed(old_dsn, "completed").items() if k is not None
                }
                ledger_before = _count(old_dsn, "SELECT count(*) FROM chaos.exec_log")
                t_crash = time.monotonic()
                pair.primary.stop("immediate")
                chaos.record("primary_stop_immediate")
                promote_s = pair.replica.promote()
                t_promote = time.monotonic()
                promoted_at = db_now(new_dsn)
                chaos.record("promote", seconds=round(promote_s, 3))
                # Right after the promote, before any worker could re-run a task: what survived.
                survived = _keyed(new_dsn)
                ledger_after = _count(new_dsn, "SELECT count(*) FROM chaos.exec_log")
                resume = wait_for(lambda: resumed_after(dsn, promoted_at), 30, "work to resume")
                pids = [p.pid for p in procs]
                wait_for(
                    lambda: (
                        _count(
                            new_dsn,
                            "SELECT count(DISTINCT pid) FROM chaos.exec_log WHERE at > %s AND pid = ANY(%s)",
                            promoted_at,
                            pids,
                        )
                        == len(pids)
                    ),
                    30,
                    "every worker process to run tasks on the new primary",
                )
                wait_for(
                    lambda: backends(new_dsn, "pgq:leader:%", str(dbname)) >= 1,
                    30,
                    "an aggregation leader on the new primary",
                )
                wait_for(
                    lambda: sum(1 for a in acked if a[2] > t_promote) >= 20,
                    30,
                    "producers to enqueue on the new primary",
                )
                producers_resume_s = min(a[2] for a in acked if a[2] > t_promote) - t_promote
            finally:
                stop.set()
                for t in ts:
                    t.join()
        present = _keyed(new_dsn)
        acked_keys = {(i, k) for i, k, _ in acked}
        acked_before = {(i, k) for i, k, at in acked if at < t_crash}
        enqueues_lost = {(i, k) for i, k in acked_keys if present.get(i, (None, ""))[0] != k}
        # A completion committed on the old primary is lost with its task when the task is gone
        # (its enqueue was not replicated either), reverted when the task is there but not
        # completed right after the promote, and re-run when the task executes after the promote.
        gone = {(i, k) for i, k in completed_before if survived.get(i, (None, ""))[0] != k}
        reverted = {(i, k) for i, k in completed_before - gone if survived[i][1] != "completed"}
        surviving_acked = [i for i, k in acked_keys - enqueues_lost]
        wait_for(lambda: lost(dsn, surviving_acked) == 0, 60, "every surviving acknowledged task completed")
        rerun = _count(
            new_dsn,
            "SELECT count(DISTINCT task_pk) FROM chaos.exec_log WHERE at > %s AND task_pk = ANY(%s)",
            promoted_at,
            [i for i, k in completed_before - gone],
        )
        figures = report(
            "R18",
            mode=mode,
            acked=len(acked_keys),
            acked_before_crash=len(acked_before),
            enqueues_lost=len(enqueues_lost),
            outcome_unknown=unknown,
            completed_before_crash=len(completed_before),
            completions_reverted=len(reverted),
            completions_lost_with_task=len(gone),
            completions_rerun=rerun,
            ledger_rows_lost=max(0, ledger_before - ledger_after),
            promote_s=round(promote_s, 3),
            resume_s=round(resume.total_seconds(), 3),
            producers_resume_s=round(producers_resume_s, 3),
            worker_restarts=sum(p.starts - 1 for p in procs) + sum(not p.alive() for p in procs),
            tracebacks=sum(p.tracebacks() for p in procs),
        )
    finally:
        for p in procs:
            if p.alive():
                p.kill()
    assert figures["worker_restarts"] == 0
    assert figures["completed_before_crash"] > 0 and figures["acked_before_crash"] > 0
    assert figures["resume_s"] < 15
    if pair.synchronous:
        sync_guarantee(figures)
