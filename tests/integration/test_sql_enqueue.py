"""pgq.enqueue(): enqueue from SQL and from triggers, with clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest

import pgq


def rows(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return conn.execute("SELECT * FROM pgq.task ORDER BY id").fetchall()


def test_enqueue_from_sql(conn: psycopg.Connection[Any]) -> None:
    r = conn.execute("SELECT pgq.enqueue('notifications', 'email:deliver', '{\"user_id\": 42}'::jsonb) AS id")
    tid = r.fetchone()["id"]  # type: ignore[index]
    assert tid.isdigit()
    (row,) = rows(conn)
    assert row["id"] == int(tid) and row["state"] == "pending" and row["queue"] == "notifications"
    assert row["type"] == "email:deliver" and row["payload"] == {"user_id": 42} and row["max_retry"] == 25
    assert row["run_at"] == row["enqueued_at"]
    assert conn.execute("SELECT name FROM pgq.queue").fetchall() == [{"name": "notifications"}]


def test_every_argument(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        """SELECT pgq.enqueue('q', 't', '[1]', group_key => 'g', max_retry => 3, headers => '{"h": "v"}',
                              task_id => 'sql-1', timeout => '30 s', deadline => now() + interval '1 day',
                              retention => '1 hour')"""
    )
    conn.execute("SELECT pgq.enqueue('q', 't', process_in => '5 minutes', group_key => 'g')")
    conn.execute("SELECT pgq.enqueue('q', 't', process_at => now() - interval '1 hour', group_key => 'g')")
    conn.execute("SELECT pgq.enqueue('q', 't', process_at => now() + interval '1 hour')")
    conn.execute("SELECT pgq.enqueue('q', 't')")
    r = rows(conn)
    assert [x["state"] for x in r] == ["aggregating", "scheduled", "aggregating", "scheduled", "pending"]
    first = r[0]
    assert first["task_id"] == "sql-1" and first["group_key"] == "g" and first["max_retry"] == 3
    assert first["headers"] == {"h": "v"} and first["timeout"] == timedelta(seconds=30)
    assert first["retention"] == timedelta(hours=1) and first["payload"] == [1]
    assert r[1]["run_at"] - r[1]["enqueued_at"] == timedelta(minutes=5) and r[1]["group_key"] == "g"
    assert r[4]["payload"] is None
    assert conn.execute("SELECT sum(size)::int AS n FROM pgq.group_arrival").fetchone() == {"n": 2}


def test_same_rows_as_the_client(dsn: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT pgq.enqueue('q', 't', '{\"a\": 1}', group_key => 'g', max_retry => 4)")
    with pgq.Client(dsn) as client:
        client.enqueue(pgq.Task("t", {"a": 1}), queue="q", group="g", max_retry=4)
    a, b = rows(conn)
    skip = {"id", "enqueued_at", "run_at"}
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


@pytest.fixture
def orders(conn: psycopg.Connection[Any]) -> Iterator[None]:
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, email text NOT NULL)")
    conn.execute(
        """CREATE FUNCTION orders_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               PERFORM pgq.enqueue('emails', 'order:confirm',
                                   jsonb_build_object('order', NEW.id, 'email', NEW.email),
                                   group_key => NEW.email);
               RETURN NEW;
           END $$"""
    )
    conn.execute(
        "CREATE TRIGGER orders_enqueue AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION orders_enqueue()"
    )
    yield


def test_enqueue_from_a_trigger(dsn: str, conn: psycopg.Connection[Any], orders: None) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgq_wake")
        with psycopg.connect(dsn) as tx:
            tx.execute("INSERT INTO orders VALUES (1, 'a@x'), (2, 'a@x'), (3, 'b@x')")
            tx.rollback()
            assert rows(conn) == []
            tx.execute("INSERT INTO orders VALUES (1, 'a@x'), (2, 'a@x'), (3, 'b@x')")
            tx.commit()
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == ["emails"]
    r = rows(conn)
    assert [(x["state"], x["group_key"], x["payload"]["order"]) for x in r] == [
        ("aggregating", "a@x", 1),
        ("aggregating", "a@x", 2),
        ("aggregating", "b@x", 3),
    ]


def test_trigger_error_aborts_the_users_insert(conn: psycopg.Connection[Any], orders: None) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="group must not be blank"):
        conn.execute("INSERT INTO orders VALUES (1, ' ')")
    assert conn.execute("SELECT count(*) AS n FROM orders").fetchone() == {"n": 0}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("pgq.enqueue('', 't')", "queue must not be blank"),
        ("pgq.enqueue(NULL, 't')", "queue must not be blank"),
        ("pgq.enqueue('q', '  ')", "type must not be blank"),
        ("pgq.enqueue('q', 't', group_key => '')", "group must not be blank"),
        ("pgq.enqueue(repeat('q', 256), 't')", "limited to 255 characters"),
        ("pgq.enqueue('q', 't', max_retry => -1)", "max_retry must be >= 0"),
        (
            "pgq.enqueue('q', 't', process_in => '1 s', process_at => now())",
            "give process_in or process_at, not both",
        ),
        ("pgq.enqueue('q', 't', task_id => '123')", "must not be all digits"),
        ("pgq.enqueue('q', 't', task_id => ' ')", "task_id must not be blank"),
        ("pgq.enqueue('q', 't', process_in => '-1 s')", "process_in must not be negative"),
        ("pgq.enqueue('q', 't', timeout => '0 s')", "timeout must be positive"),
        ("pgq.enqueue('q', 't', retention => '-1 s')", "retention must not be negative"),
    ],
)
def test_errors_are_clear(conn: psycopg.Connection[Any], call: str, message: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
        conn.execute(f"SELECT {call}")
    assert rows(conn) == []


def test_task_id_conflict_is_clear(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT pgq.enqueue('q', 't', task_id => 'k')")
    with pytest.raises(psycopg.errors.UniqueViolation, match="task_id 'k' already exists in queue 'q'") as ei:
        conn.execute("SELECT pgq.enqueue('q', 't', task_id => 'k')")
    assert ei.value.diag.constraint_name == "task_task_id_idx"
    conn.execute("SELECT pgq.enqueue('other', 't', task_id => 'k')")
    assert len(rows(conn)) == 2


def test_bad_payload_is_refused_by_postgres(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.UntranslatableCharacter):
        conn.execute("SELECT pgq.enqueue('q', 't', '\"\\u0000\"'::jsonb)")
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        conn.execute("SELECT pgq.enqueue('q', 't', 'NaN'::jsonb)")
