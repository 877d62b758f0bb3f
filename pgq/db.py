"""The seam between pgq and PostgreSQL: DSNs, connections, pools, error mapping.

Every connection pgq opens sets application_name to `pgq:<role>:<pid>` so that
operators (and the fault tests) can tell workers, listeners and leaders apart in
pg_stat_activity. Settings such as statement_timeout are set only on pgq's own
connections, never on a caller's.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from pgq.errors import ConfigError


def resolve_dsn(dsn: str | None) -> str:
    """The DSN to use: the argument, else $PGQ_DSN, else the embedded default."""
    if dsn:
        return dsn
    env = os.environ.get("PGQ_DSN")
    if env:
        return env
    try:
        from pgq import embedded
    except ImportError as exc:  # pragma: no cover - the module ships with pgq
        raise ConfigError("no DSN given and PGQ_DSN is unset") from exc
    return embedded.default_dsn()


def application_name(role: str) -> str:
    return f"pgq:{role}:{os.getpid()}"


def conninfo(dsn: str, role: str, **extra: Any) -> str:
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"invalid DSN: {exc}") from None
    return make_conninfo(dsn, application_name=application_name(role), **extra)


def redact(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<invalid DSN>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


def connect(dsn: str, role: str, *, autocommit: bool = True, **extra: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(conninfo(dsn, role, **extra), autocommit=autocommit, row_factory=dict_row)


async def connect_async(
    dsn: str, role: str, *, autocommit: bool = True, **extra: Any
) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(
        conninfo(dsn, role, **extra), autocommit=autocommit, row_factory=dict_row
    )


def pool(dsn: str, role: str, *, min_size: int = 1, max_size: int = 4) -> psycopg_pool.ConnectionPool[Any]:
    p: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
        conninfo(dsn, role),
        min_size=min_size,
        max_size=max_size,
        kwargs={"autocommit": True, "row_factory": dict_row},
        open=False,
        name=f"pgq-{role}",
    )
    p.open(wait=False)
    return p


async def pool_async(
    dsn: str, role: str, *, min_size: int = 1, max_size: int = 4
) -> psycopg_pool.AsyncConnectionPool[Any]:
    p: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
        conninfo(dsn, role),
        min_size=min_size,
        max_size=max_size,
        kwargs={"autocommit": True, "row_factory": dict_row},
        open=False,
        name=f"pgq-{role}",
    )
    await p.open(wait=False)
    return p
