"""The chaos controller: worker subprocesses, signals, backend kills, and the verifier.

Every action is appended to a JSONL log (the test's tmp dir), so a failing run
can be replayed by reading what happened and when. Randomness comes from one
seeded random.Random (PGQ_FAULT_SEED, printed with every report).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from tests.fixtures.util import read_log, wait_for

REPO = Path(__file__).resolve().parents[2]
FULL = os.environ.get("PGQ_FAULT_FULL", "") not in ("", "0")
SEED = int(os.environ.get("PGQ_FAULT_SEED", "0") or 0) or random.SystemRandom().randrange(1, 2**31)


def size(ci: Any, full: Any) -> Any:
    """The CI size, or the full one under PGQ_FAULT_FULL=1."""
    return full if FULL else ci


def report(test: str, **figures: Any) -> dict[str, Any]:
    """Print the test's figures as ONE JSON line (and add it to the session summary:
    tests/conftest.py)."""
    line = {"test": test, **figures, "full": FULL, "seed": SEED}
    print(json.dumps(line, default=str), flush=True)
    for env in ("PGQ_FAULT_REPORT", "PGQ_FAULT_SUMMARY"):  # yours; the session summary's
        path = os.environ.get(env)
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(line, default=str) + "\n")
    return line


class WorkerProc:
    """`python -m pgq worker tests.fault.app:server` in a subprocess, logging to a file."""

    def __init__(
        self,
        dsn: str,
        logdir: Path,
        n: int,
        env: Mapping[str, str] | None = None,
        argv: Iterable[str] | None = None,
    ) -> None:
        self.dsn = dsn
        self.n = n
        self.log_path = logdir / f"worker-{n}.log"
        self.env = {**os.environ, "PGQ_DSN": dsn, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.argv = (
            list(argv)
            if argv is not None
            else [
                sys.executable,
                "-m",
                "pgq",
                "worker",
                "tests.fault.app:server",
                "--log-level",
                "info",
            ]
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> WorkerProc:
        logf = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=logf, stderr=logf)
        finally:
            logf.close()
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time. The exit code."""
        if not self.alive():
            return self.proc.returncode if self.proc else None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        rc = self.wait(timeout)
        if rc is None:
            self.kill()
            assert self.proc is not None
            rc = self.proc.returncode
        return rc

    def log(self) -> str:
        return read_log(self.log_path)

    def tracebacks(self) -> int:
        return self.log().count("Traceback (most recent call last)")


class Chaos:
    """A seeded controller; every action is logged as one JSON line in `log_path`."""

    def __init__(self, admin_dsn: str, log_path: Path, seed: int = SEED) -> None:
        self.rng = random.Random(seed)
        self.admin_dsn = admin_dsn
        self.log_path = log_path
        self.actions: list[dict[str, Any]] = []

    def record(self, action: str, **details: Any) -> None:
        entry = {"t": time.time(), "action": action, **details}
        self.actions.append(entry)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")

    def count(self, action: str) -> int:
        return sum(1 for a in self.actions if a["action"] == action)

    def terminate(self, pattern: str) -> int:
        """pg_terminate_backend on every backend whose application_name is LIKE `pattern`."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as c:
            row = c.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name LIKE %s AND pid <> pg_backend_pid()",
                (pattern,),
            ).fetchone()
        n = int(row[0]) if row else 0
        self.record("terminate", pattern=pattern, backends=n)
        return n

    def in_flight(self, dsn: str, pid: int) -> set[int]:
        """Ids of the tasks a worker process holds active (worker id host:pid:random)."""
        with psycopg.connect(dsn, autocommit=True) as c:
            rows = c.execute(
                "SELECT id FROM pgq.task WHERE state = 'active' AND split_part(locked_by, ':', 2) = %s",
                (str(pid),),
            ).fetchall()
        return {r[0] for r in rows}

    def sigkill(self, w: WorkerProc, dsn: str) -> set[int]:
        """Freeze the worker, note its in-flight tasks, SIGKILL it; returns the in-flight ids."""
        w.signal(signal.SIGSTOP)
        time.sleep(0.05)  # a claim already sent may still commit: let it land before we look
        held = self.in_flight(dsn, w.pid)
        w.kill()
        self.record("sigkill", worker=w.n, pid=w.pid, in_flight=len(held))
        return held


def db_now(dsn: str) -> datetime:
    """The database clock now (clock_timestamp(), not the transaction's start)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    now: datetime = row[0]
    return now


def ledger(dsn: str) -> dict[str, Any]:
    """Executions and duplicates from chaos.exec_log, per task type."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as c:
        row = c.execute(
            "SELECT count(*) AS executions, count(DISTINCT task_pk) AS tasks FROM chaos.exec_log"
        ).fetchone()
    assert row is not None
    return {"executions": row["executions"], "dup": row["executions"] - row["tasks"]}


def duplicated_ids(dsn: str) -> set[int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute("SELECT task_pk FROM chaos.exec_log GROUP BY 1 HAVING count(*) > 1").fetchall()
    return {r[0] for r in rows}


def states(dsn: str, ids: Iterable[int] | None = None) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        if ids is None:
            rows = c.execute("SELECT state, count(*) FROM pgq.task GROUP BY 1").fetchall()
        else:
            rows = c.execute(
                "SELECT state, count(*) FROM pgq.task WHERE id = ANY(%s) GROUP BY 1", (list(ids),)
            ).fetchall()
    return {r[0]: r[1] for r in rows}


def lost(dsn: str, ids: Iterable[int]) -> int:
    """Enqueued tasks (kept with retention) that are not completed."""
    ids = list(ids)
    return len(ids) - states(dsn, ids).get("completed", 0)


def resumed_after(dsn: str, t: datetime) -> timedelta | None:
    """How long after `t` (database time) the first task execution was logged; None before one is."""
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT min(at) - %s FROM chaos.exec_log WHERE at > %s", (t, t)).fetchone()
    return row[0] if row else None


def pgq_idle_in_tx(admin_dsn: str, older_than: float = 1.0) -> list[dict[str, Any]]:
    """pgq backends idle in a transaction for longer than `older_than` seconds (must be none)."""
    with psycopg.connect(admin_dsn, autocommit=True, row_factory=dict_row) as c:
        return c.execute(
            "SELECT pid, application_name, state, now() - state_change AS age FROM pg_stat_activity "
            "WHERE application_name LIKE 'pgq:%%' AND state LIKE 'idle in transaction%%' "
            "AND now() - state_change > %s * interval '1 second'",
            (older_than,),
        ).fetchall()


def backends(admin_dsn: str, pattern: str, dbname: str | None = None) -> int:
    with psycopg.connect(admin_dsn, autocommit=True) as c:
        row = c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s "
            "AND (%s::text IS NULL OR datname = %s)",
            (pattern, dbname, dbname),
        ).fetchone()
    return int(row[0]) if row else 0


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))], 3)


def wait_ready(dsn: str, procs: Iterable[WorkerProc], timeout: float = 30) -> None:
    """Wait until every worker process has registered its pgq.server row."""
    pids = [p.pid for p in procs]

    def ready() -> bool:
        with psycopg.connect(dsn, autocommit=True) as c:
            row = c.execute(
                "SELECT count(DISTINCT pid) FROM pgq.server WHERE pid = ANY(%s)", (pids,)
            ).fetchone()
        return bool(row and row[0] == len(pids))

    wait_for(ready, timeout, f"workers {pids} to start")
