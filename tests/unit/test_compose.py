"""docker-compose.yml, checked without a Docker engine: the YAML parses into the
services the quick start names, every `pgq` command it runs exists with the
options it passes (`pgq <cmd> --help` as a subprocess), the files its inline
Dockerfile copies exist, and its worker module runs the aggregation tutorial
locally with the exact `pgq worker` command line."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from psycopg.conninfo import conninfo_to_dict

import pgq
from tests.fixtures.util import free_port

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
EXAMPLE = REPO / "examples" / "aggregation"


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@cache
def pgq_help(*words: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run(
        [sys.executable, "-m", "pgq", *words, "--help"], capture_output=True, text=True, env=env, timeout=120
    )


def pgq_commands() -> list[list[str]]:
    """The argv of every pgq command the compose file runs (entrypoint + command)."""
    out = []
    for svc in compose()["services"].values():
        entry = svc.get("entrypoint") or []
        cmd = svc.get("command") or []
        argv = [*entry, *cmd] if isinstance(entry, list) else [entry, *cmd]
        if argv and argv[0] == "pgq":
            out.append(argv)
    return out


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(subcommand words, --options) of a pgq argv."""
    words = []
    for w in argv[1:]:
        if w.startswith("-"):
            break
        words.append(w)
    # a leaf command takes arguments (e.g. worker MODULE:ATTR): keep the command words only
    while words and pgq_help(*words).returncode != 0:
        words.pop()
    cmd: list[str] = []
    for w in words:
        if cmd and "Commands" not in pgq_help(*cmd).stdout:
            break
        cmd.append(w)
    return cmd, [w.split("=", 1)[0] for w in argv if w.startswith("--")]


def test_compose_file_has_the_services_the_docs_name() -> None:
    data = compose()
    services = data["services"]
    assert {"postgres", "migrate", "worker", "metrics", "client", "pgq"} <= set(services)
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:")
    assert "pg_isready" in pg["healthcheck"]["test"]
    worker = services["worker"]
    assert worker["command"][:2] == ["pgq", "worker"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    metrics = services["metrics"]
    assert metrics["command"][:2] == ["pgq", "metrics"]
    port = metrics["command"][metrics["command"].index("--port") + 1]
    assert any(str(p).endswith(f":{port}:{port}") for p in metrics["ports"]), metrics["ports"]
    # every service reaching PostgreSQL uses the credentials the postgres service creates
    env = pg["environment"]
    for name, svc in services.items():
        dsn = (svc.get("environment") or {}).get("PGQ_DSN")
        if name == "postgres" or svc.get("image") != "pgq-local":
            continue
        assert dsn, f"service {name} has no PGQ_DSN"
        params = conninfo_to_dict(dsn)
        assert (params["user"], params["password"], params["dbname"], params["host"]) == (
            env["POSTGRES_USER"],
            env["POSTGRES_PASSWORD"],
            env["POSTGRES_DB"],
            "postgres",
        ), name


def test_inline_dockerfile_copies_files_that_exist() -> None:
    dockerfile = compose()["x-pgq"]["build"]["dockerfile_inline"]
    copies = re.findall(r"^COPY (.+) \S+$", dockerfile, re.M)
    assert copies
    for line in copies:
        for src in line.split():
            assert (REPO / src).exists(), f"the compose Dockerfile copies {src}, which does not exist"
    assert "pip install" in dockerfile


def test_every_pgq_command_exists_with_its_options() -> None:
    commands = pgq_commands()
    assert len(commands) >= 4, commands  # migrate, worker, metrics, the pgq tool
    for argv in commands:
        cmd, options = split(argv)
        res = pgq_help(*cmd)
        assert cmd and res.returncode == 0, f"{argv}: `pgq {' '.join(cmd)} --help` failed: {res.stderr}"
        for opt in options:
            assert opt in res.stdout, f"{argv}: `pgq {' '.join(cmd)}` has no option {opt}"


def test_the_check_can_fail() -> None:
    assert pgq_help("no-such-command").returncode != 0
    cmd, _ = split(["pgq", "worker", "mod:attr", "--no-such-option"])
    assert cmd == ["worker"] and "--no-such-option" not in pgq_help(*cmd).stdout


def test_client_service_runs_the_example_client() -> None:
    client = compose()["services"]["client"]
    assert client["entrypoint"] == ["python", "client.py"]
    res = subprocess.run(
        [sys.executable, "client.py", "--help"], cwd=EXAMPLE, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    for opt in [w for w in client["command"] if w.startswith("--")]:
        assert opt in res.stdout


def test_worker_service_runs_the_tutorial_locally(dsn: str, tmp_path: Path) -> None:
    """The worker's command line, its inline module and the example client, run here."""
    data = compose()
    worker = data["services"]["worker"]
    module = data["configs"]["tutorial_worker"]["content"]
    target = Path(worker["configs"][0]["target"])
    (tmp_path / target.name).write_text(module)
    argv = list(worker["command"])
    metrics_argv = list(data["services"]["metrics"]["command"])
    port = free_port()
    metrics_argv[metrics_argv.index("--port") + 1] = str(port)
    metrics_argv[metrics_argv.index("--addr") + 1] = "127.0.0.1"
    env = {
        **os.environ,
        **{k: str(v) for k, v in worker["environment"].items()},
        "PGQ_DSN": dsn,
        "GRACE_PERIOD": "0.5s",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(EXAMPLE), str(REPO)]),
    }
    # Both messages first (a client start takes longer than the grace period here),
    # then the worker: one group of two.
    for msg in ["hi", "there"]:
        res = subprocess.run(
            [sys.executable, "client.py", "--message", msg],
            cwd=EXAMPLE,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        assert "state=aggregating" in res.stdout
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgq", *argv[1:]],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    exporter = subprocess.Popen(
        [sys.executable, "-m", "pgq", *metrics_argv[1:]],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with pgq.Inspector(dsn) as insp:
            deadline = time.monotonic() + 60
            while insp.get_queue_info("tutorial").processed < 1:
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() < deadline, "the tutorial group was not handled within 60 s"
                time.sleep(0.1)
        body = ""
        while 'pgq_processed_total{queue="tutorial"} 1.0' not in body:
            assert exporter.poll() is None, "pgq metrics exited"
            assert time.monotonic() < deadline, f"no tutorial metrics within 60 s:\n{body}"
            with contextlib.suppress(OSError):
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            time.sleep(0.1)
    finally:
        exporter.send_signal(signal.SIGTERM)
        exporter.wait(timeout=30)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert "Aggregating 2 tasks from group example-group" in out, out
    assert "Handling aggregated task" in out and "hi\nthere" in out, out
