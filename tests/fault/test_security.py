"""S1 hostile names, S2 invalid payloads on the caller's open transaction, S3
privilege separation (sql/roles.sql, docs/security.md)."""

from __future__ import annotations

import hashlib
import math
import random
import subprocess
import time
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgq
from pgq import _sql
from pgq.task import MAX_PAYLOAD_BYTES
from tests.fault.chaos import SEED, report, size
from tests.fault.cluster import PG_BIN, PG_USER, Cluster
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.fault

ROLES_SQL = Path(__file__).resolve().parents[2] / "sql" / "roles.sql"

HOSTILE = [
    "'",
    '"',
    "'; DROP TABLE pgq.task; --",
    '"; DROP SCHEMA pgq CASCADE; --',
    ";--",
    "%s",
    "%(x)s",
    "%%",
    "{}",
    "{0}",
    "$$",
    "$1",
    "$fn$ END $fn$",
    "\\",
    "\\x00",
    "\x00",
    "a\x00b",
    "\u202eevil\u202c",
    "שלום",
    "مرحبا",
    "👩‍👩‍👧‍👦",
    "e\u0301",
    "\u200b",
    "line\nbreak",
    "tab\t",
    " leading",
    "pgq_wake",
    "x" * 255,
    "x" * 256,
    "é" * 255,
    "y" * 10_000,
    "\ud800",
    "",
    "   ",
    "1",
    "NULL",
]


def _fuzz(rng: random.Random, n: int) -> list[str]:
    alphabet = [*list("';\"%()s{}$\\-_ ./:aZ9\n\t"), "\u202e", "é", "👍", "\u200b"]
    out = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))) for _ in range(n)]
    # a few with NUL or a lone surrogate somewhere
    return [s if rng.random() > 0.05 else s + rng.choice(["\x00", "\ud800"]) for s in out]


def _schema_hash(cluster: Cluster, dsn: str) -> str:
    db = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    out = subprocess.run(
        [
            str(PG_BIN / "pg_dump"),
            "--schema-only",
            "-h",
            "127.0.0.1",
            "-p",
            str(cluster.port),
            "-U",
            PG_USER,
            db,
        ],
        check=True,
        capture_output=True,
    ).stdout
    # \restrict / \unrestrict carry a random key per dump (pg_dump >= 15.14): not schema
    lines = [ln for ln in out.splitlines() if not ln.startswith((b"\\restrict", b"\\unrestrict"))]
    return hashlib.sha256(b"\n".join(lines)).hexdigest()


