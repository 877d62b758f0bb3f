"""The seam between pgq and PostgreSQL: DSNs, connections, pools, error mapping.

Every connection pgq opens sets application_name to `pgq:<role>:<pid>` so that
operators (and the fault tests) can tell workers, listeners and leaders apart in
pg_stat_activity. Settings such as statement_timeout are set only on pgq's own
connections, never on a caller's.

Prepared statements and transaction poolers (R13): psycopg prepares a statement
on the server once it ran `prepare_threshold` times on a connection. Through a
transaction pooler (PgBouncer pool_mode=transaction before 1.21, or without
max_prepared_statements) the next transaction may run on another server
connection, where that name is missing or, worse, names ANOTHER client's
statement (seen with PgBouncer 1.18: "bind message supplies 5 parameters, but
prepared statement "_pg3_0" requires 3"). So the single connections of
`connect()` never prepare (they run a statement every few seconds at most), and
the pools prepare unless `prepare=False` (Client(prepare=False); the Server turns
it off itself when `transaction_pooled()` says so).

psycopg_pool is imported by the pool functions only: the `pgq` commands that open one
connection (`pgq stats`, ...) do not load it.

Reconnecting (R12): psycopg_pool replaces a lost connection by retrying with a
doubling delay (1, 2, 4, 8, 16 s ...) for `reconnect_timeout` (300 s by default),
so after a 45 s cut a Server whose six connections all broke resumed 17.8 s after
the database came back. pgq's pools give up a retry chain after
RECONNECT_TIMEOUT and start over at once (`reconnect_failed` runs `check()`,
which grows the pool by one connection when it has none): the delay between
attempts never exceeds about half of RECONNECT_TIMEOUT, and the broken
connections' chains fold into one. psycopg_pool warns at every failed attempt
(logger `psycopg.pool`); for pgq's pools `_outage.PoolWarnings` lets one such
warning through per minute, as pgq logs the episode itself (pgq/_outage.py).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from pgq import _outage
from pgq.errors import ConfigError

if TYPE_CHECKING:
    import psycopg_pool


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


#: TCP settings of every pgq connection, unless the DSN (or the caller) sets them (RELIABILITY R12).
#: A half-open socket (the database host gone, a partition dropping packets, no RST) otherwise
#: leaves a statement waiting for as long as the kernel retransmits (about 15 minutes on Linux)
#: and an idle connection (the listener's) for ever. With these, an idle dead connection is
#: found after 15 + 3 x 5 s of unanswered keepalives, and a statement whose bytes stay
#: unacknowledged fails after 30 s (Linux only; libpq ignores it elsewhere and on Unix sockets):
#: the connection is then replaced. A long-running query is not affected (its bytes are
#: acknowledged at once). The worker does not wait for this to stop trusting its leases: its
#: heartbeat abandons tasks at their local deadline whatever the socket does (pgq/worker.py).
TCP_DEFAULTS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 15,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # milliseconds; libpq >= 12
}


def conninfo(dsn: str, role: str, **extra: Any) -> str:
    """The DSN with pgq's application_name, TCP_DEFAULTS for what it leaves unset, and `extra`."""
    try:
        given = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"invalid DSN: {exc}") from None
    tcp = {k: v for k, v in TCP_DEFAULTS.items() if k not in given and k not in extra}
    if psycopg.pq.version() < 120000:
        tcp.pop("tcp_user_timeout", None)
    return make_conninfo(dsn, application_name=application_name(role), **tcp, **extra)


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
    """One connection of pgq's own; it never prepares statements (see the module docstring)."""
    return psycopg.connect(
        conninfo(dsn, role, **extra), autocommit=autocommit, row_factory=dict_row, prepare_threshold=None
    )


