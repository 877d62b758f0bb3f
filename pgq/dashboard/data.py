"""What the dashboard reads and does: the Inspector, the Scheduler's listings,
and two read-only queries of its own (sql/queries/dashboard.sql).

Everything here is blocking; the app runs it in a worker thread. The
Inspector serialises its calls on one connection; the extra queries use a
second connection of their own, under their own lock.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any, LiteralString

import psycopg

from pgq import _sql, db, scheduler
from pgq.inspector import Inspector
from pgq.task import TaskInfo


class Data:
    """The dashboard's access to one database."""

    def __init__(self, dsn: str, schema: str = "pgq") -> None:
        self.schema = _sql.check_schema(schema)
        self.dsn = dsn
        self.inspector = Inspector(dsn, schema=schema)
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def _q(self, name: str) -> LiteralString:
        return _sql.query(name, self.schema)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = db.connect(self.dsn, "dashboard")
        return self._conn

    def now(self) -> datetime:
        """The database clock."""
        with self._lock:
            row = self._connection().execute(self._q("dashboard_now"), {"now": None}).fetchone()
        assert row is not None
        value: datetime = row["now"]
        return value

    def aggregate_of(self, queue: str, task_id: str) -> TaskInfo | None:
        """The aggregated task that a member went into, while it is stored."""
        with self._lock:
            row = (
                self._connection()
                .execute(self._q("dashboard_task_aggregate_of"), {"queue": queue, "task_id": task_id})
                .fetchone()
            )
        return None if row is None else TaskInfo.from_row(row)

    def queue_overview(self) -> list[dict[str, Any]]:
        """One row per queue from the view pgq.queue_stats."""
        with self._lock:
            return self._connection().execute(self._q("dashboard_queue_overview")).fetchall()

    def daily_totals(self, days: int, now: datetime | None = None) -> list[dict[str, Any]]:
        """Processed/failed per day over all queues, oldest first (view pgq.task_history)."""
        with self._lock:
            return (
                self._connection()
                .execute(self._q("dashboard_daily_totals"), {"days": days, "now": now})
                .fetchall()
            )

    def periodic_entries(self) -> list[scheduler.EntryInfo]:
        with self._lock:
            return scheduler.list_entries(self._connection(), self.schema)

    def entry_history(self, entry_id: str, limit: int = 50) -> list[scheduler.TickInfo]:
        with self._lock:
            return scheduler.entry_history(self._connection(), entry_id, self.schema, limit=limit)

    def close(self) -> None:
        self.inspector.close()
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