def test_s1_hostile_names(cluster: Cluster, fdb: str) -> None:
    before = _schema_hash(cluster, fdb)
    rng = random.Random(SEED)
    names = HOSTILE + _fuzz(rng, size(300, 5_000))
    stats = {
        "accepted": 0,
        "invalid_name": 0,
        "mismatch": 0,
        "other_errors": 0,
        "sql_accepted": 0,
        "sql_rejected": 0,
    }
    others: list[str] = []
    with pgq.Client(fdb) as client, psycopg.connect(fdb, autocommit=True) as c:
        insp = pgq.Inspector(fdb)
        try:
            for i, name in enumerate(names):
                role = ("queue", "group", "type")[i % 3]
                queue = name if role == "queue" else "q"
                group = name if role == "group" else None
                typ = name if role == "type" else "t"
                try:
                    info = client.enqueue(pgq.Task(typ, {"n": i}), queue=queue, group=group)
                except pgq.InvalidName:
                    stats["invalid_name"] += 1
                except Exception as exc:
                    stats["other_errors"] += 1
                    others.append(f"{role} {name[:40]!r}: {exc!r}"[:200])
                else:
                    stats["accepted"] += 1
                    got = insp.get_task_info(queue, info.id)
                    if (got.queue, got.type, got.group, got.payload) != (queue, typ, group, {"n": i}):
                        stats["mismatch"] += 1
                # The SQL function: the same name as a bound value.
                try:
                    row = c.execute(
                        "SELECT pgq.enqueue(%s, %s, '{}'::jsonb, %s)", (queue, typ, group)
                    ).fetchone()
                    assert row is not None
                    got_row = c.execute(
                        "SELECT queue, type, group_key FROM pgq.task WHERE id = %s::bigint", (row[0],)
                    ).fetchone()
                    stats["sql_accepted"] += 1
                    if got_row != (queue, typ, group):
                        stats["mismatch"] += 1
                except (psycopg.errors.InvalidParameterValue, psycopg.DataError, UnicodeEncodeError):
                    stats["sql_rejected"] += 1
        finally:
            insp.close()
    # Hostile schema names fail before any SQL runs.
    schema_errors = 0
    for bad in ["pgq; DROP TABLE x", 'pgq"', "PGQ", "pg q", "1pgq", "pgq\x00", "x" * 64, "%s"]:
        try:
            pgq.Client(fdb, schema=bad)
        except pgq.ConfigError:
            schema_errors += 1
        with pytest.raises(pgq.ConfigError):
            _sql.check_schema(bad)
    after = _schema_hash(cluster, fdb)
    line = report(
        "S1",
        examples=len(names),
        **stats,
        hostile_schemas_refused=schema_errors,
        schema_hash_equal=before == after,
        other_error_samples=others[:5],
    )
    assert line["mismatch"] == 0 and line["other_errors"] == 0, others[:10]
    assert line["schema_hash_equal"]
    assert schema_errors == 8
    assert stats["accepted"] > len(HOSTILE) // 2


def test_s1_hostile_queue_names_are_served(fdb: str) -> None:
    """Claims and wake-ups work for hostile queue names (they travel as values and NOTIFY payloads)."""
    queues = ["'; DROP TABLE pgq.task; --", "%(x)s", "{}", "\u202eevil", "é" * 255]
    done: list[str] = []
    server = pgq.Server(fdb, queues={q: 1 for q in queues}, poll_interval=30, concurrency=4)
    mux = pgq.ServeMux()
    mux.handle("t", lambda task: done.append(task.queue))
    server.start(mux)
    try:
        with pgq.Client(fdb) as client:
            for q in queues:
                client.enqueue(pgq.Task("t", {}), queue=q)
        wait_for(lambda: sorted(done) == sorted(queues), 10, "every hostile queue served (by NOTIFY)")
    finally:
        server.shutdown()
    report("S1-serve", queues=len(queues), served=len(done))


class _Obj:
    pass


INVALID = [
    ("nan", float("nan")),
    ("inf", math.inf),
    ("-inf", {"x": -math.inf}),
    ("NUL string", "\u0000"),
    ("NUL in key", {"a\x00": 1}),
    ("lone surrogate", "\ud800"),
    ("datetime", datetime(2024, 1, 1)),
    ("Decimal", Decimal("1.5")),
    ("bytes", b"abc"),
    ("set", {1, 2}),
    ("object", _Obj()),
    ("int key", {1: "x"}),
    ("tuple key", {("a",): 1}),
    ("5000-deep", None),  # built below
    ("limit + 1", None),
    ("64 MiB", None),
]


def _deep(n: int) -> Any:
    v: Any = 1
    for _ in range(n):
        v = [v]
    return v


