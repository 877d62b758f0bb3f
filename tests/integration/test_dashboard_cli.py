"""`pgq dashboard` as a user runs it: a real uvicorn in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

pytest.importorskip("uvicorn", reason="the dashboard extra is not installed")

import pgq
from tests.fixtures.util import free_port


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgq", "dashboard", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_refuses_public_address_without_auth() -> None:
    # (the rules themselves: test_dashboard.py::test_check_bind)
    r = run_cli("--dsn", "postgresql://u:pw@127.0.0.1/x", "--host", "0.0.0.0")
    assert r.returncode == 2, r.stderr
    assert "without authentication" in r.stderr and "--token" in r.stderr
    assert "pw@" not in r.stderr + r.stdout
    r = run_cli("--basic-auth", "nopassword")
    assert r.returncode == 2 and "USER:PASSWORD" in r.stderr


def test_serves_and_never_prints_the_password(dsn: str) -> None:
    password = "Sup3r-Secret-pw-42"
    params = conninfo_to_dict(dsn)
    params["password"] = password  # the test server trusts local connections: any password works
    secret_dsn = make_conninfo("", **params)
    with pgq.Client(dsn) as c:
        c.enqueue(pgq.Task("x", {"a": 1}), queue="cliq", group="g")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgq",
            "dashboard",
            "--dsn",
            secret_dsn,
            "--port",
            str(port),
            "--refresh",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        body = ""
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
                body = r.text
                break
            except httpx.TransportError:
                assert proc.poll() is None, "the dashboard exited early"
                time.sleep(0.1)
        assert 'data-queue="cliq"' in body
        pages = [
            httpx.get(f"http://127.0.0.1:{port}{p}", timeout=5).text
            for p in ("/groups?queue=cliq", "/group?queue=cliq&group=g", "/servers", "/queue?queue=none")
        ]
        assert all(password not in p for p in [body, *pages])
        r = httpx.post(f"http://127.0.0.1:{port}/action", data={"action": "queue_pause", "queue": "cliq"})
        assert r.status_code == 403
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "pgq dashboard on http://127.0.0.1:" in out
    assert "password=***" in out
    assert password not in out
    assert '"GET / HTTP/1.1" 200' in out  # the access log is there, and clean
