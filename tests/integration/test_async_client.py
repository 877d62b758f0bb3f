"""AsyncClient: the twins of the main Client cases, on psycopg's AsyncConnection.

Each test drives its coroutine with asyncio.run (no extra pytest plugin needed).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import psycopg
import psycopg_pool
import pytest

import pgq


def run(dsn: str, body: Callable[[pgq.AsyncClient], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        async with pgq.AsyncClient(dsn, **kw) as client:
            await body(client)

    asyncio.run(main())


def rows(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return conn.execute("SELECT * FROM pgq.task ORDER BY id").fetchall()


def test_enqueue_every_option(dsn: str, conn: psycopg.Connection[Any]) -> None:
    async def body(client: pgq.AsyncClient) -> None:
        info = await client.enqueue(pgq.Task("t", {"a": 1}, headers={"h": "v"}))
        assert info.state == "pending" and info.queue == "default" and info.id.isdigit()
        g = await client.enqueue(pgq.Task("t", 2), queue="q", group="g")
        assert g.state == "aggregating" and g.group == "g"
        s = await client.enqueue(pgq.Task("t", 3), group="g", process_in=timedelta(minutes=1), max_retry=2)
        assert s.state == "scheduled" and s.group == "g" and s.max_retry == 2
        o = await client.enqueue(pgq.Task("t", 4), timeout=5, retention=60, task_id="a-1")
        assert o.id == "a-1" and o.timeout == timedelta(seconds=5)

    run(dsn, body)
    r = rows(conn)
    assert [x["state"] for x in r] == ["pending", "aggregating", "scheduled", "pending"]
    assert r[0]["headers"] == {"h": "v"} and r[1]["queue"] == "q"
    assert r[2]["run_at"] - r[2]["enqueued_at"] == timedelta(minutes=1) and r[2]["group_key"] == "g"
    assert r[3]["task_id"] == "a-1" and r[3]["retention"] == timedelta(seconds=60)
    assert conn.execute("SELECT size FROM pgq.group_arrival").fetchall() == [{"size": 1}]


def test_task_id_conflict_and_unique(dsn: str, conn: psycopg.Connection[Any]) -> None:
    async def body(client: pgq.AsyncClient) -> None:
        await client.enqueue(pgq.Task("t"), task_id="x")
        with pytest.raises(pgq.TaskIDConflictError, match="'x'"):
            await client.enqueue(pgq.Task("t"), task_id="x")
        await client.enqueue(pgq.Task("u", 1), unique=60)
        with pytest.raises(pgq.DuplicateTaskError):
            await client.enqueue(pgq.Task("u", 1), unique=60)
        with pytest.raises(pgq.DuplicateTaskError):
            await client.enqueue_many([pgq.Task("v"), pgq.Task("u", 1, unique=60)])

    run(dsn, body)
    assert [r["type"] for r in rows(conn)] == ["t", "u"]


def test_transactional_enqueue(dsn: str, conn: psycopg.Connection[Any]) -> None:
    async def body(client: pgq.AsyncClient) -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as tx:
            await client.enqueue(pgq.Task("t", 1), conn=tx)
            await client.enqueue_many([pgq.Task("t", 2), pgq.Task("t", 3)], conn=tx)
            assert rows(conn) == []
            await tx.rollback()
            assert rows(conn) == []
            await client.enqueue(pgq.Task("t", 4), conn=tx)
            await client.enqueue(pgq.Task("t"), conn=tx, task_id="k")
            with pytest.raises(pgq.TaskIDConflictError):
                await client.enqueue(pgq.Task("t"), conn=tx, task_id="k")
            with pytest.raises(pgq.InvalidPayloadError):
                await client.enqueue(pgq.Task("t", float("nan")), conn=tx)
            await tx.execute("SELECT 1")
            assert tx.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            await tx.commit()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as ac:
            with pytest.raises(RuntimeError):
                async with ac.transaction():
                    await client.enqueue(pgq.Task("t", 5), conn=ac)
                    raise RuntimeError
            async with ac.transaction():
                await client.enqueue(pgq.Task("t", 6), conn=ac)

    run(dsn, body)
    assert [r["payload"] for r in rows(conn)] == [4, None, 6]


def test_enqueue_many_in_order(dsn: str, conn: psycopg.Connection[Any]) -> None:
    async def body(client: pgq.AsyncClient) -> None:
        infos = await client.enqueue_many(
            [pgq.Task("t", i, group="g" if i % 2 else None) for i in range(200)]
        )
        ids = [int(i.id) for i in infos]
        assert ids == sorted(ids) and [i.payload for i in infos] == list(range(200))
        assert {i.state for i in infos} == {"pending", "aggregating"}

    run(dsn, body)
    assert [r["payload"] for r in rows(conn)] == list(range(200))
    assert conn.execute("SELECT size FROM pgq.group_arrival").fetchall() == [{"size": 100}]


def test_bad_input_before_any_sql(dsn: str, conn: psycopg.Connection[Any]) -> None:
    async def body(client: pgq.AsyncClient) -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as tx:
            await tx.execute("SELECT 1")
            cases: list[tuple[pgq.Task, dict[str, Any], type[Exception]]] = [
                (pgq.Task(" "), {}, pgq.InvalidName),
                (pgq.Task("t"), {"queue": ""}, pgq.InvalidName),
                (pgq.Task("t"), {"group": "\x00"}, pgq.InvalidName),
                (pgq.Task("t", {1, 2}), {}, pgq.PayloadTypeError),
                (pgq.Task("t", "\x00"), {}, pgq.InvalidPayloadError),
                (pgq.Task("t"), {"max_retry": -1}, pgq.InvalidArgumentError),
                (pgq.Task("t"), {"process_in": 1, "process_at": pgq_now()}, pgq.InvalidArgumentError),
                (pgq.Task("t"), {"bogus": 1}, pgq.InvalidArgumentError),
            ]
            for task, opts, exc in cases:
                with pytest.raises(exc):
                    await client.enqueue(task, conn=tx, **opts)
                assert tx.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            await tx.execute("SELECT 1")
            await tx.commit()

    run(dsn, body)
    assert rows(conn) == []


def pgq_now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def test_notify_at_commit_and_trailing(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgq_wake")

        def got(timeout: float, stop_after: int | None = None) -> list[str]:
            return [n.payload for n in listener.notifies(timeout=timeout, stop_after=stop_after)]

        async def body(client: pgq.AsyncClient) -> None:
            async with await psycopg.AsyncConnection.connect(dsn) as tx:
                await client.enqueue(pgq.Task("t"), conn=tx, queue="a")
                await client.enqueue_many([pgq.Task("t")] * 3, conn=tx, queue="a")
                assert got(0.1) == []
                await tx.commit()
            assert got(5, stop_after=1) == ["a"]
            assert got(0.1) == []
            await client.enqueue(pgq.Task("t"), queue="b", notify=False)
            assert got(0.1) == []
            await client.enqueue(pgq.Task("t"), queue="b")
            assert got(5, stop_after=1) == ["b"]
            t0 = time.monotonic()
            await client.enqueue(pgq.Task("t"), queue="b")
            if time.monotonic() - t0 < 0.25:
                assert got(0.01) == []  # debounced: inside the window ...
            seen: list[str] = []  # ... and the trailing NOTIFY follows the window (sent by the loop)
            deadline = time.monotonic() + 5
            while not seen and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                seen = got(0.01)
            assert seen == ["b"]

        run(dsn, body, notify_window=0.3)


def test_close_sends_pending_trailing_notify_and_refuses_more(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgq_wake")

        async def main() -> None:
            client = pgq.AsyncClient(dsn, notify_window=60)
            await client.enqueue(pgq.Task("t"), queue="q")
            await client.enqueue(pgq.Task("t"), queue="q")
            await client.close()
            with pytest.raises(RuntimeError, match="closed"):
                await client.enqueue(pgq.Task("t"))

        asyncio.run(main())
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=2)] == ["q", "q"]


def test_concurrent_enqueues_share_the_client(dsn: str, conn: psycopg.Connection[Any]) -> None:
    async def body(client: pgq.AsyncClient) -> None:
        await asyncio.gather(*(client.enqueue(pgq.Task("t", i)) for i in range(50)))

    run(dsn, body)
    assert sorted(r["payload"] for r in rows(conn)) == list(range(50))


def test_copied_batch_with_shared_options_and_a_late_bad_payload(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    n = pgq.client.COPY_MIN_TASKS * 2

    async def body(client: pgq.AsyncClient) -> None:
        bad = [pgq.Task("t", {"i": i}) for i in range(n)]
        bad[-1] = pgq.Task("t", {"i": {1, 2}})
        with pytest.raises(pgq.PayloadTypeError):
            await client.enqueue_many(bad, queue="q")  # encoded as the COPY writes: it rolls back
        assert rows(conn) == [] and gc.isenabled()  # the collector is back after a failed batch
        infos = await client.enqueue_many(bad[:-1], queue="q", group="g", max_retry=2)
        assert gc.isenabled()
        assert [int(i.id) for i in infos] == [r["id"] for r in rows(conn)]
        assert {(i.state, i.group, i.max_retry, i.queue) for i in infos} == {("aggregating", "g", 2, "q")}
        assert len({i.enqueued_at for i in infos}) == 1 and infos[0].enqueued_at is not None

    run(dsn, body)
    assert [r["payload"]["i"] for r in rows(conn)] == list(range(n - 1))
    assert conn.execute("SELECT size FROM pgq.group_arrival").fetchall() == [{"size": n - 1}]


def test_async_client_with_a_callers_pool(dsn: str, conn: psycopg.Connection[Any]) -> None:
    """A caller's pool (not autocommit) keeps pool.connection(), which commits; pgq's own
    pool is checked out with getconn/putconn and survives a terminated connection."""

    outcome: dict[str, int] = {}

    async def main() -> None:
        async with psycopg_pool.AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False) as pool:
            async with pgq.AsyncClient(pool=pool) as c:
                await c.enqueue(pgq.Task("t", "callers"))
                await c.enqueue_many([pgq.Task("t", i) for i in range(3)])
            assert not pool.closed
        async with pgq.AsyncClient(dsn) as own:
            await own.enqueue(pgq.Task("t", "own"))
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name LIKE 'pgq:client:%%'"
            ).fetchone()
            assert killed is not None and killed["n"] >= 1
            outcome["killed"], outcome["failed"] = killed["n"], 0
            for i in range(4):  # a call may meet a dead connection, once per killed one
                try:
                    await own.enqueue(pgq.Task("t", f"own{i}"))
                except psycopg.OperationalError:
                    outcome["failed"] += 1

    asyncio.run(main())
    assert outcome["failed"] <= outcome["killed"] < 4
    payloads = [r["payload"] for r in rows(conn)]
    assert payloads[:5] == ["callers", 0, 1, 2, "own"]
    assert len(payloads) == 5 + 4 - outcome["failed"]


def test_the_kept_connection_serves_calls_in_a_row_and_is_replaced_when_broken(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    async def body(client: pgq.AsyncClient) -> None:
        await client.enqueue(pgq.Task("t", 0))
        pool = await client._get_pool()
        before = pool.get_stats().get("requests_num", 0)
        for i in range(1, 10):
            await client.enqueue(pgq.Task("t", i))
        await client.enqueue_many([pgq.Task("t", i) for i in range(100)])
        assert pool.get_stats().get("requests_num", 0) == before  # no checkout from the pool
        async with await client._checkout() as held:  # taken: the next call uses the pool
            pid = held.info.backend_pid
            await client.enqueue(pgq.Task("t", 10))
        assert pool.get_stats().get("requests_num", 0) == before + 1
        conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))  # waits for it to end
        with pytest.raises(psycopg.OperationalError):
            await client.enqueue(pgq.Task("t", 11))
        await client.enqueue(pgq.Task("t", 12))

    run(dsn, body)
    assert conn.execute("SELECT count(*) AS n FROM pgq.task").fetchone() == {"n": 112}
