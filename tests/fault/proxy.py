"""A TCP proxy for network faults, modelled on psycopg's tests/fix_proxy.py.

Modes:
- `pass`: forward bytes both ways;
- `cut`: close both sides of every open connection (and refuse new ones while cut);
- `blackhole`: stop forwarding but keep the sockets open: a half-open connection;
  new connections are accepted and go nowhere;
- `delay:<seconds>`: forward, each chunk late by that much.

It runs an asyncio loop in a daemon thread; `mode` can be switched from the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from tests.fixtures.util import free_port


class Proxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.mode = "pass"
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)

    def dsn_params(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port}

    def start(self) -> Proxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.close()

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode == "cut":
            asyncio.run_coroutine_threadsafe(self._cut(), self._loop).result(5)

    async def _cut(self) -> None:
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            self._ready.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()
        self._loop.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            cw.close()
            return
        self.connections += 1
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.close()
            return
        self._writers |= {cw, sw}
        await asyncio.gather(self._pipe(cr, sw), self._pipe(sr, cw), return_exceptions=True)
        for w in (cw, sw):
            self._writers.discard(w)
            w.close()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            data = await r.read(65536)
            if not data:
                break
            while self.mode == "blackhole":  # noqa: ASYNC110 - the mode is switched from another thread
                await asyncio.sleep(0.05)
            if self.mode.startswith("delay:"):
                await asyncio.sleep(float(self.mode.split(":", 1)[1]))
            if w.is_closing():
                break
            w.write(data)
            await w.drain()
        with contextlib.suppress(Exception):
            w.close()
