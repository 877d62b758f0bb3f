"""Background services of a Server. Each duty is one small service with a
`run_once(now=None)` that tests call directly and a `run(stop)` loop around it.

Every service's statement is idempotent and safe to run on every server at
once (SKIP LOCKED, fenced re-checks), so correctness never depends on which
server runs it, or on how many do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from pgq._outage import OUTAGE, is_database_error

logger = logging.getLogger(__name__)


async def periodic(
    name: str,
    run_once: Callable[[], Awaitable[Any]],
    interval: float,
    stop: asyncio.Event,
    *,
    jitter: float = 0.1,
    first_delay: float = 0.0,
) -> None:
    """Call run_once every `interval` seconds (± jitter) until `stop`; errors are logged, not raised."""

    async def pause(seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    if first_delay > 0:
        await pause(first_delay)
    while not stop.is_set():
        try:
            await run_once()
            OUTAGE.ok(name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if is_database_error(exc):
                OUTAGE.failed(name, exc)
            else:
                logger.warning("%s: %s", name, exc, extra={"action": f"{name}_error"})
        await pause(interval * (1 + jitter * (2 * random.random() - 1)))
