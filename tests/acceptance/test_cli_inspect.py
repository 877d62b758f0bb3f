"""The inspection CLI run as a user runs it: `pgq ...` in a subprocess, against a real PostgreSQL.

Each command is checked for its output (tables and --json) and its exit code:
0 ok, 1 not found / refused, 2 bad usage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgq

PGQ = Path(sys.executable).with_name("pgq")


def run(dsn: str | None, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "PGQ_DSN"}
    cmd = [str(PGQ), *args] if PGQ.exists() else [sys.executable, "-m", "pgq", *args]
    if dsn is not None:
        cmd += ["--dsn", dsn]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env={**base, **(env or {})}, check=False
    )


def ok(dsn: str, *args: str) -> str:
    r = run(dsn, *args)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def ok_json(dsn: str, *args: str) -> Any:
    return json.loads(ok(dsn, *args, "--json"))


def failed(dsn: str | None, *args: str, code: int = 1) -> str:
    r = run(dsn, *args)
    assert r.returncode == code, (args, r.returncode, r.stdout, r.stderr)
    return r.stderr


def failed_many(dsn: str, cases: list[tuple[str, ...]], code: int = 1) -> list[tuple[tuple[str, ...], str]]:
    """`failed` for commands that do not depend on each other, a few at a time: each
    spends most of its time starting an interpreter, and the machine has two cores."""
    with ThreadPoolExecutor(3) as pool:
        return list(zip(cases, pool.map(lambda a: failed(dsn, *a, code=code), cases), strict=True))


@pytest.fixture
def client(dsn: str) -> Iterator[pgq.Client]:
    with pgq.Client(dsn, notify_window=0) as c:
        yield c


def test_enqueue_and_inspect_a_task(dsn: str) -> None:
    out = ok(dsn, "enqueue", "email:send", '{"to": 42}', "--queue", "mail")
    assert "enqueued task" in out and "pending" in out
    info = ok_json(
        dsn, "enqueue", "email:send", '"hi"', "-q", "mail", "--process-in", "10s", "--max-retry", "3"
    )
    assert (info["state"], info["payload"], info["max_retry"]) == ("scheduled", "hi", 3)
    got = ok_json(dsn, "task", "inspect", "--queue", "mail", info["id"])
    assert (got["id"], got["type"], got["state"], got["queue"]) == (
        info["id"],
        "email:send",
        "scheduled",
        "mail",
    )
    table = ok(dsn, "task", "inspect", "--queue", "mail", info["id"])
    assert "email:send" in table and "scheduled" in table


def test_enqueue_options(dsn: str) -> None:
    g = ok_json(dsn, "enqueue", "digest", "1", "-q", "n", "--group", "user1")
    assert (g["state"], g["group"]) == ("aggregating", "user1")
    t = ok_json(
        dsn, "enqueue", "x", "-q", "n", "--task-id", "my-id", "--unique", "1h", "--timeout", "30s",
        "--retention", "1h", "-H", "trace=abc", "--process-at", "2099-01-01T00:00:00+00:00",
    )  # fmt: skip
    assert (t["id"], t["headers"], t["state"]) == ("my-id", {"trace": "abc"}, "scheduled")
    assert "unique lock" in failed(dsn, "enqueue", "x", "-q", "n", "--unique", "1h")
    assert "my-id" in failed(dsn, "enqueue", "y", "-q", "n", "--task-id", "my-id")


def test_enqueue_bad_arguments_exit_2(dsn: str) -> None:
    cases = {
        ("enqueue", "x", "{oops"): "not valid JSON",
        ("enqueue", "x", "--max-retry", "-1"): "max_retry",
        ("enqueue", "x", "--process-in", "soon"): "process_in",
        ("enqueue", "x", "--process-at", "2030-01-01T00:00:00"): "time zone",
        ("enqueue", "x", "-H", "novalue"): "KEY=VALUE",
        ("enqueue", "x", "--group", "  "): "group",
        ("enqueue",): "",  # no TYPE
    }
    for args, stderr in failed_many(dsn, list(cases), code=2):
        assert cases[args] in stderr, (args, stderr)


def test_stats_and_queue_commands(dsn: str, client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    assert "no queues yet" in ok(dsn, "stats")
    client.enqueue(pgq.Task("t"), queue="alpha")
    client.enqueue(pgq.Task("t"), queue="beta", group="g")
    conn.execute(
        "INSERT INTO pgq.stat_daily (queue, day, processed, failed) VALUES ('alpha', current_date, 5, 2)"
    )
    out = ok(dsn, "stats")
    assert "alpha" in out and "beta" in out and "servers: 0" in out
    stats = ok_json(dsn, "stats")
    by_queue = {q["queue"]: q for q in stats["queues"]}
    assert (by_queue["alpha"]["pending"], by_queue["alpha"]["processed"], by_queue["alpha"]["failed"]) == (
        1,
        5,
        2,
    )
    assert (by_queue["beta"]["aggregating"], by_queue["beta"]["groups"]) == (1, 1)
    assert isinstance(by_queue["alpha"]["latency"], float)
    assert [q["queue"] for q in ok_json(dsn, "queue", "ls")] == ["alpha", "beta"]
    assert "alpha" in ok(dsn, "queue", "ls")
    info = ok_json(dsn, "queue", "inspect", "alpha")
    assert (info["queue"], info["size"], info["paused"]) == ("alpha", 1, False)
    assert "processed total" in ok(dsn, "queue", "inspect", "alpha")
    hist = ok_json(dsn, "queue", "history", "alpha", "--days", "3")
    assert [(h["processed"], h["failed"]) for h in hist] == [(5, 2), (0, 0), (0, 0)]
    assert "40.0%" in ok(dsn, "queue", "history", "alpha")
    assert "paused" in ok(dsn, "queue", "pause", "alpha")
    assert ok_json(dsn, "queue", "inspect", "alpha")["paused"] is True
    ok(dsn, "queue", "unpause", "alpha")
    assert ok_json(dsn, "queue", "inspect", "alpha")["paused"] is False


def test_queue_remove(dsn: str, client: pgq.Client) -> None:
    client.enqueue(pgq.Task("t"), queue="q")
    assert "force" in failed(dsn, "queue", "remove", "q")
    assert ok_json(dsn, "queue", "remove", "q", "--force") == {"queue": "q", "deleted_tasks": 1}
    assert ok_json(dsn, "queue", "ls") == []


def test_unknown_queue_and_task_exit_1(dsn: str, client: pgq.Client) -> None:
    client.enqueue(pgq.Task("t"), queue="q")
    queue_cases = [
        ("queue", "inspect", "nope"),
        ("queue", "history", "nope"),
        ("queue", "pause", "nope"),
        ("queue", "unpause", "nope"),
        ("queue", "remove", "nope"),
        ("task", "ls", "-q", "nope", "-s", "pending"),
        ("task", "inspect", "-q", "nope", "1"),
        ("group", "ls", "-q", "nope"),
        ("task", "runall", "-q", "nope", "-s", "retry"),
    ]
    verbs = ("inspect", "run", "archive", "delete", "cancel")
    task_cases = [("task", verb, "-q", "q", "9999") for verb in verbs]
    for args, stderr in failed_many(dsn, queue_cases):
        assert "queue 'nope' does not exist" in stderr, args
    for args, stderr in failed_many(dsn, task_cases):
        assert "no task '9999'" in stderr, args


def test_bad_usage_exit_2(dsn: str) -> None:
    cases = {
        ("task", "ls", "-q", "q", "-s", "bogus"): "unknown state 'bogus'",
        ("task", "ls", "-q", "q"): "--state is required",
        ("task", "runall", "-q", "q", "-s", "pending"): "does not apply to pending",
        ("task", "deleteall", "-q", "q", "-s", "active"): "does not apply to active",
        ("task", "ls", "-q", "q", "-s", "pending", "-g", "g"): "--group applies to aggregating",
        ("task", "ls", "-s", "pending"): "",  # --queue missing
        ("task", "ls", "-q", "q", "-s", "pending", "--page", "0"): "",
        ("task", "inspect", "-q", "q"): "",  # no id
        ("queue", "frobnicate"): "",
        ("stats", "--no-such-option"): "",
    }
    for args, stderr in failed_many(dsn, list(cases), code=2):
        assert cases[args] in stderr, (args, stderr)
    assert "invalid DSN" in failed("not a dsn ===", "stats", code=2)


def test_task_ls_and_operations(dsn: str, client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    a = client.enqueue(pgq.Task("t", {"n": 1}), queue="q", process_in=3600)
    b = client.enqueue(pgq.Task("t", {"n": 2}), queue="q", process_in=3600)
    c = client.enqueue(pgq.Task("t", {"n": 3}), queue="q")
    listed = ok_json(dsn, "task", "ls", "-q", "q", "-s", "scheduled")
    assert [t["id"] for t in listed] == [a.id, b.id]
    assert [
        t["id"]
        for t in ok_json(dsn, "task", "ls", "-q", "q", "-s", "scheduled", "--page-size", "1", "--page", "2")
    ] == [b.id]
    out = ok(dsn, "task", "ls", "-q", "q", "-s", "scheduled")
    assert a.id in out and '{"n": 1}' in out
    assert "no tasks" in ok(dsn, "task", "ls", "-q", "q", "-s", "retry")
    assert "pending" in ok(dsn, "task", "run", "-q", "q", a.id)
    assert "is pending" in failed(dsn, "task", "run", "-q", "q", a.id)  # refused: already pending
    assert "archived" in ok(dsn, "task", "archive", "-q", "q", c.id)
    assert "deleted" in ok(dsn, "task", "delete", "-q", "q", b.id)
    assert "only active" in failed(dsn, "task", "cancel", "-q", "q", a.id)
    conn.execute("UPDATE pgq.task SET state = 'active', locked_by = 'w' WHERE id = %s", (int(a.id),))
    assert "cancel sent" in ok(dsn, "task", "cancel", "-q", "q", a.id)
    assert "is active" in failed(dsn, "task", "delete", "-q", "q", a.id)


def test_task_bulk_commands(dsn: str, client: pgq.Client) -> None:
    for i in range(3):
        client.enqueue(pgq.Task("t", i), queue="q", process_in=3600)
    assert ok_json(dsn, "task", "runall", "-q", "q", "-s", "scheduled") == {
        "queue": "q", "state": "scheduled", "group": None, "run": 3,
    }  # fmt: skip
    assert "3 pending task(s) in queue q archived" in ok(
        dsn, "task", "archiveall", "-q", "q", "-s", "pending"
    )
    assert ok_json(dsn, "task", "deleteall", "-q", "q", "-s", "archived")["delete"] == 3
    assert ok_json(dsn, "queue", "inspect", "q")["size"] == 0


def test_groups_and_members(dsn: str, client: pgq.Client) -> None:
    """The tutorial's view of waiting members (SPEC-aggregation: `pgq task ls`, `pgq group ls`)."""
    ids = [
        client.enqueue(pgq.Task("email", f"m{i}"), queue="tutorial", group="user1:email").id for i in range(3)
    ]
    client.enqueue(pgq.Task("email", "x"), queue="tutorial", group="user2:email")
    out = ok(dsn, "group", "ls", "--queue", "tutorial")
    assert "user1:email" in out and "user2:email" in out
    groups = {g["group"]: g for g in ok_json(dsn, "group", "ls", "--queue", "tutorial")}
    assert groups["user1:email"]["size"] == 3 and groups["user2:email"]["size"] == 1
    members = ok_json(
        dsn, "task", "ls", "--queue", "tutorial", "--state", "aggregating", "--group", "user1:email"
    )
    assert [m["id"] for m in members] == ids
    assert "user1:email" in ok(dsn, "task", "ls", "--queue", "tutorial", "--state", "aggregating")
    assert ok_json(dsn, "task", "ls", "-q", "tutorial", "-g", "unknown") == []
    ok(dsn, "task", "run", "-q", "tutorial", ids[0])
    assert ok_json(dsn, "task", "inspect", "-q", "tutorial", ids[0])["state"] == "pending"
    assert ok_json(dsn, "task", "archiveall", "-q", "tutorial", "-g", "user1:email")["archive"] == 2
    assert (
        ok_json(dsn, "task", "deleteall", "-q", "tutorial", "-s", "aggregating", "-g", "user2:email")[
            "delete"
        ]
        == 1
    )
    assert "no groups waiting" in ok(dsn, "group", "ls", "-q", "tutorial")


