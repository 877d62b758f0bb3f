"""Process-level behaviour: a SIGKILLed `python -m pgq worker` has its task finished
by another worker; a terminated LISTEN connection does not stall work; signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgq
from tests.fixtures.util import free_port, wait_for

Conn = psycopg.Connection[Any]
ROOT = Path(__file__).resolve().parents[2]


APP = textwrap.dedent(
    """
    import time
    import pgq

    mux = pgq.ServeMux()

    @mux.handle("block")
    def block(task):
        time.sleep(60)

    @mux.handle("quick")
    async def quick(task):
        pass

    server = pgq.Server(lease_duration=1.0, recover_interval=0.2, shutdown_timeout=0.5)
    """
)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "workerapp.py").write_text(APP)
    return tmp_path


def spawn_worker(app_dir: Path, dsn: str, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": f"{app_dir}{os.pathsep}{ROOT}"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgq",
            "worker",
            "workerapp:server",
            "--dsn",
            dsn,
            "--log-level",
            "warning",
            *args,
        ],
        cwd=app_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_active(conn: Conn, task_id: str) -> None:
    """Until a worker has claimed the task (its state is active)."""
    wait_for(
        lambda: (
            conn.execute("SELECT state FROM pgq.task WHERE id = %s", (int(task_id),)).fetchone()
            == {"state": "active"}
        ),
        timeout=20,
        what=f"task {task_id} to be active",
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)  # also closes the stderr pipe


def test_sigkilled_worker_task_is_finished_by_another(
    dsn: str, conn: Conn, app_dir: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    with pgq.Client(dsn) as client:
        info = client.enqueue(pgq.Task("block"), queue="default")
    p = spawn_worker(app_dir, dsn)
    procs.append(p)
    wait_active(conn, info.id)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    killed_at = time.monotonic()

    done = threading.Event()
    mux = pgq.ServeMux()

    @mux.handle("block")
    async def finish(task: pgq.Task) -> None:
        done.set()

    server = pgq.Server(dsn, lease_duration=1.0, recover_interval=0.2)
    server.start(mux)
    try:
        assert done.wait(10)
        elapsed = time.monotonic() - killed_at
        wait_for(
            lambda: conn.execute("SELECT 1 FROM pgq.task WHERE id = %s", (int(info.id),)).fetchone() is None
        )
    finally:
        server.shutdown()
    # Within lease (1 s) + a recoverer scan (0.2 s) + slack for a loaded machine.
    assert elapsed < 4.0, elapsed


def test_sigterm_is_graceful(
    dsn: str, conn: Conn, app_dir: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    with pgq.Client(dsn) as client:
        info = client.enqueue(pgq.Task("block"))
    p = spawn_worker(app_dir, dsn)
    procs.append(p)
    wait_active(conn, info.id)
    p.send_signal(signal.SIGTERM)
    assert p.wait(15) == 0
    r = conn.execute("SELECT state, retried FROM pgq.task WHERE id = %s", (int(info.id),)).fetchone()
    assert r == {"state": "pending", "retried": 0}


def test_listener_connection_loss_does_not_stall_work(dsn: str, conn: Conn) -> None:
    ran = threading.Event()
    mux = pgq.ServeMux()

    @mux.handle("t")
    async def h(task: pgq.Task) -> None:
        ran.set()

    # A polling floor far above the wait below: only the listener (or its reconnect poll) can be on time.
    server = pgq.Server(dsn, poll_interval=60)
    server.start(mux)
    try:
        assert server.listener is not None and server.listener.connects == 1
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
            "WHERE application_name LIKE 'pgq:listener:%%' AND datname = current_database()"
        ).fetchone()
        assert killed == {"n": 1}
        with pgq.Client(dsn) as client:
            t0 = time.monotonic()
            client.enqueue(pgq.Task("t"))  # its NOTIFY may be lost while the listener is down
            assert ran.wait(5), "task not picked up after the listener was terminated"
            assert time.monotonic() - t0 < 3
        wait_for(lambda: server.listener is not None and server.listener.connects >= 2)
        # And wake-ups work again on the new connection.
        ran.clear()
        with pgq.Client(dsn) as client:
            t0 = time.monotonic()
            client.enqueue(pgq.Task("t"))
            assert ran.wait(5)
            assert time.monotonic() - t0 < 1.0
    finally:
        server.shutdown()


def test_poll_only_mode_has_no_listener(dsn: str, conn: Conn) -> None:
    ran = threading.Event()
    mux = pgq.ServeMux()
    mux.handle("t", lambda task: ran.set())
    server = pgq.Server(dsn, poll_only=True, poll_interval=0.1)
    server.start(mux)
    try:
        assert server.listener is None
        listeners = conn.execute(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name LIKE 'pgq:listener:%%' "
            "AND datname = current_database()"
        ).fetchone()
        assert listeners == {"n": 0}
        with pgq.Client(dsn) as client:
            client.enqueue(pgq.Task("t"))
        assert ran.wait(5)
    finally:
        server.shutdown()


def test_worker_cli_rejects_bad_app(app_dir: Path, dsn: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{app_dir}{os.pathsep}{ROOT}"}
    out = subprocess.run(
        [sys.executable, "-m", "pgq", "worker", "workerapp:nothing", "--dsn", dsn],
        cwd=app_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "has no attribute 'nothing'" in out.stderr


def test_second_signal_exits_at_once(
    dsn: str, conn: Conn, app_dir: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    with pgq.Client(dsn) as client:
        info = client.enqueue(pgq.Task("block"))
    p = spawn_worker(app_dir, dsn)
    procs.append(p)
    wait_active(conn, info.id)
    conn.execute("UPDATE pgq.task SET max_retry = 0 WHERE id = %s", (int(info.id),))
    p.send_signal(signal.SIGTERM)
    time.sleep(0.05)  # let the first signal be handled before the second
    p.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    p.wait(10)
    assert time.monotonic() - t0 < 3.5
    # Left to the recoverer: still active with the dead worker's lease.
    r = conn.execute("SELECT state FROM pgq.task WHERE id = %s", (int(info.id),)).fetchone()
    assert r == {"state": "active"}


def test_processes_flag_runs_several_workers(
    dsn: str, conn: Conn, app_dir: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    p = spawn_worker(app_dir, dsn, "--processes", "2", "--queues", "a=2,default=1")
    procs.append(p)
    rows = wait_for(
        lambda: (r := conn.execute("SELECT pid, queues FROM pgq.server").fetchall()) and len(r) == 2 and r,
        timeout=30,
    )
    assert len({r["pid"] for r in rows}) == 2 and all(r["queues"] == {"a": 2, "default": 1} for r in rows)
    with pgq.Client(dsn) as client:
        infos = client.enqueue_many([pgq.Task("quick") for _ in range(20)], queue="a")
    wait_for(
        lambda: (
            conn.execute(
                "SELECT count(*) AS n FROM pgq.task WHERE id = ANY(%s)", ([int(i.id) for i in infos],)
            ).fetchone()
            == {"n": 0}
        ),
        timeout=20,
    )
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0
    assert conn.execute("SELECT count(*) AS n FROM pgq.server").fetchone() == {"n": 0}


def test_worker_cli_runs_a_servemux(
    dsn: str, conn: Conn, app_dir: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    env = {**os.environ, "PYTHONPATH": f"{app_dir}{os.pathsep}{ROOT}"}
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgq",
            "worker",
            "workerapp:mux",
            "--dsn",
            dsn,
            "--queues",
            "cli",
            "--concurrency",
            "2",
            "--log-format",
            "json",
        ],
        cwd=app_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    procs.append(p)
    with pgq.Client(dsn) as client:
        info = client.enqueue(pgq.Task("quick"), queue="cli")
    wait_for(
        lambda: conn.execute("SELECT 1 FROM pgq.task WHERE id = %s", (int(info.id),)).fetchone() is None,
        timeout=20,
    )
    r = conn.execute("SELECT queues, concurrency FROM pgq.server").fetchone()
    assert r == {"queues": {"cli": 1}, "concurrency": 2}
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 0
    assert b'"action": "server_started"' in err  # structured (JSON) log lines


def test_worker_serves_metrics_on_metrics_port(
    dsn: str, app_dir: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    import urllib.request

    port = free_port()
    with pgq.Client(dsn) as client:
        client.enqueue(pgq.Task("t"), queue="metricsq", process_in=3600)
    p = spawn_worker(app_dir, dsn, "--metrics-port", str(port), "--metrics-addr", "127.0.0.1")
    procs.append(p)

    def scrape() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                return str(r.read().decode())
        except OSError:
            return None

    body = wait_for(scrape, timeout=30, interval=0.1)
    assert 'queue="metricsq"' in body and "pgq_tasks" in body
