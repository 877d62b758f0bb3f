"""`pgq migrate`: idempotent, safe when run concurrently, and equal to sql/schema.sql."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import pgq
import pgq.migrate
from pgq import _sql


def pgq_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgq", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PGQ_DSN": ""},
    )


def versions(dsn: str, schema: str = "pgq") -> list[int]:
    with psycopg.connect(dsn) as c:
        return [r[0] for r in c.execute(f"SELECT version FROM {schema}.migration ORDER BY version")]  # noqa: S608


def test_cli_migrate_is_idempotent(empty_db: str) -> None:
    first = pgq_cli("migrate", "--dsn", empty_db)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_initial" in first.stdout
    second = pgq_cli("migrate", "--dsn", empty_db)
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout and "applied" not in second.stdout
    third = pgq_cli("migrate", "--dsn", empty_db, "--json")
    assert json.loads(third.stdout) == {"applied": []}
    status = pgq_cli("migrate", "--dsn", empty_db, "--status", "--json")
    st = json.loads(status.stdout)
    assert st["pending"] == [] and st["applied"] == [m.version for m in pgq.migrate.available()]
    assert versions(empty_db) == st["applied"]


def test_status_before_migrating(empty_db: str) -> None:
    assert pgq.migrate.status(empty_db) == {
        "applied": [],
        "pending": [m.version for m in pgq.migrate.available()],
    }


def test_concurrent_processes(empty_db: str) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pgq", "migrate", "--dsn", empty_db, "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    applied = sorted(len(json.loads(o[0])["applied"]) for o in outs)
    assert applied == [0, len(pgq.migrate.available())]  # one runner did the work, the other found it done
    assert versions(empty_db) == [m.version for m in pgq.migrate.available()]


def test_concurrent_threads(empty_db: str) -> None:
    results: list[Any] = []
    barrier = threading.Barrier(3)

    def work() -> None:
        barrier.wait(10)
        try:
            results.append(len(pgq.migrate.migrate(empty_db)))
        except Exception as exc:  # pragma: no cover - reported below
            results.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 0, len(pgq.migrate.available())]


def test_other_schema(empty_db: str) -> None:
    ran = pgq.migrate.migrate(empty_db, schema="jobs")
    assert [m.version for m in ran] == [m.version for m in pgq.migrate.available()]
    assert versions(empty_db, "jobs") == [m.version for m in ran]
    with psycopg.connect(empty_db, autocommit=True) as c:
        assert c.execute("SELECT to_regclass('pgq.task')").fetchone() == (None,)
        c.execute("LISTEN jobs_wake")
        with pgq.Client(empty_db, schema="jobs") as client:
            info = client.enqueue(pgq.Task("t", 1), group="g")
            client.enqueue(pgq.Task("t", 2))
        assert info.state == "aggregating"
        assert c.execute("SELECT count(*) FROM jobs.task").fetchone() == (2,)
        assert c.execute("SELECT jobs.enqueue('q', 't')").fetchone() is not None
        assert {n.payload for n in c.notifies(timeout=5, stop_after=1)} <= {"default", "q"}


def _pg_dump_for(dsn: str) -> str:
    """A pg_dump no older than the server (pg_dump refuses newer servers): the one on PATH,
    a Debian cluster's, or the embedded PostgreSQL's."""
    with psycopg.connect(dsn) as c:
        server_major = c.info.server_version // 10000
    candidates = [shutil.which("pg_dump"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_dump"))]
    with contextlib.suppress(Exception):
        from pgq import embedded

        candidates.append(str(embedded.bin_dir() / "pg_dump"))
    for exe in candidates:
        if not exe or not os.access(exe, os.X_OK):
            continue
        v = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"(\d+)(?:\.\d+)?", v)
        if m and int(m.group(1)) >= server_major:
            return exe
    pytest.skip(f"no pg_dump for PostgreSQL {server_major} on this machine")


def _dump(dsn: str) -> str:
    out = subprocess.run(
        [
            _pg_dump_for(dsn),
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--exclude-table=pgq.migration",
            "-d",
            dsn,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    lines = []
    for line in out.splitlines():
        if not line.strip() or line.startswith("--") or line.startswith("SET ") or line.startswith("\\"):
            continue
        if re.match(r"SELECT pg_catalog\.set_config", line):
            continue
        lines.append(line.rstrip())
    return "\n".join(lines)


def test_migrations_produce_schema_sql(server_dsn: str, empty_db: str) -> None:
    from tests.fixtures.db import dsn_for

    other = "pgq_s_" + os.urandom(6).hex()
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{other}"')
    try:
        from_schema = dsn_for(server_dsn, other)
        with psycopg.connect(from_schema, autocommit=True) as c:
            c.execute(_sql.script("schema.sql"))
            pgq.migrate.apply_views(c)  # `pgq migrate` (re)creates sql/views/ after the migrations
        pgq.migrate.migrate(empty_db)
        a, b = _dump(from_schema), _dump(empty_db)
        assert "CREATE TABLE pgq.task" in a and "CREATE FUNCTION pgq.enqueue" in a
        assert "pgq.migration" not in b
        assert a == b
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')


def test_migrated_database_works(empty_db: str) -> None:
    pgq.migrate.migrate(empty_db)
    with pgq.Client(empty_db) as client:
        assert client.enqueue(pgq.Task("t")).state == "pending"
    with psycopg.connect(empty_db, row_factory=dict_row) as c:
        assert c.execute("SELECT count(*) AS n FROM pgq.task").fetchone() == {"n": 1}


def test_upgrade_to_task_domains_keeps_rows_checks_and_view_privileges(
    empty_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0003 moves pgq.task's per-column CHECKs into domains on a table that holds tasks."""
    every = pgq.migrate.available()
    monkeypatch.setattr(pgq.migrate, "available", lambda: [m for m in every if m.version < 3])
    pgq.migrate.migrate(empty_db)
    rows_sql = "SELECT id, state, max_retry, retried, payload, group_key FROM pgq.task ORDER BY id"
    with psycopg.connect(empty_db, autocommit=True) as c:
        c.execute(
            "INSERT INTO pgq.task (queue, type, payload, state, group_key, max_retry, retried) VALUES"
            " ('q', 't', '{\"a\": 1}', 'pending', NULL, 3, 0),"
            " ('q', 't', '[1, 2]', 'aggregating', 'g', 25, 0),"
            " ('q', 't', 'null', 'archived', NULL, 2, 2)"
        )
        c.execute("GRANT SELECT ON pgq.queue_stats, pgq.task_history TO PUBLIC")
        c.execute("REVOKE ALL ON FUNCTION pgq.aggregate_of_member(text) FROM PUBLIC")  # as sql/roles.sql does
        before = c.execute(rows_sql).fetchall()
    monkeypatch.setattr(pgq.migrate, "available", lambda: every)
    assert [m.version for m in pgq.migrate.migrate(empty_db)] == [m.version for m in every if m.version >= 3]
    with psycopg.connect(empty_db, autocommit=True) as c:
        assert c.execute(rows_sql).fetchall() == before
        types = dict(
            c.execute(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
                " WHERE a.attrelid = 'pgq.task'::regclass AND a.attname IN ('state', 'max_retry', 'payload')"
            ).fetchall()
        )
        assert types == {"state": "pgq.task_state", "max_retry": "pgq.retry_count", "payload": "pgq.payload"}
        checks = c.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'pgq.task'::regclass AND contype = 'c'"
        ).fetchall()
        assert checks == [("task_group_check",)]
        # the views came back, with the privileges they had
        granted = c.execute(
            "SELECT c.relname FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a"
            " WHERE c.relnamespace = 'pgq'::regnamespace AND a.grantee = 0 AND a.privilege_type = 'SELECT'"
            " ORDER BY 1"
        ).fetchall()
        assert granted == [("queue_stats",), ("task_history",)]
        # the function 0003 dropped came back without the EXECUTE for PUBLIC a new one would have
        acl = c.execute(
            "SELECT proacl IS NOT NULL, (SELECT count(*) FROM aclexplode(proacl) a WHERE a.grantee = 0)"
            " FROM pg_proc WHERE oid = 'pgq.aggregate_of_member(text)'::regprocedure"
        ).fetchone()
        assert acl == (True, 0)
        assert c.execute("SELECT group_key, size FROM pgq.group_stats").fetchall() == [
            ("g", 1)
        ]  # a view over the altered columns reads the old rows
        # every check still holds, under the same constraint names
        bad = {
            "task_state_check": "INSERT INTO pgq.task (queue, type, payload, state)"
            " VALUES ('q', 't', '1', 'bogus')",
            "task_retry_check": "UPDATE pgq.task SET retried = -1 WHERE state = 'pending'",
            "task_group_check": "INSERT INTO pgq.task (queue, type, payload, state)"
            " VALUES ('q', 't', '1', 'aggregating')",
            "task_payload_size_check": "INSERT INTO pgq.task (queue, type, payload, state)"
            " SELECT 'q', 't', (SELECT jsonb_agg(md5(i::text)) FROM generate_series(1, 500000) i),"
            " 'pending'",  # ~20 MB of jsonb
        }
        for name, stmt in bad.items():
            with pytest.raises(psycopg.errors.CheckViolation) as exc:
                c.execute(stmt)
            assert exc.value.diag.constraint_name == name
    with pgq.Client(empty_db) as client:
        assert client.enqueue(pgq.Task("t", {"k": 1}), queue="q").state == "pending"
        assert [i.state for i in client.enqueue_many([pgq.Task("t", i) for i in range(100)], group="g")] == [
            "aggregating"
        ] * 100
