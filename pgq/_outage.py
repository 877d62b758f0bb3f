"""Database trouble logged as an episode: one line when it starts, one when it ends.

A lock on pgq.task, a restart of PostgreSQL, a cut connection or a statement
timeout makes every loop of a Server fail at once, each retrying on its own
schedule (claimer, flusher, heartbeat, recoverer, cleaner, aggregator). Logged
one failure at a time that was some thirty lines per episode and worker
(RELIABILITY R14 asks for at most five). So these loops report database errors
(`psycopg.OperationalError`, `psycopg.InterfaceError`: the connection or the
server, not the statement) here instead of logging them:

- the first failure of an episode is logged at WARNING, naming the loop and
  the error;
- later ones, of any loop, are logged at DEBUG and counted;
- while the episode lasts, a WARNING repeats the counts every `remind` seconds,
  so a lasting outage never goes quiet;
- the episode ends when every loop that failed in it has succeeded again: one
  INFO line says how long it lasted and how often each loop failed.

The state is per process (one episode for all the Servers of a process: they
share the database). Errors that are not the database's (a bug, a rejected
statement) are logged by the caller as before. `ok()` is called on every
success of a hot loop, so it costs one attribute test when all is well.
"""

from __future__ import annotations

import logging
import threading
import time

import psycopg

logger = logging.getLogger("pgq.database")

#: The errors an episode is made of: the connection or the server failing, not the statement.
DATABASE_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


def is_database_error(exc: BaseException) -> bool:
    return isinstance(exc, DATABASE_ERRORS)


class Outage:
    """The current episode of database errors of this process (see the module docstring)."""

    def __init__(self, remind: float = 60.0) -> None:
        self.remind = remind
        self._lock = threading.Lock()
        self._failing: set[str] = set()  # loops that failed and have not succeeded since
        self._counts: dict[str, int] = {}
        self._started = 0.0
        self._reminded = 0.0
        #: Episodes ended so far (tests).
        self.episodes = 0

    @property
    def active(self) -> bool:
        return bool(self._counts)

    def failed(self, loop: str, exc: BaseException, retry_in: float | None = None) -> None:
        """`loop` met a database error; it retries on its own (in `retry_in` seconds)."""
        now = time.monotonic()
        retry = "" if retry_in is None else f"; retrying in {retry_in:.2f}s"
        with self._lock:
            first = not self._counts
            self._failing.add(loop)
            self._counts[loop] = self._counts.get(loop, 0) + 1
            if first:
                self._started = self._reminded = now
            remind = not first and now - self._reminded >= self.remind
            if remind:
                self._reminded = now
            counts = dict(self._counts)
        if first:
            logger.warning(
                "database error in the %s (%s)%s. Further database errors are logged at DEBUG "
                "until the database answers again",
                loop,
                _one_line(exc),
                retry,
                extra={"action": "database_error", "loop": loop},
            )
        elif remind:
            logger.warning(
                "database errors go on after %.0fs: %s; last: %s in the %s",
                now - self._started,
                _summary(counts),
                _one_line(exc),
                loop,
                extra={"action": "database_error_ongoing"},
            )
        else:
            logger.debug(
                "database error in the %s (%s)%s",
                loop,
                _one_line(exc),
                retry,
                extra={"action": "database_error"},
            )

    def ok(self, loop: str) -> None:
        """`loop` succeeded; the episode ends when every loop that failed in it has."""
        if not self._failing:
            return
        with self._lock:
            if loop not in self._failing:
                return
            self._failing.discard(loop)
            if self._failing:
                return
            counts, self._counts = self._counts, {}
            lasted = time.monotonic() - self._started
            self.episodes += 1
        logger.info(
            "database answers again; its errors began %.1fs ago (%s)",
            lasted,
            _summary(counts),
            extra={"action": "database_recovered", "seconds": round(lasted, 3)},
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{loop} {n}x" for loop, n in sorted(counts.items()))


#: The process's episode; the loops of every Server in the process report to it.
OUTAGE = Outage()


#: How often psycopg_pool may warn about one of pgq's pools failing to connect.
POOL_WARNING_EVERY = 60.0


class PoolWarnings(logging.Filter):
    """psycopg_pool warns at every failed connection attempt ("error connecting in
    'pgq-worker': ...") and whenever a retry chain gives up. pgq's pools retry every
    few seconds during an outage (pgq/db.py, "Reconnecting"), which would be hundreds
    of lines for a ten-minute outage where the episode above logs two. This filter,
    on the `psycopg.pool` logger, lets each such warning about one of pgq's pools
    (named `pgq-<role>`) through once per POOL_WARNING_EVERY seconds and drops the
    repeats; records about other pools pass untouched."""

    def __init__(self, every: float = POOL_WARNING_EVERY) -> None:
        super().__init__()
        self.every = every
        self._last: dict[tuple[str, object], float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        pool = args[0] if isinstance(args, tuple) and args else None
        if record.levelno < logging.WARNING or not (isinstance(pool, str) and pool.startswith("pgq-")):
            return True
        key, now = (pool, record.msg), time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every:
                return False
            self._last[key] = now
        return True


_POOL_WARNINGS = PoolWarnings()
_install_lock = threading.Lock()


def quiet_pool_warnings() -> None:
    """Install PoolWarnings on the `psycopg.pool` logger, once per process: addFilter skips a
    filter the logger holds already (under the lock: held twice, its second call would drop
    every record the first let through)."""
    with _install_lock:
        logging.getLogger("psycopg.pool").addFilter(_POOL_WARNINGS)
