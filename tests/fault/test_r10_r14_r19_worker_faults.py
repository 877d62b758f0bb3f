"""R10: the LISTEN backend is terminated: tasks are still picked up promptly.
R14: timeouts and an ACCESS EXCLUSIVE lock held by another session: no crash
loop, work resumes. R19: poison tasks: workers survive, healthy tasks are not lost."""

from __future__ import annotations

import functools
import re
import threading
import time
from typing import Any

import psycopg
import pytest

import pgq
from tests.fault.chaos import (
    Chaos,
    backends,
    ledger,
    lost,
    percentile,
    pgq_idle_in_tx,
    report,
    resumed_after,
    size,
    states,
    wait_ready,
)
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.fault


def _dbname(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


def _pickups(dsn: str, ids: list[int]) -> list[float]:
    with psycopg.connect(dsn, autocommit=True) as c:
        return [
            r[0]
            for r in c.execute(
                "SELECT extract(epoch FROM min(l.at) - t.enqueued_at)::float8 FROM pgq.task t "
                "JOIN chaos.exec_log l ON l.task_pk = t.id WHERE t.id = ANY(%s) GROUP BY t.id, t.enqueued_at",
                (ids,),
            )
        ]


def test_r10_listener_backend_terminated(fdb: str, admin_dsn: str, workers: Any, chaos: Chaos) -> None:
    env = {"FAULT_POLL": "60", "FAULT_CONCURRENCY": "8"}
    procs = [workers(env) for _ in range(2)]
    wait_ready(fdb, procs)
    db = _dbname(fdb)
    wait_for(lambda: backends(admin_dsn, "pgq:listener:%", db) == 2, 10, "two listeners")
    cycles, per_cycle = size(3, 20), size(50, 500)
    pickups: list[float] = []
    first: list[float] = []  # per cut: the first pickup (reconnect + re-poll; the rest is throughput)
    all_ids: list[int] = []
    with pgq.Client(fdb) as client:
        for _ in range(cycles):
            assert chaos.terminate("pgq:listener:%") == 2
            ids = [int(i.id) for i in client.enqueue_many([pgq.Task("work", {})] * per_cycle, retention=3600)]
            all_ids += ids
            wait_for(lambda ids=ids: lost(fdb, ids) == 0, 30, "the tasks enqueued during the reconnect gap")
            got = _pickups(fdb, ids)
            pickups += got
            first.append(min(got))
            wait_for(lambda: backends(admin_dsn, "pgq:listener:%", db) == 2, 10, "listeners re-established")
    listeners = backends(admin_dsn, "pgq:listener:%", db)
    line = report(
        "R10",
        cycles=cycles,
        tasks=len(all_ids),
        missed=lost(fdb, all_ids),
        pickup_p99_s=percentile(pickups, 99),
        pickup_max_s=round(max(pickups), 3),
        first_pickup_max_s=round(max(first), 3),
        listeners_after=listeners,
        poll_interval_s=60,
        workers_alive=sum(p.alive() for p in procs),
    )
    assert line["missed"] == 0
    assert line["first_pickup_max_s"] < 5  # reconnect backoff + one re-poll, not the 60 s poll
    assert listeners == 2 and line["workers_alive"] == 2


def _logger(line: str) -> str:
    """The logger's name in a line of `pgq worker`'s text log ("date time LEVEL name [pid] ...")."""
    parts = line.split(" ", 4)
    return parts[3] if len(parts) > 4 else ""


def test_r14_timeouts_and_table_lock(fdb: str, admin_dsn: str, workers: Any, chaos: Chaos) -> None:
    db = _dbname(fdb)
    with psycopg.connect(admin_dsn, autocommit=True) as a:
        a.execute(
            f"ALTER DATABASE \"{db}\" SET statement_timeout = '2s'; "
            f"ALTER DATABASE \"{db}\" SET idle_in_transaction_session_timeout = '2s'; "
            f"ALTER DATABASE \"{db}\" SET idle_session_timeout = '4s'"
        )
    env = {"FAULT_CONCURRENCY": "4", "FAULT_LEASE": "10", "FAULT_AGG_QUEUE": "agg"}
    procs = [workers(env) for _ in range(2)]
    wait_ready(fdb, procs)
    n = size(600, 5_000)
    with pgq.Client(fdb) as client:
        ids = [int(i.id) for i in client.enqueue_many([pgq.Task("work", {"ms": 50})] * n, retention=3600)]
    samples: list[float] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(0.2):
            rows = pgq_idle_in_tx(admin_dsn, 0.0)
            samples.append(max((r["age"].total_seconds() for r in rows), default=0.0))

    s = threading.Thread(target=sampler)
    s.start()
    episodes, hold = size(1, 3), size(4.0, 10.0)
    recovery: list[float] = []
    log_lines: list[int] = []
    db_lines: list[int] = []  # of those, the lines of pgq's episode logger (pgq/_outage.py)
    most_said: list[str] = []  # the longest episode a worker logged, for the failure message
    lease_lost_lines = 0
    try:
        for _ in range(episodes):
            time.sleep(1.0)
            before = [p.log().count("\n") for p in procs]
            with psycopg.connect(fdb) as locker:  # a migration holding the table
                locker.execute("SET idle_in_transaction_session_timeout = 0")
                locker.execute("SET statement_timeout = 0")
                locker.execute("LOCK TABLE pgq.task IN ACCESS EXCLUSIVE MODE")
                chaos.record("lock_table", hold=hold)
                time.sleep(hold)
                with psycopg.connect(fdb, autocommit=True) as c:
                    t_release = c.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
            chaos.record("unlock_table")
            resumed = functools.partial(resumed_after, fdb, t_release)
            recovery.append(wait_for(resumed, 20, "work to resume after the lock").total_seconds())
            # Per worker, what it logged about the episode; a task's own lease-lost line (the lock
            # outlasting the lease) is news about that task, counted apart.
            episode = [p.log().split("\n")[b:] for p, b in zip(procs, before, strict=True)]
            said = [[x for x in e if x and "lease lost" not in x] for e in episode]
            log_lines.append(max(len(x) for x in said))
            db_lines.append(max(sum(1 for x in e if _logger(x) == "pgq.database") for e in said))
            longest = max(said, key=len)
            if len(longest) > len(most_said):
                most_said = longest
            lease_lost_lines += sum(1 for e in episode for x in e if "lease lost" in x)
        wait_for(lambda: lost(fdb, ids) == 0, size(60, 900), "every task completed", interval=0.25)
    finally:
        stop.set()
        s.join()
    logs = "".join(p.log() for p in procs)
    line = report(
        "R14",
        tasks=n,
        lost=lost(fdb, ids),
        dup=ledger(fdb)["dup"],
        lock_episodes=episodes,
        lock_hold_s=hold,
        recovery_max_s=round(max(recovery), 3),
        max_idle_in_tx_s=round(max(samples, default=0.0), 3),
        log_lines_per_episode=max(log_lines),  # the most one worker logged about one episode
        episode_lines_per_episode=max(db_lines),
        lease_lost_lines=lease_lost_lines,
        listener_reconnects=logs.count("listener: connection lost"),
        leader_lost=logs.count("lost the leader connection"),
        tracebacks=logs.count("Traceback"),
        workers_alive=sum(p.alive() for p in procs),
    )
    assert line["lost"] == 0 and line["workers_alive"] == 2
    assert line["recovery_max_s"] < 1.5
    assert line["max_idle_in_tx_s"] < 2
    # a lock held longer than the lease stops the heartbeat: tasks in flight may run again
    assert line["dup"] <= (0 if hold < 10 else episodes * 2 * 4)  # in flight: 2 workers x 4 slots
    assert line["listener_reconnects"] == 0 and line["leader_lost"] == 0
    # The database errors of all its loops are logged as one episode (pgq/_outage.py): a WARNING
    # and an INFO per worker. Anything else a worker said meanwhile counts against RELIABILITY's
    # bound of five lines per episode.
    assert line["episode_lines_per_episode"] <= 2, most_said
    assert line["log_lines_per_episode"] <= 5, most_said


POISON = [
    # (what, type, payload SQL, headers SQL, timeout)
    ("undecodable payload", "work", "('1' || repeat('0', 5000))::jsonb", "NULL", None),
    ("headers not an object", "work", "'{}'::jsonb", "'\"x\"'::jsonb", None),
    ("unknown type", "no-such-type", "'{}'::jsonb", "NULL", None),
    ("hangs past its timeout", "hang", "'{}'::jsonb", "NULL", "1 second"),
    ("async hangs past its timeout", "async_hang", "'{}'::jsonb", "NULL", "1 second"),
    ("ends its thread (SystemExit)", "exit_thread", "'{}'::jsonb", "NULL", None),
    ("SystemExit on the event loop", "async_exit", "'{}'::jsonb", "NULL", None),
    ("raises", "boom", "'{}'::jsonb", "NULL", None),
]


def test_r19_poison_tasks(fdb: str, workers: Any) -> None:
    conc = 4
    procs = [
        workers({"FAULT_CONCURRENCY": str(conc), "FAULT_LEASE": "3", "FAULT_RECOVER": "0.5"})
        for _ in range(2)
    ]
    wait_ready(fdb, procs)
    healthy_n = size(800, 10_000)
    poison_ids: dict[int, str] = {}
    with pgq.Client(fdb) as client, psycopg.connect(fdb, autocommit=True) as c:
        healthy = [
            int(i.id) for i in client.enqueue_many([pgq.Task("work", {})] * (healthy_n // 2), retention=3600)
        ]
        for what, typ, payload, headers, timeout in POISON * size(1, 20):
            row = c.execute(
                "INSERT INTO pgq.task (queue, type, payload, headers, state, max_retry, timeout) "  # noqa: S608
                f"VALUES ('default', %s, {payload}, {headers}, 'pending', 1, %s::interval) RETURNING id",
                (typ, timeout),
            ).fetchone()
            assert row is not None
            poison_ids[row[0]] = what
        healthy += [
            int(i.id) for i in client.enqueue_many([pgq.Task("work", {})] * (healthy_n // 2), retention=3600)
        ]
        c.execute("NOTIFY pgq_wake, 'default'")
        wait_for(lambda: lost(fdb, healthy) == 0, 60, "every healthy task completed", interval=0.25)
        wait_for(
            lambda: states(fdb, poison_ids).get("archived", 0) == len(poison_ids),
            60,
            "every poison task archived",
            interval=0.25,
        )
        errors = {
            poison_ids[r[0]]: r[1]
            for r in c.execute("SELECT id, last_error FROM pgq.task WHERE id = ANY(%s)", (list(poison_ids),))
        }
        # Leaked slots: `conc` tasks of 0.6 s on one worker must run side by side.
        t0 = time.monotonic()
        burst = [
            int(i.id) for i in client.enqueue_many([pgq.Task("work", {"ms": 600})] * conc * 2, retention=3600)
        ]
        wait_for(lambda: lost(fdb, burst) == 0, 30, "the slot burst")
        burst_s = time.monotonic() - t0
    line = report(
        "R19",
        healthy=len(healthy),
        healthy_lost=lost(fdb, healthy),
        poison=len(poison_ids),
        poison_archived=states(fdb, poison_ids).get("archived", 0),
        worker_exits=sum(not p.alive() for p in procs),
        burst_s=round(burst_s, 3),
        errors={k: (v or "")[:80] for k, v in errors.items()},
    )
    assert line["worker_exits"] == 0, [p.log()[-3000:] for p in procs if not p.alive()]
    assert line["healthy_lost"] == 0
    assert line["poison_archived"] == len(poison_ids)
    assert all(errors.values()), errors
    assert burst_s < 0.6 * 2 + 2.5, "slots leaked: the burst did not run in parallel"
    assert not re.search(r"lease lost|lease expired", "".join(p.log() for p in procs)), "healthy leases lost"
