"""Apply sql/migrations/NNNN_name.sql in order, each in its own transaction.

Idempotent (applied versions are recorded in <schema>.migration) and safe to run
concurrently: a session advisory lock keyed on the schema serialises runners, and
a runner that waited finds the versions already applied.

After the migrations, the dashboard views (sql/views/) are created again. A
migration that changes columns the views read drops them first (0003 does), and
the views, and any function typed by them, come back with default privileges:
the ACLs of the schema's views and functions are read before the migrations and
given back to whatever was created anew (`_restore_acls`), so the grants of
sql/roles.sql or an operator's own survive an upgrade.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgq import _sql, db

_FILE_RE = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: str


def available() -> list[Migration]:
    out = []
    for p in sorted((_sql.sql_dir() / "migrations").glob("*.sql")):
        m = _FILE_RE.match(p.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), f"migrations/{p.name}"))
    return out


def _lock_key(schema: str) -> str:
    return f"pgq-migrate:{schema}"


def applied(conn: psycopg.Connection[Any], schema: str = "pgq") -> list[int]:
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL AS e", (f"{schema}.migration",)).fetchone()
    if not exists or not _first(exists):
        return []
    q = sql.SQL("SELECT version FROM {}.migration ORDER BY version").format(sql.Identifier(schema))
    return [_first(r) for r in conn.execute(q).fetchall()]


def _first(row: Any) -> Any:
    return next(iter(row.values())) if isinstance(row, dict) else row[0]


def migrate_conn(conn: psycopg.Connection[Any], schema: str = "pgq") -> list[Migration]:
    """Apply pending migrations on an autocommit connection; returns those applied."""
    _sql.check_schema(schema)
    ident = sql.Identifier(schema)
    conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (_lock_key(schema),))
    try:
        with conn.transaction():
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}.migration (version integer PRIMARY KEY, "
                    "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(ident)
            )
        done = set(applied(conn, schema))
        acls = _schema_acls(conn, schema)
        ran = []
        for m in available():
            if m.version in done:
                continue
            with conn.transaction():
                conn.execute(_sql.script(m.path, schema))
                conn.execute(
                    sql.SQL("INSERT INTO {}.migration (version, name) VALUES (%s, %s)").format(ident),
                    (m.version, m.name),
                )
            ran.append(m)
        apply_views(conn, schema)
        _restore_acls(conn, schema, acls)
        return ran
    finally:
        conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (_lock_key(schema),))


#: What GRANT can give on a view or a function (aclexplode's privilege_type).
_PRIVILEGES = frozenset(
    ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN", "EXECUTE")
)


def _schema_acls(conn: psycopg.Connection[Any], schema: str) -> list[dict[str, Any]]:
    """The privileges of the schema's views and functions, before any migration runs."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_sql.query("schema_acls", schema), {"schema": schema}).fetchall()


def _restore_acls(conn: psycopg.Connection[Any], schema: str, acls: list[dict[str, Any]]) -> None:
    """Give a view or function that a migration dropped and `apply_views` created again
    the privileges it had (sql/roles.sql's, or an operator's), in place of the defaults:
    PUBLIC loses what the old ACL did not give it (a new function is executable by
    PUBLIC), and each other grantee gets its privileges back. Objects that kept their
    ACL, and objects sql/views/ no longer has, are left alone."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        for obj in acls:
            params = {"kind": obj["kind"], "ident": obj["ident"]}
            now = cur.execute(_sql.query("acl_recreated", schema), params).fetchone()
            if now is None or not now["recreated"]:
                continue
            # the identity comes from the catalog, quoted by format('%I'); GRANT takes no parameters
            target = sql.SQL("{} {}").format(sql.SQL(obj["kind"]), sql.SQL(obj["ident"]))
            cur.execute(sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(target))
            entries = cur.execute(
                _sql.query("acl_entries", schema), {"acl": obj["acl"], "owner": now["owner"]}
            ).fetchall()
            for e in entries:
                if e["privilege"] not in _PRIVILEGES:
                    continue
                public = e["grantee"] is None
                cur.execute(
                    sql.SQL("GRANT {} ON {} TO {}{}").format(
                        sql.SQL(e["privilege"]),
                        target,
                        sql.SQL("PUBLIC") if public else sql.Identifier(e["grantee"]),
                        sql.SQL(" WITH GRANT OPTION") if e["grantable"] and not public else sql.SQL(""),
                    )
                )


def apply_views(conn: psycopg.Connection[Any], schema: str = "pgq") -> None:
    """(Re)create the dashboard views of sql/views/*.sql (CREATE OR REPLACE), in one transaction."""
    for p in sorted((_sql.sql_dir() / "views").glob("*.sql")):
        with conn.transaction():
            conn.execute(_sql.script(f"views/{p.name}", schema))


def migrate(dsn: str | None = None, schema: str = "pgq") -> list[Migration]:
    """Apply pending migrations to the database at dsn (None: $PGQ_DSN or the embedded default)."""
    with db.connect(db.resolve_dsn(dsn), "migrate") as conn:
        return migrate_conn(conn, schema)


def status(dsn: str | None = None, schema: str = "pgq") -> dict[str, list[int]]:
    with db.connect(db.resolve_dsn(dsn), "migrate") as conn:
        done = applied(conn, schema)
    return {"applied": done, "pending": [m.version for m in available() if m.version not in done]}
