"""Client.enqueue / enqueue_many against a real PostgreSQL: every option, the
caller's transaction (conn=), unique locks under concurrent transactions,
wake-up NOTIFYs, and bad input that must leave the caller's transaction usable."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import psycopg_pool
import pytest
from psycopg.rows import dict_row

import pgq
from pgq.client import STREAM_TRAIL, WakeDebouncer
from tests.fixtures.util import wait_for


@pytest.fixture
def client(dsn: str) -> Iterator[pgq.Client]:
    with pgq.Client(dsn) as c:
        yield c


@pytest.fixture
def tx(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A caller's connection in the default (non-autocommit) mode, tuple rows."""
    with psycopg.connect(dsn) as c:
        yield c


def task_rows(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return conn.execute("SELECT * FROM pgq.task ORDER BY id").fetchall()


def one(conn: psycopg.Connection[Any], info: pgq.TaskInfo) -> dict[str, Any]:
    row = conn.execute(
        "SELECT * FROM pgq.task WHERE coalesce(task_id, id::text) = %s AND queue = %s", (info.id, info.queue)
    ).fetchone()
    assert row is not None
    return dict(row)


def same_info(x: pgq.TaskInfo, y: pgq.TaskInfo, *fields: str) -> bool:
    """Whether two TaskInfos agree on these fields."""
    return [getattr(x, f) for f in fields] == [getattr(y, f) for f in fields]


def db_now(conn: psycopg.Connection[Any]) -> datetime:
    row = conn.execute("SELECT clock_timestamp() AS t").fetchone()
    assert row is not None
    return row["t"]  # type: ignore[no-any-return]


# --- every option ------------------------------------------------------------------------------


def test_enqueue_defaults(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    info = client.enqueue(pgq.Task("email:deliver", {"user_id": 42}))
    assert isinstance(info, pgq.TaskInfo)
    assert info.id.isdigit() and info.queue == "default" and info.type == "email:deliver"
    assert info.state == "pending" and info.payload == {"user_id": 42} and info.group is None
    assert info.max_retry == 25 and info.retried == 0 and info.members == []
    assert info.next_process_at == info.enqueued_at is not None
    r = one(conn, info)
    assert r["id"] == int(info.id) and r["task_id"] is None
    assert r["state"] == "pending" and r["queue"] == "default" and r["type"] == "email:deliver"
    assert r["payload"] == {"user_id": 42} and r["headers"] is None and r["max_retry"] == 25
    assert r["run_at"] == r["enqueued_at"] == info.enqueued_at
    assert r["timeout"] is r["deadline"] is r["retention"] is r["unique_key"] is None
    assert conn.execute("SELECT name, paused FROM pgq.queue").fetchall() == [
        {"name": "default", "paused": False}
    ]


def test_queue(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    info = client.enqueue(pgq.Task("t"), queue="notifications")
    assert info.queue == "notifications" and one(conn, info)["queue"] == "notifications"
    client.enqueue(pgq.Task("t"), queue="notifications")
    assert [r["name"] for r in conn.execute("SELECT name FROM pgq.queue")] == ["notifications"]


def test_group_is_aggregating(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    info = client.enqueue(pgq.Task("t", 1), queue="q", group="user1:email")
    assert info.state == "aggregating" and info.group == "user1:email"
    r = one(conn, info)
    assert r["state"] == "aggregating" and r["group_key"] == "user1:email"
    arrivals = conn.execute(
        "SELECT queue, group_key, size, oldest_at, newest_at FROM pgq.group_arrival"
    ).fetchall()
    assert arrivals == [
        {
            "queue": "q",
            "group_key": "user1:email",
            "size": 1,
            "oldest_at": r["enqueued_at"],
            "newest_at": r["enqueued_at"],
        }
    ]


def test_group_with_process_in_is_scheduled_and_keeps_its_group(
    client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    info = client.enqueue(pgq.Task("t"), group="g", process_in=60)
    r = one(conn, info)
    assert info.state == r["state"] == "scheduled" and r["group_key"] == "g" and info.group == "g"
    assert r["run_at"] - r["enqueued_at"] == timedelta(seconds=60)
    assert conn.execute("SELECT count(*) AS n FROM pgq.group_arrival").fetchone() == {"n": 0}


def test_group_with_process_at_in_the_past_is_aggregating(
    client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    past = db_now(conn) - timedelta(hours=1)
    info = client.enqueue(pgq.Task("t"), group="g", process_at=past)
    r = one(conn, info)
    assert info.state == r["state"] == "aggregating" and r["run_at"] == r["enqueued_at"]
    assert conn.execute("SELECT size FROM pgq.group_arrival").fetchall() == [{"size": 1}]


def test_max_retry_timeout_deadline_retention_headers(
    client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    deadline = datetime(2031, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
    info = client.enqueue(
        pgq.Task("t", {"a": [1, 2]}, headers={"trace": "abc", "x-é": "ü"}),
        max_retry=0,
        timeout=timedelta(seconds=90),
        deadline=deadline,
        retention=2.5,
    )
    r = one(conn, info)
    assert r["max_retry"] == 0 and info.max_retry == 0
    assert r["timeout"] == timedelta(seconds=90) == info.timeout
    assert r["deadline"] == deadline == info.deadline
    assert r["retention"] == timedelta(seconds=2.5) == info.retention
    assert r["headers"] == {"trace": "abc", "x-é": "ü"} == info.headers


def test_process_in_is_scheduled_by_the_database_clock(
    client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    before = db_now(conn)
    info = client.enqueue(pgq.Task("t"), process_in=timedelta(minutes=5))
    after = db_now(conn)
    r = one(conn, info)
    assert info.state == r["state"] == "scheduled"
    assert r["run_at"] - r["enqueued_at"] == timedelta(minutes=5)
    assert before <= r["enqueued_at"] <= after
    assert info.next_process_at == r["run_at"]


def test_process_at(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    at = db_now(conn) + timedelta(days=1)
    info = client.enqueue(pgq.Task("t"), process_at=at)
    assert info.state == "scheduled" and one(conn, info)["run_at"] == at
    # another time zone is the same instant
    info2 = client.enqueue(pgq.Task("t"), process_at=at.astimezone(timezone(timedelta(hours=-5))))
    assert one(conn, info2)["run_at"] == at
    past = client.enqueue(pgq.Task("t"), process_at=at - timedelta(days=2))
    assert past.state == "pending"
    zero = client.enqueue(pgq.Task("t"), process_in=0)
    assert zero.state == "pending"


def test_task_id_and_conflict(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    info = client.enqueue(pgq.Task("t"), task_id="order-7")
    assert info.id == "order-7" and one(conn, info)["task_id"] == "order-7"
    with pytest.raises(pgq.TaskIDConflictError, match="order-7"):
        client.enqueue(pgq.Task("u"), task_id="order-7")
    # the same id in another queue is another task
    assert client.enqueue(pgq.Task("t"), task_id="order-7", queue="other").id == "order-7"
    with pytest.raises(pgq.InvalidName, match="digits"):
        client.enqueue(pgq.Task("t"), task_id="1234")
    assert len(task_rows(conn)) == 2


def test_unique(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    first = client.enqueue(pgq.Task("t", {"a": 1, "b": 2}), unique=timedelta(hours=1))
    with pytest.raises(pgq.DuplicateTaskError, match="unique"):
        client.enqueue(pgq.Task("t", {"b": 2, "a": 1}), unique=3600)
    # another payload, type or queue is another key; a non-unique task is never blocked
    client.enqueue(pgq.Task("t", {"a": 2}), unique=3600)
    client.enqueue(pgq.Task("u", {"a": 1, "b": 2}), unique=3600)
    client.enqueue(pgq.Task("t", {"a": 1, "b": 2}), unique=3600, queue="q2")
    client.enqueue(pgq.Task("t", {"a": 1, "b": 2}))
    assert len(task_rows(conn)) == 5
    lock = conn.execute("SELECT * FROM pgq.unique_lock WHERE task = %s", (int(first.id),)).fetchone()
    assert lock is not None
    r = one(conn, first)
    assert lock["expires_at"] - r["enqueued_at"] == timedelta(hours=1) and r["unique_key"] == lock["key"]


def test_unique_allowed_again_after_the_ttl(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    client.enqueue(pgq.Task("t", 1), unique=0.2)
    with pytest.raises(pgq.DuplicateTaskError):
        client.enqueue(pgq.Task("t", 1), unique=0.2)
    # wait on the database clock (the only clock) until the lock has expired
    deadline = time.monotonic() + 10
    while conn.execute("SELECT count(*) AS n FROM pgq.unique_lock WHERE expires_at > now()").fetchone() != {
        "n": 0
    }:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = client.enqueue(pgq.Task("t", 1), unique=60)
    lock = conn.execute("SELECT task FROM pgq.unique_lock").fetchall()
    assert lock == [{"task": int(second.id)}]


def _blocked_on_lock(conn: psycopg.Connection[Any], pid: int) -> bool:
    row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row["wait_event_type"] == "Lock"


def _wait_blocked(conn: psycopg.Connection[Any], pid: int) -> None:
    deadline = time.monotonic() + 10
    while not _blocked_on_lock(conn, pid):
        assert time.monotonic() < deadline, "the second enqueue never waited for the first transaction"
        time.sleep(0.01)


@pytest.mark.parametrize("first_commits", [True, False])
def test_unique_under_concurrent_transactions(
    client: pgq.Client, dsn: str, conn: psycopg.Connection[Any], first_commits: bool
) -> None:
    task = pgq.Task("report", {"day": "2030-01-01"})
    with psycopg.connect(dsn) as a, psycopg.connect(dsn) as b:
        client.enqueue(task, conn=a, unique=3600)  # a's transaction stays open
        outcome: list[Any] = []

        def second() -> None:
            try:
                outcome.append(client.enqueue(task, conn=b, unique=3600))
                b.commit()
            except Exception as exc:
                outcome.append(exc)
                b.rollback()

        t = threading.Thread(target=second)
        t.start()
        _wait_blocked(conn, b.info.backend_pid)
        assert outcome == []
        if first_commits:
            a.commit()
        else:
            a.rollback()
        t.join(10)
        assert not t.is_alive()
    if first_commits:
        assert len(outcome) == 1 and isinstance(outcome[0], pgq.DuplicateTaskError)
    else:
        assert len(outcome) == 1 and isinstance(outcome[0], pgq.TaskInfo)
    assert len(task_rows(conn)) == 1
    assert conn.execute("SELECT count(*) AS n FROM pgq.unique_lock").fetchone() == {"n": 1}


def test_options_on_the_task_and_overrides(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    task = pgq.Task("t", None, queue="a", group="g", max_retry=3, timeout=10, task_id="x1")
    info = client.enqueue(task)
    r = one(conn, info)
    assert (r["queue"], r["group_key"], r["max_retry"], r["timeout"], r["task_id"]) == (
        "a",
        "g",
        3,
        timedelta(seconds=10),
        "x1",
    )
    info2 = client.enqueue(task, queue="b", max_retry=9, task_id="x2", process_in=30)
    r2 = one(conn, info2)
    assert (r2["queue"], r2["group_key"], r2["max_retry"], r2["task_id"], r2["state"]) == (
        "b",
        "g",
        9,
        "x2",
        "scheduled",
    )
    assert task.options["queue"] == "a"  # the task itself is unchanged


# --- the caller's transaction ------------------------------------------------------------------


def test_rollback_leaves_no_task(
    client: pgq.Client, tx: psycopg.Connection[Any], conn: psycopg.Connection[Any]
) -> None:
    tx.execute("CREATE TABLE orders (id int)")
    tx.commit()
    tx.execute("INSERT INTO orders VALUES (7)")
    client.enqueue(pgq.Task("order:confirm", {"order": 7}), conn=tx)
    client.enqueue_many([pgq.Task("a"), pgq.Task("b")], conn=tx, group="g")
    tx.rollback()
    assert task_rows(conn) == []
    assert conn.execute("SELECT count(*) AS n FROM pgq.group_arrival").fetchone() == {"n": 0}


def test_commit_keeps_the_task_and_client_never_commits(
    client: pgq.Client, tx: psycopg.Connection[Any], conn: psycopg.Connection[Any]
) -> None:
    info = client.enqueue(pgq.Task("t", 1), conn=tx)
    infos = client.enqueue_many([pgq.Task("t", 2), pgq.Task("t", 3)], conn=tx)
    tid = client.enqueue(pgq.Task("t", 4), conn=tx, task_id="custom")
    assert tx.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    assert task_rows(conn) == []  # not visible to others: nothing was committed
    tx.commit()
    assert [r["payload"] for r in task_rows(conn)] == [1, 2, 3, 4]
    assert [info.id, *[i.id for i in infos], tid.id][-1] == "custom"


def test_autocommit_connection_inside_a_transaction_block(
    client: pgq.Client, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(dsn, autocommit=True) as ac:
        with pytest.raises(RuntimeError, match="boom"), ac.transaction():
            client.enqueue(pgq.Task("t", 1), conn=ac)
            client.enqueue(pgq.Task("t", 2), conn=ac, task_id="k")
            client.enqueue_many([pgq.Task("t", 3)], conn=ac)
            raise RuntimeError("boom")
        assert task_rows(conn) == []
        with ac.transaction():
            client.enqueue(pgq.Task("t", 1), conn=ac)
            assert task_rows(conn) == []
        assert len(task_rows(conn)) == 1
        # outside a block each enqueue commits on its own (autocommit)
        client.enqueue(pgq.Task("t", 2), conn=ac, task_id="k2")
        client.enqueue_many([pgq.Task("t", 3), pgq.Task("t", 4)], conn=ac)
        assert len(task_rows(conn)) == 4


def test_task_id_conflict_leaves_the_callers_transaction_usable(
    client: pgq.Client, tx: psycopg.Connection[Any], conn: psycopg.Connection[Any]
) -> None:
    client.enqueue(pgq.Task("t"), task_id="dup")
    client.enqueue(pgq.Task("mine", 1), conn=tx)
    with pytest.raises(pgq.TaskIDConflictError):
        client.enqueue(pgq.Task("t"), conn=tx, task_id="dup")
    with pytest.raises(pgq.TaskIDConflictError):
        client.enqueue_many([pgq.Task("x", task_id="new"), pgq.Task("y", task_id="dup")], conn=tx)
    client.enqueue(pgq.Task("u", 1), unique=60)
    with pytest.raises(pgq.DuplicateTaskError):
        client.enqueue(pgq.Task("u", 1), unique=60, conn=tx)
    with pytest.raises(pgq.DuplicateTaskError):
        client.enqueue_many([pgq.Task("z", task_id="new2"), pgq.Task("u", 1, unique=60)], conn=tx)
    tx.execute("SELECT 1")
    client.enqueue(pgq.Task("mine", 2), conn=tx)
    tx.commit()
    mine = [r["payload"] for r in task_rows(conn) if r["type"] == "mine"]
    assert mine == [1, 2]
    assert conn.execute("SELECT count(*) AS n FROM pgq.task WHERE task_id LIKE 'new%'").fetchone() == {"n": 0}


def _notifications(
    listener: psycopg.Connection[Any], timeout: float, stop_after: int | None = None
) -> list[str]:
    return [n.payload for n in listener.notifies(timeout=timeout, stop_after=stop_after)]


@pytest.fixture
def listener(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("LISTEN pgq_wake")
        yield c


def test_notify_is_delivered_only_at_commit(
    client: pgq.Client, tx: psycopg.Connection[Any], listener: psycopg.Connection[Any]
) -> None:
    client.enqueue(pgq.Task("t"), conn=tx, queue="q1")
    client.enqueue_many([pgq.Task("t") for _ in range(50)], conn=tx, queue="q1")
    client.enqueue(pgq.Task("t"), conn=tx, queue="q2")
    assert _notifications(listener, 0.2) == []
    tx.commit()
    got = _notifications(listener, 5, stop_after=2)
    got += _notifications(listener, 0.2)
    assert sorted(got) == ["q1", "q2"]  # one per queue and transaction, never one per row


def test_notify_false(
    client: pgq.Client, tx: psycopg.Connection[Any], listener: psycopg.Connection[Any]
) -> None:
    client.enqueue(pgq.Task("t"), conn=tx, notify=False)
    tx.commit()
    client.enqueue(pgq.Task("t"), notify=False)
    client.enqueue_many([pgq.Task("t")] * 2, notify=False)
    assert _notifications(listener, 0.2) == []


def test_notify_on_own_connection_and_trailing(dsn: str, listener: psycopg.Connection[Any]) -> None:
    with pgq.Client(dsn, notify_window=0.5) as c:
        c.enqueue(pgq.Task("t"), queue="q")
        assert _notifications(listener, 5, stop_after=1) == ["q"]
        t0 = time.monotonic()
        c.enqueue(pgq.Task("t"), queue="q")
        c.enqueue(pgq.Task("t"), queue="q")
        if time.monotonic() - t0 < 0.4:  # still inside the window: no NOTIFY yet, a trailing one later
            assert _notifications(listener, 0.05) == []
        assert _notifications(listener, 5, stop_after=1) == ["q"]
        assert _notifications(listener, 0.7) == []  # one trailing NOTIFY, not one per enqueue


def test_close_sends_the_pending_trailing_notify(dsn: str, listener: psycopg.Connection[Any]) -> None:
    c = pgq.Client(dsn, notify_window=60)
    c.enqueue(pgq.Task("t"), queue="q")
    c.enqueue(pgq.Task("t"), queue="q")
    c.close()
    assert _notifications(listener, 5, stop_after=2) == ["q", "q"]
    with pytest.raises(RuntimeError, match="closed"):
        c.enqueue(pgq.Task("t"))


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_wake_debouncer(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr("pgq.client.time.monotonic", clock)
    d = WakeDebouncer(0.002)
    assert d.trail == STREAM_TRAIL
    notify, delay = d.choose(["a", "a", "b"])
    assert sorted(notify) == ["a", "b"] and delay is None
    clock.t += 0.001
    notify, delay = d.choose(["a"])  # skipped: a trailing NOTIFY two windows after the last one
    assert notify == [] and delay == pytest.approx(0.003)
    due, nxt = d.take_due()
    assert due == [] and nxt == pytest.approx(0.003)
    clock.t += 0.0015
    # an enqueue after the window notifies itself and covers the skipped one; the
    # queue is now streaming
    assert d.choose(["a"]) == (["a"], None)
    assert d.take_due() == ([], None)
    clock.t += 0.001
    notify, delay = d.choose(["a"])  # skipped while streaming: its trailing NOTIFY waits `trail`
    assert notify == [] and delay == pytest.approx(STREAM_TRAIL)
    clock.t += 0.004
    assert d.take_due() == ([], pytest.approx(STREAM_TRAIL - 0.004))  # two windows: not yet
    clock.t += STREAM_TRAIL - 0.004
    assert d.take_due() == (["a"], None)  # no enqueue came: the trailing NOTIFY follows the skipped one
    assert d.take_due() == ([], None)
    clock.t += 0.0005
    # the trailing NOTIFY counts as the last one, and ended the stream: two windows again
    assert d.choose(["a"]) == ([], pytest.approx(0.0035))
    assert d.drain() == ["a"] and d.drain() == []
    clock.t += 1
    assert d.choose(["a"]) == (["a"], None)
    clock.t += 0.0025
    assert d.choose(["a"]) == (["a"], None)  # notified with none pending: not streaming
    clock.t += 0.001
    assert d.choose(["a"]) == ([], pytest.approx(0.003))
    assert WakeDebouncer(0).choose(["b", "a", "a"]) == (["a", "b"], None)
    assert WakeDebouncer(0.5).trail == 1.0  # never under two windows


# --- enqueue_many ------------------------------------------------------------------------------


def test_enqueue_many_one_statement_in_order(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    tasks = [pgq.Task("t", i) for i in range(500)]
    infos = client.enqueue_many(tasks, queue="bulk")
    assert [i.payload for i in infos] == list(range(500))
    ids = [int(i.id) for i in infos]
    assert ids == sorted(ids) and len(set(ids)) == 500
    rows = task_rows(conn)
    assert [r["payload"] for r in rows] == list(range(500)) and [r["id"] for r in rows] == ids
    # one statement: one statement timestamp and one transaction for every row
    stamps = conn.execute(
        "SELECT count(DISTINCT enqueued_at) AS s, count(DISTINCT xmin::text) AS x FROM pgq.task"
    )
    assert stamps.fetchone() == {"s": 1, "x": 1}


def test_enqueue_many_grouped_and_mixed(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    tasks = [pgq.Task("t", i, group=f"g{i % 2}") for i in range(5)]
    tasks += [pgq.Task("t", 9, queue="other"), pgq.Task("t", 10, group="g0", process_in=60)]
    infos = client.enqueue_many(tasks)
    assert [i.state for i in infos] == ["aggregating"] * 5 + ["pending", "scheduled"]
    arrivals = conn.execute(
        "SELECT queue, group_key, size FROM pgq.group_arrival ORDER BY group_key"
    ).fetchall()
    assert arrivals == [
        {"queue": "default", "group_key": "g0", "size": 3},
        {"queue": "default", "group_key": "g1", "size": 2},
    ]
    assert sorted(r["name"] for r in conn.execute("SELECT name FROM pgq.queue")) == ["default", "other"]


def test_enqueue_many_all_or_nothing(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    client.enqueue(pgq.Task("u", 1), unique=60)
    client.enqueue(pgq.Task("t"), task_id="taken")
    with pytest.raises(pgq.DuplicateTaskError):
        client.enqueue_many([pgq.Task("a"), pgq.Task("u", 1, unique=60), pgq.Task("b")])
    with pytest.raises(pgq.TaskIDConflictError):
        client.enqueue_many([pgq.Task("a"), pgq.Task("t", task_id="taken"), pgq.Task("b")])
    with pytest.raises(pgq.InvalidPayloadError):
        client.enqueue_many([pgq.Task("a"), pgq.Task("b", float("nan"))])
    assert len(task_rows(conn)) == 2
    assert conn.execute("SELECT count(*) AS n FROM pgq.unique_lock").fetchone() == {"n": 1}
    with pytest.raises(pgq.InvalidArgumentError):
        client.enqueue_many([])


def test_enqueue_many_of_10000(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    infos = client.enqueue_many((pgq.Task("t", {"i": i}) for i in range(10_000)), queue="bulk")
    assert len(infos) == 10_000 and infos[-1].payload == {"i": 9999}
    assert conn.execute("SELECT count(*) AS n FROM pgq.task WHERE state = 'pending'").fetchone() == {
        "n": 10_000
    }


# --- bad input on the caller's open transaction ------------------------------------------------

NAIVE = datetime(2030, 1, 1)


def _deep(n: int) -> Any:
    v: Any = 0
    for _ in range(n):
        v = {"k": v}
    return v


BAD: list[tuple[str, Any, dict[str, Any], type[Exception]]] = [
    ("blank queue", 1, {"queue": " "}, pgq.InvalidName),
    ("blank type", 1, {"type": ""}, pgq.InvalidName),
    ("blank group", 1, {"group": "\t"}, pgq.InvalidName),
    ("NUL in queue", 1, {"queue": "a\x00"}, pgq.InvalidName),
    ("NUL in type", 1, {"type": "a\x00"}, pgq.InvalidName),
    ("long group", 1, {"group": "g" * 256}, pgq.InvalidName),
    ("long task_id", 1, {"task_id": "i" * 256}, pgq.InvalidName),
    ("NaN", float("nan"), {}, pgq.InvalidPayloadError),
    ("Infinity", {"x": float("inf")}, {}, pgq.InvalidPayloadError),
    ("NUL string", "\u0000", {}, pgq.InvalidPayloadError),
    ("lone surrogate", ["\ud83d"], {}, pgq.InvalidPayloadError),
    ("bytes", b"x", {}, pgq.PayloadTypeError),
    ("set", {1}, {}, pgq.PayloadTypeError),
    ("datetime", NAIVE, {}, pgq.PayloadTypeError),
    ("Decimal", __import__("decimal").Decimal("1"), {}, pgq.PayloadTypeError),
    ("int keys", {1: 2}, {}, pgq.PayloadTypeError),
    ("5000 deep", _deep(5000), {}, pgq.InvalidPayloadError),
    ("too large", "x" * (16 * 1024 * 1024), {}, pgq.PayloadTooLargeError),
    ("negative max_retry", 1, {"max_retry": -1}, pgq.InvalidArgumentError),
    (
        "process_at and process_in",
        1,
        {"process_at": datetime.now(UTC), "process_in": 1},
        pgq.InvalidArgumentError,
    ),
    ("naive process_at", 1, {"process_at": NAIVE}, pgq.InvalidArgumentError),
    ("naive deadline", 1, {"deadline": NAIVE}, pgq.InvalidArgumentError),
    ("negative process_in", 1, {"process_in": -1}, pgq.InvalidArgumentError),
    ("zero timeout", 1, {"timeout": 0}, pgq.InvalidArgumentError),
    ("negative unique", 1, {"unique": timedelta(seconds=-5)}, pgq.InvalidArgumentError),
    ("negative retention", 1, {"retention": -1}, pgq.InvalidArgumentError),
    ("unknown option", 1, {"max_retries": 3}, pgq.InvalidArgumentError),
    ("all-digit task_id", 1, {"task_id": "42"}, pgq.InvalidName),
]


@pytest.mark.parametrize(("what", "payload", "opts", "exc"), BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("many", [False, True], ids=["enqueue", "enqueue_many"])
def test_bad_input_leaves_the_callers_transaction_usable(
    client: pgq.Client,
    tx: psycopg.Connection[Any],
    conn: psycopg.Connection[Any],
    what: str,
    payload: Any,
    opts: dict[str, Any],
    exc: type[Exception],
    many: bool,
) -> None:
    opts = dict(opts)
    task = pgq.Task(opts.pop("type", "t"), payload)
    tx.execute("SELECT 1")  # the caller's transaction is open
    with pytest.raises(exc) as ei:
        if many:
            client.enqueue_many([pgq.Task("ok"), task], conn=tx, **opts)
        else:
            client.enqueue(task, conn=tx, **opts)
    assert isinstance(ei.value, pgq.PgqError), what
    assert tx.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    tx.execute("SELECT 1")
    tx.commit()
    assert task_rows(conn) == []


# --- pools and threads -------------------------------------------------------------------------


def test_client_with_a_callers_pool(dsn: str, conn: psycopg.Connection[Any]) -> None:
    with psycopg_pool.ConnectionPool(dsn, min_size=1, max_size=2, open=True) as pool:
        with pgq.Client(pool=pool) as c:
            c.enqueue(pgq.Task("t"))
        assert not pool.closed  # a caller's pool is the caller's to close
        with pool.connection() as pc:
            assert pc.execute("SELECT 1").fetchone() == (1,)
    assert len(task_rows(conn)) == 1


def _terminate_client_backends(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name LIKE 'pgq:client:%%'"
    ).fetchone()
    assert row is not None
    return int(row["n"])


def test_client_gets_over_a_terminated_connection(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    """The Client's own pool is checked out with getconn/putconn: a connection that broke
    under a call is discarded by putconn, and the next call gets a fresh one."""
    client.enqueue(pgq.Task("t", 1))
    client.enqueue_many([pgq.Task("t", i) for i in range(2, 4)])
    killed = _terminate_client_backends(conn)
    assert killed >= 1
    failed = 0
    for i in range(4, 8):  # a call may meet a dead connection, once per killed one
        try:
            client.enqueue(pgq.Task("t", i))
        except psycopg.OperationalError:
            failed += 1
    assert failed <= killed < 4
    assert len(task_rows(conn)) == 3 + 4 - failed
    infos = client.enqueue_many([pgq.Task("t", i) for i in range(100)])  # the COPY path too
    assert len(infos) == 100


def test_client_leaves_no_connection_in_a_transaction(
    client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    """A failed call (a unique batch that rolls back, a task_id conflict) returns its
    connection idle: the next calls on the same pool commit."""
    client.enqueue(pgq.Task("t"), task_id="x")
    with pytest.raises(pgq.TaskIDConflictError):
        client.enqueue(pgq.Task("t"), task_id="x")
    with pytest.raises(pgq.DuplicateTaskError):
        client.enqueue_many([pgq.Task("u", 1), pgq.Task("u", 1)], unique=60)
    client.enqueue(pgq.Task("t", "after"))
    states = conn.execute(
        "SELECT state FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE 'pgq:client:%%'"
    ).fetchall()
    assert states  # (a trailing NOTIFY of the Client's own may be running: 'active' is fine)
    assert not [r for r in states if str(r["state"]).startswith("idle in transaction")]
    assert [r["payload"] for r in task_rows(conn)] == [None, "after"]


def test_one_client_shared_by_threads(client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                client.enqueue(pgq.Task("t", [n, i]), queue=f"q{n % 2}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert conn.execute("SELECT count(*) AS n FROM pgq.task").fetchone() == {"n": 80}


def test_caller_connection_with_dict_rows(client: pgq.Client, dsn: str) -> None:
    with psycopg.connect(dsn, row_factory=dict_row) as c:
        info = client.enqueue(pgq.Task("t"), conn=c, task_id="dr")
        c.commit()
    assert info.id == "dr"


# --- the two bulk paths (COPY for plain tasks, the statement otherwise) store the same rows -----


def _bulk(n: int, queue: str) -> list[pgq.Task]:
    # COPY's text format escapes backslashes, tabs, newlines and carriage returns in names too
    deadline = datetime(2031, 1, 1, 12, 30, 0, 250, tzinfo=timezone(timedelta(hours=5, minutes=45)))
    return [
        pgq.Task(
            "t\tab\\" if i % 7 == 0 else "t",
            {"i": i, "s": 'tab\there\nnew \\ line "q" é'},
            headers={"h": str(i), "\\k": "v\r"} if i % 3 else None,
            group=f"g{i % 4}\n\\" if i % 2 else None,
            max_retry=i % 5,
            timeout=1.5 if i % 2 else None,
            deadline=deadline if i % 3 == 0 else None,
            retention=timedelta(days=2, seconds=5, microseconds=7) if i % 4 == 0 else None,
            task_id=f"{queue}-{i}" if i % 5 == 0 else None,
            queue=queue,
        )
        for i in range(n)
    ]


def test_copy_and_statement_paths_agree(
    client: pgq.Client, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch, dsn: str
) -> None:
    n = pgq.client.COPY_MIN_TASKS + 6
    via_copy = client.enqueue_many(_bulk(n, "a"))
    monkeypatch.setattr(pgq.client, "COPY_MIN_TASKS", 10**9)
    via_statement = client.enqueue_many(_bulk(n, "b"))
    skip = {"id", "task_id", "queue", "enqueued_at", "run_at"}

    def strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in skip} for r in rows]

    a = conn.execute("SELECT * FROM pgq.task WHERE queue = 'a' ORDER BY id").fetchall()
    b = conn.execute("SELECT * FROM pgq.task WHERE queue = 'b' ORDER BY id").fetchall()
    assert strip(a) == strip(b) and len(a) == n
    assert [r["payload"]["i"] for r in a] == list(range(n))
    assert all(r["run_at"] == r["enqueued_at"] == a[0]["enqueued_at"] for r in a)
    for x, y in zip(via_copy, via_statement, strict=True):
        assert same_info(x, y, "state", "group", "max_retry", "timeout", "deadline", "retention", "headers")
        assert x.next_process_at == x.enqueued_at is not None
    assert [i.id for i in via_copy if not i.id.isdigit()] == [f"a-{i}" for i in range(0, n, 5)]
    # and what each path returns is what the Inspector reads back from the row
    fields = ("id", "queue", "type", "payload", "state", "group", "max_retry", "retried", "next_process_at")
    fields += ("enqueued_at", "headers", "timeout", "deadline", "retention", "members", "last_error")
    with pgq.Inspector(dsn) as inspector:
        for info in via_copy + via_statement:
            stored = inspector.get_task_info(info.queue, info.id)
            assert same_info(info, stored, *fields), (info, stored)
    arrivals = conn.execute(
        "SELECT queue, group_key, size FROM pgq.group_arrival ORDER BY queue, group_key"
    ).fetchall()
    assert [(r["group_key"], r["size"]) for r in arrivals if r["queue"] == "a"] == [
        (g, s) for g, s in ((r["group_key"], r["size"]) for r in arrivals if r["queue"] == "b")
    ]
    assert sorted(r["name"] for r in conn.execute("SELECT name FROM pgq.queue")) == ["a", "b"]


def test_copy_path_task_id_conflict_in_the_callers_transaction(
    client: pgq.Client,
    tx: psycopg.Connection[Any],
    conn: psycopg.Connection[Any],
    listener: psycopg.Connection[Any],
) -> None:
    n = pgq.client.COPY_MIN_TASKS
    client.enqueue(pgq.Task("t"), task_id="taken")
    _notifications(listener, 5, stop_after=1)
    client.enqueue(pgq.Task("mine"), conn=tx)
    tasks = [pgq.Task("t", i) for i in range(n)] + [pgq.Task("t", task_id="taken")]
    with pytest.raises(pgq.TaskIDConflictError):
        client.enqueue_many(tasks, conn=tx)
    client.enqueue_many([pgq.Task("t", i) for i in range(n)], conn=tx, queue="q2")
    tx.commit()
    assert conn.execute("SELECT queue, count(*) AS n FROM pgq.task GROUP BY 1 ORDER BY 1").fetchall() == [
        {"queue": "default", "n": 2},
        {"queue": "q2", "n": n},
    ]
    assert sorted(_notifications(listener, 5, stop_after=2)) == ["default", "q2"]


# --- the lean single enqueue and the shared-options COPY path agree with the general ones --------


def test_lean_enqueue_writes_the_row_the_general_path_writes(
    client: pgq.Client, conn: psycopg.Connection[Any], tx: psycopg.Connection[Any]
) -> None:
    lean = client.enqueue(pgq.Task("t", {"k": [1, 2]}), queue="q")
    general = client.enqueue(pgq.Task("t", {"k": [1, 2]}), queue="q", max_retry=25)  # an option: general
    skip = {"id", "enqueued_at", "run_at"}
    a, b = one(conn, lean), one(conn, general)
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    assert a["run_at"] == a["enqueued_at"] == lean.enqueued_at == lean.next_process_at
    assert same_info(lean, general, "state", "queue", "type", "payload", "max_retry", "headers")
    # on the caller's connection: in its transaction, gone with its rollback
    info = client.enqueue(pgq.Task("t", 1), conn=tx)
    assert tx.execute("SELECT count(*) FROM pgq.task WHERE id = %s", (int(info.id),)).fetchone() == (1,)
    tx.rollback()
    assert conn.execute("SELECT count(*) AS n FROM pgq.task").fetchone() == {"n": 2}


def test_lean_enqueue_rejects_bad_names_and_payloads(client: pgq.Client) -> None:
    with pytest.raises(pgq.InvalidArgumentError, match="queue must not be blank"):
        client.enqueue(pgq.Task("t"), queue=" ")
    with pytest.raises(pgq.InvalidArgumentError, match="task type must not be blank"):
        client.enqueue(pgq.Task(""))
    with pytest.raises(pgq.InvalidPayloadError):
        client.enqueue(pgq.Task("t", {"x": float("inf")}))
    client.enqueue(pgq.Task("t"))  # a name once checked stays good; a bad one is never remembered
    with pytest.raises(pgq.InvalidArgumentError, match="queue must be a str"):
        client.enqueue(pgq.Task("t"), queue=7)


def _shared_batch(n: int) -> list[pgq.Task]:
    return [
        pgq.Task("t", {"i": i, "s": 'tab\there "q" é'}, headers={"h": "1"} if i % 2 else None)
        for i in range(n)
    ]


def test_shared_options_copy_matches_the_statement_path(
    client: pgq.Client, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    n = pgq.client.COPY_MIN_TASKS + 3
    opts: dict[str, Any] = {"group": "g", "max_retry": 3, "timeout": 2.5, "retention": 60}
    via_copy = client.enqueue_many(_shared_batch(n), queue="a", **opts)
    monkeypatch.setattr(pgq.client, "COPY_MIN_TASKS", 10**9)
    via_statement = client.enqueue_many(_shared_batch(n), queue="b", **opts)
    skip = {"id", "queue", "enqueued_at", "run_at"}
    a = conn.execute("SELECT * FROM pgq.task WHERE queue = 'a' ORDER BY id").fetchall()
    b = conn.execute("SELECT * FROM pgq.task WHERE queue = 'b' ORDER BY id").fetchall()
    assert [{k: v for k, v in r.items() if k not in skip} for r in a] == [
        {k: v for k, v in r.items() if k not in skip} for r in b
    ]
    assert [r["payload"]["i"] for r in a] == list(range(n)) and a[0]["state"] == "aggregating"
    assert [int(i.id) for i in via_copy] == [r["id"] for r in a]
    for x, y in zip(via_copy, via_statement, strict=True):
        assert same_info(x, y, "state", "group", "max_retry", "timeout", "retention", "headers", "payload")
        assert x.enqueued_at == x.next_process_at == a[0]["enqueued_at"]


def test_bad_payload_late_in_a_copied_batch_loses_nothing(
    client: pgq.Client, conn: psycopg.Connection[Any], tx: psycopg.Connection[Any]
) -> None:
    n = pgq.client.COPY_MIN_TASKS * 3
    tasks = [pgq.Task("t", {"i": i}) for i in range(n)]
    tasks[-5] = pgq.Task("t", {"i": float("nan")})
    # pgq's own connection: the payload is encoded as the COPY writes it; the COPY rolls back
    with pytest.raises(pgq.InvalidPayloadError, match="nan"):
        client.enqueue_many(tasks)
    assert conn.execute("SELECT count(*) AS n FROM pgq.task").fetchone() == {"n": 0}
    assert len(client.enqueue_many(tasks[:-5])) == n - 5  # the client (and its pool) is fine
    # the caller's transaction: checked before any SQL, the transaction stays usable
    client.enqueue(pgq.Task("mine"), conn=tx)
    with pytest.raises(pgq.InvalidPayloadError, match="nan"):
        client.enqueue_many(tasks, conn=tx)
    tx.commit()
    assert conn.execute("SELECT count(*) AS n FROM pgq.task").fetchone() == {"n": n - 5 + 1}


def test_a_copied_batch_runs_with_the_collector_paused(
    client: pgq.Client, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    n = pgq.client.COPY_MIN_TASKS
    seen: list[bool] = []
    encode = pgq.client.encode_payload

    def watched(payload: Any) -> str:
        seen.append(gc.isenabled())
        return encode(payload)

    monkeypatch.setattr(pgq.client, "encode_payload", watched)
    assert gc.isenabled()
    client.enqueue_many([pgq.Task("t", {"i": i}) for i in range(n)])
    assert len(seen) == n and not any(seen)  # encoded as the COPY wrote them, collector paused
    assert gc.isenabled()
    seen.clear()
    with pytest.raises(pgq.InvalidPayloadError):
        client.enqueue_many([pgq.Task("t", {"i": i}) for i in range(n - 1)] + [pgq.Task("t", float("inf"))])
    assert seen and not any(seen) and gc.isenabled()
    client.enqueue_many([pgq.Task("t", {"i": i}) for i in range(n - 1)])  # below the COPY size: no pause
    assert all(seen[-(n - 1) :])
    assert conn.execute("SELECT count(*) AS n FROM pgq.task").fetchone() == {"n": 2 * n - 1}


# --- the kept connection: single calls skip the pool's checkout, and never wait for it ---------


def _pool_requests(client: pgq.Client) -> int:
    return int(client._pool.get_stats().get("requests_num", 0))


def _backend_pids(conn: psycopg.Connection[Any]) -> set[int]:
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE 'pgq:client:%%'"
    ).fetchall()
    return {r["pid"] for r in rows}


def test_calls_in_a_row_keep_one_connection_out_of_the_pool(
    client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    client.enqueue(pgq.Task("t", 0))
    before = _pool_requests(client)
    for i in range(1, 20):
        client.enqueue(pgq.Task("t", i))
    client.enqueue_many([pgq.Task("t", i) for i in range(100)])
    assert _pool_requests(client) == before  # no checkout from the pool
    assert conn.execute("SELECT count(*) AS n FROM pgq.task").fetchone() == {"n": 120}


def test_a_call_that_finds_the_kept_connection_taken_uses_the_pool(client: pgq.Client) -> None:
    client.enqueue(pgq.Task("t", 0))
    before = _pool_requests(client)
    with client._checkout() as held:  # as another thread in a call would hold it
        info = client.enqueue(pgq.Task("t", 1))  # same thread: a wait would never end
        assert info.state == "pending"
        assert held.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert _pool_requests(client) == before + 1


def test_a_broken_kept_connection_goes_back_and_the_next_call_gets_a_new_one(
    client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    client.enqueue(pgq.Task("t", 0))
    with client._checkout() as kept:
        pid = kept.info.backend_pid
    conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))  # waits for it to end
    with pytest.raises(psycopg.OperationalError):
        client.enqueue(pgq.Task("t", 1))  # as a pooled connection killed while idle would
    assert client.enqueue(pgq.Task("t", 2)).state == "pending"
    assert [r["payload"] for r in conn.execute("SELECT payload FROM pgq.task ORDER BY id")] == [0, 2]


def test_the_kept_connection_goes_back_through_the_pool_after_kept_seconds(
    client: pgq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.enqueue(pgq.Task("t", 0))
    before = _pool_requests(client)
    monkeypatch.setattr(pgq.client, "KEPT_SECONDS", -1.0)
    for i in range(3):
        client.enqueue(pgq.Task("t", i))
    assert _pool_requests(client) == before + 3


def test_close_returns_the_kept_connection(dsn: str, conn: psycopg.Connection[Any]) -> None:
    client = pgq.Client(dsn)
    client.enqueue(pgq.Task("t", 0))
    assert len(_backend_pids(conn)) >= 1
    client.close()
    wait_for(lambda: not _backend_pids(conn), timeout=10, what="the client's connections to close")
