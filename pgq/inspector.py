"""Inspector: see and operate every queue, group, task and server.

Everything here reads or changes rows of the pgq schema with the named queries
of sql/queries/inspector.sql; the database is authoritative for all of it, and
its clock for every time (each method takes an optional `now` for tests).

Counts are exact (Asynq's inspector is too): `get_queue_info` reads the queue's
rows. For dashboards on big tables use the views of sql/views/dashboard.sql,
which estimate where exact counts would be expensive.

Groups (G14). `groups()` and `list_aggregating_tasks()` read the members
themselves, so they are exact whatever the aggregator's bookkeeping says. When
members leave their group (run, archive, delete), the aggregator's summary row
in task_group may stay as an over-estimate (the aggregator re-reads the real
rows before aggregating), except when the group lost its last member: then the
summary row and the group's stale arrival rows are deleted. That cleanup locks
the summary row first, then looks at the members in a fresh statement, so an
aggregator folding a concurrent arrival can never lose it (see
inspector_group_forget_empty). Operations that meet a deadlock with an
aggregator are retried.

doctor() (`pgq doctor`) looks beyond pgq's rows, at what in the cluster slows
or blocks a queue: the NOTIFY queue, long transactions, replication slots and
prepared transactions holding back vacuum, pgq's own sessions idle in a
transaction, squatters on the aggregation leadership keys, and the health of
pgq.task. It reads catalogs and statistics views only (sql/queries/doctor.sql);
what the role may not see becomes a finding, never an error.

cancel_task is best effort: it sends NOTIFY `<schema>_cancel` with the task's
key; a worker that hears it cancels the handler and the task is retried. A
worker that is disconnected at that moment never hears it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, LiteralString, TypeVar

import psycopg

from pgq import _sql, db
from pgq.errors import QueueNotEmptyError, QueueNotFoundError, TaskNotFoundError, TaskStateError
from pgq.task import STATES, TaskInfo, task_id_of

T = TypeVar("T")

#: The states each bulk operation accepts.
RUNNABLE_STATES = ("scheduled", "retry", "archived", "aggregating")
ARCHIVABLE_STATES = ("pending", "scheduled", "retry", "aggregating")
DELETABLE_STATES = ("pending", "scheduled", "retry", "archived", "completed", "aggregating")

_BIGINT_MAX = 2**63 - 1
#: Errors that make one doctor check a finding instead of a failure.
_DOCTOR_DENIED = (
    psycopg.errors.InsufficientPrivilege,
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedFunction,
    psycopg.errors.InvalidSchemaName,
)
_MAX_PAGE_SIZE = 10_000
_RETRIES = 5


@dataclass(frozen=True)
class QueueInfo:
    """A queue's state at `timestamp` (database clock). Counts are exact.

    size counts every task that is not completed (pending, active, scheduled,
    retry, aggregating, archived), as Asynq's does. processed/failed are
    today's (the database's current date); *_total add up every day kept.
    latency is the age of the oldest task ready to run (zero when none).
    """

    queue: str
    size: int
    pending: int
    active: int
    scheduled: int
    retry: int
    archived: int
    completed: int
    aggregating: int
    groups: int
    processed: int
    failed: int
    processed_total: int
    failed_total: int
    paused: bool
    latency: timedelta
    timestamp: datetime | None = None


@dataclass(frozen=True)
class DailyStats:
    """Processed and failed counts of one queue on one day (processed includes failed)."""

    queue: str
    date: date
    processed: int
    failed: int


@dataclass(frozen=True)
class GroupInfo:
    """A group of tasks waiting to be aggregated (G14).

    size, oldest_at and newest_at come from the members themselves.
    next_due_at: when the group is due, by the aggregation policy that the
    running servers aggregating its queue publish in their heartbeat rows (the
    earliest when they differ), and not before the retry time after a failed
    aggregation. None when no running server aggregates the queue and no
    aggregation has failed. due_by says which rule gives it: "grace_period"
    (newest + grace), "max_delay" (oldest + max delay), "max_size" (full: due at
    once) or "retry". A due time in the past means the next aggregation round
    takes the group.
    errors / last_error / last_error_at: failed aggregation attempts so far.
    """

    group: str
    size: int
    oldest_at: datetime
    newest_at: datetime
    next_due_at: datetime | None = None
    errors: int = 0
    last_error: str | None = None
    last_error_at: datetime | None = None
    due_by: str | None = None


@dataclass(frozen=True)
class WorkerInfo:
    """An active task and the server holding it."""

    server_id: str
    task_id: str
    queue: str
    type: str
    payload: Any
    started_at: datetime | None
    lease_expires_at: datetime | None
    deadline: datetime | None


@dataclass(frozen=True)
class ServerInfo:
    """A worker server, from the heartbeat row it writes, with its active tasks."""

    id: str
    host: str
    pid: int
    queues: Any
    concurrency: int
    strict_priority: bool
    status: str
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age: timedelta
    active_workers: list[WorkerInfo] = field(default_factory=list)


#: Doctor finding levels, from best to worst.
LEVELS = ("ok", "warn", "critical")

#: NOTIFY queue usage at or above which doctor reports critical (a full queue fails enqueues).
NOTIFY_QUEUE_CRITICAL = 0.9
#: age(relfrozenxid) of pgq.task at or above which doctor reports critical (wraparound
#: protection stops writes at about 2.1 billion).
XID_AGE_CRITICAL = 1_200_000_000


@dataclass(frozen=True)
class Finding:
    """One thing doctor checked: `level` is ok, warn or critical; `message` is one line that
    names the pid, slot, queue or relation; `values` are the raw figures behind it."""

    check: str
    level: str
    message: str
    values: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DoctorReport:
    """What Inspector.doctor() found; `level` is the worst level among the findings."""

    findings: tuple[Finding, ...]
    level: str

    @property
    def problems(self) -> tuple[Finding, ...]:
        """The findings that are not ok."""
        return tuple(f for f in self.findings if f.level != "ok")


def _worst(findings: Sequence[Finding]) -> str:
    return max((f.level for f in findings), key=LEVELS.index, default="ok")


def _secs(value: float | timedelta, name: str) -> float:
    s = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(s, bool) or not isinstance(s, int | float) or s < 0:
        raise ValueError(f"{name} must be a non-negative number of seconds or a timedelta, got {value!r}")
    return float(s)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


def _who(r: Mapping[str, Any]) -> str:
    """pid N (application_name 'x', user u, database d) for a session row."""
    parts = [f"application_name {r.get('application_name') or ''!r}"]
    if r.get("usename"):
        parts.append(f"user {r['usename']}")
    if r.get("datname"):
        parts.append(f"database {r['datname']}")
    return f"pid {r['pid']} ({', '.join(parts)})"


def _key_of(task_id: str | int) -> tuple[str, int | None]:
    """(public id as text, bigint key or None) for the lookup queries."""
    if isinstance(task_id, bool) or not isinstance(task_id, str | int):
        raise TypeError(f"task id must be a str, not {type(task_id).__name__}")
    text = str(task_id)
    if text.isascii() and text.isdigit():
        n = int(text)
        return text, n if n <= _BIGINT_MAX else -1
    return text, None


def _check_state(state: str, allowed: tuple[str, ...], op: str) -> str:
    if state not in STATES:
        raise ValueError(f"unknown task state {state!r}; states are: {', '.join(STATES)}")
    if state not in allowed:
        raise ValueError(f"{op} does not apply to {state} tasks; it applies to: {', '.join(allowed)}")
    return state


def _check_page(page: int, page_size: int) -> tuple[int, int]:
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise ValueError(f"page must be an int >= 1, got {page!r}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= _MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be an int between 1 and {_MAX_PAGE_SIZE}, got {page_size!r}")
    return page_size, (page - 1) * page_size


def _check_queue(queue: object) -> str:
    if not isinstance(queue, str) or not queue:
        raise ValueError(f"queue must be a non-empty str, got {queue!r}")
    return queue


class Inspector:
    """Read and operate queues, groups, tasks and servers.

    Inspector(dsn=None, schema="pgq"): dsn None reads $PGQ_DSN (else pgq's
    embedded default). Thread-safe: calls share one connection, one at a time;
    close() releases it (also a context manager).
    """

    def __init__(self, dsn: str | None = None, schema: str = "pgq") -> None:
        self._schema = _sql.check_schema(schema)
        self._dsn = db.resolve_dsn(dsn)
        self._cancel_channel = f"{schema}_cancel"
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.RLock()
        self._closed = False

    # -- plumbing -----------------------------------------------------------------

    def _q(self, name: str) -> LiteralString:
        return _sql.query(name, self._schema)

    def _connection(self) -> psycopg.Connection[Any]:
        """The inspector's one connection (under self._lock): opened on first use, reopened when broken."""
        if self._closed:
            raise RuntimeError("this Inspector is closed")
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = db.connect(self._dsn, "inspector")
        return self._conn

    def _run(self, fn: Callable[[psycopg.Connection[Any]], T], *, tx: bool = False) -> T:
        """fn on the connection; with tx, in one transaction retried on deadlock."""
        with self._lock:
            conn = self._connection()
            for attempt in range(_RETRIES):
                if not tx:
                    return fn(conn)
                try:
                    with conn.transaction():
                        return fn(conn)
                except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                    if attempt == _RETRIES - 1:
                        raise
            raise AssertionError("unreachable")

    @staticmethod
    def _one(conn: psycopg.Connection[Any], query: LiteralString, **params: Any) -> dict[str, Any] | None:
        row: dict[str, Any] | None = conn.execute(query, params).fetchone()
        return row

    @staticmethod
    def _all(conn: psycopg.Connection[Any], query: LiteralString, **params: Any) -> list[dict[str, Any]]:
        return conn.execute(query, params).fetchall()

    def _require_queue(self, conn: psycopg.Connection[Any], queue: str) -> None:
        row = self._one(conn, self._q("inspector_queue_exists"), queue=queue)
        if not row or not row["found"]:
            raise QueueNotFoundError(f"queue {queue!r} does not exist")

    def _missing(self, conn: psycopg.Connection[Any], queue: str, task_id: str) -> Exception:
        """The error for a task that a write did not touch: no queue, no task, or a wrong state."""
        self._require_queue(conn, queue)
        text, key = _key_of(task_id)
        row = self._one(conn, self._q("inspector_task_get"), queue=queue, task_id=text, id=key)
        if row is None:
            return TaskNotFoundError(f"no task {text!r} in queue {queue!r}")
        return TaskStateError(f"task {text!r} in queue {queue!r} is {row['state']}")

    def _forget_empty_groups(
        self, conn: psycopg.Connection[Any], queue: str, groups: list[str] | None
    ) -> None:
        """Drop the summary of groups left without members (see the module docstring)."""
        if groups is not None and not groups:
            return
        self._all(conn, self._q("inspector_group_lock"), queue=queue, groups=groups)
        self._one(conn, self._q("inspector_group_forget_empty"), queue=queue, groups=groups)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Inspector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queues -------------------------------------------------------------------

    def queues(self) -> list[str]:
        """Names of all queues, sorted."""
        return [r["name"] for r in self._run(lambda c: self._all(c, self._q("inspector_queue_list")))]

    def get_queue_info(self, queue: str, *, now: datetime | None = None) -> QueueInfo:
        """Counts per state, groups, stats, pause flag and latency of one queue."""
        _check_queue(queue)

        def op(conn: psycopg.Connection[Any]) -> QueueInfo:
            self._require_queue(conn, queue)
            r = self._one(conn, self._q("inspector_queue_info"), queue=queue, now=now)
            assert r is not None
            size = sum(r[s] for s in ("pending", "active", "scheduled", "retry", "archived", "aggregating"))
            return QueueInfo(
                queue=queue,
                size=size,
                pending=r["pending"],
                active=r["active"],
                scheduled=r["scheduled"],
                retry=r["retry"],
                archived=r["archived"],
                completed=r["completed"],
                aggregating=r["aggregating"],
                groups=r["groups"],
                processed=int(r["processed"]),
                failed=int(r["failed"]),
                processed_total=int(r["processed_total"]),
                failed_total=int(r["failed_total"]),
                paused=bool(r["paused"]),
                latency=r["latency"] or timedelta(0),
                timestamp=r["timestamp"],
            )

        return self._run(op, tx=True)

    def history(self, queue: str, days: int = 7, *, now: datetime | None = None) -> list[DailyStats]:
        """Processed/failed per day for the last `days` days (today first), zeros included."""
        _check_queue(queue)
        if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 3660:
            raise ValueError(f"days must be an int between 1 and 3660, got {days!r}")

        def op(conn: psycopg.Connection[Any]) -> list[DailyStats]:
            self._require_queue(conn, queue)
            rows = self._all(conn, self._q("inspector_queue_history"), queue=queue, days=days, now=now)
            return [DailyStats(queue, r["day"], int(r["processed"]), int(r["failed"])) for r in rows]

        return self._run(op)

    def pause_queue(self, queue: str) -> None:
        """Stop workers from claiming this queue's tasks (aggregation goes on, G15)."""
        self._set_paused(queue, True)

    def unpause_queue(self, queue: str) -> None:
        self._set_paused(queue, False)

    def _set_paused(self, queue: str, paused: bool) -> None:
        _check_queue(queue)

        def op(conn: psycopg.Connection[Any]) -> None:
            if self._one(conn, self._q("inspector_queue_set_paused"), queue=queue, paused=paused) is None:
                raise QueueNotFoundError(f"queue {queue!r} does not exist")

        self._run(op)

    def delete_queue(self, queue: str, force: bool = False) -> int:
        """Remove a queue with its stats and group bookkeeping; returns the tasks deleted.

        Raises QueueNotEmptyError when the queue holds tasks and force is False,
        and (even with force, as Asynq does) while any of its tasks is active.
        """
        _check_queue(queue)

        def op(conn: psycopg.Connection[Any]) -> int:
            row = self._one(conn, self._q("inspector_queue_lock"), queue=queue)
            if row is None:
                self._require_queue(conn, queue)  # tasks without a queue row: delete them too
                row = {"tasks": 1, "active": 0}
            if row["active"]:
                raise QueueNotEmptyError(
                    f"queue {queue!r} has {row['active']} active task(s); wait for them or cancel them"
                )
            if row["tasks"] and not force:
                raise QueueNotEmptyError(f"queue {queue!r} holds {row['tasks']} task(s); use force to delete")
            res = self._one(conn, self._q("inspector_queue_delete"), queue=queue)
            assert res is not None
            return int(res["tasks"])

        return self._run(op, tx=True)

    # -- groups -------------------------------------------------------------------

    def groups(self, queue: str) -> list[GroupInfo]:
        """The groups of a queue with members waiting, oldest first (G14)."""
        _check_queue(queue)

        def op(conn: psycopg.Connection[Any]) -> list[GroupInfo]:
            self._require_queue(conn, queue)
            return [_group(r) for r in self._all(conn, self._q("inspector_group_list"), queue=queue)]

        return self._run(op)

    def list_aggregating_tasks(
        self, queue: str, group: str, page: int = 1, page_size: int = 30
    ) -> list[TaskInfo]:
        """One page of a group's members in enqueue order; [] for an unknown group."""
        _check_queue(queue)
        limit, offset = _check_page(page, page_size)

        def op(conn: psycopg.Connection[Any]) -> list[TaskInfo]:
            self._require_queue(conn, queue)
            rows = self._all(
                conn,
                self._q("inspector_task_list_group"),
                queue=queue,
                group=group,
                limit=limit,
                offset=offset,
            )
            return [TaskInfo.from_row(r) for r in rows]

        return self._run(op)

    def run_all_aggregating_tasks(self, queue: str, group: str) -> int:
        """Make every member of a group pending, each processed on its own; returns the count."""
        return self._bulk("inspector_task_run_all", queue, "aggregating", group)

    def archive_all_aggregating_tasks(self, queue: str, group: str) -> int:
        return self._bulk("inspector_task_archive_all", queue, "aggregating", group)

    def delete_all_aggregating_tasks(self, queue: str, group: str) -> int:
        return self._bulk("inspector_task_delete_all", queue, "aggregating", group)

    # -- tasks --------------------------------------------------------------------

    def list_tasks(self, queue: str, state: str, page: int = 1, page_size: int = 30) -> list[TaskInfo]:
        """One page of a queue's tasks in one state (aggregating: by group, then enqueue order)."""
        _check_queue(queue)
        _check_state(state, STATES, "list_tasks")
        limit, offset = _check_page(page, page_size)

        def op(conn: psycopg.Connection[Any]) -> list[TaskInfo]:
            self._require_queue(conn, queue)
            rows = self._all(
                conn, self._q("inspector_task_list"), queue=queue, state=state, limit=limit, offset=offset
            )
            return [TaskInfo.from_row(r) for r in rows]

        return self._run(op)

    def get_task_info(self, queue: str, task_id: str) -> TaskInfo:
        _check_queue(queue)
        text, key = _key_of(task_id)

        def op(conn: psycopg.Connection[Any]) -> TaskInfo:
            row = self._one(conn, self._q("inspector_task_get"), queue=queue, task_id=text, id=key)
            if row is None:
                self._require_queue(conn, queue)
                raise TaskNotFoundError(f"no task {text!r} in queue {queue!r}")
            return TaskInfo.from_row(row)

        return self._run(op)

    def run_task(self, queue: str, task_id: str, *, now: datetime | None = None) -> TaskInfo:
        """scheduled/retry/archived/aggregating -> pending now. Returns the task as it now is."""
        return self._one_task("inspector_task_run", queue, task_id, now, RUNNABLE_STATES, "run")

    def archive_task(self, queue: str, task_id: str, *, now: datetime | None = None) -> TaskInfo:
        """pending/scheduled/retry/aggregating -> archived. Returns the task as it now is."""
        return self._one_task("inspector_task_archive", queue, task_id, now, ARCHIVABLE_STATES, "archive")

    def delete_task(self, queue: str, task_id: str) -> None:
        """Delete a task that is not active, releasing its unique lock."""
        self._one_task("inspector_task_delete", queue, task_id, None, DELETABLE_STATES, "delete")

    def _one_task(
        self,
        query: str,
        queue: str,
        task_id: str,
        now: datetime | None,
        allowed: tuple[str, ...],
        verb: str,
    ) -> TaskInfo:
        _check_queue(queue)
        text, key = _key_of(task_id)

        def op(conn: psycopg.Connection[Any]) -> TaskInfo:
            row = self._one(conn, self._q(query), queue=queue, task_id=text, id=key, now=now)
            if row is None:
                err = self._missing(conn, queue, text)
                if isinstance(err, TaskStateError):
                    err = TaskStateError(f"cannot {verb} {err}; {verb} applies to: {', '.join(allowed)}")
                raise err
            if row["old_state"] == "aggregating":
                self._forget_empty_groups(conn, queue, [row["group_key"]])
            return TaskInfo.from_row(row)

        return self._run(op, tx=True)

    def run_all_tasks(self, queue: str, state: str) -> int:
        """Every task of a state (scheduled, retry, archived, aggregating) -> pending; returns the count."""
        _check_state(state, RUNNABLE_STATES, "run_all_tasks")
        return self._bulk("inspector_task_run_all", queue, state, None)

    def archive_all_tasks(self, queue: str, state: str) -> int:
        """Every task of a state (pending, scheduled, retry, aggregating) -> archived; returns the count."""
        _check_state(state, ARCHIVABLE_STATES, "archive_all_tasks")
        return self._bulk("inspector_task_archive_all", queue, state, None)

    def delete_all_tasks(self, queue: str, state: str) -> int:
        """Delete every task of a state (any but active); returns the count."""
        _check_state(state, DELETABLE_STATES, "delete_all_tasks")
        return self._bulk("inspector_task_delete_all", queue, state, None)

    # Asynq's names, for those who know them.
    def run_all_scheduled_tasks(self, queue: str) -> int:
        return self.run_all_tasks(queue, "scheduled")

    def run_all_retry_tasks(self, queue: str) -> int:
        return self.run_all_tasks(queue, "retry")

    def run_all_archived_tasks(self, queue: str) -> int:
        return self.run_all_tasks(queue, "archived")

    def archive_all_pending_tasks(self, queue: str) -> int:
        return self.archive_all_tasks(queue, "pending")

    def archive_all_scheduled_tasks(self, queue: str) -> int:
        return self.archive_all_tasks(queue, "scheduled")

    def archive_all_retry_tasks(self, queue: str) -> int:
        return self.archive_all_tasks(queue, "retry")

    def delete_all_pending_tasks(self, queue: str) -> int:
        return self.delete_all_tasks(queue, "pending")

    def delete_all_scheduled_tasks(self, queue: str) -> int:
        return self.delete_all_tasks(queue, "scheduled")

    def delete_all_retry_tasks(self, queue: str) -> int:
        return self.delete_all_tasks(queue, "retry")

    def delete_all_archived_tasks(self, queue: str) -> int:
        return self.delete_all_tasks(queue, "archived")

    def delete_all_completed_tasks(self, queue: str) -> int:
        return self.delete_all_tasks(queue, "completed")

    def _bulk(
        self, query: str, queue: str, state: str, group: str | None, now: datetime | None = None
    ) -> int:
        _check_queue(queue)
        if group is not None and (not isinstance(group, str) or not group):
            raise ValueError(f"group must be a non-empty str, got {group!r}")

        def op(conn: psycopg.Connection[Any]) -> int:
            self._require_queue(conn, queue)
            touches_groups = state == "aggregating"
            if touches_groups:  # lock the summaries first: the order an aggregator uses
                self._all(
                    conn,
                    self._q("inspector_group_lock"),
                    queue=queue,
                    groups=None if group is None else [group],
                )
            row = self._one(conn, self._q(query), queue=queue, state=state, group=group, now=now)
            assert row is not None
            if touches_groups and row["n"]:
                self._one(
                    conn,
                    self._q("inspector_group_forget_empty"),
                    queue=queue,
                    groups=list(row["groups"]),
                )
            return int(row["n"])

        return self._run(op, tx=True)

    def cancel_task(self, queue: str, task_id: str) -> None:
        """Ask the worker running an active task to cancel it; the task is then retried.

        Best effort: a NOTIFY on `<schema>_cancel` that workers listening at
        that moment act on. Raises TaskStateError when the task is not active.
        """
        _check_queue(queue)
        text, key = _key_of(task_id)

        def op(conn: psycopg.Connection[Any]) -> None:
            row = self._one(
                conn,
                self._q("inspector_task_cancel"),
                queue=queue,
                task_id=text,
                id=key,
                channel=self._cancel_channel,
            )
            if row is None:
                err = self._missing(conn, queue, text)
                if isinstance(err, TaskStateError):
                    err = TaskStateError(f"cannot cancel {err}; only active tasks can be cancelled")
                raise err

        self._run(op)

    # -- servers ------------------------------------------------------------------

    def servers(self, *, now: datetime | None = None) -> list[ServerInfo]:
        """Servers from their heartbeat rows, each with the active tasks it holds."""

        def op(conn: psycopg.Connection[Any]) -> list[ServerInfo]:
            rows = self._all(conn, self._q("inspector_server_list"), now=now)
            if not rows:
                return []
            tasks = self._all(conn, self._q("inspector_server_active_tasks"), servers=[r["id"] for r in rows])
            by_server: dict[str, list[WorkerInfo]] = {}
            for t in tasks:
                by_server.setdefault(t["locked_by"], []).append(_worker(t))
            return [_server(r, by_server.get(r["id"], [])) for r in rows]

        return self._run(op)

    # -- doctor -------------------------------------------------------------------

    def doctor(
        self,
        *,
        long_transaction: float | timedelta = 60.0,
        notify_queue_warn: float = 0.5,
        pgq_idle_in_transaction: float | timedelta = 1.0,
        xid_age_warn: int | None = None,
        dead_tuples_ratio: float = 1.0,
        limit: int = 10,
    ) -> DoctorReport:
        """Check what in the cluster slows or blocks pgq; see `pgq doctor` in docs/cli.md.

        long_transaction: open transactions (and prepared ones) older than this
        warn, each naming its pid. notify_queue_warn: pg_notification_queue_usage()
        at or above this warns (critical from NOTIFY_QUEUE_CRITICAL).
        pgq_idle_in_transaction: pgq's own sessions idle in a transaction longer
        than this warn. xid_age_warn: age(relfrozenxid) of pgq.task above this
        warns (default 1.5 x autovacuum_freeze_max_age). dead_tuples_ratio: more
        dead than this times the live tuples of pgq.task (and over 10,000) warns.
        limit: at most this many transactions are listed.
        """
        long_tx = _secs(long_transaction, "long_transaction")
        idle_tx = _secs(pgq_idle_in_transaction, "pgq_idle_in_transaction")
        if isinstance(notify_queue_warn, bool) or not isinstance(notify_queue_warn, int | float):
            raise ValueError(f"notify_queue_warn must be a number between 0 and 1, got {notify_queue_warn!r}")
        if not 0 <= notify_queue_warn <= 1:
            raise ValueError(f"notify_queue_warn must be between 0 and 1, got {notify_queue_warn!r}")
        if xid_age_warn is not None and (isinstance(xid_age_warn, bool) or not isinstance(xid_age_warn, int)):
            raise ValueError(f"xid_age_warn must be an int or None, got {xid_age_warn!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValueError(f"limit must be an int between 1 and 1000, got {limit!r}")

        def op(conn: psycopg.Connection[Any]) -> DoctorReport:
            out: list[Finding] = []
            checks: list[tuple[str, Callable[[], list[Finding]]]] = [
                ("privileges", lambda: self._doctor_privileges(conn)),
                ("transactions", lambda: self._doctor_transactions(conn, long_tx, notify_queue_warn, limit)),
                ("pgq_idle_in_transaction", lambda: self._doctor_pgq_idle(conn, idle_tx)),
                ("replication_slots", lambda: self._doctor_slots(conn)),
                ("prepared_transactions", lambda: self._doctor_prepared(conn, long_tx)),
                ("leader_keys", lambda: self._doctor_leaders(conn)),
                ("task_table", lambda: self._doctor_task_table(conn, xid_age_warn, dead_tuples_ratio)),
            ]
            for name, check in checks:
                try:
                    out.extend(check())
                except _DOCTOR_DENIED as exc:
                    message = str(exc.diag.message_primary or exc).strip()
                    out.append(
                        Finding(
                            name,
                            "warn",
                            f"{name}: not checked: {message} (run doctor as the schema owner, "
                            "pgq_worker, or a role with pg_monitor)",
                            {"error": message},
                        )
                    )
            return DoctorReport(tuple(out), _worst(out))

        return self._run(op)

    def _doctor_privileges(self, conn: psycopg.Connection[Any]) -> list[Finding]:
        r = self._one(conn, self._q("doctor_privileges"))
        assert r is not None
        hidden = int(r["hidden_sessions"])
        if hidden:
            return [
                Finding(
                    "privileges",
                    "warn",
                    f"role {r['role']} cannot see the state of {hidden} session(s) of other roles, so their "
                    f"transactions are not checked: GRANT pg_monitor TO {r['role']}",
                    dict(r),
                )
            ]
        return [Finding("privileges", "ok", f"role {r['role']} sees every session", dict(r))]

    def _doctor_transactions(
        self, conn: psycopg.Connection[Any], long_tx: float, usage_warn: float, limit: int
    ) -> list[Finding]:
        q = self._one(conn, self._q("doctor_notify_queue"))
        assert q is not None
        usage = float(q["usage"])
        rows = self._all(conn, self._q("doctor_transactions"), limit=limit)
        oldest = max(
            (r for r in rows if r["xact_age_seconds"] is not None),
            key=lambda r: r["xact_age_seconds"],
            default=None,
        )
        out: list[Finding] = []
        level = "critical" if usage >= NOTIFY_QUEUE_CRITICAL else "warn" if usage >= usage_warn else "ok"
        msg = f"NOTIFY queue {usage:.2%} used"
        if level != "ok":
            msg += "; a full queue makes every notifying COMMIT (enqueue) fail"
            if oldest is not None:
                msg += (
                    f"; the oldest transaction, {_who(oldest)}, {oldest['state'] or '?'}, "
                    f"open {_age(oldest['xact_age_seconds'])}, may be holding it"
                )
        out.append(
            Finding(
                "notify_queue",
                level,
                msg,
                {"usage": usage, "warn_at": usage_warn, "oldest_pid": oldest["pid"] if oldest else None},
            )
        )
        long = [r for r in rows if r["xact_age_seconds"] is not None and r["xact_age_seconds"] >= long_tx]
        for r in long:
            xmin = f", holds an xmin {r['xmin_age']} xids old" if r["xmin_age"] is not None else ""
            # Since PostgreSQL 14 a transaction in another database does not hold back the
            # vacuum of pgq's tables; it can still hold the (cluster-wide) NOTIFY queue.
            if r["this_database"]:
                level, why = "warn", "it holds back vacuum (and the NOTIFY queue if it listens)"
            elif usage >= usage_warn:
                level, why = "warn", "it may hold the NOTIFY queue (if it listens)"
            else:
                level, why = "ok", "another database: it does not hold back the vacuum of pgq's tables"
            out.append(
                Finding(
                    "long_transaction",
                    level,
                    f"{_who(r)}: {r['state'] or '?'}, transaction open "
                    f"{_age(r['xact_age_seconds'])}{xmin}; {why}",
                    dict(r),
                )
            )
        if not long:
            age = ""
            if oldest is not None:
                age = f"; the oldest is {_age(oldest['xact_age_seconds'])} (pid {oldest['pid']})"
            out.append(
                Finding(
                    "long_transaction",
                    "ok",
                    f"no transaction open longer than {_age(long_tx)}{age}",
                    {"threshold_seconds": long_tx, "oldest": dict(oldest) if oldest else None},
                )
            )
        return out

    def _doctor_pgq_idle(self, conn: psycopg.Connection[Any], idle_tx: float) -> list[Finding]:
        rows = self._all(conn, self._q("doctor_pgq_idle_in_transaction"), idle_seconds=idle_tx)
        if not rows:
            return [Finding("pgq_idle_in_transaction", "ok", "no pgq session is idle in a transaction", {})]
        return [
            Finding(
                "pgq_idle_in_transaction",
                "warn",
                f"pgq session {_who(r)} is {r['state']} for {_age(r['idle_seconds'])} "
                f"(transaction open {_age(r['xact_age_seconds'])})",
                dict(r),
            )
            for r in rows
        ]

    def _doctor_slots(self, conn: psycopg.Connection[Any]) -> list[Finding]:
        rows = self._all(conn, self._q("doctor_replication_slots"))
        if not rows:
            return [Finding("replication_slot", "ok", "no replication slot holds back xmin", {})]
        out = []
        for r in rows:
            holds = ", ".join(
                f"{k} {r[k + '_age']} xids old" for k in ("xmin", "catalog_xmin") if r[k + "_age"] is not None
            )
            state = f"active (pid {r['active_pid']})" if r["active"] else "INACTIVE"
            out.append(
                Finding(
                    "replication_slot",
                    "ok" if r["active"] else "warn",
                    f"replication slot {r['slot_name']!r} ({r['slot_type']}, {state}) holds {holds}",
                    dict(r),
                )
            )
        return out

    def _doctor_prepared(self, conn: psycopg.Connection[Any], long_tx: float) -> list[Finding]:
        rows = self._all(conn, self._q("doctor_prepared_xacts"))
        if not rows:
            return [Finding("prepared_transaction", "ok", "no prepared transaction", {})]
        return [
            Finding(
                "prepared_transaction",
                "warn" if r["age_seconds"] >= long_tx and r["this_database"] else "ok",
                f"prepared transaction {r['gid']!r} (owner {r['owner']}, database {r['database']}) "
                f"open {_age(r['age_seconds'])}, xid {r['xid_age']} xids old: COMMIT PREPARED or "
                "ROLLBACK PREPARED it",
                dict(r),
            )
            for r in rows
        ]

    def _doctor_leaders(self, conn: psycopg.Connection[Any]) -> list[Finding]:
        # The one definition of the key namespace is the aggregator's.
        from pgq.services.aggregator import leader_namespace

        try:
            queues = [r["name"] for r in self._all(conn, self._q("doctor_leader_queues"))]
        except psycopg.errors.InsufficientPrivilege:
            queues = [r["name"] for r in self._all(conn, self._q("doctor_leader_queues_reader"))]
        rows = self._all(
            conn,
            self._q("doctor_leader_holders"),
            ns=leader_namespace(self._schema),
            queues=sorted(set(queues)),
        )
        if not rows:
            msg = "no aggregation leadership key is held"
            return [Finding("leader_key", "ok", msg, {"queues": sorted(set(queues))})]
        out = []
        for r in rows:
            who = _who(r)
            if r["servers"]:
                out.append(
                    Finding(
                        "leader_key",
                        "ok",
                        f"queue {r['queue']!r}: aggregation led by {who}, server {', '.join(r['servers'])}",
                        dict(r),
                    )
                )
            else:
                out.append(
                    Finding(
                        "leader_key",
                        "warn",
                        f"queue {r['queue']!r}: the aggregation leadership key is held by {who}, which "
                        "is not a running pgq server's leader connection (squatting?); no server leads it",
                        dict(r),
                    )
                )
        return out

    def _doctor_task_table(
        self, conn: psycopg.Connection[Any], xid_age_warn: int | None, dead_ratio: float
    ) -> list[Finding]:
        r = self._one(conn, self._q("doctor_task_table"), schema=self._schema)
        if r is None:
            msg = f"{self._schema}.task does not exist: run `pgq migrate`"
            return [Finding("task_table", "critical", msg, {})]
        values = dict(r)
        warn_at = xid_age_warn if xid_age_warn is not None else int(r["freeze_max_age"]) * 3 // 2
        values["xid_age_warn"] = warn_at
        age = int(r["frozenxid_age"])
        dead, live = int(r["n_dead_tup"] or 0), int(r["n_live_tup"] or 0)
        vacuumed = _age(r["vacuum_age_seconds"]) + " ago" if r["vacuum_age_seconds"] is not None else "never"
        base = (
            f"{r['relation']}: {r['total_bytes'] / 2**20:.1f} MiB, {live} live / {dead} dead tuples, "
            f"last vacuum {vacuumed}, age(relfrozenxid) {age}"
        )
        out = []
        if age >= XID_AGE_CRITICAL:
            out.append(
                Finding("task_table", "critical", f"{base}: anti-wraparound vacuum is not keeping up", values)
            )
        elif age >= warn_at:
            out.append(
                Finding("task_table", "warn", f"{base}: above {warn_at}, anti-wraparound vacuum lags", values)
            )
        if dead > 10_000 and dead > dead_ratio * live:
            out.append(
                Finding(
                    "task_table",
                    "warn",
                    f"{base}: more dead tuples than {dead_ratio:g} x live; is vacuum held back "
                    "(see the transactions above)?",
                    values,
                )
            )
        return out or [Finding("task_table", "ok", base, values)]


def _group(r: Mapping[str, Any]) -> GroupInfo:
    return GroupInfo(
        group=r["group_key"],
        size=r["size"],
        oldest_at=r["oldest_at"],
        newest_at=r["newest_at"],
        next_due_at=r["due_at"],
        errors=r["errors"] or 0,
        last_error=r["last_error"],
        last_error_at=r["last_error_at"],
        due_by=r["due_by"],
    )


def _worker(t: Mapping[str, Any]) -> WorkerInfo:
    return WorkerInfo(
        server_id=t["locked_by"],
        task_id=task_id_of(t),
        queue=t["queue"],
        type=t["type"],
        payload=t["payload"],
        started_at=t["started_at"],
        lease_expires_at=t["lease_expires_at"],
        deadline=t["deadline"],
    )


def _server(r: Mapping[str, Any], workers: list[WorkerInfo]) -> ServerInfo:
    return ServerInfo(
        id=r["id"],
        host=r["host"],
        pid=r["pid"],
        queues=r["queues"],
        concurrency=r["concurrency"],
        strict_priority=r["strict_priority"],
        status=r["status"],
        started_at=r["started_at"],
        heartbeat_at=r["heartbeat_at"],
        heartbeat_age=r["heartbeat_age"],
        active_workers=workers,
    )
