"""R3: a paused (SIGSTOP) worker resumes after its task was recovered and
completed elsewhere: its late writes are rejected. R4: graceful and forced
shutdown."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import pgq
from pgq import tasks
from pgq.tasks import DONE, Ack
from tests.fault.chaos import Chaos, ledger, lost, report, states, wait_ready
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.fault


def _row(dsn: str, pk: int) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as c:
        row = c.execute("SELECT * FROM pgq.task WHERE id = %s", (pk,)).fetchone()
    assert row is not None
    return row


def _executions(dsn: str, pk: int | None = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as c:
        return c.execute(
            "SELECT * FROM chaos.exec_log WHERE %(pk)s::bigint IS NULL OR task_pk = %(pk)s ORDER BY at",
            {"pk": pk},
        ).fetchall()


async def _stale_ack(dsn: str, pk: int, attempt: int) -> set[int]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        return await tasks.ack_many(c.cursor(), tasks.Queries.load("pgq"), [Ack(pk, attempt, DONE)])


def test_r3_stopped_worker_late_writes_rejected(fdb: str, workers: Any, chaos: Chaos) -> None:
    env = {"FAULT_LEASE": "1.5", "FAULT_RECOVER": "0.3", "FAULT_CONCURRENCY": "1", "FAULT_POLL": "0.5"}
    a = workers(env)
    wait_ready(fdb, [a])
    with pgq.Client(fdb) as client:
        pk = int(client.enqueue(pgq.Task("slow", {"ms": 2500}), retention=3600).id)
    wait_for(lambda: _executions(fdb, pk), 10, "worker A to start the task")
    a.signal(signal.SIGSTOP)
    chaos.record("sigstop", worker=a.n, pid=a.pid)
    t_stop = time.monotonic()
    b = workers(env)
    done = wait_for(lambda: _row(fdb, pk)["state"] == "completed" and _row(fdb, pk), 20, "B to complete it")
    recovered_in = time.monotonic() - t_stop
    a.signal(signal.SIGCONT)
    chaos.record("sigcont", worker=a.n, pid=a.pid)
    # A's handler wakes up, finishes and writes its result and outcome: all fenced off.
    wait_for(lambda: "lease" in a.log(), 10, "worker A to notice it lost the lease")
    time.sleep(0.5)
    after = _row(fdb, pk)
    # A stale write sent straight to the database is rejected by the (id, attempt) fence too.
    applied = asyncio.run(_stale_ack(fdb, pk, 1))
    execs = _executions(fdb, pk)
    stale_writes = int(after["result"] != done["result"]) + int(after["completed_at"] != done["completed_at"])
    line = report(
        "R3",
        executions=len(execs),
        attempts=[e["attempt"] for e in execs],
        final_attempt=after["attempt"],
        result_pid=(after["result"] or {}).get("pid"),
        winner_pid=b.pid,
        stale_writes_accepted=stale_writes + len(applied),
        recovered_and_completed_s=round(recovered_in, 3),
        a_alive=a.alive(),
    )
    assert [e["pid"] for e in execs] == [a.pid, b.pid]
    assert line["attempts"] == [1, 2] and after["attempt"] == 2
    assert line["result_pid"] == b.pid
    assert line["stale_writes_accepted"] == 0
    assert a.alive() and b.alive()


def test_r4_graceful_shutdown_finishes_running_tasks(fdb: str, workers: Any) -> None:
    w = workers({"FAULT_CONCURRENCY": "4", "FAULT_SHUTDOWN_TIMEOUT": "10"})
    wait_ready(fdb, [w])
    with pgq.Client(fdb) as client:
        ids = [int(i.id) for i in client.enqueue_many([pgq.Task("work", {"ms": 1000})] * 4, retention=3600)]
    wait_for(lambda: len(_executions(fdb)) == 4, 10, "4 running tasks")
    t0 = time.monotonic()
    w.signal(signal.SIGTERM)
    rc = w.wait(15)
    took = time.monotonic() - t0
    line = report(
        "R4-graceful",
        exit_code=rc,
        exit_s=round(took, 3),
        lost=lost(fdb, ids),
        dup=ledger(fdb)["dup"],
        tracebacks=w.tracebacks(),
        server_rows=_count(fdb, "SELECT count(*) FROM pgq.server"),
    )
    assert rc == 0, w.log()[-3000:]
    assert line["lost"] == 0 and line["dup"] == 0
    assert line["tracebacks"] == 0, w.log()[-3000:]
    assert line["server_rows"] == 0
    assert took < 1.0 + 3


def test_r4_shutdown_timeout_requeues_without_retry(fdb: str, workers: Any) -> None:
    w = workers({"FAULT_CONCURRENCY": "4", "FAULT_SHUTDOWN_TIMEOUT": "0.5"})
    wait_ready(fdb, [w])
    with pgq.Client(fdb) as client:
        ids = [int(i.id) for i in client.enqueue_many([pgq.Task("work", {"ms": 2500})] * 4, retention=3600)]
    wait_for(lambda: len(_executions(fdb)) == 4, 10, "4 running tasks")
    t0 = time.monotonic()
    w.signal(signal.SIGTERM)
    rc = w.wait(15)
    took = time.monotonic() - t0
    st = states(fdb, ids)
    with psycopg.connect(fdb, autocommit=True) as c:
        retried = [r[0] for r in c.execute("SELECT retried FROM pgq.task WHERE id = ANY(%s)", (ids,))]
    w2 = workers({"FAULT_CONCURRENCY": "4"})
    wait_for(lambda: lost(fdb, ids) == 0, 20, "the requeued tasks to complete elsewhere")
    line = report(
        "R4-timeout",
        exit_code=rc,
        exit_s=round(took, 3),
        requeued=st.get("pending", 0),
        retried_after_requeue=max(retried),
        lost=lost(fdb, ids),
        dup=ledger(fdb)["dup"],
        bound=4,
        tracebacks=w.tracebacks(),
    )
    assert rc == 0, w.log()[-3000:]
    assert st == {"pending": 4}
    assert max(retried) == 0
    assert took < 0.5 + 3
    assert line["dup"] <= 4 and line["tracebacks"] == 0
    assert w2.alive()


def test_r4_second_signal_exits_at_once(fdb: str, workers: Any) -> None:
    env = {
        "FAULT_CONCURRENCY": "4",
        "FAULT_SHUTDOWN_TIMEOUT": "30",
        "FAULT_LEASE": "1.5",
        "FAULT_RECOVER": "0.3",
    }
    w = workers(env)
    wait_ready(fdb, [w])
    with pgq.Client(fdb) as client:
        ids = [int(i.id) for i in client.enqueue_many([pgq.Task("work", {"ms": 2500})] * 4, retention=3600)]
    wait_for(lambda: len(_executions(fdb)) == 4, 10, "4 running tasks")
    t0 = time.monotonic()
    w.signal(signal.SIGTERM)
    time.sleep(0.2)
    w.signal(signal.SIGTERM)
    rc = w.wait(10)
    took = time.monotonic() - t0
    left_active = states(fdb, ids).get("active", 0)
    w2 = workers(env)
    wait_for(lambda: lost(fdb, ids) == 0, 20, "the abandoned tasks to be recovered and completed")
    line = report(
        "R4-forced",
        exit_code=rc,
        exit_s=round(took, 3),
        left_active=left_active,
        lost=lost(fdb, ids),
        dup=ledger(fdb)["dup"],
        bound=4,
    )
    assert rc is not None and took < 3
    assert left_active == 4
    assert line["lost"] == 0 and line["dup"] <= 4
    assert w2.alive()


def _count(dsn: str, q: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(q).fetchone()  # type: ignore[arg-type]
    return int(row[0]) if row else 0