def test_server_ls(dsn: str, client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    assert "no servers" in ok(dsn, "server", "ls")
    conn.execute(
        "INSERT INTO pgq.server (id, host, pid, queues, concurrency) "
        "VALUES ('h:1:a', 'h', 1, '{\"q\": 1}', 4)"
    )
    t = client.enqueue(pgq.Task("job", 7), queue="q")
    conn.execute(
        "UPDATE pgq.task SET state = 'active', locked_by = 'h:1:a', started_at = now() WHERE id = %s",
        (int(t.id),),
    )
    out = ok(dsn, "server", "ls")
    assert "h:1:a" in out and "1/4" in out and "job" in out
    servers = ok_json(dsn, "server", "ls")
    assert servers[0]["id"] == "h:1:a"
    assert [w["task_id"] for w in servers[0]["active_workers"]] == [t.id]
    assert ok_json(dsn, "stats")["servers"][0]["concurrency"] == 4


def test_dsn_from_environment_and_unreachable_database(dsn: str, client: pgq.Client) -> None:
    client.enqueue(pgq.Task("t"), queue="envq")
    r = run(None, "queue", "ls", "--json", env={"PGQ_DSN": dsn})
    assert r.returncode == 0 and json.loads(r.stdout)[0]["queue"] == "envq"
    err = failed("postgresql://root@127.0.0.1:1/nowhere", "stats")
    assert "cannot reach PostgreSQL" in err


def test_unmigrated_database_says_so(empty_db: str) -> None:
    assert "pgq migrate" in failed(empty_db, "stats")
