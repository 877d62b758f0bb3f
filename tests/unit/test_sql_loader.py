"""The named-query loader: parsing, schema substitution, schema-name checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgq import _sql
from pgq.errors import ConfigError

SAMPLE = """\
-- A file comment before the first query is ignored.

-- name: task_get
-- returns: one
-- Fetch a task.
SELECT * FROM pgq.task WHERE id = %(id)s;

-- name: task_list
-- returns: many
SELECT id
FROM pgq.task
WHERE queue = %(queue)s   -- an inline comment stays
ORDER BY id;
"""


def test_parse_sample() -> None:
    q = _sql.parse(SAMPLE)
    assert list(q) == ["task_get", "task_list"]
    assert q["task_get"] == "SELECT * FROM pgq.task WHERE id = %(id)s"
    assert q["task_list"].startswith("SELECT id\nFROM pgq.task")
    assert q["task_list"].endswith("ORDER BY id")
    assert "-- an inline comment stays" in q["task_list"]
    assert "returns" not in q["task_list"]


def test_parse_empty_and_headerless() -> None:
    assert _sql.parse("") == {}
    assert _sql.parse("SELECT 1;") == {}


def test_schema_substitution() -> None:
    text = "SELECT pg_notify('pgq_wake', q) FROM pgq.task t JOIN pgq.queue USING (queue) -- mypgq.x"
    out = _sql.with_schema(text, "app_jobs")
    assert out == (
        "SELECT pg_notify('app_jobs_wake', q) FROM app_jobs.task t "
        "JOIN app_jobs.queue USING (queue) -- mypgq.x"
    )
    assert _sql.with_schema(text, "pgq") == text
    assert _sql.channel("app_jobs") == "app_jobs_wake"


@pytest.mark.parametrize(
    "schema",
    ["", "Pgq", "1pgq", "pgq-x", "pgq.x", 'pgq"; DROP TABLE x; --', "a" * 52, "pgq ", "päq", None, 5],
)
def test_bad_schema_names(schema: object) -> None:
    with pytest.raises(ConfigError, match="schema name"):
        _sql.check_schema(schema)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        _sql.with_schema("SELECT 1", schema)  # type: ignore[arg-type]
    if isinstance(schema, str):
        with pytest.raises(ConfigError):
            _sql.queries(schema)


@pytest.mark.parametrize("schema", ["pgq", "_x", "jobs_2", "a" * 51])
def test_good_schema_names(schema: str) -> None:
    assert _sql.check_schema(schema) == schema


def test_shipped_queries_load_for_any_schema() -> None:
    default = _sql.queries()
    assert {"task_enqueue", "task_notify"} <= set(default)
    other = _sql.queries("jobs")
    assert set(other) == set(default)
    for name, text in other.items():
        assert "pgq." not in text and "pgq_wake" not in text, name
        assert not text.rstrip().endswith(";"), name
    assert "jobs.task" in other["task_enqueue"]


def test_duplicate_query_names_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "sql"
    (root / "queries").mkdir(parents=True)
    (root / "queries" / "a.sql").write_text("-- name: x_get\nSELECT 1;\n")
    (root / "queries" / "b.sql").write_text("-- name: x_get\nSELECT 2;\n")
    monkeypatch.setattr(_sql, "sql_dir", lambda: root)
    _sql.queries.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="defined twice"):
            _sql.queries("pgq")
    finally:
        monkeypatch.undo()
        _sql.queries.cache_clear()


def test_sql_dir_holds_the_files() -> None:
    d = _sql.sql_dir()
    assert (d / "schema.sql").is_file()
    assert (d / "migrations" / "0001_initial.sql").is_file()
    assert "CREATE TABLE pgq.task" in _sql.script("schema.sql")
    assert "CREATE TABLE jobs.task" in _sql.script("schema.sql", "jobs")
