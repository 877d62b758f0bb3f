"""`pgq metrics` run as a user runs it: a subprocess serving /metrics until SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pgq
from tests.fixtures.util import free_port

PGQ = Path(sys.executable).with_name("pgq")


def test_metrics_command_serves_until_terminated(dsn: str) -> None:
    with pgq.Client(dsn) as c:
        c.enqueue(pgq.Task("t"), queue="m")
    port = free_port()
    proc = subprocess.Popen(
        [str(PGQ), "metrics", "--port", str(port), "--addr", "127.0.0.1", "--dsn", dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        body = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    body = r.read().decode()
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.1)
        assert 'pgq_tasks{queue="m",state="pending"} 1.0' in body
        assert "pgq_up 1.0" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"serving pgq metrics on http://127.0.0.1:{port}/metrics" in err


def test_metrics_bad_arguments(dsn: str) -> None:
    r = subprocess.run([str(PGQ), "metrics", "--port", "70000", "--dsn", dsn], capture_output=True, text=True)
    assert r.returncode == 2
    r = subprocess.run(
        [str(PGQ), "metrics", "--port", "0", "--dsn", "postgresql://root@127.0.0.1:1/nowhere"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "cannot read pgq's state" in r.stderr
