"""The worker application the fault tests run: `python -m pgq worker tests.fault.app:server`.

Settings come from the environment (FAULT_*), so one module serves every test.
Every handler first writes its execution to the ledger (chaos.exec_log) over
its own autocommit connection, with the task's current attempt read in the
same statement; the verifier counts executions and duplicates from it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import psycopg

import pgq


def _env(name: str, default: str) -> str:
    return os.environ.get(f"FAULT_{name}", default)


DSN = os.environ.get("PGQ_DSN")
_local = threading.local()
_LOG = (
    "INSERT INTO chaos.exec_log (task_pk, attempt, retried, type, pid) "
    "SELECT %(pk)s, (SELECT attempt FROM pgq.task WHERE id = %(pk)s), %(retried)s, %(type)s, %(pid)s"
)


def _thread_conn(attr: str, application_name: str) -> psycopg.Connection[Any]:
    """This thread's autocommit connection kept in `_local.<attr>` (a new one when it broke)."""
    c = getattr(_local, attr, None)
    if c is None or c.closed or c.broken:
        c = psycopg.connect(DSN or "", autocommit=True, application_name=application_name, connect_timeout=5)
        setattr(_local, attr, c)
    return c


def _ledger_conn() -> psycopg.Connection[Any]:
    return _thread_conn("conn", "chaos:ledger")


def log_execution(task: pgq.Task) -> None:
    params = {"pk": int(task.id or 0), "retried": task.retried, "type": task.type, "pid": os.getpid()}
    try:
        _ledger_conn().execute(_LOG, params)
    except psycopg.OperationalError:
        _local.conn = None
        _ledger_conn().execute(_LOG, params)  # a second failure fails the task: it is retried


def work(task: pgq.Task) -> None:
    log_execution(task)
    ms = (task.payload or {}).get("ms", 0) if isinstance(task.payload, dict) else 0
    if ms:
        time.sleep(ms / 1000)


def slow(task: pgq.Task) -> None:
    """Runs `ms`, then writes its pid as the result: a stale worker's late write (R3)."""
    log_execution(task)
    time.sleep(task.payload["ms"] / 1000)
    assert task.result_writer is not None
    task.result_writer.write({"pid": os.getpid()})


def digest(task: pgq.Task) -> None:
    log_execution(task)


def hang(task: pgq.Task) -> None:
    log_execution(task)
    time.sleep(3600)


def exit_thread(task: pgq.Task) -> None:
    log_execution(task)
    raise SystemExit("a handler that ends its thread")


async def async_exit(task: pgq.Task) -> None:
    await asyncio.to_thread(log_execution, task)
    raise SystemExit("an async handler that raises SystemExit on the loop")


async def async_hang(task: pgq.Task) -> None:
    await asyncio.to_thread(log_execution, task)
    await asyncio.sleep(3600)


def boom(task: pgq.Task) -> None:
    log_execution(task)
    raise RuntimeError("boom")


#: R2's effect: one row per committed execution, into chaos.effect (the test creates it,
#: deliberately without a unique constraint, so a duplicate effect shows).
_EFFECT = (
    "INSERT INTO chaos.effect (task_pk, attempt, pid) "
    "SELECT %(pk)s, (SELECT attempt FROM pgq.task WHERE id = %(pk)s), %(pid)s"
)


def _effect_conn() -> psycopg.Connection[Any]:
    return _thread_conn("effect_conn", "chaos:effect")


def effect(task: pgq.Task) -> None:
    """R2: the effect row and the completion in one transaction (task.complete), then commit."""
    log_execution(task)
    conn = _effect_conn()
    with conn.transaction():
        conn.execute(_EFFECT, {"pk": int(task.id or 0), "pid": os.getpid()})
        task.complete(conn)


_async_conns: list[psycopg.AsyncConnection[Any]] = []


async def effect_async(task: pgq.Task) -> None:
    """effect() on an AsyncConnection, with task.complete_async."""
    await asyncio.to_thread(log_execution, task)
    conn = _async_conns.pop() if _async_conns else None
    if conn is None or conn.closed or conn.broken:
        conn = await psycopg.AsyncConnection.connect(
            DSN or "", autocommit=True, application_name="chaos:effect", connect_timeout=5
        )
    try:
        async with conn.transaction():
            await conn.execute(_EFFECT, {"pk": int(task.id or 0), "pid": os.getpid()})
            await task.complete_async(conn)
    except BaseException:
        await conn.close()
        raise
    _async_conns.append(conn)  # kept for the next task only after a clean commit


def aggregate(group: str, tasks: list[pgq.Task]) -> pgq.Task:
    return pgq.Task("digest", [t.payload for t in tasks], retention=3600)


mux = pgq.ServeMux()
mux.handle("work", work)
mux.handle("slow", slow)
mux.handle("digest", digest)
mux.handle("hang", hang)
mux.handle("exit_thread", exit_thread)
mux.handle("async_exit", async_exit)
mux.handle("async_hang", async_hang)
mux.handle("boom", boom)
mux.handle("effect", effect)
mux.handle("effect_async", effect_async)

_agg_queue = _env("AGG_QUEUE", "")
_queues = {q: 1 for q in _env("QUEUES", "default").split(",")}
_agg: dict[str, Any] = {}
if _agg_queue:
    _queues.setdefault(_agg_queue, 1)
    _agg = {
        "group_aggregator": aggregate,
        "group_grace_period": float(_env("AGG_GRACE", "0.2")),
        "group_max_delay": float(_env("AGG_MAX_DELAY", "2")),
        "group_max_size": int(_env("AGG_MAX_SIZE", "50")),
    }

server = pgq.Server(
    DSN,
    queues=_queues,
    concurrency=int(_env("CONCURRENCY", "8")),
    lease_duration=float(_env("LEASE", "5")),
    recover_interval=float(_env("RECOVER", "1")),
    poll_interval=float(_env("POLL", "1")),
    shutdown_timeout=float(_env("SHUTDOWN_TIMEOUT", "8")),
    listener_keepalive=float(_env("KEEPALIVE", "30")),
    retry_delay_func=lambda n, exc, task: float(_env("RETRY_DELAY", "0.2")),
    **_agg,
)
