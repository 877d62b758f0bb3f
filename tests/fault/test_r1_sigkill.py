"""R1: SIGKILL workers under load. Nothing is lost; a task runs more than once
only if it was in flight (active, locked by the killed process) at a kill."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

import pgq
from tests.fault.chaos import (
    Chaos,
    WorkerProc,
    duplicated_ids,
    ledger,
    lost,
    percentile,
    report,
    size,
    wait_ready,
)
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.fault

ENV = {"FAULT_LEASE": "3", "FAULT_RECOVER": "0.5", "FAULT_CONCURRENCY": "4", "FAULT_POLL": "0.5"}


def enqueue(dsn: str, n: int, rng: Any) -> list[int]:
    ids: list[int] = []
    with pgq.Client(dsn) as client:
        for start in range(0, n, 1000):
            batch = [pgq.Task("work", {"ms": rng.randint(5, 15)}) for _ in range(min(1000, n - start))]
            ids += [int(i.id) for i in client.enqueue_many(batch, retention=3600)]
    return ids


def test_r1_sigkill_workers_under_load(fdb: str, workers: Any, chaos: Chaos) -> None:
    n_tasks = size(3000, 20_000)
    n_workers = size(3, 4)
    kills = size(3, 20)
    gap = size((0.4, 0.9), (1.0, 3.0))
    env = {**ENV, "FAULT_CONCURRENCY": str(size(4, 8))}
    ids = enqueue(fdb, n_tasks, chaos.rng)
    procs: list[WorkerProc] = [workers(env) for _ in range(n_workers)]
    wait_ready(fdb, procs)
    in_flight: set[int] = set()
    bound = 0
    kill_times: list[tuple[Any, set[int]]] = []
    with psycopg.connect(fdb, autocommit=True) as c:
        for _ in range(kills):
            time.sleep(chaos.rng.uniform(*gap))
            w = chaos.rng.choice(procs)
            held = chaos.sigkill(w, fdb)
            row = c.execute("SELECT clock_timestamp()").fetchone()
            assert row is not None
            kill_times.append((row[0], held))
            in_flight |= held
            bound += len(held)
            w.start()  # the operator's supervisor restarts it
        wait_for(lambda: lost(fdb, ids) == 0, size(60, 900), "every task completed", interval=0.25)
        # kill -> rescue: the recoverer stamps last_failed_at when it moves an expired lease
        rescue: list[float] = []
        for at, held in kill_times:
            rows = c.execute(
                "SELECT extract(epoch FROM last_failed_at - %s)::float8 FROM pgq.task "
                "WHERE id = ANY(%s) AND last_error = 'lease expired' AND last_failed_at > %s",
                (at, list(held), at),
            ).fetchall()
            rescue += [r[0] for r in rows]
        lat = [
            r[0]
            for r in c.execute(
                "SELECT extract(epoch FROM completed_at - enqueued_at)::float8 FROM pgq.task "
                "WHERE state = 'completed'"
            ).fetchall()
        ]
    alive = sum(w.alive() for w in procs)
    led = ledger(fdb)
    dups = duplicated_ids(fdb)
    line = report(
        "R1",
        tasks=n_tasks,
        lost=lost(fdb, ids),
        dup=led["dup"],
        bound=bound,
        dup_outside_in_flight=len(dups - in_flight),
        kills=len(kill_times),
        executions=led["executions"],
        rescue_p99_s=percentile(rescue, 99),
        rescue_max_s=max(rescue) if rescue else None,
        latency_p99_s=percentile(lat, 99),
        workers_alive=alive,
    )
    assert line["lost"] == 0
    assert line["dup_outside_in_flight"] == 0, sorted(dups - in_flight)[:20]
    assert line["dup"] <= bound
    assert alive == n_workers
    # kill -> rescue within lease + recover interval + 1 s (plus scheduling slack on 2 cores)
    assert not rescue or max(rescue) <= 3 + 0.5 + 1 + 2
