"""pgq.Server: runs handlers for the tasks of its queues (see pgq/worker.py for the core).

    server = pgq.Server(dsn, queues={"critical": 6, "default": 3}, concurrency=20)
    server.run(mux)                       # blocks; SIGTERM/SIGINT: graceful shutdown
    server.start(mux); server.shutdown()  # the same in a background thread

One Server is one asyncio event loop with: the claimer and the flusher (each
holding a pooled connection), the heartbeat, the recoverer, the cleaner, the
aggregator when a queue aggregates, and the listener on a dedicated
connection outside the pool (none with poll_only=True, for PgBouncer in
transaction mode, where LISTEN does not work). At start the Server checks
whether its DSN leads to a transaction pooler and refuses what cannot work
through one (see Server._check_pooler).

Handlers: `async def` handlers run on the event loop and are cancelled at
their deadline (timeout or deadline; 30 minutes when neither is set). Plain
`def` handlers run in a pool of `concurrency` threads; Python cannot stop a
thread, so at the deadline the task is failed (and retried) and its slot freed
while the thread runs on until the handler returns. Such handlers should check
`task.deadline` (an aware datetime) and stop in time.

Signals (run() only): the first SIGTERM/SIGINT stops claiming, waits
`shutdown_timeout` for running handlers, returns unfinished tasks to
'pending' and flushes every outcome; a second one stops at once, leaving
unfinished tasks to the recoverer (they run again after their lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict

from pgq import _sql, db
from pgq._outage import OUTAGE, is_database_error
from pgq.config import DEFAULT_GRACE_PERIOD, GroupPolicy, ResolvedPolicy, resolve_group_policies
from pgq.errors import ConfigError, InvalidArgumentError, InvalidName
from pgq.listener import Listener, cancel_channel
from pgq.mux import ServeMux, is_async_handler
from pgq.scheduler import Scheduler
from pgq.services.cleaner import Cleaner, CleanerConfig
from pgq.services.recoverer import Recoverer, RecovererConfig
from pgq.task import Task, check_name, parse_duration
from pgq.worker import Worker, WorkerConfig, configure_connection

logger = logging.getLogger(__name__)

Aggregate = Callable[..., Any]


def new_worker_id() -> str:
    """host:pid:random, unique per process start."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _seconds(value: Any, name: str, *, positive: bool = True, allow_zero: bool = False) -> float:
    try:
        s = parse_duration(value, name)
    except InvalidArgumentError as exc:
        raise ConfigError(str(exc)) from None
    if s < 0 or (s == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'positive' if positive else 'non-negative'}, got {value!r}")
    return s


def _callable(value: Any, name: str) -> Any:
    if value is not None and not callable(value):
        raise ConfigError(f"{name} must be callable, got {value!r}")
    return value


