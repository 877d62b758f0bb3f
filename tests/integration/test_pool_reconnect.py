"""pgq's pools come back soon after a long outage (R12's slow resume).

psycopg_pool alone retries a lost connection at 1, 2, 4, 8 ... s: after an 8 s
cut its next attempt comes 7 s after the heal. pgq's pools give a retry chain
up after db.RECONNECT_TIMEOUT and start over at once (pgq/db.py, "Reconnecting"),
so a client that asked during the outage gets a connection within about that long
after the heal. (Without the restart a given-up pool would grow again only when
another client asks.)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgq import db
from tests.fault.proxy import Proxy

#: Longer than 1 + 2 + 4 s, so psycopg_pool's own back-off would wait till 15 s.
OUTAGE = 8.0


@pytest.fixture
def via_proxy(
    dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Iterator[tuple[str, Proxy]]:
    """(DSN through a fault proxy, the proxy), with db.RECONNECT_TIMEOUT at 1 s."""
    monkeypatch.setattr(db, "RECONNECT_TIMEOUT", 1.0)
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    params = conninfo_to_dict(dsn)
    proxy = Proxy(int(params.get("port") or 5432), str(params.get("host") or "127.0.0.1")).start()
    try:
        yield make_conninfo("", **{**params, **proxy.dsn_params()}), proxy
    finally:
        proxy.stop()


def _check(resumed: float, caplog: pytest.LogCaptureFixture) -> None:
    assert resumed < 2.5, f"first connection {resumed:.1f} s after the heal"
    # psycopg_pool warns at each failed attempt (23 here without the filter); one got through
    warned = [r.msg for r in caplog.records if r.name == "psycopg.pool" and r.levelno >= logging.WARNING]
    assert warned.count("error connecting in %r: %s") == 1, warned


def test_async_pool_resumes_soon_after_a_long_cut(
    via_proxy: tuple[str, Proxy], caplog: pytest.LogCaptureFixture
) -> None:
    via, proxy = via_proxy

    async def body() -> float:
        # max_size = min_size: a client cannot grow the pool past its broken connections
        pool = await db.pool_async(via, "test-async", min_size=2, max_size=2, open_timeout=10)
        got_at: list[float] = []

        async def client() -> None:  # asks during the outage, as a worker's claimer does
            async with pool.connection(timeout=OUTAGE + 20) as conn:
                got_at.append(time.monotonic())
                await conn.execute("SELECT 1")

        try:
            proxy.set_mode("cut")  # open connections closed, new ones refused
            await pool.check()  # the pool finds both broken and starts to replace them
            waiting = asyncio.ensure_future(client())
            await asyncio.sleep(OUTAGE)  # the outage itself; what is measured follows it
            assert not got_at
            proxy.set_mode("pass")
            healed = time.monotonic()
            await waiting
            return got_at[0] - healed
        finally:
            await pool.close()

    _check(asyncio.run(body()), caplog)


def test_sync_pool_resumes_soon_after_a_long_cut(
    via_proxy: tuple[str, Proxy], caplog: pytest.LogCaptureFixture
) -> None:
    """The same for the Client's (threaded) pool."""
    via, proxy = via_proxy
    pool = db.pool(via, "test-sync", min_size=2, max_size=2)
    got_at: list[float] = []

    def client() -> None:  # an application thread that enqueues during the outage
        with pool.connection(timeout=OUTAGE + 20) as conn:
            got_at.append(time.monotonic())
            conn.execute("SELECT 1")

    try:
        pool.wait(timeout=10)
        proxy.set_mode("cut")
        pool.check()
        waiting = threading.Thread(target=client)
        waiting.start()
        time.sleep(OUTAGE)  # the outage itself; what is measured follows it
        assert not got_at
        proxy.set_mode("pass")
        healed = time.monotonic()
        waiting.join(OUTAGE + 30)
    finally:
        pool.close()
    _check(got_at[0] - healed, caplog)
