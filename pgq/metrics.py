"""Prometheus metrics for pgq, read from the database at each scrape.

`start_exporter(dsn, port, schema)` serves /metrics on a background thread
(what `pgq metrics --port` and `pgq worker --metrics-port` run) and returns
an Exporter whose stop() ends it. Every scrape reads the dashboard views
(sql/views/dashboard.sql) on one connection of the exporter's own; results are
cached for `min_interval` seconds so that several scrapers cost one reading.
All figures describe the whole database, not one process: run one exporter
per database (or scrape only one worker's) to avoid counting twice in sums.

Metrics (labels in braces):

- pgq_tasks{queue,state}: tasks per state; exact below 1,000 per state family,
  planner estimates above (pgq_queue_counts_exact{queue} is 0 then).
- pgq_queue_size{queue}, pgq_queue_latency_seconds{queue} (age of the oldest
  task ready to run), pgq_queue_paused{queue}, pgq_queue_groups{queue}.
- pgq_processed_total{queue}, pgq_failed_total{queue}: counters over the days
  the daily stats keep (a counter reset when old days are pruned);
  pgq_processed_today{queue}, pgq_failed_today{queue}.
- pgq_aggregations_total{queue}, pgq_aggregated_members_total{queue}: aggregated
  tasks made and the members they took (counters, as processed).
- pgq_group_backlog{queue}: members waiting to be aggregated;
  pgq_group_oldest_age_seconds{queue}: age of the oldest waiting group.
- pgq_groups_failing{queue}: groups whose last aggregation failed (waiting for
  their retry); pgq_group_aggregation_errors{queue}: their failed attempts.
- pgq_server_active_tasks{server,host}, pgq_server_concurrency{server,host},
  pgq_server_heartbeat_age_seconds{server,host}, pgq_servers.
- pgq_up: 1 when the last reading succeeded; pgq_scrape_duration_seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import psycopg
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from pgq import _sql, db
from pgq.task import STATES

logger = logging.getLogger(__name__)


@dataclass
class _Reading:
    queues: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    servers: list[dict[str, Any]]
    duration: float


class PgqCollector(Collector):
    """Reads pgq's state from the database when Prometheus scrapes."""

    def __init__(self, dsn: str | None = None, schema: str = "pgq", *, min_interval: float = 1.0) -> None:
        self._schema = _sql.check_schema(schema)
        self._dsn = db.resolve_dsn(dsn)
        self._min_interval = min_interval
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._cached: tuple[float, _Reading] | None = None

    def _read(self) -> _Reading:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = db.connect(self._dsn, "metrics")
        conn = self._conn
        t0 = time.perf_counter()
        queues = conn.execute(_sql.query("metrics_queues", self._schema)).fetchall()
        groups = conn.execute(_sql.query("metrics_groups", self._schema), {"now": None}).fetchall()
        servers = conn.execute(_sql.query("metrics_servers", self._schema)).fetchall()
        return _Reading(queues, groups, servers, time.perf_counter() - t0)

    def reading(self) -> _Reading | None:
        """The current reading (cached for min_interval), or None when the database fails."""
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self._min_interval:
                return self._cached[1]
            try:
                r = self._read()
            except psycopg.Error as exc:
                logger.warning(
                    "metrics: cannot read pgq's state: %s", exc, extra={"action": "metrics_failed"}
                )
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                self._cached = None
                return None
            self._cached = (now, r)
            return r

    def collect(self) -> Iterator[Metric]:
        r = self.reading()
        up = GaugeMetricFamily("pgq_up", "1 when pgq's state could be read from PostgreSQL.")
        up.add_metric([], 0.0 if r is None else 1.0)
        yield up
        if r is None:
            return
        yield from _metrics(r)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _gauge(
    name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], float]]
) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=labels)
    for values, v in rows:
        g.add_metric(values, v)
    return g


