"""R13: pgq behind PgBouncer (the Debian package, 1.18) in pool_mode=transaction.

PgBouncer 1.18 does not carry protocol-level prepared statements across
transactions, and psycopg prepares a statement once it ran `prepare_threshold`
(5) times on a connection; a client connection of a transaction pooler owns no
server session, so LISTEN and session advisory locks do not work through it.

- Client: `pgq.Client(dsn, prepare=False)` through transaction mode enqueues
  (single, enqueue_many incl. COPY, conn= inside the caller's transaction, the
  AsyncClient) well past the threshold; every call succeeds and every task is
  stored exactly once. The Inspector and the SQL function pgq.enqueue work on
  the same bouncer. The figures also record what a default Client (prepare on)
  does there (it fails, with 1.18).
- Misconfiguration: a Server without poll_only, or with a group_aggregator,
  through transaction mode refuses to start with a ConfigError naming the fix;
  the detection (pgq.db.transaction_pooled) says no for session mode and direct.
- Documented mode: a poll_only Server through transaction mode drains N tasks
  with none lost or duplicated and no database error logged; its throughput is
  reported against the same Server on a direct DSN.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgq
from pgq import db
from pgq.errors import ConfigError
from tests.fault import pgbouncer
from tests.fault.chaos import report, size
from tests.fault.cluster import Cluster
from tests.fixtures.util import wait_for

pytestmark = [
    pytest.mark.fault,
    pytest.mark.skipif(pgbouncer.available() is not None, reason=f"R13: {pgbouncer.available()}"),
]


@pytest.fixture(scope="module")
def tx_bouncer(cluster: Cluster) -> Iterator[pgbouncer.Bouncer]:
    b = pgbouncer.Bouncer(cluster, "transaction").start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def session_bouncer(cluster: Cluster) -> Iterator[pgbouncer.Bouncer]:
    b = pgbouncer.Bouncer(cluster, "session").start()
    yield b
    b.stop()


def _stored(dsn: str, run: str) -> tuple[int, int]:
    """(rows, distinct markers) of the tasks whose payload carries this run's marker."""
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(
            "SELECT count(*), count(DISTINCT payload->>'k') FROM pgq.task WHERE payload->>'run' = %s", (run,)
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_r13_client_through_transaction_mode(fdb: str, tx_bouncer: pgbouncer.Bouncer) -> None:
    bdsn = tx_bouncer.dsn(fdb)
    run = uuid.uuid4().hex
    expected: list[str] = []

    def task(k: str) -> pgq.Task:
        expected.append(k)
        return pgq.Task("r13", {"run": run, "k": k})

    # What two default Clients (psycopg prepares after 5 runs) do here, taking turns over the
    # pooler's one idle server connection: recorded, not asserted, since PgBouncer >= 1.21 with
    # max_prepared_statements would accept it.
    default_error = None
    with pgq.Client(bdsn) as d1, pgq.Client(bdsn) as d2:
        try:
            for i in range(60):
                (d1, d2)[i % 2].enqueue(pgq.Task("r13-default", {"i": i}))
        except psycopg.Error as exc:
            default_error = f"{type(exc).__name__}: {exc}"

    calls = 0
    with pgq.Client(bdsn, prepare=False) as client, pgq.Client(bdsn, prepare=False) as other:
        for i in range(50):  # the lean statement, five times past the threshold on each Client
            (client, other)[i % 2].enqueue(task(f"s{i}"))
            calls += 1
        for i in range(10):  # the plain statement (an option besides the queue)
            client.enqueue(task(f"p{i}"), max_retry=3)
            calls += 1
        for b in range(6):  # arrays (10) and COPY (100)
            n = 10 if b % 2 else 100
            client.enqueue_many([task(f"m{b}.{j}") for j in range(n)])
            calls += 1
        # conn=: the caller's transaction through the bouncer; its connection must not
        # prepare either (psycopg's prepare_threshold=None), as docs/howto-pgbouncer.md says.
        with psycopg.connect(bdsn, prepare_threshold=None) as conn:
            for t in range(8):
                with conn.transaction():
                    conn.execute("SELECT 1")
                    client.enqueue(task(f"c{t}"), conn=conn)
                    client.enqueue(task(f"cg{t}"), conn=conn, task_id=f"tid-{run}-{t}")
                    client.enqueue_many([task(f"cm{t}.{j}") for j in range(5)], conn=conn)
                    calls += 3
            # The SQL function on the caller's connection.
            for i in range(10):
                conn.execute(
                    "SELECT pgq.enqueue('default', 'r13', %s::jsonb)",
                    (psycopg.types.json.Jsonb({"run": run, "k": f"f{i}"}),),
                )
                expected.append(f"f{i}")
                conn.commit()
                calls += 1

    async def async_enqueues() -> int:
        async with pgq.AsyncClient(bdsn, prepare=False) as ac:
            for i in range(20):
                await ac.enqueue(task(f"a{i}"))
            await ac.enqueue_many([task(f"am{j}") for j in range(100)])
        return 21

    calls += asyncio.run(async_enqueues())

    # Two Inspectors through the same bouncer, taking turns: one statement many times on each
    # one connection, so a prepared statement would meet the other's on the shared backend.
    with pgq.Inspector(bdsn) as insp, pgq.Inspector(bdsn) as insp2:
        for i in range(24):
            info = (insp, insp2)[i % 2].get_queue_info("default")
        for i in range(24):
            one = (insp, insp2)[i % 2].get_task_info("default", f"tid-{run}-0")
    assert one.state == "pending"

    rows, distinct = _stored(fdb, run)
    line = report(
        "R13-client",
        pgbouncer=pgbouncer.version(),
        pool_mode="transaction",
        calls=calls,
        tasks=len(expected),
        stored=rows,
        distinct=distinct,
        default_client_error=default_error,
        inspector_pending=info.pending,
    )
    assert len(set(expected)) == len(expected), line
    assert rows == len(expected) and distinct == len(expected), line  # each exactly once
    assert info.pending >= len(expected), line


def test_r13_misconfiguration_refused(
    fdb: str, tx_bouncer: pgbouncer.Bouncer, session_bouncer: pgbouncer.Bouncer
) -> None:
    tdsn, sdsn = tx_bouncer.dsn(fdb), session_bouncer.dsn(fdb)
    detected = {
        name: [asyncio.run(db.transaction_pooled(d)) for _ in range(3)]
        for name, d in (("transaction", tdsn), ("session", sdsn), ("direct", fdb))
    }

    refused: dict[str, str] = {}
    for name, kwargs in (
        ("listen", {}),
        ("aggregator", {"poll_only": True, "queues": {"agg": 1}, "group_aggregator": lambda g, ts: None}),
    ):
        server = pgq.Server(tdsn, poll_interval=0.2, **kwargs)  # type: ignore[arg-type]
        t0 = time.monotonic()
        try:
            with pytest.raises(ConfigError) as err:
                server.start(pgq.ServeMux(), ready_timeout=10)
        finally:
            server.shutdown(10)  # a no-op when it was refused
        refused[name] = f"{time.monotonic() - t0:.2f}s: {err.value}"
        assert server.worker is None  # refused before it claimed anything

    # No false positive: the same misconfiguration-prone Server starts through session mode.
    ok = pgq.Server(sdsn, poll_interval=0.2)
    ok.start(pgq.ServeMux(), ready_timeout=10)
    try:
        assert ok.listener is not None
        wait_for(lambda: ok.listener is not None and ok.listener.listening.is_set(), 10, "listening")
    finally:
        ok.shutdown(10)

    line = report("R13-misconfig", detected=detected, refused=refused, session_started=True)
    assert detected["transaction"] == [True, True, True], line
    assert detected["session"] == [False, False, False], line
    assert detected["direct"] == [False, False, False], line
    assert "poll_only=True" in refused["listen"] and "direct" in refused["listen"], line
    assert "group_aggregator" in refused["aggregator"], line


def _drain(dsn: str, fill_dsn: str, n: int, caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    """Enqueue n tasks (direct), run a poll_only Server on `dsn` until all complete."""
    run = uuid.uuid4().hex
    with pgq.Client(fill_dsn) as client:
        tasks = [pgq.Task("r13", {"run": run, "k": str(k)}) for k in range(n)]
        ids = [i.id for i in client.enqueue_many(tasks, retention=3600)]  # kept, to count them
    seen: list[str] = []
    mux = pgq.ServeMux()
    mux.handle("r13", lambda t: seen.append(str(t.id)))
    server = pgq.Server(dsn, poll_only=True, poll_interval=0.2, concurrency=10)
    caplog.clear()
    t0 = time.monotonic()
    server.start(mux, ready_timeout=15)
    try:
        with psycopg.connect(fill_dsn, autocommit=True) as c:

            def done() -> bool:
                row = c.execute(
                    "SELECT count(*) FROM pgq.task WHERE id = ANY(%s) AND state = 'completed'",
                    ([int(i) for i in ids],),
                ).fetchone()
                return bool(row and row[0] == n)

            wait_for(done, 30, f"{n} tasks completed", interval=0.02)
        seconds = time.monotonic() - t0
    finally:
        server.shutdown(15)
    errors = [
        r.getMessage() for r in caplog.records if r.name.startswith("pgq") and r.levelno >= logging.WARNING
    ]
    return {
        "seconds": round(seconds, 3),
        "per_s": round(n / seconds),
        "executed": len(seen),
        "dup": len(seen) - len(set(seen)),
        "lost": len(set(map(str, ids)) - set(seen)),
        "pooled": server.transaction_pooled,
        "warnings": errors[:3],
    }


def test_r13_poll_only_through_transaction_mode(
    cluster: Cluster, fdb: str, tx_bouncer: pgbouncer.Bouncer, caplog: pytest.LogCaptureFixture
) -> None:
    n = size(500, 20_000)
    caplog.set_level(logging.WARNING, logger="pgq")
    bounced = _drain(tx_bouncer.dsn(fdb), fdb, n, caplog)
    other = cluster.new_db()
    try:
        direct = _drain(other, other, n, caplog)
    finally:
        cluster.drop_db(other)
    line = report(
        "R13-poll-only",
        pgbouncer=pgbouncer.version(),
        tasks=n,
        through_bouncer=bounced,
        direct=direct,
        throughput_ratio=round(bounced["per_s"] / direct["per_s"], 2),
    )
    assert bounced["pooled"] is True and direct["pooled"] is False, line
    assert bounced["lost"] == 0 and bounced["dup"] == 0 and bounced["executed"] == n, line
    assert bounced["warnings"] == [], line  # e.g. no "prepared statement ... does not exist"
    assert direct["lost"] == 0 and direct["dup"] == 0, line
