"""The worker runtime against a real PostgreSQL: routing, claims, acks, retries,
timeouts, results, stats, shutdown, leases. Each test starts a Server in a
background thread (server.start) and waits on conditions, never on bare sleeps."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import pgq
from pgq import tasks
from pgq.services.cleaner import Cleaner
from pgq.services.recoverer import Recoverer
from tests.fixtures import util

Conn = psycopg.Connection[Any]


def wait_for(pred: Callable[[], Any], timeout: float = 10.0) -> Any:
    """tests.fixtures.util.wait_for, polling every 10 ms (these tests time pickups)."""
    return util.wait_for(pred, timeout, interval=0.01)


@contextmanager
def serving(server: pgq.Server, mux: pgq.ServeMux) -> Iterator[pgq.Server]:
    server.start(mux)
    try:
        yield server
    finally:
        server.shutdown()


def row(conn: Conn, pk: str) -> dict[str, Any]:
    r = conn.execute("SELECT * FROM pgq.task WHERE id = %s", (int(pk),)).fetchone()
    assert r is not None, f"task {pk} is gone"
    return dict(r)


def gone(conn: Conn, pk: str) -> bool:
    return conn.execute("SELECT 1 FROM pgq.task WHERE id = %s", (int(pk),)).fetchone() is None


@pytest.fixture
def client(dsn: str) -> Iterator[pgq.Client]:
    with pgq.Client(dsn) as c:
        yield c


def test_routing_sync_async_middleware_and_unknown_type(dsn: str, conn: Conn, client: pgq.Client) -> None:
    seen: list[tuple[str, str, bool]] = []
    mux = pgq.ServeMux()

    @mux.handle("email:")
    def email(task: pgq.Task) -> None:
        seen.append(("email", task.type, threading.current_thread() is not threading.main_thread()))

    @mux.handle("email:deliver")
    async def deliver(task: pgq.Task) -> None:
        seen.append(("deliver", task.type, True))

    order: list[str] = []

    def mw(next_handler: Any) -> Any:
        def h(task: pgq.Task) -> Any:
            order.append(task.type)
            return next_handler(task)

        return h

    mux.use(mw)
    infos = [
        client.enqueue(pgq.Task(t, {"n": i})) for i, t in enumerate(["email:deliver", "email:x", "nope"])
    ]
    with serving(pgq.Server(dsn, poll_interval=0.2), mux):
        wait_for(lambda: len(seen) == 2 and gone(conn, infos[0].id) and gone(conn, infos[1].id))
        r = wait_for(lambda: (x := row(conn, infos[2].id))["state"] == "retry" and x)
    assert sorted(s[:2] for s in seen) == [("deliver", "email:deliver"), ("email", "email:x")]
    assert sorted(order) == ["email:deliver", "email:x"]  # no middleware call for an unknown type
    assert r["retried"] == 1 and "no handler" in r["last_error"] and r["run_at"] > r["last_failed_at"]


def test_handler_sees_task_fields(dsn: str, client: pgq.Client) -> None:
    got: dict[str, Any] = {}
    done = threading.Event()
    mux = pgq.ServeMux()

    @mux.handle("t")
    def h(task: pgq.Task) -> None:
        got.update(
            id=task.id,
            queue=task.queue,
            payload=task.payload,
            headers=task.headers,
            retried=task.retried,
            max_retry=task.max_retry,
            deadline=task.deadline,
        )
        done.set()

    info = client.enqueue(pgq.Task("t", {"a": [1]}, headers={"h": "v"}), queue="q1", max_retry=3, timeout=60)
    with serving(pgq.Server(dsn, queues={"q1": 1}), mux):
        assert done.wait(5)
    assert got["id"] == info.id and got["queue"] == "q1" and got["payload"] == {"a": [1]}
    assert got["headers"] == {"h": "v"} and got["retried"] == 0 and got["max_retry"] == 3
    assert got["deadline"] is not None
    assert timedelta(seconds=50) < got["deadline"] - datetime.now(UTC) <= timedelta(seconds=60)


def test_strict_priority_and_paused_queue(dsn: str, conn: Conn, client: pgq.Client) -> None:
    ran: list[str] = []
    mux = pgq.ServeMux()
    mux.handle("t", lambda task: ran.append(task.queue))
    conn.execute("INSERT INTO pgq.queue (name, paused) VALUES ('paused', true)")
    client.enqueue_many([pgq.Task("t") for _ in range(5)], queue="low")
    client.enqueue_many([pgq.Task("t") for _ in range(5)], queue="high")
    client.enqueue_many([pgq.Task("t") for _ in range(3)], queue="paused")
    server = pgq.Server(
        dsn, queues={"low": 1, "high": 5, "paused": 9}, strict_priority=True, concurrency=1, poll_interval=0.1
    )
    with serving(server, mux):
        wait_for(lambda: len(ran) == 10)
        assert ran == ["high"] * 5 + ["low"] * 5
        left = conn.execute("SELECT count(*) AS n FROM pgq.task WHERE queue = 'paused' AND state = 'pending'")
        assert left.fetchone() == {"n": 3}
        conn.execute("UPDATE pgq.queue SET paused = false WHERE name = 'paused'")
        wait_for(lambda: len(ran) == 13)


def test_claim_takes_queues_in_the_given_order(dsn: str, conn: Conn, client: pgq.Client) -> None:
    client.enqueue_many([pgq.Task("t") for _ in range(3)], queue="a")
    client.enqueue_many([pgq.Task("t") for _ in range(3)], queue="b")

    async def claim(queues: list[str], limit: int) -> list[Any]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            return await tasks.claim_many(
                c.cursor(), tasks.Queries.load("pgq"), queues=queues, limit=limit, worker_id="w", lease=30
            )

    rows = asyncio.run(claim(["b", "a"], 4))
    assert [r[2] for r in rows] == ["b", "b", "b", "a"]
    assert all(r[9] == 1 for r in rows)  # attempt = 1: the fencing token of this claim
    states = conn.execute(
        "SELECT state, count(*) AS n FROM pgq.task GROUP BY state ORDER BY state"
    ).fetchall()
    assert states == [{"state": "active", "n": 4}, {"state": "pending", "n": 2}]


def test_weighted_queues_share_work(dsn: str, client: pgq.Client) -> None:
    ran: list[str] = []
    mux = pgq.ServeMux()

    @mux.handle("t")
    async def h(task: pgq.Task) -> None:
        ran.append(task.queue or "")

    client.enqueue_many([pgq.Task("t") for _ in range(300)], queue="heavy")
    client.enqueue_many([pgq.Task("t") for _ in range(300)], queue="light")
    with serving(pgq.Server(dsn, queues={"heavy": 3, "light": 1}, concurrency=1), mux):
        wait_for(lambda: len(ran) >= 200, timeout=20)
    first = ran[:200]
    heavy = first.count("heavy")
    assert 120 <= heavy <= 185, heavy  # expected 150 of 200


def test_scheduled_and_retry_tasks_start_when_due(dsn: str, client: pgq.Client) -> None:
    starts: dict[str, list[float]] = {}
    mux = pgq.ServeMux()

    @mux.handle("sched")
    async def sched(task: pgq.Task) -> None:
        starts.setdefault("sched", []).append(time.monotonic())

    @mux.handle("flaky")
    async def flaky(task: pgq.Task) -> None:
        starts.setdefault("flaky", []).append(time.monotonic())
        if task.retried == 0:
            raise RuntimeError("first try fails")

    # A poll interval far above the delays: only the next-due timer can start them on time.
    server = pgq.Server(dsn, poll_interval=30, retry_delay_func=lambda n, exc, task: 0.5)
    with serving(server, mux):
        t0 = time.monotonic()
        client.enqueue(pgq.Task("sched"), process_in=1)
        client.enqueue(pgq.Task("flaky"))
        wait_for(lambda: len(starts.get("sched", [])) == 1 and len(starts.get("flaky", [])) == 2)
    assert 0.9 <= starts["sched"][0] - t0 <= 1.6
    gap = starts["flaky"][1] - starts["flaky"][0]
    assert 0.45 <= gap <= 1.2, gap


@pytest.mark.parametrize("plain", [False, True], ids=["general", "plain-delete-path"])
def test_stale_ack_is_rejected_and_batch_applies_the_rest(
    dsn: str, conn: Conn, client: pgq.Client, plain: bool
) -> None:
    infos = client.enqueue_many([pgq.Task("t", i) for i in range(3)])
    ids = [int(i.id) for i in infos]
    q = tasks.Queries.load("pgq")

    async def run() -> set[int]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            cur = c.cursor()
            await tasks.claim_many(cur, q, queues=["default"], limit=3, worker_id="w1", lease=30)
            # Task 0 was taken over: recovered and claimed again (attempt 2) by another worker.
            await cur.execute("UPDATE pgq.task SET attempt = 2, locked_by = 'w2' WHERE id = %s", (ids[0],))
            return await tasks.ack_many(
                cur,
                q,
                [
                    tasks.Ack(ids[0], 1, tasks.DONE, plain=plain),
                    tasks.Ack(ids[1], 1, tasks.DONE, plain=plain),
                    tasks.Ack(ids[2], 1, tasks.RETRY, 10.0, "boom", None, True),
                ],
            )

    applied = asyncio.run(run())
    assert applied == {ids[1], ids[2]}
    r0 = row(conn, str(ids[0]))
    assert r0["state"] == "active" and r0["locked_by"] == "w2"  # the stale ack changed nothing
    assert gone(conn, str(ids[1]))
    r2 = row(conn, str(ids[2]))
    assert r2["state"] == "retry" and r2["retried"] == 1 and r2["last_error"] == "boom"
    assert r2["locked_by"] is None and r2["lease_expires_at"] is None
    st = conn.execute("SELECT processed, failed FROM pgq.stat_daily WHERE queue = 'default'").fetchone()
    assert st == {"processed": 2, "failed": 1}


def test_retries_skip_retry_archive_and_hooks(dsn: str, conn: Conn, client: pgq.Client) -> None:
    errors: list[tuple[str, str]] = []
    mux = pgq.ServeMux()

    @mux.handle("fail")
    def fail(task: pgq.Task) -> None:
        raise ValueError(f"bad {task.payload}")

    @mux.handle("skip")
    async def skip(task: pgq.Task) -> None:
        raise pgq.SkipRetry("give up")

    @mux.handle("soft")
    async def soft(task: pgq.Task) -> None:
        raise KeyError("not a failure")

    delays: list[int] = []

    def delay(n: int, exc: BaseException, task: pgq.Task) -> timedelta:
        if task.type == "fail":
            delays.append(n)
        return timedelta(milliseconds=50)

    server = pgq.Server(
        dsn,
        retry_delay_func=delay,
        error_handler=lambda task, exc: errors.append((task.type, str(exc))),
        is_failure=lambda exc: not isinstance(exc, KeyError),
        poll_interval=0.1,
    )
    a = client.enqueue(pgq.Task("fail", 1), max_retry=2)
    b = client.enqueue(pgq.Task("skip"), max_retry=5)
    c = client.enqueue(pgq.Task("soft"), max_retry=0)
    with serving(server, mux):
        ra = wait_for(lambda: (x := row(conn, a.id))["state"] == "archived" and x)
        rb = wait_for(lambda: (x := row(conn, b.id))["state"] == "archived" and x)
        wait_for(lambda: row(conn, c.id)["attempt"] >= 2)
    assert ra["retried"] == 2 and ra["attempt"] == 3 and ra["last_error"] == "bad 1"
    assert rb["retried"] == 0 and rb["last_error"] == "give up"
    rc = row(conn, c.id)
    assert rc["retried"] == 0 and rc["state"] in (
        "retry",
        "active",
        "pending",
    )  # never archived: not a failure
    assert delays == [0, 1]
    assert ("fail", "bad 1") in errors and ("skip", "give up") in errors
    st = conn.execute("SELECT processed, failed FROM pgq.stat_daily WHERE queue = 'default'").fetchone()
    assert st is not None and st["failed"] == st["processed"] == 4  # 3 for a, 1 for b; c not counted


def test_async_timeout_cancels_and_sync_deadline_frees_the_slot(
    dsn: str, conn: Conn, client: pgq.Client
) -> None:
    cancelled = threading.Event()
    release = threading.Event()
    handled: list[tuple[str, str]] = []
    mux = pgq.ServeMux()

    @mux.handle("slow_async")
    async def slow_async(task: pgq.Task) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    @mux.handle("slow_sync")
    def slow_sync(task: pgq.Task) -> None:
        release.wait(10)

    @mux.handle("quick")
    def quick(task: pgq.Task) -> None:
        pass

    a = client.enqueue(pgq.Task("slow_async"), timeout=0.3)
    s = client.enqueue(pgq.Task("slow_sync"), timeout=0.3)
    try:
        server = pgq.Server(
            dsn,
            concurrency=2,
            retry_delay_func=lambda *x: 60,
            error_handler=lambda task, exc: handled.append((task.type, str(exc))),
        )
        with serving(server, mux):
            ra = wait_for(lambda: (x := row(conn, a.id))["state"] == "retry" and x)
            rs = wait_for(lambda: (x := row(conn, s.id))["state"] == "retry" and x)
            assert cancelled.is_set()
            # Both slots are free again although the sync handler still runs.
            q = client.enqueue_many([pgq.Task("quick") for _ in range(2)])
            wait_for(lambda: all(gone(conn, i.id) for i in q))
    finally:
        release.set()
    assert ra["last_error"] == rs["last_error"] == "task deadline exceeded"
    assert sorted(handled) == [
        ("slow_async", "task deadline exceeded"),
        ("slow_sync", "task deadline exceeded"),
    ]


def test_results_retention_and_cleaner(dsn: str, conn: Conn, client: pgq.Client) -> None:
    mux = pgq.ServeMux()

    @mux.handle("sync")
    def sync_h(task: pgq.Task) -> None:
        assert task.result_writer is not None
        task.result_writer.write({"from": "sync"})
        # Written at once, while the task still runs:
        with psycopg.connect(dsn) as c:
            r = c.execute("SELECT state, result FROM pgq.task WHERE id = %s", (int(task.id or 0),)).fetchone()
        assert r == ("active", {"from": "sync"})

    @mux.handle("async")
    async def async_h(task: pgq.Task) -> None:
        assert task.result_writer is not None
        task.result_writer.write([1, 2, 3])

    kept = client.enqueue(pgq.Task("sync"), retention=timedelta(hours=1))
    kept2 = client.enqueue(pgq.Task("async"), retention=60)
    dropped = client.enqueue(pgq.Task("async"))
    with serving(pgq.Server(dsn), mux):
        r1 = wait_for(lambda: (x := row(conn, kept.id))["state"] == "completed" and x)
        r2 = wait_for(lambda: (x := row(conn, kept2.id))["state"] == "completed" and x)
        wait_for(lambda: gone(conn, dropped.id))
    assert r1["result"] == {"from": "sync"} and r2["result"] == [1, 2, 3]
    assert r1["expires_at"] - r1["completed_at"] == timedelta(hours=1)

    async def clean(now: datetime) -> Any:
        from psycopg_pool import AsyncConnectionPool

        async with AsyncConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, open=False) as pool:
            return await Cleaner(pool).run_once(now=now)

    res = asyncio.run(clean(r2["completed_at"] + timedelta(minutes=2)))
    assert res.completed == 1 and gone(conn, kept2.id) and not gone(conn, kept.id)
    res = asyncio.run(clean(r1["completed_at"] + timedelta(hours=2)))
    assert res.completed == 1 and gone(conn, kept.id)


def test_shutdown_returns_unfinished_tasks_to_pending(dsn: str, conn: Conn, client: pgq.Client) -> None:
    mux, started, _ = util.blocking_mux("long")
    info = client.enqueue(pgq.Task("long"))
    server = pgq.Server(dsn, shutdown_timeout=0.2)
    server.start(mux)
    assert started.wait(5)
    t0 = time.monotonic()
    server.shutdown()
    assert time.monotonic() - t0 < 3
    r = row(conn, info.id)
    assert r["state"] == "pending" and r["retried"] == 0 and r["attempt"] == 1 and r["locked_by"] is None
    assert conn.execute("SELECT count(*) AS n FROM pgq.server").fetchone() == {"n": 0}


def test_recoverer_with_injected_now(dsn: str, conn: Conn, client: pgq.Client) -> None:
    a, b, c = client.enqueue_many([pgq.Task("t") for _ in range(3)], max_retry=1)
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    conn.execute(
        "UPDATE pgq.task SET state = 'active', attempt = 1, locked_by = 'dead', "
        "lease_expires_at = %s WHERE id = ANY(%s)",
        (t0, [int(a.id), int(b.id)]),
    )
    conn.execute("UPDATE pgq.task SET retried = 1 WHERE id = %s", (int(b.id),))
    conn.execute(
        "UPDATE pgq.task SET state = 'active', attempt = 1, lease_expires_at = %s WHERE id = %s",
        (t0 + timedelta(minutes=5), int(c.id)),
    )

    async def recover(now: datetime) -> Any:
        from psycopg_pool import AsyncConnectionPool

        async with AsyncConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, open=False) as pool:
            return await Recoverer(pool).run_once(now=now)

    assert asyncio.run(recover(t0 - timedelta(seconds=1))).retried == 0
    res = asyncio.run(recover(t0 + timedelta(seconds=1)))
    assert (res.retried, res.archived) == (1, 1)
    ra, rb, rc = row(conn, a.id), row(conn, b.id), row(conn, c.id)
    assert ra["state"] == "retry" and ra["retried"] == 1 and ra["last_error"] == "lease expired"
    assert ra["run_at"] == t0 + timedelta(seconds=1)  # due at once: the worker died, the task did not fail
    assert rb["state"] == "archived" and rc["state"] == "active"
    assert asyncio.run(recover(t0 + timedelta(seconds=2))) == type(res)(0, 0)  # idempotent


def test_heartbeat_extends_leases(dsn: str, conn: Conn, client: pgq.Client) -> None:
    mux = pgq.ServeMux()

    @mux.handle("t")
    async def h(task: pgq.Task) -> None:
        await asyncio.sleep(2.0)

    info = client.enqueue(pgq.Task("t"))
    with serving(pgq.Server(dsn, lease_duration=0.9, recover_interval=0.1), mux) as server:
        wait_for(lambda: gone(conn, info.id), timeout=10)
        assert server.worker is not None and server.worker.lost == 0
    assert conn.execute("SELECT processed, failed FROM pgq.stat_daily").fetchone() == {
        "processed": 1,
        "failed": 0,
    }


def test_lost_lease_cancels_the_handler(dsn: str, conn: Conn, client: pgq.Client) -> None:
    mux, started, cancelled = util.blocking_mux()
    info = client.enqueue(pgq.Task("t"))
    with serving(pgq.Server(dsn, lease_duration=0.6, recover_interval=60), mux):
        assert started.wait(5)
        # Someone else took the task over (as the recoverer + another worker would).
        conn.execute("UPDATE pgq.task SET attempt = attempt + 1 WHERE id = %s", (int(info.id),))
        assert cancelled.wait(5)
    assert row(conn, info.id)["state"] == "active"  # this worker wrote nothing


def test_cancel_notification_cancels_running_handler(dsn: str, conn: Conn, client: pgq.Client) -> None:
    mux, started, _ = util.blocking_mux()
    info = client.enqueue(pgq.Task("t"))
    with serving(pgq.Server(dsn, retry_delay_func=lambda *a: 60), mux):
        assert started.wait(5)
        conn.execute("SELECT pg_notify('pgq_cancel', %s)", (info.id,))
        r = wait_for(lambda: (x := row(conn, info.id))["state"] == "retry" and x)
    assert r["last_error"] == "task cancelled" and r["retried"] == 1


def test_a_task_claimed_again_by_the_same_worker(dsn: str, conn: Conn, client: pgq.Client) -> None:
    """A worker whose attempt lost the task and that claims it again (attempt 2) while attempt
    1's handler still runs: attempt 1 is abandoned, attempt 2 is heartbeated and completes, and
    attempt 1 finishing late disturbs nothing (it used to delete attempt 2's entry: KeyError,
    no heartbeat, rescued again and again; found by R9 on a starved machine)."""
    release = threading.Event()
    started: list[int] = []
    ended: list[int] = []

    def slow(task: pgq.Task) -> None:
        n = len(started) + 1
        started.append(n)
        if n == 1:
            release.wait(20)  # attempt 1 blocks until attempt 2 is done
        ended.append(n)

    mux = pgq.ServeMux()
    mux.handle("slow", slow)
    server = pgq.Server(dsn, concurrency=2, lease_duration=1.2, recover_interval=60, poll_interval=0.05)
    with serving(server, mux):
        pk = client.enqueue(pgq.Task("slow")).id
        wait_for(lambda: len(started) == 1)
        # What the recoverer does once a lease has expired, done at once: back to pending.
        conn.execute(
            "UPDATE pgq.task SET state = 'pending', locked_by = NULL, lease_expires_at = NULL WHERE id = %s",
            (int(pk),),
        )
        worker = server.worker
        assert worker is not None
        wait_for(lambda: len(started) == 2)  # claimed again by the same worker: attempt 2
        wait_for(lambda: gone(conn, pk) or row(conn, pk)["state"] == "completed")
        assert worker.lost == 1  # attempt 1, abandoned when attempt 2 came
        release.set()
        wait_for(lambda: ended == [2, 1])  # attempt 1 returns late: its outcome changes nothing
        assert worker.running == {}
        assert worker.succeeded == 1
    assert gone(conn, pk) or row(conn, pk)["attempt"] == 2


def test_server_row_heartbeat(dsn: str, conn: Conn) -> None:
    mux = pgq.ServeMux()
    with serving(pgq.Server(dsn, queues={"a": 2, "b": 1}, concurrency=3), mux) as server:
        r = conn.execute("SELECT * FROM pgq.server").fetchone()
        assert r is not None and r["id"] == server.worker_id and r["queues"] == {"a": 2, "b": 1}
        assert r["concurrency"] == 3 and server.worker_id.count(":") == 2
        apps = conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'pgq:%%'"
        ).fetchall()
        names = {a["application_name"].split(":")[1] for a in apps}
        assert {"worker", "listener"} <= names
    other = pgq.Server(dsn)
    assert other.worker_id != server.worker_id


def test_completion_releases_the_unique_lock(dsn: str, conn: Conn, client: pgq.Client) -> None:
    mux = pgq.ServeMux()
    mux.handle("u", lambda task: None)
    info = client.enqueue(pgq.Task("u", {"k": 1}), unique=3600)
    with pytest.raises(pgq.DuplicateTaskError):
        client.enqueue(pgq.Task("u", {"k": 1}), unique=3600)
    with serving(pgq.Server(dsn), mux):
        wait_for(lambda: gone(conn, info.id))
    assert conn.execute("SELECT count(*) AS n FROM pgq.unique_lock").fetchone() == {"n": 0}
    client.enqueue(pgq.Task("u", {"k": 1}), unique=3600)  # accepted again


def test_an_async_task_cancelled_before_its_handler_starts_is_failed_once() -> None:
    """A cancel (or deadline) that lands between the claim and the handler's first step: the
    handler never runs, and the failure is recorded once, not lost (no database needed)."""
    from pgq import worker as w

    ran: list[str] = []
    seen: list[BaseException] = []

    async def handler(task: pgq.Task) -> None:
        ran.append(task.type)

    async def run() -> list[tasks.Ack]:
        cfg = w.WorkerConfig(queues={"q": 1}, worker_id="w", error_handler=lambda t, e: seen.append(e))
        worker = w.Worker(cfg, None, lambda _type: (handler, True))  # type: ignore[arg-type]
        now = datetime.now(UTC)
        row = (7, None, "q", "t", '{"a": 1}', None, None, 0, 25, 1, now, now, 1800.0, True)
        worker._start(row, 0.0)
        worker.cancel_task(7)  # before the loop runs the handler's task
        for _ in range(3):
            await asyncio.sleep(0)
        assert not worker.running
        return worker._acks

    acks = asyncio.run(run())
    assert ran == []
    assert [(a.id, a.kind, a.error) for a in acks] == [(7, tasks.RETRY, "task cancelled")]
    assert [type(e) for e in seen] == [pgq.worker.TaskCancelled]


def test_an_async_handler_completes_on_its_own_task() -> None:
    """Outcomes of async handlers: success, an exception, SystemExit (a failure, not an exit)."""
    from pgq import worker as w

    async def ok(task: pgq.Task) -> None:
        assert asyncio.current_task() is not None
        assert task.payload == {"n": 1} and task.headers == {"h": "v"} and task.max_retry == 3

    async def boom(task: pgq.Task) -> None:
        raise ValueError("boom")

    async def leave(task: pgq.Task) -> None:
        raise SystemExit(3)

    handlers = {"ok": ok, "boom": boom, "leave": leave}

    async def run() -> list[tasks.Ack]:
        cfg = w.WorkerConfig(queues={"q": 1}, worker_id="w")
        worker = w.Worker(cfg, None, lambda t: (handlers[t], True))  # type: ignore[arg-type]
        now = datetime.now(UTC)
        for pk, type_ in enumerate(handlers, 1):
            row = (pk, None, "q", type_, '{"n": 1}', '{"h": "v"}', None, 0, 3, 1, now, now, 1800.0, True)
            worker._start(row, 0.0)
        for _ in range(3):
            await asyncio.sleep(0)
        assert not worker.running
        return sorted(worker._acks)

    acks = asyncio.run(run())
    assert [(a.id, a.kind, a.plain) for a in acks] == [
        (1, tasks.DONE, True),
        (2, tasks.RETRY, False),
        (3, tasks.RETRY, False),
    ]
    assert acks[1].error == "boom"
    assert acks[2].error is not None and "SystemExit" in acks[2].error
