"""`pgq doctor` (Inspector.doctor): a clean database is ok; a long REPEATABLE READ
transaction is named by pid (R15 phase B detection); a session squatting on a
queue's aggregation leadership key is named by pid and application_name (S4),
and a real server's leadership is not; pgq_reader gets findings, not errors;
the CLI's exit codes, --json, and no password in its output (S5)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from typer.testing import CliRunner

import pgq
from pgq import _sql
from pgq.cli import app
from pgq.services.aggregator import leader_namespace
from tests.fixtures.util import wait_for

ROLES_SQL = Path(__file__).resolve().parents[2] / "sql" / "roles.sql"


def _findings(report: pgq.DoctorReport, check: str) -> list[pgq.Finding]:
    return [f for f in report.findings if f.check == check]


@pytest.fixture
def rogue(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A session of another application holding a REPEATABLE READ snapshot open."""
    c = psycopg.connect(make_conninfo(dsn, application_name="rogue-report"))
    c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    c.execute("SELECT count(*) FROM pgq.task").fetchone()  # takes the snapshot: backend_xmin is set
    yield c
    c.close()


def test_clean_database_is_ok(dsn: str) -> None:
    with pgq.Inspector(dsn) as insp:
        report = insp.doctor()
    assert report.level == "ok", [f.message for f in report.problems]
    assert report.problems == ()
    checks = {f.check for f in report.findings}
    assert {
        "privileges",
        "notify_queue",
        "long_transaction",
        "pgq_idle_in_transaction",
        "replication_slot",
        "prepared_transaction",
        "leader_key",
        "task_table",
    } <= checks
    (table,) = _findings(report, "task_table")
    assert table.values["frozenxid_age"] >= 0 and table.values["total_bytes"] > 0
    (usage,) = _findings(report, "notify_queue")
    assert 0 <= usage.values["usage"] < 0.5


def test_long_repeatable_read_transaction_is_named(dsn: str, rogue: psycopg.Connection[Any]) -> None:
    pid = rogue.info.backend_pid
    with pgq.Inspector(dsn) as insp:
        # R15 phase B: the threshold is injected (60 s by default), so no waiting.
        report = insp.doctor(long_transaction=timedelta(0))
        assert report.level == "warn"
        (mine,) = [f for f in _findings(report, "long_transaction") if f.values.get("pid") == pid]
        assert mine.level == "warn"
        assert f"pid {pid}" in mine.message and "rogue-report" in mine.message
        assert "idle in transaction" in mine.message
        assert mine.values["xmin_age"] is not None  # REPEATABLE READ keeps its snapshot's xmin
        # Above the threshold it is not reported, and the database is ok again.
        calm = insp.doctor(long_transaction=3600)
        assert not [f for f in calm.findings if f.values.get("pid") == pid and f.level != "ok"]
        rogue.rollback()
        after = insp.doctor(long_transaction=timedelta(0))
        assert not [f for f in after.findings if f.values.get("pid") == pid]


def test_pgq_session_idle_in_transaction_warns(dsn: str) -> None:
    with pgq.db.connect(dsn, "worker", autocommit=False) as c, pgq.Inspector(dsn) as insp:
        c.execute("SELECT 1")
        pid = c.info.backend_pid
        report = insp.doctor(pgq_idle_in_transaction=0)
        (f,) = _findings(report, "pgq_idle_in_transaction")
        assert f.level == "warn" and f"pid {pid}" in f.message and "pgq:worker:" in f.message