def _blob(nbytes: int) -> str:
    """A JSON string payload of exactly `nbytes` bytes of JSON text (incompressible)."""
    return random.Random(1).randbytes((nbytes - 2) // 2 + 1).hex()[: nbytes - 2]


def test_s2_invalid_payloads_leave_the_callers_transaction_usable(fdb: str) -> None:
    cases = list(INVALID)
    cases[cases.index(("5000-deep", None))] = ("5000-deep", _deep(5000))
    cases[cases.index(("limit + 1", None))] = ("limit + 1", _blob(MAX_PAYLOAD_BYTES + 1))
    cases[cases.index(("64 MiB", None))] = ("64 MiB", _blob(64 * 1024 * 1024))
    valid = [
        ("empty string", ""),
        ("null", None),
        ("1 KiB", _blob(1024)),
        ("limit / 2", _blob(MAX_PAYLOAD_BYTES // 2)),
    ]
    # jsonb is a little larger than JSON text: at the very limit the table's CHECK may refuse
    # it; then it must be PayloadTooLargeError with the caller's transaction intact.
    edge = ("limit - 1", _blob(MAX_PAYLOAD_BYTES - 1))
    aborted: list[str] = []
    unclear: list[str] = []
    with pgq.Client(fdb) as client, psycopg.connect(fdb) as conn:  # NOT autocommit: the caller's transaction
        conn.execute("INSERT INTO chaos.exec_log (task_pk, type, pid) VALUES (-1, 'caller-row', 0)")
        for what, payload in cases:
            try:
                client.enqueue(pgq.Task("t", payload), conn=conn)
            except pgq.EnqueueError as exc:
                if not str(exc):
                    unclear.append(what)
            except Exception as exc:
                unclear.append(f"{what}: {exc!r}"[:120])
            else:
                unclear.append(f"{what}: accepted")
            try:
                conn.execute("SELECT 1")
            except psycopg.Error:
                aborted.append(what)
                conn.rollback()
                conn.execute("INSERT INTO chaos.exec_log (task_pk, type, pid) VALUES (-1, 'caller-row', 0)")
        ok_ids: list[str] = []
        for what, payload in valid:
            try:
                ok_ids.append(client.enqueue(pgq.Task("ok", payload), conn=conn).id)
            except pgq.EnqueueError as exc:
                unclear.append(f"valid {what} refused: {exc}"[:160])
            try:
                conn.execute("SELECT 1")
            except psycopg.Error:
                aborted.append(f"valid {what}")
                conn.rollback()
        try:
            client.enqueue(pgq.Task("edge", edge[1]), conn=conn)
            edge_outcome = "accepted"
        except pgq.PayloadTooLargeError:
            edge_outcome = "PayloadTooLargeError"
        try:
            conn.execute("SELECT 1")
        except psycopg.Error:
            aborted.append("limit")
            conn.rollback()
        conn.commit()
    with psycopg.connect(fdb, autocommit=True) as c:
        caller_rows = c.execute("SELECT count(*) FROM chaos.exec_log WHERE type = 'caller-row'").fetchone()
        rows = c.execute("SELECT type, count(*) FROM pgq.task GROUP BY 1").fetchall()
    line = report(
        "S2",
        invalid_cases=len(cases),
        aborted_caller_tx=len(aborted),
        aborted=aborted,
        unclear=unclear,
        rows_from_invalid=dict(rows).get("t", 0),
        valid_committed=dict(rows).get("ok", 0),
        caller_rows=caller_rows[0] if caller_rows else 0,
        exact_limit=edge_outcome,
    )
    assert aborted == [] and unclear == []
    assert line["rows_from_invalid"] == 0
    assert line["valid_committed"] == len(valid) and line["caller_rows"] == 1


# S3 ------------------------------------------------------------------------------------------

#: (operation, SQL) tried by each role; True where the role may do it (docs/security.md).
OPS: list[tuple[str, str]] = [
    ("enqueue via pgq.enqueue", "SELECT pgq.enqueue('q', 't', '{\"a\": 1}')"),
    (
        "insert into pgq.task",
        "INSERT INTO pgq.task (queue, type, payload, state) VALUES ('q', 't', '{}', 'pending')",
    ),
    ("select payload", "SELECT payload FROM pgq.task LIMIT 1"),
    ("update state", "UPDATE pgq.task SET state = 'completed'"),
    ("delete", "DELETE FROM pgq.task"),
    ("truncate", "TRUNCATE pgq.task"),
    ("alter table", "ALTER TABLE pgq.task ADD COLUMN x int"),
    ("create in schema", "CREATE TABLE pgq.evil (x int)"),
    ("read stat_daily table", "SELECT * FROM pgq.stat_daily"),
    ("call queue_counts", "SELECT * FROM pgq.queue_counts('q')"),
    ("read view queue_stats", "SELECT * FROM pgq.queue_stats"),
    ("read view task_history", "SELECT * FROM pgq.task_history"),
    ("read view group_stats", "SELECT * FROM pgq.group_stats"),
    ("read view group_backlog", "SELECT * FROM pgq.group_backlog"),
    ("read view aggregation_lineage", "SELECT * FROM pgq.aggregation_lineage"),
    ("read view server_activity", "SELECT * FROM pgq.server_activity"),
    ("read view worker_activity", "SELECT * FROM pgq.worker_activity"),
    ("advisory unlock all", "SELECT pg_advisory_unlock_all()"),
]
ALLOWED = {
    "pgq_producer": {"enqueue via pgq.enqueue", "advisory unlock all"},
    "pgq_reader": {op for op, _ in OPS if op.startswith("read view")}
    | {"advisory unlock all", "call queue_counts"},
    "nobody": {"advisory unlock all"},
}


def test_s3_privilege_separation(fdb: str) -> None:
    with psycopg.connect(fdb, autocommit=True) as c:
        c.execute(ROLES_SQL.read_text())  # type: ignore[arg-type]
        c.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'nobody') "
            "THEN CREATE ROLE nobody; END IF; END $$"
        )
        c.execute("SELECT pgq.enqueue('q', 't', '{}')")
    mismatches: list[str] = []
    for role, allowed in ALLOWED.items():
        for op, q in OPS:
            with psycopg.connect(fdb) as c:
                c.execute(f"SET ROLE {role}")  # type: ignore[arg-type]
                try:
                    c.execute(q)  # type: ignore[arg-type]
                    ok = True
                except psycopg.errors.InsufficientPrivilege:
                    ok = False
                c.rollback()
            if ok != (op in allowed):
                mismatches.append(f"{role}: {op}: {'allowed' if ok else 'denied'}")
    # search_path hijack: objects in public shadowing what pgq.enqueue calls.
    hijacks = 0
    with psycopg.connect(fdb, autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS public.hijack_log (what text)")
        c.execute("GRANT INSERT ON public.hijack_log TO PUBLIC")
        for fn, ret in (
            ("now", "timestamptz"),
            ("statement_timestamp", "timestamptz"),
            ("btrim", "text"),
            ("gen_random_uuid", "uuid"),
        ):
            args = "a text" if fn == "btrim" else ""
            c.execute(
                f"CREATE OR REPLACE FUNCTION public.{fn}({args}) RETURNS {ret} LANGUAGE plpgsql AS "  # type: ignore[arg-type]  # noqa: S608
                f"$$ BEGIN INSERT INTO public.hijack_log VALUES ('{fn}'); RETURN NULL; END $$"
            )
        c.execute("CREATE TABLE IF NOT EXISTS public.task (id int)")
        c.execute("ALTER ROLE pgq_producer SET search_path = public, pg_catalog, pgq")
        with psycopg.connect(fdb) as p:
            p.execute("SET ROLE pgq_producer")
            p.execute("SET search_path = public, pg_catalog, pgq")
            p.execute("SELECT pgq.enqueue('q2', 't', '{}', 'g')")
            p.commit()
        row = c.execute("SELECT count(*) FROM public.hijack_log").fetchone()
        hijacks = row[0] if row else 0
        definer = c.execute(
            "SELECT p.proname, p.proconfig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'pgq' AND p.prosecdef"
        ).fetchall()
        public_rights = c.execute("SELECT has_schema_privilege('public', 'pgq', 'USAGE')").fetchone()
    unpinned = [name for name, cfg in definer if not any(s.startswith("search_path=") for s in (cfg or []))]
    line = report(
        "S3",
        roles=len(ALLOWED),
        operations=len(OPS),
        mismatches=len(mismatches),
        mismatch_list=mismatches,
        hijacks=hijacks,
        security_definer_functions=[d[0] for d in definer],
        unpinned_search_path=unpinned,
        public_usage_on_schema=bool(public_rights and public_rights[0]),
    )
    assert mismatches == []
    assert hijacks == 0 and unpinned == []
    assert "enqueue" in line["security_definer_functions"]
    assert not line["public_usage_on_schema"]


def _r17_names() -> dict[str, str]:
    """Queue/group names at the edges of PostgreSQL's 63-byte identifiers and pgq's limit."""
    from pgq.task import MAX_NAME_LENGTH

    return {
        "1": "q",
        "63": "a" * 63,
        "64": "b" * 64,
        "128": "c" * 128,
        "129": "d" * 129,
        "limit": "e" * MAX_NAME_LENGTH,
        "straddle": "f" * 62 + "é" + "f" * 10,  # a two-byte character across byte 63
        "twin-A": "t" * 63 + "A",  # identical in their first 63 bytes
        "twin-B": "t" * 63 + "B",
    }


def test_r17_names_at_the_limits(fdb: str) -> None:
    """Names round-trip exactly or are refused at the documented limit; wake-ups reach
    every accepted queue name (pickup well under the 30 s poll) with no cross-talk."""
    from pgq.task import MAX_NAME_LENGTH

    names = _r17_names()
    for too_long in ("x" * (MAX_NAME_LENGTH + 1), "x" * 1000):
        with pgq.Client(fdb) as client, pytest.raises(pgq.InvalidName, match="limit"):
            client.enqueue(pgq.Task("t"), queue=too_long)
        with pgq.Client(fdb) as client, pytest.raises(pgq.InvalidName, match="limit"):
            client.enqueue(pgq.Task("t"), queue="q", group=too_long)
    served = [n for k, n in names.items() if k != "twin-B"]  # twin-B: enqueued, never served
    seen: dict[str, list[float]] = {}
    mux = pgq.ServeMux()
    mux.handle("t", lambda task: seen.setdefault(task.queue, []).append(time.monotonic()))
    server = pgq.Server(fdb, queues={q: 1 for q in served}, poll_interval=30, concurrency=4)
    server.start(mux)
    mismatches: list[str] = []
    pickups: list[float] = []
    try:
        with pgq.Client(fdb, notify_window=0) as client, pgq.Inspector(fdb) as insp:
            # the first claim round has run: from now on only wake-ups claim (the poll is 30 s)
            wait_for(lambda: server.worker is not None and server.worker.polls >= 1, 20, "the first claim")
            twin_b = client.enqueue(pgq.Task("t", "B"), queue=names["twin-B"])
            for key, q in names.items():
                if key == "twin-B":
                    continue
                t0 = time.monotonic()
                info = client.enqueue(pgq.Task("t", key), queue=q)
                if info.queue != q:
                    mismatches.append(f"{key}: TaskInfo.queue")
                wait_for(lambda q=q: q in seen, 10, f"pickup of {key}")  # type: ignore[misc]
                pickups.append(seen[q][0] - t0)
                grouped = client.enqueue(pgq.Task("g"), queue=names["1"], group=q)
                groups = {g.group for g in insp.groups(names["1"])}
                if grouped.group != q or q not in groups:
                    mismatches.append(f"{key}: group name")
            if insp.get_task_info(names["twin-B"], twin_b.id).state != "pending":
                mismatches.append("twin-B was claimed by a server of twin-A only")
            if sorted(seen) != sorted(served) or any(len(v) != 1 for v in seen.values()):
                mismatches.append(f"served {sorted(len(k) for k in seen)}")
    finally:
        server.shutdown()
    report(
        "R17",
        names=len(names),
        mismatches=len(mismatches),
        mismatch_list=mismatches,
        pickup_ms_max=round(max(pickups) * 1000, 1),
        pickup_ms_p50=round(sorted(pickups)[len(pickups) // 2] * 1000, 1),
    )
    assert mismatches == []
    assert max(pickups) < 0.1, pickups  # woken by NOTIFY, not the 30 s poll
