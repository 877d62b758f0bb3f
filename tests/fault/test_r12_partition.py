"""R12: a worker partitioned from the database (half-open socket, or connections reset).

Worker W1 reaches PostgreSQL through the TCP proxy (tests/fault/proxy.py), W2
directly. While W1 runs tasks, the proxy blackholes W1 (its sockets stay open
and nothing arrives: a half-open connection) or cuts every connection and
refuses new ones, for longer than the lease; then it heals.

Guarantees: W1 stops trusting its leases at its local deadline (its handlers
are abandoned, it logs the lease lost) although no statement of its returns;
the recoverer moves W1's tasks and W2 finishes them; whatever W1 writes late
is fenced off (stale writes accepted: 0); W1 reconnects without a restart and
runs tasks again after the heal; nothing is lost; a task runs twice only if
W1 held it at the partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

import pgq
from pgq import tasks
from pgq.tasks import DONE, Ack
from tests.fault.chaos import Chaos, db_now, duplicated_ids, ledger, lost, report, size
from tests.fault.proxy import Proxy
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.fault

LEASE = size(2.0, 10.0)
#: How long the partition lasts: longer than the lease, so W1's tasks are rescued meanwhile.
OUTAGE = size(2 * LEASE, 45.0)
#: W1's tasks, all running at the partition: `slow` ones block in their result write (the write
#: cannot reach the database), so they still run at W1's local lease deadline and are abandoned;
#: `work` ones finish during the partition. The result writes and the `work` outcomes are W1's
#: late writes, which reach the database after the heal and must be fenced off.
TASK_MS = 800
SLOW = WORK = 2
ABANDON = re.compile(r"task \S+: .*; abandoning it")


def _rows(dsn: str, ids: list[int]) -> dict[int, dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as c:
        rows = c.execute("SELECT id, state, attempt, result FROM pgq.task WHERE id = ANY(%s)", (ids,))
        return {r["id"]: r for r in rows}


def _execs(dsn: str, pid: int) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM chaos.exec_log WHERE pid = %s", (pid,)).fetchone()
    return int(row[0]) if row else 0


def _first_exec(dsn: str, pk: int) -> dict[str, Any] | None:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as c:
        return c.execute(
            "SELECT pid, at FROM chaos.exec_log WHERE task_pk = %s ORDER BY at LIMIT 1", (pk,)
        ).fetchone()


async def _stale_ack(dsn: str, pk: int, attempt: int) -> set[int]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        return await tasks.ack_many(c.cursor(), tasks.Queries.load("pgq"), [Ack(pk, attempt, DONE)])


@pytest.mark.parametrize("mode", ["blackhole", "cut"])
def test_r12_partition(mode: str, fdb: str, workers: Any, chaos: Chaos, proxy: Proxy) -> None:
    env = {"FAULT_LEASE": str(LEASE), "FAULT_RECOVER": "0.3", "FAULT_CONCURRENCY": str(SLOW + WORK)}
    with pgq.Client(fdb) as client:
        batch = [pgq.Task("slow", {"ms": TASK_MS})] * SLOW + [pgq.Task("work", {"ms": TASK_MS})] * WORK
        ids = [int(i.id) for i in client.enqueue_many(batch, retention=3600)]
    slow_ids = set(ids[:SLOW])
    # W1 (through the proxy) also serves `probe`, which nobody else does: its resume signal.
    w1 = workers({**env, "FAULT_QUEUES": "default,probe"}, dsn=make_conninfo(fdb, **proxy.dsn_params()))
    wait_for(lambda: _execs(fdb, w1.pid) == len(ids), 20, "W1 to run its tasks")
    w2 = workers(env)  # it starts while W1 is partitioned; the tasks are all W1's until rescued

    proxy.set_mode(mode)
    t_part = time.monotonic()
    chaos.record("partition", mode=mode, worker=w1.n)
    time.sleep(0.1)  # a statement the proxy forwarded just before may still commit: let it land
    held = chaos.in_flight(fdb, w1.pid)
    held_attempt = {pk: r["attempt"] for pk, r in _rows(fdb, list(held)).items()}
    # Detection: W1 abandons its running tasks at its local lease deadline, while none of its
    # statements returns (blackhole) or it cannot get a connection (cut).
    wait_for(lambda: len(ABANDON.findall(w1.log())) >= SLOW, LEASE * 3, "W1 to abandon its tasks")
    detect_s = time.monotonic() - t_part
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - t_part)))

    proxy.set_mode("pass")
    t_heal = db_now(fdb)
    chaos.record("heal", mode=mode, worker=w1.n)
    with pgq.Client(fdb) as client:
        probe = int(client.enqueue(pgq.Task("work", {}), queue="probe", retention=3600).id)
    first = wait_for(lambda: _first_exec(fdb, probe), 30, "W1 to run a task after the heal")
    resume_s = (first["at"] - t_heal).total_seconds()
    # The recoverer (W2's) moved W1's tasks after the lease, and W2 ran them.
    wait_for(lambda: lost(fdb, [*ids, probe]) == 0, 30, "every task completed")
    rescued_s = time.monotonic() - t_part
    # W1's late writes (the results of its `slow` tasks, the outcomes of the others) reach the
    # database after the heal: each is fenced off (logged as lease lost, "... was not written").
    with contextlib.suppress(AssertionError):  # asserted below, after the report
        wait_for(lambda: w1.log().count("was not written") >= len(ids), 10, "W1's late writes")

    rows = _rows(fdb, ids)
    # Accepted stale writes: a result that is not W2's, a final attempt that is W1's, and W1's
    # attempt acknowledged now, straight to the database (the fence itself).
    stale = sum(1 for pk in slow_ids if (rows[pk]["result"] or {}).get("pid") != w2.pid)
    stale += sum(1 for pk in held if rows[pk]["attempt"] <= held_attempt[pk])
    stale += sum(len(asyncio.run(_stale_ack(fdb, pk, held_attempt[pk]))) for pk in held)
    led = ledger(fdb)
    dups = duplicated_ids(fdb)
    log = w1.log()
    line = report(
        f"R12-{mode}",
        lease_s=LEASE,
        outage_s=OUTAGE,
        in_flight=len(held),
        detect_s=round(detect_s, 3),
        abandoned=len(ABANDON.findall(log)),
        rescued_and_completed_s=round(rescued_s, 3),
        dup=led["dup"],
        dup_outside_in_flight=len(dups - held),
        stale_writes_accepted=stale,
        late_writes_rejected=log.count("was not written"),
        resume_after_heal_s=round(resume_s, 3),
        lost=lost(fdb, [*ids, probe]),
        w1_restarts=w1.starts - 1,
        w1_alive=w1.alive(),
    )
    assert held == set(ids), "W1 did not hold its tasks at the partition"
    # W1 stops trusting its leases at its local deadline (the lease; + heartbeat and log slack).
    assert line["detect_s"] <= LEASE + 1.5, log[-3000:]
    assert line["stale_writes_accepted"] == 0
    assert line["late_writes_rejected"] == len(ids)
    assert line["lost"] == 0
    assert line["dup"] <= len(held) and line["dup_outside_in_flight"] == 0
    assert first["pid"] == w1.pid and line["w1_restarts"] == 0 and w1.alive()
    # W1's claimer backs off to 5 s at most. After a cut, W1's pool must also open connections
    # again, and psycopg_pool retries with an uncapped doubling backoff (1, 2, 4, 8, 16 s ...):
    # after a 45 s cut its next attempt can come up to ~the outage after the heal (open item).
    assert line["resume_after_heal_s"] < 5.0 + (OUTAGE if mode == "cut" else 0.0), log[-3000:]
    assert w2.alive()
