"""A scratch database for one benchmark run: created, migrated, dropped afterwards.

Imported by the scripts beside it (`python benchmarks/<script>.py` puts this folder
on sys.path).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgq.migrate


def dsn_for(server: str, dbname: str) -> str:
    """The DSN of database `dbname` on the server of `server`."""
    params = conninfo_to_dict(server)
    params["dbname"] = dbname
    return make_conninfo("", **params)


@contextlib.contextmanager
def scratch_db(admin: str, prefix: str = "pgq_bench") -> Iterator[str]:
    """A new database on `admin`'s server with pgq's schema; dropped on exit (FORCE)."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = dsn_for(admin, name)
        pgq.migrate.migrate(dsn)
        yield dsn
    finally:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