def _metrics(r: _Reading) -> Iterator[Metric]:
    qs = r.queues
    yield _gauge(
        "pgq_tasks",
        "Tasks per queue and state (estimates above 1,000 per state family).",
        ["queue", "state"],
        (([q["queue"], s], float(q[s])) for q in qs for s in STATES),
    )
    simple = [
        (
            "pgq_queue_size",
            "Tasks not completed (pending+active+scheduled+retry+aggregating+archived).",
            "size",
        ),
        ("pgq_queue_latency_seconds", "Age of the oldest task ready to run.", "latency_seconds"),
        ("pgq_queue_paused", "1 when the queue is paused.", "paused"),
        ("pgq_queue_groups", "Aggregation groups with members waiting.", "groups"),
        (
            "pgq_queue_counts_exact",
            "1 when the queue's task counts are exact, 0 when estimated.",
            "counts_exact",
        ),
        ("pgq_group_backlog", "Members waiting to be aggregated.", "aggregating"),
        ("pgq_processed_today", "Tasks finished today (success or failure).", "processed_today"),
        ("pgq_failed_today", "Failed attempts today.", "failed_today"),
    ]
    for name, doc, col in simple:
        yield _gauge(name, doc, ["queue"], (([q["queue"]], float(q[col])) for q in qs))
    for name, doc, col in [
        (
            "pgq_processed",
            "Tasks finished (success or failure) over the days the stats keep.",
            "processed_total",
        ),
        ("pgq_failed", "Failed attempts over the days the stats keep.", "failed_total"),
        ("pgq_aggregations", "Aggregated tasks made over the days the stats keep.", "aggregated_total"),
        (
            "pgq_aggregated_members",
            "Members taken into aggregated tasks over the days the stats keep.",
            "aggregated_members_total",
        ),
    ]:
        c = CounterMetricFamily(name, doc, labels=["queue"])
        for q in qs:
            c.add_metric([q["queue"]], float(q[col]))
        yield c
    gs = r.groups
    yield _gauge(
        "pgq_group_oldest_age_seconds",
        "Age of the oldest waiting group (from the aggregators' summary).",
        ["queue"],
        (([g["queue"]], float(g["oldest_age_seconds"])) for g in gs if g["oldest_age_seconds"] is not None),
    )
    yield _gauge(
        "pgq_groups_failing",
        "Groups whose last aggregation failed, waiting for a retry.",
        ["queue"],
        (([g["queue"]], float(g["failing"])) for g in gs),
    )
    yield _gauge(
        "pgq_group_aggregation_errors",
        "Failed aggregation attempts of the groups now failing.",
        ["queue"],
        (([g["queue"]], float(g["errors"])) for g in gs),
    )
    ss = r.servers
    yield _gauge("pgq_servers", "Worker servers with a heartbeat row.", [], [([], float(len(ss)))])
    for name, doc, col in [
        ("pgq_server_active_tasks", "Tasks a server is running.", "active_tasks"),
        ("pgq_server_concurrency", "Tasks a server can run at once.", "concurrency"),
        (
            "pgq_server_heartbeat_age_seconds",
            "Time since a server's last heartbeat.",
            "heartbeat_age_seconds",
        ),
    ]:
        yield _gauge(
            name, doc, ["server", "host"], (([s["server_id"], s["host"]], float(s[col])) for s in ss)
        )
    yield _gauge("pgq_scrape_duration_seconds", "Time spent reading pgq's state.", [], [([], r.duration)])


class Exporter:
    """A running /metrics endpoint; stop() shuts it down and closes its connection."""

    def __init__(self, server: WSGIServer, thread: threading.Thread, collector: PgqCollector) -> None:
        self._server = server
        self._thread = thread
        self.collector = collector

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self.collector.close()

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_exporter(
    dsn: str | None, port: int, schema: str = "pgq", *, addr: str = "0.0.0.0", min_interval: float = 1.0
) -> Exporter:
    """Serve pgq's metrics at http://addr:port/metrics on a daemon thread (port 0: any free port)."""
    collector = PgqCollector(dsn, schema, min_interval=min_interval)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, thread = start_http_server(port, addr=addr, registry=registry)
    logger.info("metrics: serving on http://%s:%d/metrics", addr, server.server_port)
    return Exporter(server, thread, collector)
