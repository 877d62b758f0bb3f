"""The dashboard views of sql/views/dashboard.sql, the documented SQL interface."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgq
import pgq.migrate


@pytest.fixture
def client(dsn: str) -> Iterator[pgq.Client]:
    with pgq.Client(dsn, notify_window=0) as c:
        yield c


def fill(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    client.enqueue_many([pgq.Task("t", i) for i in range(5)], queue="a")
    client.enqueue_many([pgq.Task("t", i) for i in range(3)], queue="a", process_in=3600)
    client.enqueue_many([pgq.Task("m", i) for i in range(4)], queue="a", group="g1")
    client.enqueue(pgq.Task("m", 9), queue="a", group="g2")
    client.enqueue(pgq.Task("t"), queue="b")
    conn.execute("UPDATE pgq.task SET state = 'retry' WHERE queue = 'a' AND payload = '4' AND type = 't'")
    conn.execute(
        "UPDATE pgq.task SET state = 'archived', last_failed_at = now() "
        "WHERE queue = 'a' AND payload = '3' AND type = 't'"
    )
    conn.execute(
        "UPDATE pgq.task SET state = 'active', locked_by = 'h:1:x', started_at = now() WHERE queue = 'b'"
    )
    conn.execute(
        "INSERT INTO pgq.stat_daily (queue, day, processed, failed) VALUES "
        "('a', current_date, 10, 4), ('a', current_date - 1, 6, 0)"
    )


def test_queue_stats(client: pgq.Client, conn: psycopg.Connection[Any], dsn: str) -> None:
    fill(client, conn)
    rows = {r["queue"]: r for r in conn.execute("SELECT * FROM pgq.queue_stats").fetchall()}
    a = rows["a"]
    assert (a["pending"], a["scheduled"], a["retry"], a["archived"]) == (3, 3, 1, 1)
    assert (a["aggregating"], a["groups"], a["active"], a["completed"]) == (5, 2, 0, 0)
    assert a["size"] == 3 + 3 + 1 + 1 + 5
    assert a["counts_exact"] is True
    assert (a["processed_today"], a["failed_today"], a["processed_total"], a["failed_total"]) == (
        10,
        4,
        16,
        4,
    )
    assert a["latency_seconds"] >= 0 and a["oldest_ready_at"] is not None
    assert rows["b"]["active"] == 1 and rows["b"]["latency_seconds"] == 0
    with pgq.Inspector(dsn) as insp:
        insp_info = insp.get_queue_info("a")
    assert (insp_info.pending, insp_info.aggregating, insp_info.groups) == (a["pending"], 5, 2)


def test_queue_counts_estimate_above_the_cap(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    client.enqueue_many([pgq.Task("t", i) for i in range(50)], queue="big")
    client.enqueue_many([pgq.Task("m", i) for i in range(30)], queue="big", group="g")
    conn.execute("ANALYZE pgq.task")
    exact = conn.execute("SELECT * FROM pgq.queue_counts('big')").fetchone()
    assert exact is not None and exact["exact"] is True and exact["pending"] == 50
    capped = conn.execute("SELECT * FROM pgq.queue_counts('big', 10)").fetchone()
    assert capped is not None and capped["exact"] is False
    # estimates never fall below what was counted, and stay in the right range here (fresh statistics)
    assert 10 <= capped["pending"] <= 100
    assert 10 <= capped["aggregating"] <= 60


def test_task_history(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    fill(client, conn)
    rows = conn.execute("SELECT * FROM pgq.task_history WHERE queue = 'a' ORDER BY day DESC").fetchall()
    assert [(r["processed"], r["failed"], r["succeeded"], r["error_rate"]) for r in rows] == [
        (10, 4, 6, 0.4),
        (6, 0, 6, 0.0),
    ]


def test_group_stats_and_backlog(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    fill(client, conn)
    rows = conn.execute("SELECT * FROM pgq.group_stats WHERE queue = 'a' ORDER BY group_key").fetchall()
    assert [(r["group_key"], r["size"], r["errors"]) for r in rows] == [("g1", 4, 0), ("g2", 1, 0)]
    assert rows[0]["oldest_at"] <= rows[0]["newest_at"]
    conn.execute(
        "INSERT INTO pgq.task_group (queue, group_key, size, oldest_at, newest_at, errors, last_error) "
        "VALUES ('a', 'g1', 4, now(), now(), 2, 'boom')"
    )
    g1 = conn.execute("SELECT * FROM pgq.group_stats WHERE queue = 'a' AND group_key = 'g1'").fetchone()
    assert g1 is not None and (g1["errors"], g1["last_error"]) == (2, "boom")
    backlog = conn.execute("SELECT * FROM pgq.group_backlog").fetchall()
    assert [(r["queue"], r["group_key"], r["size_estimate"], r["errors"]) for r in backlog] == [
        ("a", "g1", 4, 2)
    ]


def test_aggregation_lineage(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    client.enqueue(pgq.Task("t"), queue="q")
    conn.execute(
        "INSERT INTO pgq.task (queue, type, payload, state, members) "
        "VALUES ('q', 'digest', '[]', 'pending', ARRAY['11', '12', 'x-13'])"
    )
    rows = conn.execute("SELECT * FROM pgq.aggregation_lineage ORDER BY member_position").fetchall()
    assert [(r["member_id"], r["member_position"], r["member_count"]) for r in rows] == [
        ("11", 1, 3),
        ("12", 2, 3),
        ("x-13", 3, 3),
    ]
    assert rows[0]["aggregated_type"] == "digest" and rows[0]["aggregated_state"] == "pending"
    of = conn.execute("SELECT * FROM pgq.aggregate_of_member('12')").fetchall()
    assert [(r["member_id"], r["aggregated_id"]) for r in of] == [("12", rows[0]["aggregated_id"])]
    assert conn.execute("SELECT * FROM pgq.aggregate_of_member('nope')").fetchall() == []


def test_server_and_worker_activity(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    fill(client, conn)
    conn.execute(
        "INSERT INTO pgq.server (id, host, pid, queues, concurrency) "
        "VALUES ('h:1:x', 'h', 1, '{\"b\": 1}', 4)"
    )
    s = conn.execute("SELECT * FROM pgq.server_activity").fetchone()
    assert s is not None and (s["server_id"], s["active_tasks"], s["utilization"]) == ("h:1:x", 1, 0.25)
    w = conn.execute("SELECT * FROM pgq.worker_activity").fetchall()
    assert [(r["server_id"], r["host"], r["queue"], r["type"]) for r in w] == [("h:1:x", "h", "b", "t")]


def test_migrate_recreates_views_idempotently(dsn: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute("DROP VIEW pgq.worker_activity")
    assert pgq.migrate.migrate(dsn) == []  # nothing to migrate, views recreated anyway
    assert conn.execute("SELECT count(*) AS n FROM pgq.worker_activity").fetchone() == {"n": 0}
    pgq.migrate.migrate(dsn)


def test_views_in_another_schema(empty_db: str) -> None:
    pgq.migrate.migrate(empty_db, schema="jobs")
    with psycopg.connect(empty_db) as c:
        assert c.execute("SELECT count(*) FROM jobs.queue_stats").fetchone() == (0,)
        assert c.execute("SELECT to_regclass('pgq.queue_stats')").fetchone() == (None,)
