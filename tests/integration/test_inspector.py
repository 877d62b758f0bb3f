"""pgq.Inspector against a real PostgreSQL: every method, with rows built by the Client and SQL."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pgq
import pgq.migrate
from pgq.inspector import Inspector

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def client(dsn: str) -> Iterator[pgq.Client]:
    with pgq.Client(dsn, notify_window=0) as c:
        yield c


@pytest.fixture
def insp(dsn: str) -> Iterator[Inspector]:
    with pgq.Inspector(dsn) as i:
        yield i


def set_state(conn: psycopg.Connection[Any], task_id: str, state: str, **cols: Any) -> None:
    sets = [sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in ["state", *cols]]
    query = sql.SQL("UPDATE pgq.task SET {} WHERE id = %(id)s").format(sql.SQL(", ").join(sets))
    conn.execute(query, {"state": state, "id": int(task_id), **cols})


def enqueue_states(client: pgq.Client, conn: psycopg.Connection[Any], queue: str = "q") -> dict[str, str]:
    """One task per state (aggregating in group g1); returns state -> id."""
    ids = {}
    for state in pgq.STATES:
        info = client.enqueue(pgq.Task("t", {"s": state}), queue=queue)
        ids[state] = info.id
    set_state(conn, ids["scheduled"], "scheduled", run_at=NOW + timedelta(hours=1))
    set_state(conn, ids["retry"], "retry", run_at=NOW + timedelta(minutes=1), last_error="boom")
    set_state(conn, ids["active"], "active", started_at=NOW, locked_by="h:1:abc")
    set_state(conn, ids["aggregating"], "aggregating", group_key="g1")
    set_state(conn, ids["completed"], "completed", completed_at=NOW)
    set_state(conn, ids["archived"], "archived", last_failed_at=NOW)
    return ids


# -- queues ------------------------------------------------------------------------


def test_queues_lists_every_queue_sorted(insp: Inspector, client: pgq.Client) -> None:
    assert insp.queues() == []
    client.enqueue(pgq.Task("t"), queue="b")
    client.enqueue(pgq.Task("t"), queue="a")
    assert insp.queues() == ["a", "b"]


def test_get_queue_info_counts_every_state(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    enqueue_states(client, conn)
    client.enqueue(pgq.Task("m"), queue="q", group="g2")
    client.enqueue(pgq.Task("m"), queue="q", group="g2")
    conn.execute(
        "INSERT INTO pgq.stat_daily (queue, day, processed, failed) VALUES "
        "('q', %(d)s, 10, 3), ('q', %(d)s::date - 1, 5, 1), ('other', %(d)s, 100, 100)",
        {"d": NOW.date()},
    )
    info = insp.get_queue_info("q", now=NOW)
    assert (info.pending, info.active, info.scheduled, info.retry) == (1, 1, 1, 1)
    assert (info.archived, info.completed, info.aggregating, info.groups) == (1, 1, 3, 2)
    assert info.size == 1 + 1 + 1 + 1 + 1 + 3  # everything but completed
    assert (info.processed, info.failed, info.processed_total, info.failed_total) == (10, 3, 15, 4)
    assert info.paused is False
    assert info.queue == "q"


def test_latency_is_age_of_oldest_ready_task(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    a = client.enqueue(pgq.Task("t"), queue="q")
    b = client.enqueue(pgq.Task("t"), queue="q")
    set_state(conn, a.id, "pending", run_at=NOW - timedelta(seconds=30))
    set_state(conn, b.id, "retry", run_at=NOW - timedelta(seconds=90))  # due retry waits too
    assert insp.get_queue_info("q", now=NOW).latency == timedelta(seconds=90)
    set_state(conn, b.id, "retry", run_at=NOW + timedelta(seconds=90))  # not yet due
    assert insp.get_queue_info("q", now=NOW).latency == timedelta(seconds=30)
    insp.delete_all_tasks("q", "pending")
    assert insp.get_queue_info("q", now=NOW).latency == timedelta(0)


def test_unknown_queue_raises_queue_not_found(insp: Inspector) -> None:
    calls = [
        lambda: insp.get_queue_info("nope"),
        lambda: insp.history("nope"),
        lambda: insp.groups("nope"),
        lambda: insp.list_tasks("nope", "pending"),
        lambda: insp.list_aggregating_tasks("nope", "g"),
        lambda: insp.get_task_info("nope", "1"),
        lambda: insp.run_task("nope", "1"),
        lambda: insp.archive_task("nope", "1"),
        lambda: insp.delete_task("nope", "1"),
        lambda: insp.cancel_task("nope", "1"),
        lambda: insp.run_all_tasks("nope", "archived"),
        lambda: insp.delete_all_aggregating_tasks("nope", "g"),
        lambda: insp.pause_queue("nope"),
        lambda: insp.unpause_queue("nope"),
        lambda: insp.delete_queue("nope"),
    ]
    for call in calls:
        with pytest.raises(pgq.QueueNotFoundError, match="nope"):
            call()


def test_history_fills_missing_days_with_zeros(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    client.enqueue(pgq.Task("t"), queue="q")
    conn.execute(
        "INSERT INTO pgq.stat_daily (queue, day, processed, failed) VALUES ('q', %s, 7, 2), ('q', %s, 4, 0)",
        (NOW.date(), NOW.date() - timedelta(days=2)),
    )
    h = insp.history("q", days=3, now=NOW)
    assert [(d.date, d.processed, d.failed) for d in h] == [
        (NOW.date(), 7, 2),
        (NOW.date() - timedelta(days=1), 0, 0),
        (NOW.date() - timedelta(days=2), 4, 0),
    ]
    assert all(isinstance(d.date, date) and d.queue == "q" for d in h)
    assert len(insp.history("q", now=NOW)) == 7
    with pytest.raises(ValueError, match="days"):
        insp.history("q", days=0)


def test_pause_and_unpause(insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    client.enqueue(pgq.Task("t"), queue="q")
    insp.pause_queue("q")
    assert insp.get_queue_info("q").paused is True
    assert conn.execute("SELECT paused FROM pgq.queue WHERE name = 'q'").fetchone() == {"paused": True}
    insp.unpause_queue("q")
    assert insp.get_queue_info("q").paused is False


def test_delete_queue_refuses_when_not_empty_unless_forced(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    client.enqueue(pgq.Task("t"), queue="q")
    client.enqueue(pgq.Task("t"), queue="q", group="g")
    client.enqueue(pgq.Task("u"), queue="q", unique=60)
    conn.execute("INSERT INTO pgq.stat_daily (queue, day, processed) VALUES ('q', current_date, 1)")
    with pytest.raises(pgq.QueueNotEmptyError, match="3 task"):
        insp.delete_queue("q")
    assert insp.delete_queue("q", force=True) == 3
    assert insp.queues() == []
    for table in ("task", "unique_lock", "group_arrival", "task_group", "stat_daily", "queue"):
        query = sql.SQL("SELECT count(*) AS n FROM pgq.{}").format(sql.Identifier(table))
        assert conn.execute(query).fetchone() == {"n": 0}
    client.enqueue(pgq.Task("t"), queue="empty")
    insp.delete_all_tasks("empty", "pending")
    assert insp.delete_queue("empty") == 0
    assert insp.queues() == []


def test_delete_queue_refuses_active_tasks_even_forced(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    a = client.enqueue(pgq.Task("t"), queue="q")
    set_state(conn, a.id, "active", locked_by="w")
    with pytest.raises(pgq.QueueNotEmptyError, match="active"):
        insp.delete_queue("q", force=True)
    assert insp.queues() == ["q"]


# -- tasks -------------------------------------------------------------------------


def test_list_tasks_by_state_with_pages(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    ids = enqueue_states(client, conn)
    for state in pgq.STATES:
        got = insp.list_tasks("q", state)
        assert [t.id for t in got] == [ids[state]], state
        assert got[0].state == state
    more = [client.enqueue(pgq.Task("t", i), queue="q").id for i in range(5)]
    pending = [ids["pending"], *more]
    assert [t.id for t in insp.list_tasks("q", "pending", page=1, page_size=4)] == pending[:4]
    assert [t.id for t in insp.list_tasks("q", "pending", page=2, page_size=4)] == pending[4:]
    assert insp.list_tasks("q", "pending", page=3, page_size=4) == []
    with pytest.raises(ValueError, match="unknown task state 'bogus'"):
        insp.list_tasks("q", "bogus")
    with pytest.raises(ValueError, match="page must"):
        insp.list_tasks("q", "pending", page=0)
    with pytest.raises(ValueError, match="page_size"):
        insp.list_tasks("q", "pending", page_size=0)


def test_get_task_info_by_generated_and_custom_id(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    a = client.enqueue(pgq.Task("t", {"x": 1}, headers={"h": "v"}), queue="q")
    b = client.enqueue(pgq.Task("t"), queue="q", task_id="custom-1")
    info = insp.get_task_info("q", a.id)
    assert (info.id, info.type, info.payload, info.state, info.headers) == (
        a.id,
        "t",
        {"x": 1},
        "pending",
        {"h": "v"},
    )
    assert insp.get_task_info("q", "custom-1").id == "custom-1"
    # the bigint key of a task with a custom id is not its public id
    key = conn.execute("SELECT id FROM pgq.task WHERE task_id = 'custom-1'").fetchone()
    assert key is not None
    with pytest.raises(pgq.TaskNotFoundError):
        insp.get_task_info("q", str(key["id"]))
    with pytest.raises(pgq.TaskNotFoundError, match="'999999'"):
        insp.get_task_info("q", "999999")
    with pytest.raises(pgq.TaskNotFoundError):
        insp.get_task_info("q", "99999999999999999999999")  # beyond bigint
    client.enqueue(pgq.Task("t"), queue="other")
    with pytest.raises(pgq.TaskNotFoundError):
        insp.get_task_info("other", b.id)  # a task belongs to one queue


def test_run_task_from_each_runnable_state(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    ids = enqueue_states(client, conn)
    for state in ("scheduled", "retry", "archived", "aggregating"):
        info = insp.run_task("q", ids[state], now=NOW)
        assert info.state == "pending"
        assert info.next_process_at == NOW
    for state in ("pending", "active", "completed"):
        with pytest.raises(pgq.TaskStateError, match=f"is {state}"):
            insp.run_task("q", ids[state])
    with pytest.raises(pgq.TaskNotFoundError):
        insp.run_task("q", "424242")


def test_run_task_notifies_workers(insp: Inspector, client: pgq.Client, dsn: str) -> None:
    t = client.enqueue(pgq.Task("t"), queue="q", process_in=3600)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgq_wake")
        insp.run_task("q", t.id)
        got = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert got == ["q"]


def test_archive_task(insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    ids = enqueue_states(client, conn)
    for state in ("pending", "scheduled", "retry", "aggregating"):
        info = insp.archive_task("q", ids[state], now=NOW)
        assert (info.state, info.last_failed_at) == ("archived", NOW)
    for state in ("active", "completed", "archived"):
        with pytest.raises(pgq.TaskStateError, match=f"is {state}"):
            insp.archive_task("q", ids[state])


def test_delete_task_releases_its_unique_lock(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    t = client.enqueue(pgq.Task("u", {"k": 1}), queue="q", unique=3600)
    with pytest.raises(pgq.DuplicateTaskError):
        client.enqueue(pgq.Task("u", {"k": 1}), queue="q", unique=3600)
    insp.delete_task("q", t.id)
    with pytest.raises(pgq.TaskNotFoundError):
        insp.get_task_info("q", t.id)
    assert conn.execute("SELECT count(*) AS n FROM pgq.unique_lock").fetchone() == {"n": 0}
    client.enqueue(pgq.Task("u", {"k": 1}), queue="q", unique=3600)  # no DuplicateTaskError


def test_delete_task_refuses_active(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    ids = enqueue_states(client, conn)
    with pytest.raises(pgq.TaskStateError, match="is active"):
        insp.delete_task("q", ids["active"])
    for state in ("pending", "scheduled", "retry", "archived", "completed", "aggregating"):
        insp.delete_task("q", ids[state])
    assert [t.id for t in insp.list_tasks("q", "active")] == [ids["active"]]


def test_bulk_operations_by_state(insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    for _ in range(3):
        ids = enqueue_states(client, conn)
    assert insp.run_all_tasks("q", "scheduled") == 3
    assert insp.run_all_retry_tasks("q") == 3
    assert insp.get_queue_info("q").pending == 9
    assert insp.archive_all_tasks("q", "pending") == 9
    assert insp.run_all_archived_tasks("q") == 12
    assert insp.delete_all_tasks("q", "pending") == 12
    assert insp.delete_all_completed_tasks("q") == 3
    assert insp.archive_all_tasks("q", "aggregating") == 3
    assert insp.delete_all_archived_tasks("q") == 3
    info = insp.get_queue_info("q")
    assert (info.size, info.active, info.completed) == (3, 3, 0)
    assert insp.run_all_tasks("q", "retry") == 0
    with pytest.raises(ValueError, match="does not apply to pending"):
        insp.run_all_tasks("q", "pending")
    with pytest.raises(ValueError, match="does not apply to active"):
        insp.delete_all_tasks("q", "active")
    with pytest.raises(ValueError, match="does not apply to archived"):
        insp.archive_all_tasks("q", "archived")
    with pytest.raises(ValueError, match="unknown task state"):
        insp.delete_all_tasks("q", "done")
    assert ids


def test_cancel_task_notifies_the_cancel_channel(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any], dsn: str
) -> None:
    ids = enqueue_states(client, conn)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgq_cancel")
        insp.cancel_task("q", ids["active"])
        got = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert got == [ids["active"]]
    with pytest.raises(pgq.TaskStateError, match="only active"):
        insp.cancel_task("q", ids["pending"])
    with pytest.raises(pgq.TaskNotFoundError):
        insp.cancel_task("q", "777777")


# -- groups (G14) --------------------------------------------------------------------


def make_groups(client: pgq.Client) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"g1": [], "g2": []}
    for i in range(3):
        out["g1"].append(client.enqueue(pgq.Task("email", f"m{i}"), queue="q", group="g1").id)
    out["g2"].append(client.enqueue(pgq.Task("sms", "x"), queue="q", group="g2").id)
    client.enqueue(pgq.Task("email", "other queue"), queue="r", group="g1")
    return out


def fold_arrivals(conn: psycopg.Connection[Any]) -> None:
    """What the aggregator does with arrivals, for the bookkeeping tests."""
    conn.execute(
        """
        WITH a AS (DELETE FROM pgq.group_arrival RETURNING *)
        INSERT INTO pgq.task_group (queue, group_key, size, oldest_at, newest_at)
        SELECT queue, group_key, sum(size), min(oldest_at), max(newest_at) FROM a GROUP BY 1, 2
        ON CONFLICT (queue, group_key) DO UPDATE SET size = pgq.task_group.size + excluded.size,
            newest_at = greatest(pgq.task_group.newest_at, excluded.newest_at)
        """
    )


def test_groups_lists_size_times_and_last_error(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    ids = make_groups(client)
    fold_arrivals(conn)
    conn.execute(
        "UPDATE pgq.task_group SET errors = 2, last_error = 'ValueError: bad', last_error_at = %(t)s, "
        "retry_at = %(t)s + interval '5 s' WHERE queue = 'q' AND group_key = 'g2'",
        {"t": NOW},
    )
    groups = {g.group: g for g in insp.groups("q")}
    assert set(groups) == {"g1", "g2"}
    g1, g2 = groups["g1"], groups["g2"]
    assert g1.size == 3 and g2.size == 1
    members = conn.execute(
        "SELECT enqueued_at FROM pgq.task WHERE id = ANY(%s) ORDER BY enqueued_at",
        ([int(i) for i in ids["g1"]],),
    ).fetchall()
    assert (g1.oldest_at, g1.newest_at) == (members[0]["enqueued_at"], members[-1]["enqueued_at"])
    assert (g1.last_error, g1.errors, g1.next_due_at) == (None, 0, None)
    assert (g2.last_error, g2.errors, g2.last_error_at) == ("ValueError: bad", 2, NOW)
    assert g2.next_due_at == NOW + timedelta(seconds=5)
    info = insp.get_queue_info("q")
    assert (info.aggregating, info.groups) == (4, 2)


def _publish(conn: psycopg.Connection[Any], server: str, policies: dict[str, Any]) -> None:
    """A server row as a running pgq.Server writes it (server_heartbeat)."""
    conn.execute(
        "INSERT INTO pgq.server (id, host, pid, queues, concurrency, group_policies) "
        "VALUES (%s, 'h', 1, '{}', 1, %s::jsonb) "
        "ON CONFLICT (id) DO UPDATE SET group_policies = excluded.group_policies",
        (server, json.dumps(policies)),
    )


def test_groups_next_due_from_the_published_policies(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    make_groups(client)
    before = {g.group: g for g in insp.groups("q")}
    assert before["g1"].next_due_at is None and before["g1"].due_by is None  # no server aggregates q
    g1 = before["g1"]
    # two servers aggregate q with different grace periods: the earliest due time wins
    _publish(conn, "s1", {"q": {"grace_period": 60, "max_delay": None, "max_size": None}})
    _publish(conn, "s2", {"q": {"grace_period": 30, "max_delay": None, "max_size": None}, "r": {}})
    g = {x.group: x for x in insp.groups("q")}["g1"]
    assert (g.next_due_at, g.due_by) == (g1.newest_at + timedelta(seconds=30), "grace_period")
    # a max delay that comes first caps the renewing grace period
    span = (g1.newest_at - g1.oldest_at).total_seconds()
    _publish(conn, "s2", {"q": {"grace_period": 30, "max_delay": span + 1, "max_size": None}})
    g = {x.group: x for x in insp.groups("q")}["g1"]
    assert (g.next_due_at, g.due_by) == (g1.oldest_at + timedelta(seconds=span + 1), "max_delay")
    # a full group is due at once: when its newest member came
    _publish(conn, "s2", {"q": {"grace_period": 30, "max_delay": None, "max_size": 3}})
    groups = {x.group: x for x in insp.groups("q")}
    assert (groups["g1"].next_due_at, groups["g1"].due_by) == (g1.newest_at, "max_size")
    assert groups["g2"].due_by == "grace_period"  # one member of three
    view = conn.execute(
        "SELECT group_key, next_due_at, due_by FROM pgq.group_stats WHERE queue = 'q' ORDER BY group_key"
    ).fetchall()
    assert [(r["group_key"], r["next_due_at"], r["due_by"]) for r in view] == [
        (k, groups[k].next_due_at, groups[k].due_by) for k in ("g1", "g2")
    ]
    # after a failed aggregation: not before the retry time
    fold_arrivals(conn)
    late = g1.newest_at + timedelta(hours=1)
    conn.execute("UPDATE pgq.task_group SET retry_at = %s WHERE group_key = 'g1'", (late,))
    g = {x.group: x for x in insp.groups("q")}["g1"]
    assert (g.next_due_at, g.due_by) == (late, "retry")
    conn.execute("UPDATE pgq.task_group SET retry_at = %s WHERE group_key = 'g1'", (g1.oldest_at,))
    g = {x.group: x for x in insp.groups("q")}["g1"]
    assert (g.next_due_at, g.due_by) == (g1.newest_at, "max_size")
    # the servers are gone (shut down, or cleaned as stale): back to unknown
    conn.execute("DELETE FROM pgq.server")
    g = {x.group: x for x in insp.groups("q")}["g2"]
    assert (g.next_due_at, g.due_by) == (None, None)


def test_list_aggregating_tasks_in_enqueue_order(insp: Inspector, client: pgq.Client) -> None:
    ids = make_groups(client)
    got = insp.list_aggregating_tasks("q", "g1")
    assert [t.id for t in got] == ids["g1"]
    assert [t.payload for t in got] == ["m0", "m1", "m2"]
    assert all(t.state == "aggregating" and t.group == "g1" for t in got)
    assert [t.id for t in insp.list_aggregating_tasks("q", "g1", page=2, page_size=2)] == ids["g1"][2:]
    assert insp.list_aggregating_tasks("q", "unknown-group") == []
    with pytest.raises(pgq.QueueNotFoundError):
        insp.groups("empty")
    assert [t.id for t in insp.list_tasks("q", "aggregating")] == ids["g1"] + ids["g2"]


def test_unknown_group_gives_empty_results(insp: Inspector, client: pgq.Client) -> None:
    make_groups(client)
    assert insp.list_aggregating_tasks("q", "nope") == []
    assert insp.run_all_aggregating_tasks("q", "nope") == 0
    assert insp.archive_all_aggregating_tasks("q", "nope") == 0
    assert insp.delete_all_aggregating_tasks("q", "nope") == 0


def test_run_member_makes_it_pending_on_its_own(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    ids = make_groups(client)
    fold_arrivals(conn)
    info = insp.run_task("q", ids["g1"][1])
    assert (info.state, info.type, info.payload, info.group) == ("pending", "email", "m1", "g1")
    assert [t.id for t in insp.list_aggregating_tasks("q", "g1")] == [ids["g1"][0], ids["g1"][2]]
    # the group still has members: its summary stays (an over-estimate the aggregator re-checks)
    assert conn.execute(
        "SELECT size FROM pgq.task_group WHERE queue = 'q' AND group_key = 'g1'"
    ).fetchone() == {"size": 3}


def test_last_member_leaving_deletes_the_group_summary(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    ids = make_groups(client)
    fold_arrivals(conn)
    client.enqueue(pgq.Task("sms", "late"), queue="q", group="g2")  # an arrival not yet folded
    late = insp.list_aggregating_tasks("q", "g2")[1].id
    insp.archive_task("q", ids["g2"][0])
    assert conn.execute("SELECT count(*) AS n FROM pgq.task_group WHERE group_key = 'g2'").fetchone() == {
        "n": 1
    }
    insp.delete_task("q", late)
    rows = conn.execute("SELECT queue, group_key FROM pgq.task_group ORDER BY 1, 2").fetchall()
    assert rows == [{"queue": "q", "group_key": "g1"}, {"queue": "r", "group_key": "g1"}]
    assert conn.execute(
        "SELECT count(*) AS n FROM pgq.group_arrival WHERE queue = 'q' AND group_key = 'g2'"
    ).fetchone() == {"n": 0}
    assert [g.group for g in insp.groups("q")] == ["g1"]
    assert insp.get_task_info("q", ids["g2"][0]).state == "archived"


def test_whole_group_operations(insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    ids = make_groups(client)
    fold_arrivals(conn)
    assert insp.run_all_aggregating_tasks("q", "g1") == 3
    assert [t.id for t in insp.list_tasks("q", "pending")] == ids["g1"]
    assert insp.archive_all_aggregating_tasks("q", "g2") == 1
    assert insp.groups("q") == []
    assert conn.execute("SELECT queue FROM pgq.task_group").fetchall() == [{"queue": "r"}]
    # the same group name in another queue is another group (G1)
    assert insp.delete_all_aggregating_tasks("r", "g1") == 1
    assert conn.execute("SELECT count(*) AS n FROM pgq.task_group").fetchone() == {"n": 0}
    assert insp.get_queue_info("q").aggregating == 0


def test_delete_member_releases_unique_lock(insp: Inspector, client: pgq.Client) -> None:
    m = client.enqueue(pgq.Task("email", "x"), queue="q", group="g", unique=3600)
    assert insp.delete_all_aggregating_tasks("q", "g") == 1
    again = client.enqueue(pgq.Task("email", "x"), queue="q", group="g", unique=3600)
    assert again.id != m.id


def test_group_cleanup_waits_for_a_concurrent_fold(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any], dsn: str
) -> None:
    """An aggregator folding an arrival while the last member is deleted must not lose the arrival."""
    m = client.enqueue(pgq.Task("e", 1), queue="q", group="g")
    fold_arrivals(conn)
    with psycopg.connect(dsn) as agg:  # a transaction holding the summary row, as a fold does
        agg.execute("SELECT 1 FROM pgq.task_group WHERE queue = 'q' AND group_key = 'g' FOR UPDATE")
        done = threading.Event()

        def delete() -> None:
            insp.delete_task("q", m.id)
            done.set()

        t = threading.Thread(target=delete)
        t.start()
        assert not done.wait(0.3)  # the inspector waits for the lock
        late = client.enqueue(pgq.Task("e", 2), queue="q", group="g")  # a member arrives meanwhile
        agg.execute("UPDATE pgq.task_group SET size = size + 1 WHERE queue = 'q' AND group_key = 'g'")
        agg.commit()
        t.join(10)
    assert done.is_set()
    # the new member is there, so its group's summary survived
    assert conn.execute("SELECT size FROM pgq.task_group WHERE group_key = 'g'").fetchone() is not None
    assert [t.id for t in insp.list_aggregating_tasks("q", "g")] == [late.id]


# -- servers -----------------------------------------------------------------------


def test_servers_with_their_active_tasks(
    insp: Inspector, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    assert insp.servers() == []
    conn.execute(
        "INSERT INTO pgq.server (id, host, pid, queues, concurrency, heartbeat_at) VALUES "
        "('h1:10:aa', 'h1', 10, '{\"q\": 1}', 4, %(t)s), ('h2:20:bb', 'h2', 20, '{\"q\": 2}', 8, %(t)s)",
        {"t": NOW - timedelta(seconds=3)},
    )
    a = client.enqueue(pgq.Task("job", 1), queue="q")
    b = client.enqueue(pgq.Task("job", 2), queue="q")
    set_state(conn, a.id, "active", locked_by="h1:10:aa", started_at=NOW)
    set_state(conn, b.id, "active", locked_by="gone:1:zz", started_at=NOW)
    servers = insp.servers(now=NOW)
    assert [s.id for s in servers] == ["h1:10:aa", "h2:20:bb"]
    s1, s2 = servers
    assert (s1.host, s1.pid, s1.queues, s1.concurrency, s1.status) == ("h1", 10, {"q": 1}, 4, "active")
    assert s1.heartbeat_age == timedelta(seconds=3)
    assert [(w.task_id, w.type, w.payload, w.started_at) for w in s1.active_workers] == [
        (a.id, "job", 1, NOW)
    ]
    assert s2.active_workers == []


def test_inspector_reads_dsn_from_environment(
    dsn: str, client: pgq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.enqueue(pgq.Task("t"), queue="envq")
    monkeypatch.setenv("PGQ_DSN", dsn)
    with pgq.Inspector() as insp:
        assert insp.queues() == ["envq"]


def test_closed_inspector_refuses_work(dsn: str) -> None:
    insp = pgq.Inspector(dsn)
    insp.close()
    with pytest.raises(RuntimeError, match="closed"):
        insp.queues()


def test_other_schema(server_dsn: str, empty_db: str) -> None:
    pgq.migrate.migrate(empty_db, schema="jobs")
    with pgq.Client(empty_db, schema="jobs") as c, pgq.Inspector(empty_db, schema="jobs") as insp:
        c.enqueue(pgq.Task("t"), queue="q", group="g")
        assert insp.queues() == ["q"]
        assert [g.group for g in insp.groups("q")] == ["g"]
        assert insp.delete_all_aggregating_tasks("q", "g") == 1
    with pytest.raises(pgq.ConfigError):
        pgq.Inspector(empty_db, schema="Bad-Name")
