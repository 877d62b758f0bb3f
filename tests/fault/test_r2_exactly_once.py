"""R2: transactional completion gives exactly-once effects.

Each task's handler (tests/fault/app.py: `effect`, `effect_async`) inserts an
effect row and calls task.complete(conn) / complete_async(conn) in one
transaction, then commits. The effects table has no unique constraint, so a
duplicate effect shows. Workers are SIGKILLed on R1's schedule and, through the
failpoint `complete.before_commit` (kill), on 5 % of completions and on the 20th of
each worker's life, between the completion statement and the commit; a supervisor loop restarts every dead
worker. Executions may repeat (a crash before the commit), effects may not.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

import pgq
from tests.fault.chaos import Chaos, WorkerProc, ledger, lost, report, size, wait_ready

pytestmark = pytest.mark.fault

# 5 % of completions, and for certain the 20th of each worker process's life: the run always
# has crashes between the completion statement and the commit (kill:0.05 alone has none in
# 150 completions about 5 times in 10,000).
FAILPOINT = "complete.before_commit@20=kill,complete.before_commit=kill:0.05"
ENV = {
    "FAULT_LEASE": "1",
    "FAULT_RECOVER": "0.2",
    "FAULT_CONCURRENCY": "4",
    "FAULT_POLL": "0.5",
    "FAULT_RETRY_DELAY": "0.05",
    "PGQ_FAILPOINTS": FAILPOINT,
}

#: Deliberately no unique constraint and no primary key: a second effect of a task is a second row.
EFFECT_SQL = """
CREATE TABLE chaos.effect (
    task_pk  bigint NOT NULL,
    attempt  integer,
    pid      integer NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX effect_task_idx ON chaos.effect (task_pk);
"""


def enqueue(dsn: str, n: int) -> list[int]:
    """n tasks, alternating the sync handler (complete) and the async one (complete_async)."""
    ids: list[int] = []
    with pgq.Client(dsn) as client:
        for start in range(0, n, 1000):
            batch = [
                pgq.Task("effect" if i % 2 == 0 else "effect_async", {"i": i})
                for i in range(start, min(start + 1000, n))
            ]
            ids += [int(i.id) for i in client.enqueue_many(batch, retention=3600)]
    return ids


def unfinished(c: psycopg.Connection[Any]) -> int:
    row = c.execute("SELECT count(*) FROM pgq.task WHERE state <> 'completed'").fetchone()
    return int(row[0]) if row else -1


def effects(c: psycopg.Connection[Any]) -> dict[str, int]:
    """Jobs without exactly one effect row, surplus effect rows, and effects of another attempt."""
    row = c.execute(
        """
        WITH e AS (SELECT task_pk, count(*) AS n, min(attempt) AS lo, max(attempt) AS hi
                   FROM chaos.effect GROUP BY 1)
        SELECT count(*) FILTER (WHERE coalesce(e.n, 0) <> 1),
               coalesce(sum(e.n - 1), 0),
               count(*) FILTER (WHERE e.lo <> t.attempt OR e.hi <> t.attempt),
               (SELECT count(*) FROM e WHERE NOT EXISTS (SELECT FROM pgq.task x WHERE x.id = e.task_pk))
        FROM pgq.task t LEFT JOIN e ON e.task_pk = t.id
        """
    ).fetchone()
    assert row is not None
    return {"not_one": row[0], "dup_effects": int(row[1]), "other_attempt": row[2], "orphans": row[3]}


def test_r2_exactly_once_effects_under_kills(fdb: str, workers: Any, chaos: Chaos) -> None:
    n_tasks = size(100, 100_000)
    n_workers = size(2, 4)
    kills = size(3, 20)
    gap = size((0.4, 0.9), (1.0, 3.0))
    with psycopg.connect(fdb, autocommit=True) as c:
        c.execute(EFFECT_SQL)
    ids = enqueue(fdb, n_tasks)
    t0 = time.monotonic()
    procs: list[WorkerProc] = [workers(ENV) for _ in range(n_workers)]
    wait_ready(fdb, procs)
    next_kill = time.monotonic() + chaos.rng.uniform(*gap)
    scheduled = failpoint = unexpected = 0
    deadline = time.monotonic() + size(90, 3300)  # full: inside fault_full.py's 3600 s timeout
    tick = 0
    with psycopg.connect(fdb, autocommit=True) as c:
        # the supervisor: every 50 ms, a scheduled kill when due and a restart of any dead
        # worker; every 0.5 s, whether every task has completed
        while tick % 10 or unfinished(c):
            tick += 1
            assert time.monotonic() < deadline, f"tasks unfinished: {unfinished(c)} / {n_tasks}"
            if scheduled < kills and time.monotonic() >= next_kill:
                w = chaos.rng.choice(procs)
                if w.alive():
                    chaos.sigkill(w, fdb)
                    scheduled += 1
                    w.start()  # the operator's supervisor restarts it
                next_kill = time.monotonic() + chaos.rng.uniform(*gap)
            for w in procs:  # a worker the failpoint killed: count it, restart it
                if not w.alive():
                    assert w.proc is not None
                    rc = w.proc.returncode
                    chaos.record("exited", worker=w.n, pid=w.pid, rc=rc)
                    if rc == -9:
                        failpoint += 1
                    else:
                        unexpected += 1
                    w.start()
            time.sleep(0.05)
        for w in procs:  # nothing can commit after this: the counts below are final
            w.kill()
        eff = effects(c)
    wall = round(time.monotonic() - t0, 2)
    led = ledger(fdb)
    line = report(
        "R2",
        tasks=n_tasks,
        lost=lost(fdb, ids),
        kills=scheduled + failpoint,
        kills_schedule=scheduled,
        kills_failpoint=failpoint,
        unexpected_exits=unexpected,
        jobs_not_one_effect=eff["not_one"],
        executions=led["executions"],
        dup_executions=led["dup"],
        dup_effects=eff["dup_effects"],
        effects_of_another_attempt=eff["other_attempt"],
        orphan_effects=eff["orphans"],
        wall_s=wall,
        summary=f"jobs with != 1 effect row: {eff['not_one']} / {n_tasks}",
    )
    assert line["lost"] == 0
    assert line["jobs_not_one_effect"] == 0, line["summary"]
    assert line["dup_effects"] == 0
    # the effect that committed is the one of the attempt whose completion committed with it
    assert line["effects_of_another_attempt"] == 0
    assert line["orphan_effects"] == 0
    assert unexpected == 0, [w.log()[-2000:] for w in procs]
    # the fault happened: completions were cut between the ack and the commit, and re-run; and
    # R1's schedule killed workers (it may not finish its kills before the work does)
    assert failpoint > 0 and scheduled >= 1
    assert led["dup"] > 0