def test_squatter_on_the_leader_key_is_named(dsn: str) -> None:
    with pgq.Client(dsn) as client:
        client.enqueue(pgq.Task("t"), queue="agg")  # the queue exists: its key is known
    squat = psycopg.connect(make_conninfo(dsn, application_name="squatter-app"), autocommit=True)
    try:
        # Take the key exactly as a leader does: the aggregator's own query and namespace.
        won = squat.execute(
            _sql.query("group_leader_elect"), {"queues": ["agg"], "ns": leader_namespace("pgq")}
        ).fetchall()
        assert won == [("agg",)]
        with pgq.Inspector(dsn) as insp:
            report = insp.doctor()
        assert report.level == "warn"
        (f,) = _findings(report, "leader_key")
        assert f.level == "warn"
        assert f"pid {squat.info.backend_pid}" in f.message and "squatter-app" in f.message
        assert "'agg'" in f.message
        assert f.values["application_name"] == "squatter-app" and not f.values["servers"]
    finally:
        squat.close()


@pytest.mark.slow
def test_a_servers_own_leadership_is_ok(dsn: str) -> None:
    server = pgq.Server(
        dsn, queues={"agg": 1}, group_aggregator=lambda group, tasks: pgq.Task("batch"), poll_interval=0.2
    )
    server.start(pgq.ServeMux())
    try:
        with pgq.Inspector(dsn) as insp:

            def led() -> pgq.Finding | None:
                fs = [f for f in _findings(insp.doctor(), "leader_key") if f.values.get("queue") == "agg"]
                return fs[0] if fs else None

            f = wait_for(led, timeout=20, what="the server to lead queue agg")
            assert f.level == "ok", f.message
            assert f.values["application_name"].startswith("pgq:leader:")
            assert f.values["servers"] and f.values["servers"][0] in f.message
    finally:
        server.shutdown()


def test_reader_role_degrades_to_findings(dsn: str, rogue: psycopg.Connection[Any]) -> None:
    role = f"doctor_reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(ROLES_SQL.read_text())
        admin.execute(f"CREATE ROLE {role} LOGIN IN ROLE pgq_reader")
    try:
        params = conninfo_to_dict(dsn)
        params["user"] = role
        with pgq.Inspector(make_conninfo("", **params)) as insp:
            report = insp.doctor(long_transaction=0)
        (priv,) = _findings(report, "privileges")
        assert priv.level == "warn" and "pg_monitor" in priv.message and role in priv.message
        # The rogue session of another role is hidden, so not named, but nothing crashed and
        # the checks that need no privilege ran.
        assert {"notify_queue", "leader_key", "task_table"} <= {
            f.check for f in report.findings if f.level == "ok"
        }
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP ROLE IF EXISTS {role}")


def test_cli_exit_codes_json_and_no_password(dsn: str, rogue: psycopg.Connection[Any]) -> None:
    secret = "Sw0rdf1sh-" + uuid.uuid4().hex[:8]
    params = conninfo_to_dict(dsn)
    params["password"] = secret  # trust auth ignores it; it must never be printed
    with_pw = make_conninfo("", **params)
    runner = CliRunner()

    ok = runner.invoke(app, ["doctor", "--dsn", with_pw])
    assert ok.exit_code == 0, ok.output
    assert "doctor: ok" in ok.output

    warn = runner.invoke(app, ["doctor", "--dsn", with_pw, "--long-transaction", "0"])
    assert warn.exit_code == 1, warn.output
    assert f"pid {rogue.info.backend_pid}" in warn.output.replace("\n", " ")

    js = runner.invoke(app, ["doctor", "--dsn", with_pw, "--long-transaction", "0", "--json"])
    assert js.exit_code == 1
    doc = json.loads(js.output)
    assert doc["level"] == "warn"
    assert any(
        f["check"] == "long_transaction" and f["values"]["pid"] == rogue.info.backend_pid
        for f in doc["findings"]
    )

    # critical: a schema without pgq.task (pgq not migrated there).
    crit = runner.invoke(app, ["doctor", "--dsn", with_pw, "--schema", "nosuchschema"])
    assert crit.exit_code == 2, crit.output

    # An unreachable server: the error names the DSN without its password.
    params["port"] = "1"
    down = runner.invoke(app, ["doctor", "--dsn", make_conninfo("", **params)])
    assert down.exit_code == 1
    for out in (ok.output, warn.output, js.output, crit.output, down.output):
        assert secret not in out
    assert "***" in down.output