class Server:
    """Runs the handlers of a ServeMux for the tasks of `queues`."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        queues: Mapping[str, int] | None = None,
        concurrency: int = 10,
        strict_priority: bool = False,
        group_aggregator: Aggregate | None = None,
        group_grace_period: float | timedelta | str = DEFAULT_GRACE_PERIOD,
        group_max_delay: float | timedelta | str | None = None,
        group_max_size: int | None = None,
        group_policies: Mapping[str, GroupPolicy] | None = None,
        group_aggregator_timeout: float | timedelta = 30.0,
        retry_delay_func: Callable[..., Any] | None = None,
        is_failure: Callable[[BaseException], bool] | None = None,
        error_handler: Callable[..., Any] | None = None,
        lease_duration: float | timedelta = 30.0,
        shutdown_timeout: float | timedelta = 8.0,
        poll_interval: float | timedelta = 1.0,
        poll_only: bool = False,
        schema: str = "pgq",
        recover_interval: float | timedelta = 5.0,
        clean_interval: float | timedelta = 60.0,
        listener_keepalive: float = 30.0,
    ) -> None:
        self._kwargs: dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if dsn is not None:
            if not isinstance(dsn, str):
                raise ConfigError(f"dsn must be a str, got {type(dsn).__name__}")
            try:
                conninfo_to_dict(dsn)
            except psycopg.ProgrammingError as exc:
                raise ConfigError(f"invalid DSN: {exc}") from None
        self._dsn = dsn
        self.schema = _sql.check_schema(schema)
        if queues is None:
            queues = {"default": 1}
        if not isinstance(queues, Mapping) or not queues:
            raise ConfigError(f"queues must be a non-empty mapping of queue name to weight, got {queues!r}")
        qs: dict[str, int] = {}
        for name, weight in queues.items():
            try:
                check_name(name, "queue name")
            except InvalidName as exc:
                raise ConfigError(f"queues: {exc}") from None
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
                raise ConfigError(f"queues[{name!r}]: the weight must be an int >= 1, got {weight!r}")
            qs[name] = weight
        self.queues = qs
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an int >= 1, got {concurrency!r}")
        self.concurrency = concurrency
        self.strict_priority = bool(strict_priority)
        self.retry_delay_func = _callable(retry_delay_func, "retry_delay_func")
        self.is_failure = _callable(is_failure, "is_failure")
        self.error_handler = _callable(error_handler, "error_handler")
        self.lease_duration = _seconds(lease_duration, "lease_duration")
        self.shutdown_timeout = _seconds(shutdown_timeout, "shutdown_timeout", allow_zero=True)
        self.poll_interval = _seconds(poll_interval, "poll_interval")
        self.recover_interval = _seconds(recover_interval, "recover_interval")
        self.clean_interval = _seconds(clean_interval, "clean_interval")
        self.listener_keepalive = _seconds(listener_keepalive, "listener_keepalive")
        self.poll_only = bool(poll_only)
        self.group_aggregator_timeout = _seconds(group_aggregator_timeout, "group_aggregator_timeout")
        self.group_policies: dict[str, ResolvedPolicy] = resolve_group_policies(
            qs,
            aggregator=group_aggregator,
            grace_period=group_grace_period,
            max_delay=group_max_delay,
            max_size=group_max_size,
            policies=group_policies,
        )
        self.worker_id = ""
        self.worker: Worker | None = None
        self.listener: Listener | None = None
        #: Set at start: whether the DSN leads to a transaction pooler (see _check_pooler).
        self.transaction_pooled: bool | None = None
        self.aggregator: Any = None
        self.recoverer: Recoverer | None = None
        self.cleaner: Cleaner | None = None
        self.scheduler: Scheduler | None = None  # set by periodic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._abort = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._running = False

    def with_options(self, **overrides: Any) -> Server:
        """A new Server with the same settings except `overrides` (the CLI's flags)."""
        new = Server(**{**self._kwargs, **overrides})
        new.scheduler = self.scheduler  # keep periodic() entries
        return new

    def periodic(self, cronspec: str, task: Task, **options: Any) -> str:
        """Enqueue `task` on `cronspec` while this server runs (see docs/periodic.md).

        Every server (or Scheduler) declaring the same entry shares its ticks: each is
        enqueued exactly once. Takes Scheduler.register()'s arguments; returns the entry id.
        """
        if self.scheduler is None:
            self.scheduler = Scheduler(self._dsn, schema=self.schema)
        return self.scheduler.register(cronspec, task, **options)

    # ------------------------------------------------------------ running

    def run(self, handler: ServeMux | Callable[..., Any]) -> None:
        """Run until SIGTERM/SIGINT (or shutdown() from another thread); blocks."""
        self._check_startable(handler)
        try:
            main = threading.current_thread() is threading.main_thread()
            asyncio.run(self._main(handler, install_signals=main))
        finally:
            self._running = False

    def start(self, handler: ServeMux | Callable[..., Any], *, ready_timeout: float = 30.0) -> None:
        """Run in a background thread; returns once the server claims tasks."""
        self._check_startable(handler)
        self._ready.clear()
        self._startup_error = None

        def target() -> None:
            try:
                asyncio.run(self._main(handler, install_signals=False))
            except BaseException as exc:  # reported to start()'s caller
                self._startup_error = exc
                self._ready.set()
            finally:
                self._running = False

        self._thread = threading.Thread(target=target, name="pgq-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(ready_timeout):
            self.shutdown()
            raise TimeoutError(f"pgq.Server did not become ready within {ready_timeout}s")
        if self._startup_error is not None:
            raise self._startup_error

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop gracefully (as the first signal) and wait for the server to finish."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout if timeout is not None else self.shutdown_timeout + 30)

    def stop(self) -> None:
        """Stop claiming and shut down without waiting (thread-safe; see shutdown())."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)

    def _check_startable(self, handler: Any) -> None:
        if not (isinstance(handler, ServeMux) or callable(handler)):
            raise TypeError(f"Server.run takes a pgq.ServeMux or a handler function, got {handler!r}")
        if self._running:
            raise RuntimeError("this Server is already running")
        self._running = True

    def _resolver(self, handler: ServeMux | Callable[..., Any]) -> Callable[[str], Any]:
        if isinstance(handler, ServeMux):
            return handler.resolve
        pair = (handler, is_async_handler(handler))
        return lambda _type: pair

    async def _main(self, handler: ServeMux | Callable[..., Any], *, install_signals: bool) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = stop = asyncio.Event()
        self._abort = False
        dsn = db.resolve_dsn(self._dsn)
        self.worker_id = wid = new_worker_id()
        prepare = not await self._check_pooler(dsn)
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
        pool = await db.pool_async(
            dsn,
            "worker",
            min_size=2,
            max_size=6,
            kwargs={"autocommit": True, "prepare_threshold": 2 if prepare else None},
            configure=configure_connection,
            open_timeout=30.0,
        )
        services_stop = asyncio.Event()
        bg: list[asyncio.Task[Any]] = []
        agg_task: asyncio.Task[Any] | None = None
        agg_stop = asyncio.Event()
        try:
            worker = self.worker = Worker(
                WorkerConfig(
                    queues=self.queues,
                    worker_id=wid,
                    concurrency=self.concurrency,
                    strict_priority=self.strict_priority,
                    lease_duration=self.lease_duration,
                    poll_interval=self.poll_interval,
                    retry_delay_func=self.retry_delay_func,
                    is_failure=self.is_failure,
                    error_handler=self.error_handler,
                    schema=self.schema,
                ),
                pool,
                self._resolver(handler),
            )
            await self._heartbeat_once(pool, "active")
            if self.group_policies:
                # Imported lazily: only servers with an aggregating queue need it.
                agg_mod = importlib.import_module("pgq.services.aggregator")
                self.aggregator = agg_mod.Aggregator(
                    dsn,
                    pool,
                    self.group_policies,
                    schema=self.schema,
                    worker_id=wid,
                    aggregate_timeout=self.group_aggregator_timeout,
                )
                agg_task = asyncio.create_task(self.aggregator.run(agg_stop), name="pgq-aggregator")
            wake_ch = _sql.channel(self.schema)
            cancel_ch = cancel_channel(self.schema)
            aggregator = self.aggregator

            def on_notify(channel: str, payload: str) -> None:
                if channel == wake_ch:
                    worker.notify(payload)
                    if aggregator is not None:
                        aggregator.wake(payload)
                elif channel == cancel_ch:
                    with contextlib.suppress(ValueError):
                        worker.cancel_task(int(payload))

            if not self.poll_only:
                self.listener = Listener(
                    dsn, self.schema, [on_notify], on_reconnect=worker.wake, keepalive=self.listener_keepalive
                )
                bg.append(asyncio.create_task(self.listener.run(services_stop), name="pgq-listener"))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.listener.listening.wait(), 10.0)
            self.recoverer = Recoverer(
                pool, schema=self.schema, config=RecovererConfig(interval=self.recover_interval)
            )
            self.cleaner = Cleaner(
                pool, schema=self.schema, config=CleanerConfig(interval=self.clean_interval)
            )
            bg.append(asyncio.create_task(self.recoverer.run(services_stop), name="pgq-recoverer"))
            bg.append(asyncio.create_task(self.cleaner.run(services_stop), name="pgq-cleaner"))
            bg.append(asyncio.create_task(self._heartbeat_loop(pool, services_stop), name="pgq-heartbeat"))
            if self.scheduler is not None:
                bg.append(asyncio.create_task(self.scheduler.run_async(services_stop), name="pgq-scheduler"))
            flusher = asyncio.create_task(worker.run_flusher(), name="pgq-flusher")
            claimer = asyncio.create_task(worker.run_claimer(), name="pgq-claimer")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.polled.wait(), 10.0)
            logger.info(
                "pgq server %s started: queues=%s concurrency=%d",
                wid,
                self.queues,
                self.concurrency,
                extra={"action": "server_started", "worker_id": wid},
            )
            self._ready.set()
            await stop.wait()

            # Graceful shutdown.
            logger.info("pgq server %s stopping", wid, extra={"action": "server_stopping"})
            worker.stop_claiming()
            await claimer
            if not self._abort:
                await self._wait_abortable(worker.wait_idle(self.shutdown_timeout))
            if self._abort:
                raise _Abort
            n = worker.requeue_running()
            if n:
                logger.warning(
                    "%d unfinished task(s) returned to pending", n, extra={"action": "tasks_requeued"}
                )
            await worker.close_flusher(flusher, within=10.0)
            worker.stop_threads()
            if agg_task is not None:
                agg_stop.set()
                await agg_task
            services_stop.set()
            for t in bg:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(t, 5.0)
            with contextlib.suppress(Exception):
                async with pool.connection() as conn:
                    await conn.execute(worker.q.server_delete, {"id": wid})
            logger.info("pgq server %s stopped", wid, extra={"action": "server_stopped"})
        except _Abort:
            logger.warning(
                "pgq server %s: forced exit; unfinished tasks are left to the recoverer",
                wid,
                extra={"action": "server_aborted"},
            )
        finally:
            services_stop.set()
            agg_stop.set()
            for t in [*bg, *([agg_task] if agg_task else [])]:
                t.cancel()
            if self.worker is not None:
                self.worker.stop_threads()
            # Close the pool before cancelling the stragglers: cancelling the pool's own
            # worker tasks first makes close() raise CancelledError (exit code 1).
            with contextlib.suppress(Exception):
                await pool.close(timeout=2.0)
            for t in asyncio.all_tasks() - {asyncio.current_task()}:
                t.cancel()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            self._ready.set()

    async def _check_pooler(self, dsn: str) -> bool:
        """Refuse what cannot work through a transaction pooler; True when `dsn` leads to one.

        R13: through PgBouncer in pool_mode=transaction a client connection owns no server
        session. LISTEN then registers on a server connection the listener no longer holds
        (a NOTIFY from another session never reaches it; measured with PgBouncer 1.18), and
        the aggregation leader's session advisory lock stays on whichever server connection
        took it. So a Server without poll_only, or with a group_aggregator, refuses to start
        (ConfigError). A poll_only Server runs, with prepared statements turned off (see
        pgq/db.py). A listener self-NOTIFY is no test of this: on a quiet pooler LISTEN and
        NOTIFY share one server connection and the probe comes back.
        """
        pooled = self.transaction_pooled = await db.transaction_pooled(dsn)
        if not pooled:
            return False
        where = db.redact(dsn)
        if not self.poll_only:
            raise ConfigError(
                f"pgq.Server: {where} leads to a transaction pooler (e.g. PgBouncer pool_mode=transaction): "
                "LISTEN cannot deliver wake-ups through it. Pass poll_only=True, "
                "or give the server a direct (or session-mode) DSN"
            )
        if self.group_policies:
            raise ConfigError(
                f"pgq.Server: {where} leads to a transaction pooler (e.g. PgBouncer pool_mode=transaction): "
                "aggregation leadership needs a session advisory lock, which a transaction pooler does "
                "not keep. Run the servers with a group_aggregator on a direct (or session-mode) DSN"
            )
        logger.info(
            "pgq server: %s is a transaction pooler; polling every %ss, no prepared statements",
            where,
            self.poll_interval,
            extra={"action": "transaction_pooler"},
        )
        return True

    async def _wait_abortable(self, aw: Any) -> None:
        t = asyncio.ensure_future(aw)
        self._abort_waiter = t
        with contextlib.suppress(asyncio.CancelledError):
            await t

    def _on_signal(self, sig: int) -> None:
        assert self._stop is not None
        if not self._stop.is_set():
            logger.info(
                "received %s: shutting down gracefully (send again to exit at once)",
                signal.Signals(sig).name,
                extra={"action": "signal"},
            )
            self._stop.set()
        else:
            logger.warning(
                "received %s again: exiting at once", signal.Signals(sig).name, extra={"action": "signal"}
            )
            self._abort = True
            waiter = getattr(self, "_abort_waiter", None)
            if waiter is not None:
                waiter.cancel()
            # Whatever is still in progress (a flush against an unreachable database, a
            # handler thread), the process ends soon: the recoverer handles the rest.
            assert self._loop is not None
            self._loop.call_later(2.0, os._exit, 1)

    async def _heartbeat_once(self, pool: psycopg_pool.AsyncConnectionPool[Any], status: str) -> None:
        q = _sql.query("server_heartbeat", self.schema)
        async with pool.connection() as conn:
            await conn.execute(
                q,
                {
                    "id": self.worker_id,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "queues": json.dumps(self.queues),
                    "concurrency": self.concurrency,
                    "strict_priority": self.strict_priority,
                    "status": status,
                    "now": None,
                    "group_policies": json.dumps(
                        {
                            q: {
                                "grace_period": p.grace_period,
                                "max_delay": p.max_delay,
                                "max_size": p.max_size,
                            }
                            for q, p in self.group_policies.items()
                        }
                    ),
                },
            )

    async def _heartbeat_loop(self, pool: psycopg_pool.AsyncConnectionPool[Any], stop: asyncio.Event) -> None:
        interval = min(self.lease_duration / 3, 60.0)
        worker = self.worker
        assert worker is not None
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            try:
                await worker.beat()
                # The server row's write gets no longer than one interval: unbounded, a blocked or
                # unanswered write (a lock on pgq.server, a half-open socket) would hold up the
                # next beat(), which is what abandons tasks at their local lease deadline (R12).
                await asyncio.wait_for(
                    self._heartbeat_once(pool, "stopping" if worker._stopping else "active"), interval
                )
                OUTAGE.ok("heartbeat")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_database_error(exc) or isinstance(exc, TimeoutError):
                    OUTAGE.failed("heartbeat", exc)
                else:
                    logger.warning("heartbeat failed: %s", exc, extra={"action": "heartbeat_error"})
                # Leases that ran out locally are abandoned by the next beat() in any case.
                with contextlib.suppress(Exception):
                    worker.abandon_expired("lease expired while the database was unreachable")

    def __repr__(self) -> str:
        return f"<pgq.Server queues={self.queues} concurrency={self.concurrency}>"


class _Abort(Exception):
    """A second signal: stop at once."""
