"""A worker whose database stops answering (RELIABILITY R12; tests/fault/test_r12_partition.py
runs it through a TCP proxy): its connections carry TCP keepalives and tcp_user_timeout, and its
heartbeat abandons tasks at their local lease deadline even while its statement gets no answer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgq
from pgq import db
from tests.fixtures.util import blocking_mux, wait_for

Conn = psycopg.Connection[Any]


@pytest.fixture
def client(dsn: str) -> Iterator[pgq.Client]:
    with pgq.Client(dsn) as c:
        yield c


def test_connections_carry_tcp_keepalives_unless_the_dsn_sets_them(dsn: str) -> None:
    with db.connect(dsn, "worker") as c:
        got = c.info.get_parameters()
    assert {k: got.get(k) for k in db.TCP_DEFAULTS} == {k: str(v) for k, v in db.TCP_DEFAULTS.items()}
    with db.connect(f"{dsn} keepalives_idle=7 tcp_user_timeout=1234", "worker") as c:
        got = c.info.get_parameters()
    assert got["keepalives_idle"] == "7" and got["tcp_user_timeout"] == "1234"
    assert got["keepalives_count"] == str(db.TCP_DEFAULTS["keepalives_count"])


def test_an_unanswered_heartbeat_abandons_the_task_at_its_local_deadline(
    dsn: str, conn: Conn, client: pgq.Client
) -> None:
    """The heartbeat's statement blocks (here behind a row lock: as a half-open socket, it never
    answers): the handler is still cancelled when the lease runs out locally, not when (if ever)
    the statement returns, and the task's outcome is not written."""
    mux, started, cancelled = blocking_mux()
    lease = 1.5
    pk = int(client.enqueue(pgq.Task("t")).id)
    server = pgq.Server(dsn, lease_duration=lease, recover_interval=60)
    server.start(mux)
    try:
        assert started.wait(5)
        with psycopg.connect(dsn) as locker:  # a transaction holding the task's row
            locker.execute("SELECT 1 FROM pgq.task WHERE id = %s FOR UPDATE", (pk,))
            t0 = time.monotonic()
            assert cancelled.wait(lease + 3), "the handler ran on past its local lease deadline"
            took = time.monotonic() - t0
            worker = server.worker
            assert worker is not None
            wait_for(lambda: worker.lost == 1, 2)
            assert worker.running == {}
        assert took <= lease + 0.5
    finally:
        server.shutdown()
    row = conn.execute("SELECT state, attempt FROM pgq.task WHERE id = %s", (pk,)).fetchone()
    assert row == {"state": "active", "attempt": 1}  # left to the recoverer: nothing written


def test_a_blocked_server_row_write_does_not_hold_up_the_leases(
    dsn: str, conn: Conn, client: pgq.Client
) -> None:
    """The heartbeat writes the server row after extending the leases. While that write is blocked
    (here behind a lock on pgq.server), the next heartbeats still extend the running task's lease:
    the row write waits at most one interval, so it cannot hold up the beat that keeps (or, when
    the database stops answering, abandons) the tasks."""
    started, release = threading.Event(), threading.Event()
    mux = pgq.ServeMux()

    @mux.handle("t")
    def h(task: pgq.Task) -> None:
        started.set()
        release.wait(30)

    lease = 1.5
    pk = int(client.enqueue(pgq.Task("t")).id)
    server = pgq.Server(dsn, lease_duration=lease, recover_interval=60)
    server.start(mux)

    def lease_expires_at() -> Any:
        row = conn.execute("SELECT lease_expires_at FROM pgq.task WHERE id = %s", (pk,)).fetchone()
        assert row is not None
        return row["lease_expires_at"]

    try:
        assert started.wait(5)
        with psycopg.connect(dsn) as locker:  # a transaction holding every server row
            locker.execute("SELECT 1 FROM pgq.server FOR UPDATE")
            first = lease_expires_at()
            # three intervals (lease/3 each) later the lease must have been extended again, twice
            seen = [first]
            wait_for(lambda: seen.append(lease_expires_at()) or len(set(seen)) >= 3, 3 * lease)
            worker = server.worker
            assert worker is not None and worker.lost == 0 and pk in worker.running
        release.set()
        wait_for(lambda: worker.succeeded == 1, 10)
    finally:
        release.set()
        server.shutdown()
