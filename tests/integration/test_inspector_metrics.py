"""pgq.metrics: the Prometheus exporter reads the dashboard views at each scrape."""

from __future__ import annotations

import urllib.request
from typing import Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families

import pgq
from pgq.metrics import PgqCollector, start_exporter


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_exporter_serves_queue_group_and_server_metrics(dsn: str, conn: psycopg.Connection[Any]) -> None:
    with pgq.Client(dsn, notify_window=0) as c:
        c.enqueue_many([pgq.Task("t", i) for i in range(3)], queue="a")
        c.enqueue_many([pgq.Task("m", i) for i in range(2)], queue="a", group="g")
    conn.execute(
        "INSERT INTO pgq.stat_daily (queue, day, processed, failed, aggregated, aggregated_members) "
        "VALUES ('a', current_date, 7, 2, 4, 40)"
    )
    conn.execute(
        "INSERT INTO pgq.task_group (queue, group_key, size, oldest_at, newest_at, errors, retry_at) "
        "VALUES ('a', 'g', 2, now() - interval '1 hour', now(), 3, now() + interval '1 min')"
    )
    conn.execute(
        "INSERT INTO pgq.server (id, host, pid, queues, concurrency) VALUES ('h:1:x', 'h', 1, '{}', 8)"
    )
    with start_exporter(dsn, 0, addr="127.0.0.1", min_interval=0) as exp:
        m = scrape(exp.port)
    q = (("queue", "a"),)
    assert m[("pgq_up", ())] == 1
    assert m[("pgq_tasks", (("queue", "a"), ("state", "pending")))] == 3
    assert m[("pgq_tasks", (("queue", "a"), ("state", "aggregating")))] == 2
    assert m[("pgq_tasks", (("queue", "a"), ("state", "archived")))] == 0
    assert m[("pgq_queue_size", q)] == 5
    assert m[("pgq_queue_groups", q)] == 1
    assert m[("pgq_group_backlog", q)] == 2
    assert m[("pgq_queue_latency_seconds", q)] >= 0
    assert m[("pgq_queue_paused", q)] == 0
    assert m[("pgq_queue_counts_exact", q)] == 1
    assert m[("pgq_processed_total", q)] == 7 and m[("pgq_failed_total", q)] == 2
    assert m[("pgq_processed_today", q)] == 7 and m[("pgq_failed_today", q)] == 2
    assert m[("pgq_aggregations_total", q)] == 4 and m[("pgq_aggregated_members_total", q)] == 40
    assert 3500 < m[("pgq_group_oldest_age_seconds", q)] < 3700
    assert m[("pgq_groups_failing", q)] == 1 and m[("pgq_group_aggregation_errors", q)] == 3
    assert m[("pgq_servers", ())] == 1
    assert m[("pgq_server_concurrency", (("host", "h"), ("server", "h:1:x")))] == 8
    assert m[("pgq_server_active_tasks", (("host", "h"), ("server", "h:1:x")))] == 0


def test_readings_are_cached_for_min_interval(dsn: str) -> None:
    col = PgqCollector(dsn, min_interval=60)
    try:
        first = col.reading()
        with pgq.Client(dsn) as c:
            c.enqueue(pgq.Task("t"), queue="new")
        assert col.reading() is first  # cached
    finally:
        col.close()


def test_unreachable_database_reports_down() -> None:
    col = PgqCollector("postgresql://root@127.0.0.1:1/nowhere", min_interval=0)
    names = [m.name for m in col.collect()]
    samples = [s for m in col.collect() for s in m.samples]
    assert names == ["pgq_up"] and samples[0].value == 0
