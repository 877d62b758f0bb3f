"""R11: PostgreSQL restarted (pg_ctl restart -m fast, then -m immediate: a crash
and WAL recovery) under load, on this module's own cluster with fsync on.
No acknowledged enqueue is lost; workers reconnect without restarting."""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

import psycopg
import pytest

import pgq
from tests.fault.chaos import Chaos, ledger, lost, percentile, report, resumed_after, size, wait_ready
from tests.fault.cluster import Cluster
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.fault

FSYNC = True  # durability is what this module measures


def test_r11_postgres_restarts_under_load(cluster: Cluster, fdb: str, workers: Any, chaos: Chaos) -> None:
    env = {"FAULT_CONCURRENCY": "4", "FAULT_LEASE": "5", "FAULT_RECOVER": "0.5", "FAULT_AGG_QUEUE": "agg"}
    procs = [workers(env) for _ in range(2)]
    wait_ready(fdb, procs)
    acked: list[int] = []
    unknown: list[str] = []
    refused = 0
    stop = threading.Event()
    lock = threading.Lock()

    def producer(client: pgq.Client) -> None:
        nonlocal refused
        while not stop.is_set():
            try:
                info = client.enqueue(pgq.Task("work", {"ms": 2}), retention=3600)
            except psycopg.OperationalError as exc:
                # The connection died: before the COMMIT was acknowledged the outcome is unknown.
                with lock:
                    unknown.append(str(exc)[:80])
                time.sleep(0.05)
                continue
            except Exception:
                with lock:
                    refused += 1
                time.sleep(0.05)
                continue
            with lock:
                acked.append(int(info.id))
            time.sleep(0.002)

    modes = ["fast"] * size(1, 3) + ["immediate"] * size(1, 3)
    resume: list[float] = []
    with pgq.Client(fdb) as client:
        ts = [threading.Thread(target=producer, args=(client,)) for _ in range(4)]
        for t in ts:
            t.start()
        try:
            for mode in modes:
                time.sleep(1.5)
                took = cluster.restart(mode)
                chaos.record("pg_restart", mode=mode, seconds=round(took, 3))
                with psycopg.connect(fdb, autocommit=True) as c:
                    up = c.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
                resumed = functools.partial(resumed_after, fdb, up)
                resume.append(
                    wait_for(resumed, 30, f"work to resume after restart -m {mode}").total_seconds()
                )
        finally:
            stop.set()
            for t in ts:
                t.join()
    with psycopg.connect(fdb, autocommit=True) as c:
        present = {r[0] for r in c.execute("SELECT id FROM pgq.task WHERE id = ANY(%s)", (acked,))}
    missing = len(set(acked) - present)
    wait_for(lambda: lost(fdb, acked) == 0, 60, "every acknowledged task completed", interval=0.25)
    logs = "".join(p.log() for p in procs)
    line = report(
        "R11",
        restarts=modes,
        acked=len(acked),
        acked_but_missing=missing,
        outcome_unknown=len(unknown),
        refused=refused,
        lost=lost(fdb, acked),
        dup=ledger(fdb)["dup"],
        worker_exits=sum(not p.alive() for p in procs),
        resume_p50_s=percentile(resume, 50),
        resume_max_s=round(max(resume), 3),
        listeners_reconnected=logs.count("listener: connection lost"),
        tracebacks=logs.count("Traceback"),
    )
    assert missing == 0
    assert line["lost"] == 0
    assert line["worker_exits"] == 0
    assert line["resume_max_s"] < 10
