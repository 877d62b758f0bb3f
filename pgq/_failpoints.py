"""Named failpoints for fault tests: no-ops unless $PGQ_FAILPOINTS is set.

PGQ_FAILPOINTS holds comma-separated `name=action` pairs, for example
`aggregate.before_commit=kill` or `aggregate.after_select=sleep:5`. Actions:

- `kill`: SIGKILL this process (a crash at that exact instant);
- `exit`: os._exit(70) without cleanup;
- `raise`: raise FailpointError (the caller's transaction rolls back);
- `sleep:<seconds>`: pause there (asyncio.sleep in `hit_async`);
- `sleep:<a>-<b>`: pause a uniformly random time between a and b seconds (jitter).

`kill`, `exit` and `raise` may take a probability, `kill:0.05`: the action fires
on that share of hits (drawn at each hit) and the others pass.

A name may end in `@N` in the variable (`aggregate.after_insert@3=kill`) to
fire only on its N-th hit in this process. The variable is read at every hit,
so a test can set it on a running process's environment only before start.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

ENV = "PGQ_FAILPOINTS"

_hits: dict[str, int] = {}


class FailpointError(RuntimeError):
    """Raised by a failpoint whose action is `raise`."""


def _action(name: str) -> str | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    n = _hits[name] = _hits.get(name, 0) + 1
    for part in spec.split(","):
        key, sep, action = part.strip().partition("=")
        if not sep:
            continue
        key, at, nth = key.partition("@")
        if key.strip() != name:
            continue
        if at and nth.strip().isdigit() and int(nth) != n:
            continue
        return action.strip()
    return None


def _fire(name: str, action: str) -> float:
    """Apply an action; returns seconds to sleep (0 for none)."""
    if action.startswith("sleep:"):
        low, sep, high = action.split(":", 1)[1].partition("-")
        return random.uniform(float(low), float(high)) if sep else float(low)
    action, sep, share = action.partition(":")
    if sep and random.random() >= float(share):
        return 0.0
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        os._exit(70)
    elif action == "raise":
        raise FailpointError(f"failpoint {name}")
    return 0.0


def hit(name: str) -> None:
    """A failpoint in synchronous code."""
    action = _action(name)
    if action is not None:
        delay = _fire(name, action)
        if delay:
            time.sleep(delay)


async def hit_async(name: str) -> None:
    """A failpoint in asyncio code: `sleep` does not block the loop."""
    action = _action(name)
    if action is not None:
        delay = _fire(name, action)
        if delay:
            await asyncio.sleep(delay)
