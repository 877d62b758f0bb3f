"""Aggregation end to end with real pgq.Servers: promptness of the size trigger
(G4), a real-time grace period, two servers with 2,000 members enqueued
concurrently (G7), SIGKILL of a server in the middle of an aggregation (at
every failpoint and inside a slow aggregator), stats and members (G8), and a
server without an aggregator (G11)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgq

Q = "agg"


def concat(group: str, tasks: list[pgq.Task]) -> pgq.Task:
    return pgq.Task("digest", [t.payload for t in tasks], retention=3600)


class Recorder:
    """A handler that records what it processed (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[pgq.Task] = []
        self.changed = threading.Condition(self.lock)

    def __call__(self, task: pgq.Task) -> None:
        with self.changed:
            self.seen.append(task)
            self.changed.notify_all()

    def wait(self, cond: Callable[[list[pgq.Task]], bool], timeout: float = 15.0) -> list[pgq.Task]:
        with self.changed:
            if not self.changed.wait_for(lambda: cond(self.seen), timeout):
                raise AssertionError(f"handler condition not met in {timeout}s; seen {len(self.seen)}")
            return list(self.seen)


@pytest.fixture
def servers() -> Iterator[Callable[..., pgq.Server]]:
    started: list[pgq.Server] = []

    def start(dsn: str, handler: Any, **kw: Any) -> pgq.Server:
        kw.setdefault("queues", {Q: 1})
        s = pgq.Server(dsn, **kw)
        s.start(handler)
        started.append(s)
        return s

    yield start
    for s in started:
        s.shutdown(timeout=20)


@pytest.fixture
def client(dsn: str) -> Iterator[pgq.Client]:
    with pgq.Client(dsn, notify_window=0) as c:
        yield c


def mux_for(rec: Recorder) -> pgq.ServeMux:
    mux = pgq.ServeMux()
    mux.handle("digest", rec)
    mux.handle("item", rec)
    return mux


def wait_for(cond: Callable[[], bool], timeout: float = 15.0, step: float = 0.002) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not met in time")
        time.sleep(step)
    return time.monotonic() - t0


def aggregated_count(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) AS n FROM pgq.task WHERE members IS NOT NULL").fetchone()
    assert row is not None
    return int(row["n"])


def test_s4_size_trigger_within_100ms_of_the_completing_commit(
    dsn: str, servers: Callable[..., pgq.Server], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    rec = Recorder()
    servers(dsn, mux_for(rec), group_aggregator=concat, group_grace_period=3600, group_max_size=5)
    time.sleep(1.5)  # leadership is taken within one elect interval
    lat = []
    for round_ in range(3):
        for i in range(4):
            client.enqueue(pgq.Task("item", i), queue=Q, group=f"g{round_}")
        time.sleep(0.2)
        assert aggregated_count(conn) == round_
        client.enqueue(pgq.Task("item", 4), queue=Q, group=f"g{round_}")
        lat.append(wait_for(lambda r=round_: aggregated_count(conn) == r + 1, timeout=5))  # type: ignore[misc]
    rec.wait(lambda s: len(s) == 3)
    assert all(t.type == "digest" and t.payload == [0, 1, 2, 3, 4] for t in rec.seen)
    assert min(lat) <= 0.1, lat
    assert max(lat) <= 1.0, lat


def test_s1_real_time_grace_period(dsn: str, servers: Callable[..., pgq.Server], client: pgq.Client) -> None:
    rec = Recorder()
    servers(dsn, mux_for(rec), group_aggregator=concat, group_grace_period=1)
    time.sleep(1.2)
    for i in range(3):
        client.enqueue(pgq.Task("item", f"m{i}"), queue=Q, group="g")
        if i < 2:
            time.sleep(0.3)
    t_last = time.monotonic()
    [t] = rec.wait(lambda s: len(s) >= 1)
    waited = time.monotonic() - t_last
    assert t.payload == ["m0", "m1", "m2"]
    assert 0.9 <= waited <= 2.0, waited
    with pgq.Inspector(dsn) as insp:
        assert insp.groups(Q) == []


def test_s8_two_servers_2000_members_exactly_once(
    dsn: str, servers: Callable[..., pgq.Server], conn: psycopg.Connection[Any]
) -> None:
    rec = Recorder()
    for _ in range(2):
        servers(
            dsn,
            mux_for(rec),
            group_aggregator=concat,
            group_grace_period=0.2,
            group_max_size=7,
            concurrency=4,
        )
    n_threads, per_thread, n_groups = 8, 250, 25

    def produce(k: int) -> None:
        with pgq.Client(dsn) as c:
            for i in range(per_thread):
                c.enqueue(pgq.Task("item", f"{k}:{i}"), queue=Q, group=f"g{(k * per_thread + i) % n_groups}")

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = n_threads * per_thread
    seen = rec.wait(lambda s: sum(len(t.payload) for t in s) >= total, timeout=60)
    payloads = [p for t in seen for p in t.payload]
    assert len(payloads) == total and len(set(payloads)) == total
    assert all(1 <= len(t.payload) <= 7 for t in seen)
    rows = conn.execute("SELECT members FROM pgq.task WHERE members IS NOT NULL").fetchall()
    ids = [m for r in rows for m in r["members"]]
    assert len(ids) == len(set(ids)) == total
    assert conn.execute("SELECT count(*) AS n FROM pgq.task WHERE state = 'aggregating'").fetchone() == {
        "n": 0
    }
    with pgq.Inspector(dsn) as insp:
        assert insp.get_queue_info(Q).processed == len(seen)


def test_s15_stats_count_the_aggregated_task_once(
    dsn: str, servers: Callable[..., pgq.Server], client: pgq.Client
) -> None:
    rec = Recorder()
    servers(dsn, mux_for(rec), group_aggregator=concat, group_grace_period=3600, group_max_size=3)
    infos = client.enqueue_many([pgq.Task("item", i) for i in range(3)], queue=Q, group="g")
    [t] = rec.wait(lambda s: len(s) == 1)
    with pgq.Inspector(dsn) as insp:
        wait_for(lambda: insp.get_queue_info(Q).processed == 1, timeout=10)
        info = insp.get_task_info(Q, str(t.id))
        assert info.members == [i.id for i in infos]
        for i in infos:
            with pytest.raises(pgq.TaskNotFoundError):
                insp.get_task_info(Q, i.id)
        time.sleep(0.3)
        assert insp.get_queue_info(Q).processed == 1


def test_s10_server_without_aggregator_leaves_members_waiting(
    dsn: str, servers: Callable[..., pgq.Server], client: pgq.Client
) -> None:
    rec = Recorder()
    servers(dsn, mux_for(rec), poll_interval=0.1)
    client.enqueue_many([pgq.Task("item", i) for i in range(3)], queue=Q, group="g")
    client.enqueue(pgq.Task("item", "alone"), queue=Q)
    rec.wait(lambda s: len(s) == 1)
    time.sleep(0.5)
    assert [t.payload for t in rec.seen] == ["alone"]
    with pgq.Inspector(dsn) as insp:
        [g] = insp.groups(Q)
        assert g.size == 3
        assert insp.get_queue_info(Q).aggregating == 3


def test_s11_scheduled_grouped_task_runs_on_its_own(
    dsn: str, servers: Callable[..., pgq.Server], client: pgq.Client
) -> None:
    rec = Recorder()
    servers(dsn, mux_for(rec), group_aggregator=concat, group_grace_period=0.1, poll_interval=0.2)
    info = client.enqueue(pgq.Task("item", "later"), queue=Q, group="g", process_in=2)
    assert info.state == "scheduled"
    [t] = rec.wait(lambda s: len(s) == 1, timeout=10)
    assert t.type == "item" and t.payload == "later"


# --- scenario 9: SIGKILL in the middle of an aggregation ------------------------------------------------

SERVER_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, pathlib
    import pgq

    marker = pathlib.Path(sys.argv[2])

    def slow(group, tasks):
        marker.write_text(str(len(tasks)))
        if os.environ.get("SLOW"):
            time.sleep(60)
        return pgq.Task("digest", [t.payload for t in tasks], retention=3600)

    mux = pgq.ServeMux()
    mux.handle("digest", lambda t: None)
    server = pgq.Server(sys.argv[1], queues={"agg": 1}, group_aggregator=slow,
                        group_grace_period=3600, group_max_size=10, poll_interval=0.2)
    server.run(mux)
    """
)


def spawn(dsn: str, marker: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    root = Path(__file__).resolve().parents[2]
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT, dsn, str(marker)],
            env={**os.environ, **env, "PYTHONPATH": str(root)},
            stdout=subprocess.DEVNULL,
            stderr=out,
        )


def check_exactly_once(conn: psycopg.Connection[Any], expected: set[int]) -> list[list[int]]:
    rows = conn.execute("SELECT payload FROM pgq.task WHERE members IS NOT NULL ORDER BY id").fetchall()
    got = [p for r in rows for p in r["payload"]]
    assert sorted(got) == sorted(expected), "a member was lost or aggregated twice"
    return [r["payload"] for r in rows]


@pytest.mark.parametrize(
    "how",
    ["slow_aggregator", "after_select", "after_insert", "after_delete", "before_commit", "after_commit"],
)
def test_s9_sigkill_mid_aggregation_another_server_aggregates_each_member_once(
    dsn: str,
    servers: Callable[..., pgq.Server],
    client: pgq.Client,
    conn: psycopg.Connection[Any],
    tmp_path: Path,
    how: str,
) -> None:
    marker = tmp_path / "called"
    env = {"SLOW": "1"} if how == "slow_aggregator" else {"PGQ_FAILPOINTS": f"aggregate.{how}=kill"}
    log = tmp_path / "server.log"
    proc = spawn(dsn, marker, env, log)
    try:
        time.sleep(0.5)
        client.enqueue_many([pgq.Task("item", i) for i in range(25)], queue=Q, group="g")
        if how == "slow_aggregator":
            wait_for(marker.exists, timeout=20, step=0.01)
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=20) == -signal.SIGKILL, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    committed = aggregated_count(conn)
    if how == "after_commit":
        assert committed == 2
        left = conn.execute("SELECT count(*) AS n FROM pgq.task WHERE state = 'aggregating'").fetchone()
        assert left == {"n": 5}
    else:
        assert committed == 0
        left = conn.execute("SELECT count(*) AS n FROM pgq.task WHERE state = 'aggregating'").fetchone()
        assert left == {"n": 25}
    # Another server takes over and aggregates every member exactly once.
    rec = Recorder()
    servers(dsn, mux_for(rec), group_aggregator=concat, group_grace_period=0.3, group_max_size=10)
    wait_for(
        lambda: (
            conn.execute("SELECT count(*) AS n FROM pgq.task WHERE state = 'aggregating'").fetchone()
            == {"n": 0}
        ),
        timeout=20,
    )
    chunks = check_exactly_once(conn, set(range(25)))
    assert [len(c) for c in chunks] == [10, 10, 5]
    assert chunks[0] == list(range(10))


def test_group_aggregator_timeout_is_a_server_setting(
    dsn: str, servers: Callable[..., pgq.Server], client: pgq.Client
) -> None:
    for bad in (0, -1, "soon"):
        with pytest.raises(pgq.ConfigError, match="group_aggregator_timeout"):
            pgq.Server(dsn, queues={Q: 1}, group_aggregator=concat, group_aggregator_timeout=bad)
    calls: list[int] = []

    async def slow_once(group: str, tasks: list[pgq.Task]) -> pgq.Task:
        calls.append(len(tasks))
        if len(calls) == 1:
            await asyncio.sleep(60)  # cancelled at the timeout
        return concat(group, tasks)

    rec = Recorder()
    servers(
        dsn,
        mux_for(rec),
        group_aggregator=slow_once,
        group_grace_period=0.05,
        group_aggregator_timeout=0.2,
        poll_interval=0.1,
    )
    client.enqueue_many([pgq.Task("item", i) for i in range(3)], queue=Q, group="g")
    with pgq.Inspector(dsn) as insp:
        wait_for(lambda: bool(insp.groups(Q)) and insp.groups(Q)[0].errors >= 1, timeout=15)
        [g] = insp.groups(Q)
        assert g.size == 3 and "took longer than 0.2 s" in (g.last_error or "")
        rec.wait(lambda s: len(s) == 1, timeout=20)  # the retry is quick: it aggregates the group
        assert insp.groups(Q) == [] and calls[:2] == [3, 3]
