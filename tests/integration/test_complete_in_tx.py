"""Task.complete(conn): a handler completes its task in the transaction that writes its
effects (R2's exactly-once effects, in process): committed together, rolled back
together, refused to an attempt that no longer owns the task."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgq
from tests.fixtures.util import wait_for

Q = "effects"


@pytest.fixture
def effects(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as c:
        # no unique constraint: a duplicate effect shows
        c.execute("CREATE TABLE effect (task text NOT NULL, attempt int NOT NULL)")
        yield c


def state(conn: psycopg.Connection[Any], task_id: str) -> Any:
    row = conn.execute("SELECT state FROM pgq.task WHERE id = %s::bigint", (task_id,)).fetchone()
    return None if row is None else row[0]


def effect_rows(conn: psycopg.Connection[Any], task_id: str) -> list[int]:
    return [r[0] for r in conn.execute("SELECT attempt FROM effect WHERE task = %s ORDER BY 1", (task_id,))]


def run_server(dsn: str, mux: pgq.ServeMux) -> pgq.Server:
    server = pgq.Server(dsn, queues={Q: 1}, poll_interval=0.1, retry_delay_func=lambda *a: 0.05)
    server.start(mux)
    return server


def test_completed_with_its_effects_then_the_handler_fails(
    dsn: str, effects: psycopg.Connection[Any]
) -> None:
    """Committed with the effect: a later exception does not run the task again."""
    calls: list[int] = []

    def handler(task: pgq.Task) -> None:
        calls.append(task.retried)
        with psycopg.connect(dsn) as conn:
            conn.execute("INSERT INTO effect VALUES (%s, %s)", (task.id, task.retried))
            task.complete(conn)
            conn.commit()
        raise RuntimeError("after the commit")  # e.g. a crash: the task is already done

    mux = pgq.ServeMux()
    mux.handle("work", handler)
    server = run_server(dsn, mux)
    try:
        with pgq.Client(dsn) as client, pgq.Inspector(dsn) as insp:
            info = client.enqueue(pgq.Task("work"), queue=Q, max_retry=3)
            wait_for(lambda: state(effects, info.id) is None, 10, "the task completed (deleted)")
            wait_for(lambda: insp.get_queue_info(Q).processed == 1, 10, "processed counted once")
        assert server.worker is not None
        wait_for(lambda: not server.worker.running, 10, "the handler finished")
        assert effect_rows(effects, info.id) == [0] and calls == [0]
        assert server.worker.lost == 0  # the handler's own outcome changed nothing, as expected
    finally:
        server.shutdown()


def test_rolled_back_with_its_effects_then_retried(dsn: str, effects: psycopg.Connection[Any]) -> None:
    """Rolled back with the effect: the handler's failure is recorded, the retry commits."""
    done = threading.Event()

    def handler(task: pgq.Task) -> None:
        with psycopg.connect(dsn) as conn:
            with conn.transaction():
                conn.execute("INSERT INTO effect VALUES (%s, %s)", (task.id, task.retried))
                task.complete(conn)
                if task.retried == 0:
                    raise ValueError("first attempt fails inside the transaction")
        done.set()

    mux = pgq.ServeMux()
    mux.handle("work", handler)
    server = run_server(dsn, mux)
    try:
        with pgq.Client(dsn) as client, pgq.Inspector(dsn) as insp:
            info = client.enqueue(pgq.Task("work"), queue=Q, max_retry=3, retention=3600)
            assert done.wait(15)
            wait_for(lambda: state(effects, info.id) == "completed", 10, "completed, kept by retention")
            got = insp.get_task_info(Q, info.id)
            assert got.retried == 1 and "first attempt fails" in (got.last_error or "")
            assert insp.get_queue_info(Q).processed == 2  # the failure and the success
        assert effect_rows(effects, info.id) == [1]
    finally:
        server.shutdown()


def test_an_attempt_that_lost_the_task_cannot_complete_it(dsn: str, effects: psycopg.Connection[Any]) -> None:
    errors: list[BaseException] = []
    done = threading.Event()

    async def handler(task: pgq.Task) -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            # another worker took the task over (as after an expired lease): a new attempt
            await conn.execute("UPDATE pgq.task SET attempt = attempt + 1 WHERE id = %s::bigint", (task.id,))
            await conn.commit()
            try:
                async with conn.transaction():
                    await conn.execute("INSERT INTO effect VALUES (%s, %s)", (task.id, task.retried))
                    await task.complete_async(conn)
            except pgq.LeaseLost as exc:
                errors.append(exc)
        done.set()

    mux = pgq.ServeMux()
    mux.handle("work", handler)
    server = run_server(dsn, mux)
    try:
        with pgq.Client(dsn) as client:
            info = client.enqueue(pgq.Task("work"), queue=Q)
            assert done.wait(15)
        assert len(errors) == 1 and "no longer owns" in str(errors[0])
        assert effect_rows(effects, info.id) == []  # rolled back with the refused completion
        assert state(effects, info.id) == "active"  # the new attempt owns it; this one wrote nothing
    finally:
        server.shutdown()


def test_complete_outside_a_worker_is_an_error(dsn: str) -> None:
    with psycopg.connect(dsn) as conn, pytest.raises(RuntimeError, match="pgq worker"):
        pgq.Task("t").complete(conn)


def test_complete_takes_the_right_kind_of_connection(dsn: str, effects: psycopg.Connection[Any]) -> None:
    """A wrong connection object is a clear TypeError before any SQL; the task then completes normally."""
    errors: list[str] = []

    async def handler(task: pgq.Task) -> None:
        for call in (lambda: task.complete(effects.cursor()), lambda: task.complete("dsn")):
            try:
                call()
            except TypeError as exc:
                errors.append(str(exc))
        try:
            await task.complete_async(effects)  # a sync connection
        except TypeError as exc:
            errors.append(str(exc))

    mux = pgq.ServeMux()
    mux.handle("work", handler)
    server = run_server(dsn, mux)
    try:
        with pgq.Client(dsn) as client:
            info = client.enqueue(pgq.Task("work"), queue=Q)
            wait_for(lambda: state(effects, info.id) is None, 10, "the task completed by the worker")
    finally:
        server.shutdown()
    assert errors == [
        "complete() takes a psycopg Connection, not Cursor (an AsyncConnection goes to complete_async())",
        "complete() takes a psycopg Connection, not str (an AsyncConnection goes to complete_async())",
        "complete_async() takes a psycopg AsyncConnection, not Connection (a Connection goes to complete())",
    ]
