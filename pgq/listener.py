"""The LISTEN connection: wake-ups (`<schema>_wake`) and cancel requests (`<schema>_cancel`).

Design:
- A dedicated autocommit connection outside every pool (application_name
  `pgq:listener:<pid>`) that runs nothing but LISTEN and a keepalive
  `SELECT 1`, so a query never waits behind a notification wait and a
  notification never waits behind a query (see PERFORMANCE.md, item 4).
- Notifications are read with psycopg's `AsyncConnection.notifies()`
  generator (psycopg >= 3.2.4 delivers those that arrive between LISTEN and
  the generator), and handed to every callback as (channel, payload), on the
  event loop thread. Callbacks must not block.
- Notifications sent while the connection is down are lost: that is
  PostgreSQL's contract. So after every (re)connect, `on_reconnect` runs, and
  the worker answers it with an immediate claim poll; a polling floor covers
  the rest. A lost listener delays nothing by more than reconnect + one poll.
- Reconnects back off exponentially with jitter (0.05 s doubling to 5 s).
- The keepalive stays under a third of the session's `idle_session_timeout`,
  so an operator's idle timeout never kills a quiet listener (R14).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from pgq import _sql, db

logger = logging.getLogger(__name__)

Callback = Callable[[str, str], None]


def cancel_channel(schema: str) -> str:
    """The channel whose payload is the bigint id of a task to cancel."""
    return f"{_sql.check_schema(schema)}_cancel"


class Listener:
    """LISTEN on the schema's channels and call `handlers(channel, payload)` for each NOTIFY."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        handlers: Sequence[Callback],
        *,
        on_reconnect: Callable[[], None] | None = None,
        keepalive: float = 30.0,
        backoff_max: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.channels = (_sql.channel(schema), cancel_channel(schema))
        self.handlers = list(handlers)
        self.on_reconnect = on_reconnect
        self.keepalive = keepalive
        self._keepalive = keepalive
        self.backoff_max = backoff_max
        #: Set while LISTEN is in place (a test signal, also used to report readiness).
        self.listening = asyncio.Event()
        #: Number of successful (re)connects so far.
        self.connects = 0
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Listen until `stop` is set, reconnecting with backoff."""
        delay = 0.05
        while not stop.is_set():
            connects = self.connects
            try:
                await self._session(stop)
                delay = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.listening.clear()
                if stop.is_set():
                    break
                if self.connects > connects:
                    delay = 0.05  # it was listening: a new outage starts the back-off afresh
                logger.warning(
                    "listener: connection lost (%s); reconnecting in %.2fs",
                    exc,
                    delay,
                    extra={"action": "listener_lost"},
                )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay * (0.5 + random.random()))
                delay = min(delay * 2, self.backoff_max)
            finally:
                await self._close()

    async def _session(self, stop: asyncio.Event) -> None:
        conn = self._conn = await db.connect_async(self.dsn, "listener", autocommit=True)
        for ch in self.channels:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(ch)))
        # A quiet listener is an idle session: keep alive well within the server's
        # idle_session_timeout (set by an operator for the role or database), or it is killed.
        cur = await conn.execute(
            "SELECT extract(epoch FROM current_setting('idle_session_timeout')::interval)::float8 AS s"
        )
        row = await cur.fetchone()
        idle = float(row["s"]) if row and row["s"] else 0.0
        self._keepalive = min(self.keepalive, idle / 3) if idle > 0 else self.keepalive
        self.connects += 1
        self.listening.set()
        logger.debug("listener: listening on %s", self.channels, extra={"action": "listener_up"})
        if self.on_reconnect is not None:
            self.on_reconnect()
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                reader = asyncio.ensure_future(self._read(conn))
                done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if reader not in done:
                    reader.cancel()
                    with contextlib.suppress(BaseException):
                        await reader
                    return
                reader.result()  # raises on a lost connection
                await conn.execute("SELECT 1")  # keepalive after a quiet period
        finally:
            stopper.cancel()

    async def _read(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async for n in conn.notifies(timeout=self._keepalive):
            for h in self.handlers:
                try:
                    h(n.channel, n.payload)
                except Exception:
                    logger.exception("listener: a notification handler failed")

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        self.listening.clear()
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