async def connect_async(
    dsn: str, role: str, *, autocommit: bool = True, **extra: Any
) -> psycopg.AsyncConnection[Any]:
    """The asyncio twin of connect(); it never prepares statements either."""
    return await psycopg.AsyncConnection.connect(
        conninfo(dsn, role, **extra), autocommit=autocommit, row_factory=dict_row, prepare_threshold=None
    )


def pool_kwargs(*, prepare: bool = True) -> dict[str, Any]:
    """The connection kwargs of pgq's pools: autocommit, dict rows, and prepare_threshold=None
    (psycopg never prepares) when `prepare` is false."""
    kw: dict[str, Any] = {"autocommit": True, "row_factory": dict_row}
    if not prepare:
        kw["prepare_threshold"] = None
    return kw


#: How long one of pgq's pools retries a lost connection before it starts over
#: (see "Reconnecting" above).
RECONNECT_TIMEOUT = 5.0


def _regrow(p: psycopg_pool.ConnectionPool[Any]) -> None:
    p.check()


async def _regrow_async(p: psycopg_pool.AsyncConnectionPool[Any]) -> None:
    await p.check()


def pool(
    dsn: str, role: str, *, min_size: int = 1, max_size: int = 4, prepare: bool = True
) -> psycopg_pool.ConnectionPool[Any]:
    import psycopg_pool

    _outage.quiet_pool_warnings()
    p: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
        conninfo(dsn, role),
        min_size=min_size,
        max_size=max_size,
        kwargs=pool_kwargs(prepare=prepare),
        open=False,
        name=f"pgq-{role}",
        reconnect_timeout=RECONNECT_TIMEOUT,
        reconnect_failed=_regrow,
    )
    p.open(wait=False)
    return p


async def pool_async(
    dsn: str,
    role: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    prepare: bool = True,
    kwargs: dict[str, Any] | None = None,
    configure: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None = None,
    open_timeout: float | None = None,
) -> psycopg_pool.AsyncConnectionPool[Any]:
    """An asyncio pool of pgq's own. `kwargs` replaces pool_kwargs(prepare=...);
    open_timeout: wait that long for min_size connections (else open in the background)."""
    import psycopg_pool

    _outage.quiet_pool_warnings()
    p: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
        conninfo(dsn, role),
        min_size=min_size,
        max_size=max_size,
        kwargs=pool_kwargs(prepare=prepare) if kwargs is None else kwargs,
        configure=configure,
        open=False,
        name=f"pgq-{role}",
        reconnect_timeout=RECONNECT_TIMEOUT,
        reconnect_failed=_regrow_async,
    )
    if open_timeout is None:
        await p.open(wait=False)
    else:
        await p.open(wait=True, timeout=open_timeout)
    return p


async def transaction_pooled(dsn: str) -> bool:
    """True when `dsn` leads to a transaction (or statement) pooler such as PgBouncer with
    pool_mode=transaction: its client connections do not own a server session.

    Two client connections A and B each run `SELECT pg_backend_pid()` (A, then B, then A
    again, one autocommit transaction each). Directly or through a session pooler every
    client connection keeps its own backend, so A's pid is stable and B's differs. Through
    a transaction pooler A's backend goes back to the pool after each transaction: B gets
    that same backend (PgBouncer reuses the most recently released server connection), or
    A's next transaction lands elsewhere. Either proves pooling; no false positive is
    possible (two live sessions never share a pid). A busy pooler could in principle give
    a false negative. Measured with PgBouncer 1.18: transaction mode gives A = B on a quiet
    pooler, session mode and direct never do.
    """

    async def pid(c: psycopg.AsyncConnection[Any]) -> Any:
        row = await (await c.execute("SELECT pg_backend_pid() AS pid")).fetchone()
        return row["pid"] if row else None

    a = await connect_async(dsn, "probe")
    try:
        b = await connect_async(dsn, "probe")
        try:
            pa = await pid(a)
            pb = await pid(b)
            pa2 = await pid(a)
        finally:
            await b.close()
    finally:
        await a.close()
    return bool(pa == pb or pa != pa2)
