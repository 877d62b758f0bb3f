"""R9: clock skew between nodes. The database clock is the only clock.

Worker A runs with its wall clock 10 minutes fast, worker B 10 minutes slow, and
server C (an aggregation candidate, like B) 10 minutes fast; two producers (one
fast, one slow) enqueue scheduled, immediate and grouped tasks. B's and C's slow
tasks run longer than the lease, so they live only by heartbeats. A is SIGKILLed
once while it holds tasks, and restarted. Everything is measured with database
timestamps:

- no false rescue: only the tasks A held when it was killed run twice or carry
  'lease expired'; every other task has attempt 1;
- no scheduled task starts before enqueued_at + process_in (the DB resolves
  process_in: run_at = enqueued_at + process_in exactly);
- no group is aggregated before least(newest + grace, oldest + max_delay);
- leadership does not flap: one election, no loss;
- A's tasks are rescued within lease + scan interval (a fast clock hides nothing).

libfaketime skews CLOCK_REALTIME only (FAKETIME_DONT_FAKE_MONOTONIC=1): the
monotonic clock measures durations and is not shared between nodes. See
tests/fault/skewed.py for why, and for the time.sleep workaround.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgq
from tests.fault import skewed
from tests.fault.chaos import REPO, Chaos, WorkerProc, duplicated_ids, ledger, report, size, wait_ready
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.fault

LEASE = 3.0  # as R1: a 2-core CI machine under load starves a process for a second or more
RECOVER = 0.3
GRACE = 0.8
MAX_DELAY = 1.5
CONCURRENCY = 8
SLOW_MS = 3500  # > LEASE: a slow task outlives its first lease, so heartbeats must extend it
KILLED_MS = 1500  # A's tasks: still in flight when A is killed, quick to rerun after the rescue
ENV = {
    "FAULT_LEASE": str(LEASE),
    "FAULT_RECOVER": str(RECOVER),
    "FAULT_CONCURRENCY": str(CONCURRENCY),
    "FAULT_POLL": "0.5",
}
AGG = {
    "FAULT_AGG_QUEUE": "agg",
    "FAULT_AGG_GRACE": str(GRACE),
    "FAULT_AGG_MAX_DELAY": str(MAX_DELAY),
    "FAULT_AGG_MAX_SIZE": "50",
}
WORKER_ARGV = skewed.argv("pgq", "worker", "tests.fault.app:server", "--log-level", "info")


@pytest.fixture(scope="module")
def faketime() -> str:
    """libfaketime's path, after proving it skews a Python process's wall clock only."""
    lib = skewed.libfaketime()
    if lib is None:
        pytest.skip(
            "libfaketime not found (Debian: apt-get install faketime; or set PGQ_FAULT_LIBFAKETIME "
            "to libfaketime.so.1)"
        )
    out = subprocess.run(
        skewed.argv("probe"),
        cwd=REPO,
        env={**os.environ, **skewed.env(lib, "+10m")},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    probe = json.loads(out.stdout)
    skew = probe["time"] - time.time()
    assert 590 < skew < 610 and 590 < probe["now"] - time.time() < 610, (lib, probe)
    assert abs(probe["monotonic"] - time.monotonic()) < 5, ("monotonic must stay real", probe)
    assert 0.04 < probe["slept"] < 1, probe
    return lib


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[str]]]:
    """Producer processes of the test; any still running afterwards are killed."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def _produce(lib: str, dsn: str, offset: str, tag: str, logdir: Path) -> subprocess.Popen[str]:
    with open(logdir / f"producer-{tag}.log", "w") as log:
        return subprocess.Popen(
            skewed.argv("produce", tag),
            cwd=REPO,
            env={**os.environ, "PGQ_DSN": dsn, **skewed.env(lib, offset)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )


def _rows(c: psycopg.Connection[Any], q: str, params: Any = None) -> list[tuple[Any, ...]]:
    return c.execute(q, params).fetchall()


def _leadership(procs: list[WorkerProc], phrase: str) -> dict[str, int]:
    """Per queue, how many log lines "<phrase> [queues]" the processes wrote."""
    counts: dict[str, int] = {}
    for p in procs:
        for m in re.finditer(re.escape(phrase) + r" (\[[^\]]*\])", p.log()):
            for q in ast.literal_eval(m.group(1)):
                counts[q] = counts.get(q, 0) + 1
    return counts


def test_r9_clock_skew_between_nodes(
    faketime: str, fdb: str, workers: Any, chaos: Chaos, spawned: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    fast, slow = skewed.env(faketime, "+10m"), skewed.env(faketime, "-10m")
    with psycopg.connect(fdb, autocommit=True) as c:
        t0 = _rows(c, "SELECT now()")[0][0]
    producers = spawned
    producers += [
        _produce(faketime, fdb, "+10m", "fast", tmp_path),
        _produce(faketime, fdb, "-10m", "slow", tmp_path),
    ]
    # Each worker also has a queue of its own, to hand it slow tasks deterministically.
    # C (fast clock) starts first and leads the aggregation of "agg"; B (slow clock) is
    # the standby candidate from then on.
    c_: WorkerProc = workers({**ENV, **AGG, **fast, "FAULT_QUEUES": "default,slow-c"}, argv=WORKER_ARGV)
    wait_for(lambda: _leadership([c_], "now leading the aggregation of").get("agg"), 30, "C to lead agg")
    a: WorkerProc = workers({**ENV, **fast, "FAULT_QUEUES": "default,slow-a"}, argv=WORKER_ARGV)
    b: WorkerProc = workers({**ENV, **AGG, **slow, "FAULT_QUEUES": "default,slow-b"}, argv=WORKER_ARGV)
    procs = [a, b, c_]
    skew_of = {a.pid: "+10m", b.pid: "-10m", c_.pid: "+10m"}
    wait_ready(fdb, procs)
    for p in producers:
        assert p.stdin is not None and p.stdout is not None
        assert p.stdout.readline().strip() == "ready", (tmp_path / "producer-fast.log").read_text()

    # Slow tasks first, 3 on each worker's own queue; B's and C's outlive the lease.
    with pgq.Client(fdb) as client:
        slow_ids = [
            int(i.id)
            for q, ms in (("slow-a", KILLED_MS), ("slow-b", SLOW_MS), ("slow-c", SLOW_MS))
            for i in client.enqueue_many(
                [pgq.Task("slow", {"ms": ms}) for _ in range(3)], queue=q, retention=3600
            )
        ]
    for p in producers:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.close()
    with pgq.Client(fdb) as client:
        imm_ids = [
            int(i.id)
            for i in client.enqueue_many(
                [pgq.Task("work", {"ms": chaos.rng.randint(1, 10)}) for _ in range(size(100, 2000))],
                retention=3600,
            )
        ]

    # The fault besides the skew: SIGKILL the fast worker while it holds slow tasks
    # (a fast clock must not delay their rescue), and restart it.
    wait_for(lambda: len(chaos.in_flight(fdb, a.pid)) >= 3, 15, "worker A to hold slow tasks")
    with psycopg.connect(fdb, autocommit=True) as c:
        held = chaos.sigkill(a, fdb)
        killed_at = _rows(c, "SELECT clock_timestamp()")[0][0]
        a.start()
        skew_of[a.pid] = "+10m"

        produced: list[dict[str, Any]] = []
        for p in producers:
            assert p.stdout is not None
            out = p.stdout.read()
            p.stdout.close()
            assert p.wait(30) == 0, (p.returncode, (tmp_path / "producer-fast.log").read_text())
            produced += [json.loads(line) for line in out.splitlines() if line.strip()]
        members = {m["id"]: m for m in produced if m["kind"] == "member"}
        scheduled = {int(m["id"]): m for m in produced if m["kind"] == "scheduled"}
        imm_ids += [int(m["id"]) for m in produced if m["kind"] == "immediate"]

        def settled() -> bool:
            row = _rows(
                c,
                "SELECT count(*) FILTER (WHERE state <> 'completed'), "
                "coalesce(sum(cardinality(members)) FILTER (WHERE type = 'digest'), 0) FROM pgq.task",
            )[0]
            return bool(row[0] == 0 and row[1] == len(members))

        try:
            wait_for(settled, 20, "every task completed and every member aggregated", interval=0.1)
            timed_out = False
        except AssertionError:  # report what did happen, then fail on the guarantee that broke
            timed_out = True

        task_ids = slow_ids + imm_ids + list(scheduled)
        completed = _rows(
            c, "SELECT count(*) FROM pgq.task WHERE id = ANY(%s) AND state = 'completed'", (task_ids,)
        )[0][0]
        lost = len(task_ids) - completed

        # False rescues: only A's in-flight tasks at the kill may be retried or rerun.
        lived = [i for i in task_ids if i not in held]
        reattempted = _rows(
            c,
            "SELECT id, attempt, last_error FROM pgq.task WHERE (type = 'digest' OR id = ANY(%s)) "
            "AND (attempt > 1 OR last_error IS NOT NULL)",
            (lived,),
        )
        rescued = _rows(
            c,
            "SELECT extract(epoch FROM last_failed_at - %s)::float8 FROM pgq.task "
            "WHERE id = ANY(%s) AND last_error = 'lease expired'",
            (killed_at, list(held)),
        )
        rescue_s = [r[0] for r in rescued]

        # Heartbeats: slow tasks that outlived their first lease, per skew of the process that ran them.
        extended = _rows(
            c,
            "SELECT l.pid, count(*) FROM pgq.task t JOIN chaos.exec_log l ON l.task_pk = t.id "
            "AND l.attempt = t.attempt WHERE t.id = ANY(%s) AND t.id <> ALL(%s) "
            "AND t.completed_at - t.started_at > %s * interval '1 second' GROUP BY 1",
            (slow_ids, list(held), LEASE),
        )
        extended_by_skew: dict[str, int] = {}
        for pid, n in extended:
            extended_by_skew[skew_of.get(pid, "?")] = extended_by_skew.get(skew_of.get(pid, "?"), 0) + n

        # Scheduled tasks: run_at resolved by the DB; nothing started before it.
        sched = _rows(
            c,
            "SELECT t.id, extract(epoch FROM t.run_at - t.enqueued_at)::float8, "
            "extract(epoch FROM t.started_at - t.run_at)::float8, "
            "extract(epoch FROM (SELECT min(l.at) FROM chaos.exec_log l WHERE l.task_pk = t.id) "
            "- t.run_at)::float8 FROM pgq.task t WHERE t.id = ANY(%s)",
            (list(scheduled),),
        )
        run_at_error = max(abs(r[1] - scheduled[r[0]]["process_in"]) for r in sched)
        starts = [v for r in sched for v in r[2:] if v is not None]
        early_start = min(starts) if starts else None

        # Groups: each aggregate inserted no earlier than its members made it due.
        digests = _rows(c, "SELECT enqueued_at, members FROM pgq.task WHERE type = 'digest'")
        early_agg: list[float] = []
        seen: list[str] = []
        for at, ids in digests:
            enq = [datetime.fromisoformat(members[i]["enqueued_at"]) for i in ids]
            due = min(max(enq) + timedelta(seconds=GRACE), min(enq) + timedelta(seconds=MAX_DELAY))
            early_agg.append((at - due).total_seconds())
            seen += ids

        servers = _rows(
            c,
            "SELECT max(abs(extract(epoch FROM now() - heartbeat_at))) FILTER (WHERE pid = ANY(%s))::float8, "
            "count(*) FILTER (WHERE started_at NOT BETWEEN %s AND now()) FROM pgq.server",
            ([p.pid for p in procs], t0),
        )[0]

    led = ledger(fdb)
    dup_outside = duplicated_ids(fdb) - held
    elected = _leadership(procs, "now leading the aggregation of")
    lost_lead = _leadership(procs, "no longer leading")
    leader_changes = elected.get("agg", 0)
    leader_lost = sum(lost_lead.values())
    tracebacks = sum(p.tracebacks() for p in procs)
    line = report(
        "R9",
        tasks=len(task_ids),
        lost=lost,
        timed_out=timed_out,
        false_rescues=len(reattempted),
        dup=led["dup"],
        dup_outside_in_flight=len(dup_outside),
        killed_in_flight=len(held),
        rescue_max_s=round(max(rescue_s), 3) if rescue_s else None,
        heartbeat_extended=extended_by_skew,
        scheduled=len(sched),
        run_at_error_s=round(run_at_error, 6),
        earliest_start_minus_scheduled_s=None if early_start is None else round(early_start, 3),
        aggregates=len(digests),
        members=len(members),
        earliest_aggregation_minus_due_s=round(min(early_agg), 3) if early_agg else None,
        leader_changes=leader_changes,
        leader_lost=leader_lost,
        elections_by_queue=elected,
        server_heartbeat_age_max_s=round(servers[0], 3),
        server_started_outside_test=servers[1],
        tracebacks=tracebacks,
        workers_alive=sum(p.alive() for p in procs),
    )
    assert reattempted == [], reattempted[:20]
    assert dup_outside == set(), sorted(dup_outside)[:20]
    assert early_start is None or early_start >= 0, early_start
    assert not early_agg or min(early_agg) >= 0, sorted(early_agg)[:5]
    assert lost == 0 and not timed_out
    assert held and len(rescue_s) == len(held), (held, rescue_s)
    assert max(rescue_s) <= LEASE + RECOVER + 2
    # the guarantee was exercised on both sides of the skew: leases extended by heartbeats
    assert extended_by_skew.get("+10m", 0) >= 1 and extended_by_skew.get("-10m", 0) >= 1, extended_by_skew
    assert line["run_at_error_s"] < 0.001
    assert sorted(seen) == sorted(members), "every member aggregated exactly once"
    # one election per queue (a server leads its queues' aggregation, every queue here
    # has a policy), and never lost: no flapping between the fast and the slow clocks
    assert leader_changes == 1 and leader_lost == 0, (elected, lost_lead)
    assert all(n == 1 for n in elected.values()), elected
    assert servers[0] < 5 and servers[1] == 0, servers  # registry rows stamped by the DB clock
    assert tracebacks == 0
    assert line["workers_alive"] == 3
