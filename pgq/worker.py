"""The worker core: claim, run, acknowledge; leases and the heartbeat.

How a task travels through one worker process (one asyncio event loop):

1. The claimer holds one pooled connection (synchronous_commit off: a claim
   lost in a database crash only makes its task claimable again; generic
   plans: planning the claim costs as much as running it for 50 rows). It
   claims up to the free slots (at most CLAIM_MAX) in ONE statement
   (task_claim_many: a LATERAL per queue in the order picked for this poll,
   FOR UPDATE SKIP LOCKED), which sets state='active', attempt+1 (the
   fencing token), locked_by and a lease. When a claim comes back full and
   slots are still free, the next one is sent at once, before the tasks
   just started run (they run while it is in flight). A claim takes every
   free slot, not half of them to overlap with the batch before it: the
   statements per task, not their overlap, dominate (benchmarks/drain.py at
   concurrency 100: 0.82-0.97x of a hand-written loop claiming 100 at a
   time, against 0.75-0.78x with claims of 50). When a claim returns fewer
   tasks than asked, it sleeps until the earliest of: a wake-up NOTIFY for a
   served queue, the next run_at among the served queues (by the database
   clock), or the polling floor. So a scheduled or retry task starts the
   moment it is due; no forwarder moves it first. A wake-up is only a hint
   (any role may NOTIFY): after WAKE_GRACE wake-ups in a row whose claims
   found nothing, each further one waits 5 ms, doubling up to
   WAKE_COOLDOWN_MAX, before it claims; a claim that finds tasks resets it.
2. `async def` handlers run as asyncio tasks on the loop (one per task, which
   records the outcome itself: no done callback); plain `def`
   handlers run in a bounded pool of daemon threads. A handler's deadline
   (timeout or deadline, default 30 minutes) cancels an async handler. A
   sync handler cannot be stopped in Python: at its deadline the task is
   failed (retried) and its slot freed, the thread runs on until the
   handler returns (a replacement thread keeps the pool's size), and the
   handler can read `task.deadline` to stop itself in time.
3. Outcomes go to a buffer that the flusher writes in batches (one
   statement: task_ack_many; plain completions of tasks without retention or
   result, the common case, by task_ack_done, a fenced DELETE that does not
   lock the rows first) on its own connection; while one batch is in
   flight the next accumulates, so an idle worker acknowledges at once and a
   busy one writes hundreds of outcomes per statement. Each write is fenced
   on (id, attempt, state='active'); rows not applied are reported as lease
   lost and not counted. NOTIFY is never sent on claims or acks.
4. The heartbeat (every lease/3) extends the leases of the running tasks in
   one fenced statement and refreshes the pgq.server row. A task whose lease
   could not be extended, or whose local lease estimate ran out while the
   database was unreachable or silent (the heartbeat waits for its statement
   no longer than the leases last: a half-open socket never answers), is
   abandoned locally at that deadline: its handler is cancelled and its
   outcome will not be written (the recoverer owns it now).

When work can repeat (at-least-once): a worker that dies, stalls past its
lease or loses its connection while running a task has that task run again
elsewhere (by the recoverer, after the lease). A stale worker's outcome is
rejected by the fence. A crash between a handler's return and the flush of
its outcome runs the task again. Unless the handler completed the task in its
own transaction (`task.complete(conn)`, `_Completer`): the same fenced
task_ack_many, on the handler's connection, commits with the handler's
effects, so the database holds effect and completion together or neither;
the worker's own outcome for that task then finds nothing to change, which
`_report` expects instead of counting a lost lease.

Shutdown: stop claiming, wait `shutdown_timeout` for running handlers, then
return the unfinished tasks to 'pending' without counting a retry (fenced)
and flush every buffered outcome.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import json.scanner
import logging
import math
import queue as queue_mod
import random
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
import psycopg_pool
from psycopg.rows import tuple_row
from psycopg.types.json import set_json_loads

from pgq import _failpoints, tasks
from pgq._outage import DATABASE_ERRORS, OUTAGE, is_database_error
from pgq.errors import LeaseLost, SkipRetry
from pgq.mux import Handler
from pgq.task import ResultWriter, Task, encode_payload
from pgq.tasks import ARCHIVE, DONE, REQUEUE, RESULT, RETRY, Ack

logger = logging.getLogger(__name__)

#: Deadlines further away than this are checked by the heartbeat sweep, not a timer per task.
NEAR_DEADLINE = 300.0
#: The most tasks one claim statement takes (a claim takes every free slot up to this).
CLAIM_MAX = 1000
#: The longest last_error stored.
MAX_ERROR_CHARS = 4096

RetryDelayFunc = Callable[[int, BaseException, Task], "float | timedelta"]
IsFailureFunc = Callable[[BaseException], bool]
ErrorHandler = Callable[[Task, BaseException], Any]
Resolver = Callable[[str], "tuple[Handler, bool] | None"]


class TaskDeadlineExceeded(Exception):
    """The handler ran past its task's timeout or deadline."""


class TaskCancelled(Exception):
    """The task was cancelled (inspector cancel) while its handler ran."""


class HandlerExit(Exception):
    """An async handler raised SystemExit or KeyboardInterrupt (a handler failure)."""


class UndecodableTaskError(SkipRetry):
    """A claimed row no handler can take (undecodable payload, headers not an object): archived."""


class HandlerNotFoundError(Exception):
    """No handler matches the task's type (a handler failure: retried)."""


def default_retry_delay(retried: int, exc: BaseException, task: Task) -> float:
    """Asynq's backoff: retry n waits n**4 + 15 + random(0..29) * (n + 1) seconds."""
    n = retried
    return float(n**4 + 15 + random.randrange(30) * (n + 1))


def error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    text = text.replace("\x00", "")
    return text[:MAX_ERROR_CHARS]


def weighted_order(weights: Mapping[str, int]) -> list[str]:
    """A random queue order, queue q first with probability w_q / sum(w) (Asynq's semantics:
    a shuffle of the weighted list, deduplicated = weighted sampling without replacement)."""
    if len(weights) == 1:
        return list(weights)
    keys = {q: random.random() ** (1.0 / w) for q, w in weights.items()}
    return sorted(weights, key=keys.__getitem__, reverse=True)


@dataclass(frozen=True)
class WorkerConfig:
    queues: Mapping[str, int]
    worker_id: str
    concurrency: int = 10
    strict_priority: bool = False
    lease_duration: float = 30.0
    poll_interval: float = 1.0
    retry_delay_func: RetryDelayFunc | None = None
    is_failure: IsFailureFunc | None = None
    error_handler: ErrorHandler | None = None
    schema: str = "pgq"
    ack_batch_max: int = 1000


class _Job:
    """One claimed task in this process."""

    __slots__ = (
        "abandoned",
        "attempt",
        "deadline_at",
        "finished",
        "handle",
        "id",
        "lease_until",
        "plain",
        "reason",
        "replaced",
        "started",
        "sync",
        "task",
        "timer",
        "worker",
    )

    def __init__(self, worker: Worker, id: int, attempt: int, task: Task, lease_until: float) -> None:
        self.worker = worker
        self.id = id
        self.attempt = attempt
        self.task = task
        self.lease_until = lease_until
        self.handle: asyncio.Future[Any] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline_at = math.inf
        self.finished = False
        self.sync = False
        self.abandoned = False
        self.started = False
        self.replaced = False
        self.plain = False
        self.reason: BaseException | None = None


class _ResultWriter(ResultWriter):
    """task.result_writer: writes the result onto the task row, fenced on (id, attempt).

    From a sync handler (a worker thread), write() returns once the row is
    written (LeaseLost if the task is no longer ours). From an async handler,
    write() queues the write and returns at once (it is applied before the
    task's outcome); `await write_async(value)` waits for it.
    """

    def __init__(self, job: _Job) -> None:
        self._job = job

    def _write(self, value: Any) -> None:
        w = self._job.worker
        text = encode_payload(value)
        if threading.get_ident() == w._loop_thread:
            w._queue_result(self._job, text, None)
            return
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        w._loop.call_soon_threadsafe(w._queue_result, self._job, text, fut)
        try:
            fut.result(timeout=w.cfg.lease_duration)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                "the result could not be written in time (is the database reachable?)"
            ) from None

    async def write_async(self, value: Any) -> None:
        w = self._job.worker
        fut: asyncio.Future[None] = w._loop.create_future()
        w._queue_result(self._job, encode_payload(value), fut)
        await fut


class _Completer:
    """task.complete(conn): task_ack_many for this one attempt, on the handler's own
    connection and inside its transaction (fenced on (id, attempt, active) as every
    outcome). The worker's own outcome for the task, written later, then finds the
    task gone or completed and changes nothing; `_report` expects that.

    Failpoint `complete.before_commit` (pgq._failpoints): after the completion
    statement has run and taken effect on the handler's connection, before the
    handler's transaction commits (R2 crashes workers there,
    PGQ_FAILPOINTS=complete.before_commit=kill:0.05)."""

    def __init__(self, job: _Job) -> None:
        self._job = job

    def _params(self) -> dict[str, Any]:
        job = self._job
        if job.finished and job.reason is not None:
            raise LeaseLost(f"task {job.task.id} is no longer running here: {job.reason}")
        return tasks.completion_params(job.id, job.attempt)

    def _applied(self, rows: list[tuple[Any, ...]]) -> None:
        job = self._job
        if not any(r[0] == job.id for r in rows):
            raise LeaseLost(
                f"task {job.task.id}: this attempt no longer owns the task (lease lost); roll back"
            )
        job.worker._completed_in_tx.add(job.id)

    def complete(self, conn: psycopg.Connection[Any]) -> None:
        if not isinstance(conn, psycopg.Connection):
            raise TypeError(
                f"complete() takes a psycopg Connection, not {type(conn).__name__}"
                " (an AsyncConnection goes to complete_async())"
            )
        cur = conn.cursor(row_factory=tuple_row)
        self._applied(cur.execute(self._job.worker.q.ack, self._params()).fetchall())
        _failpoints.hit("complete.before_commit")

    async def complete_async(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if not isinstance(conn, psycopg.AsyncConnection):
            raise TypeError(
                f"complete_async() takes a psycopg AsyncConnection, not {type(conn).__name__}"
                " (a Connection goes to complete())"
            )
        cur = conn.cursor(row_factory=tuple_row)
        await cur.execute(self._job.worker.q.ack, self._params())
        self._applied(await cur.fetchall())
        await _failpoints.hit_async("complete.before_commit")


class _Threads:
    """A bounded pool of daemon threads for sync handlers.

    Daemon threads, so a handler that never returns cannot keep the process
    alive after shutdown. When a job is abandoned (deadline, cancel, lost
    lease) the pool starts one extra thread, and the abandoned thread exits
    once its handler returns, so the pool keeps its size.
    """

    def __init__(self, worker: Worker, size: int) -> None:
        self._worker = worker
        self._size = size
        self._q: queue_mod.SimpleQueue[tuple[_Job, Handler] | None] = queue_mod.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._n = 0

    def submit(self, job: _Job, fn: Handler) -> None:
        if not self._threads:
            for _ in range(self._size):
                self._spawn()
        self._q.put((job, fn))

    def _spawn(self) -> None:
        self._n += 1
        t = threading.Thread(target=self._run, name=f"pgq-handler-{self._n}", daemon=True)
        self._threads.append(t)
        t.start()

    def replace(self) -> None:
        if self._threads:
            self._spawn()

    def stop(self) -> None:
        for _ in self._threads:
            self._q.put(None)
        self._threads.clear()

    def _run(self) -> None:
        w = self._worker
        while True:
            item = self._q.get()
            if item is None:
                return
            job, fn = item
            exc: BaseException | None = None
            job.started = True  # before the check: see Worker._abandon
            if job.finished:
                if job.replaced:
                    return
                continue
            try:
                res = fn(job.task)
                if inspect.isawaitable(res):  # a sync middleware around an async handler
                    asyncio.run_coroutine_threadsafe(_await(res), w._loop).result()
            except BaseException as e:
                exc = e
                w._call_error_handler(job.task, e)
            try:
                w._loop.call_soon_threadsafe(w._sync_done, job, exc)
            except RuntimeError:  # the loop is closed: the process is shutting down
                return
            if job.replaced:
                return  # a replacement thread took this one's place


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


_AsyncTask = asyncio.Task
_new_object = object.__new__


async def _run_async(job: _Job, fn: Handler) -> None:
    """Run an async handler and record its outcome. SystemExit/KeyboardInterrupt raised by it
    fail the task instead of stopping the event loop (and with it the whole worker process)."""
    job.started = True  # see Worker._interrupt
    exc: BaseException
    try:
        await fn(job.task)
    except GeneratorExit:  # the task is being destroyed (loop closed under it): nothing to record
        raise
    except asyncio.CancelledError:
        if job.finished:
            return
        exc = job.reason or TaskCancelled("handler cancelled")
    except (SystemExit, KeyboardInterrupt) as e:
        if job.finished:
            return
        exc = HandlerExit(f"the handler raised {type(e).__name__}: {e}")
        exc.__cause__ = e
    except BaseException as e:
        if job.finished:
            return
        exc = e
    else:
        if not job.finished:
            job.worker._finish_ok(job)
        return
    w = job.worker
    w._call_error_handler(job.task, exc)
    w._finish_err(job, exc)


class UndecodableJSON:
    """A json/jsonb value that Python's json cannot load (written by SQL: a 5000-digit number, ...)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error

    def __str__(self) -> str:
        return self.error


# json's C scanner, called directly: a quarter of the cost of json.loads(bytes) for a small
# payload (no encoding detection, no whitespace regexes). Anything it does not take whole
# (surrounding whitespace in a json column, an error) goes through json.loads.
_c_make_scanner: Any = getattr(json.scanner, "c_make_scanner", None)
_SCAN: Callable[[str, int], tuple[Any, int]] | None = (
    _c_make_scanner(json.JSONDecoder()) if _c_make_scanner is not None else None
)


def safe_json_loads(data: str | bytes) -> Any:
    """json.loads for the worker's connections: never raises while a claim's rows are read."""
    try:
        text = data if isinstance(data, str) else data.decode("utf-8")
        if _SCAN is not None:
            with contextlib.suppress(StopIteration, ValueError):
                value, end = _SCAN(text, 0)
                if end == len(text):
                    return value
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        return UndecodableJSON(f"{type(exc).__name__}: {str(exc)[:200]}")


async def configure_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """Pool hook for the worker's connections (see safe_json_loads)."""
    set_json_loads(safe_json_loads, conn)


#: Wake-ups in a row whose claim may find nothing before the claimer slows down for them.
WAKE_GRACE = 4
#: The longest a wake-up then waits before its claim (doubling from 5 ms). A NOTIFY is a hint
#: any role may send: this bounds the claims it causes to about 1/WAKE_COOLDOWN_MAX per second
#: per worker; a claim that finds tasks ends the slow-down at once.
WAKE_COOLDOWN_MAX = 0.1


class _Wakeup:
    """A flag the claimer sleeps on with a timeout: set() resumes the sleeper in the next
    loop iteration (asyncio.wait_for on an Event takes a task and three more iterations)."""

    __slots__ = ("_flag", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._flag = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def clear(self) -> None:
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    async def wait(self, seconds: float) -> None:
        """Return when set, or after `seconds`."""
        if self._flag:
            return
        w = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(seconds, _resolve, w)
        try:
            await w
        finally:
            timer.cancel()
            self._waiter = None


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Worker:
    """Claims, runs and acknowledges tasks; see the module docstring."""

    def __init__(
        self,
        cfg: WorkerConfig,
        pool: psycopg_pool.AsyncConnectionPool[Any],
        resolve: Resolver,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.resolve = resolve
        self.q = tasks.Queries.load(cfg.schema)
        self.running: dict[int, _Job] = {}
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._threads = _Threads(self, cfg.concurrency)
        self._acks: list[Ack] = []
        self._waiters: list[tuple[int, asyncio.Future[None] | concurrent.futures.Future[None]]] = []
        self._has_results = False
        #: Tasks a handler completed in its own transaction (Task.complete): their later
        #: outcome is expected to change nothing. Added from handler threads too.
        self._completed_in_tx: set[int] = set()
        self._wake = _Wakeup(self._loop)
        self._slot_free = asyncio.Event()
        self._flush_wanted = asyncio.Event()
        self._flushed = asyncio.Event()
        self._ack_backlog = max(1000, 4 * cfg.concurrency)
        self._claim_max = max(1, min(cfg.concurrency, CLAIM_MAX))
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._closing = False
        self._queue_names = list(cfg.queues)
        self._strict_order = sorted(cfg.queues, key=lambda q: -cfg.queues[q]) if cfg.strict_priority else None
        self._retry_delay = cfg.retry_delay_func or default_retry_delay
        # Counters (tests and logs).
        self.claimed = 0
        self.succeeded = 0
        self.failed = 0
        self.lost = 0
        self.polls = 0
        #: Set after each claim poll (a test signal).
        self.polled = asyncio.Event()

    # ---------------------------------------------------------------- wake-ups

    def wake(self) -> None:
        """Claim now (a NOTIFY for a served queue, a listener reconnect)."""
        self._wake.set()

    def notify(self, queue: str) -> None:
        if queue in self.cfg.queues:
            self._wake.set()

    def cancel_task(self, task_pk: int) -> None:
        """Cancel the running handler of this task, if this process runs it; the task is retried."""
        job = self.running.get(task_pk)
        if job is None or job.finished:
            return
        logger.info(
            "cancelling task %s", job.task.id, extra={"action": "task_cancel", "task_id": job.task.id}
        )
        self._interrupt(job, TaskCancelled("task cancelled"))

    # ---------------------------------------------------------------- claimer

    def _order(self) -> list[str]:
        if self._strict_order is not None:
            return self._strict_order
        return weighted_order(self.cfg.queues)

    async def run_claimer(self) -> None:
        """Claim until stop_claiming(); never raises on database errors (backs off)."""
        conn: psycopg.AsyncConnection[Any] | None = None
        backoff = 0.05
        busy_backoff = 0.005
        woken = False  # this claim follows a wake-up
        empty_wakes = 0  # wake-ups in a row whose claim found nothing
        cfg = self.cfg
        try:
            while not self._stopping:
                free = cfg.concurrency - len(self.running)
                if free <= 0:
                    self._slot_free.clear()
                    await self._slot_free.wait()
                    continue
                if len(self._acks) >= self._ack_backlog:
                    # Outcomes are written slower than tasks finish: let the flusher catch up.
                    self._flushed.clear()
                    await self._flushed.wait()
                    continue
                self._wake.clear()
                try:
                    if conn is None:
                        conn = await self.pool.getconn()
                        # A claim need not wait for its WAL flush: if the database loses it in
                        # a crash, the task is simply claimable again (at-least-once), and the
                        # durable ack that follows flushes the claim with it. Generic plans: the
                        # claim's custom plan costs as much planning as executing 50 rows (a
                        # prepared statement keeps replanning: its generic cost looks higher).
                        await conn.execute("SET synchronous_commit = off")
                        await conn.execute("SET plan_cache_mode = force_generic_plan")
                    cur = conn.cursor(row_factory=tuple_row)
                    lease_until = self._loop.time() + cfg.lease_duration
                    limit = min(free, self._claim_max)
                    rows = await tasks.claim_many(
                        cur,
                        self.q,
                        queues=self._order(),
                        limit=limit,
                        worker_id=cfg.worker_id,
                        lease=cfg.lease_duration,
                    )
                    self.polls += 1
                    for row in rows:
                        self._start(row, lease_until)
                    self.polled.set()
                    if len(rows) >= limit or self._stopping:
                        # Claim again at once, before the tasks just started get to run: the
                        # next claim is in flight while they run (the await yields to them).
                        backoff = 0.05
                        continue
                    if rows:
                        await asyncio.sleep(0)  # let the tasks just started begin first
                    wait = await tasks.next_due(cur, self.q, queues=self._queue_names)
                    backoff = 0.05
                    OUTAGE.ok("claimer")
                except Exception as exc:
                    # Never let the claimer die: a dead claimer leaves a live process that claims nothing.
                    if is_database_error(exc):
                        OUTAGE.failed("claimer", exc, backoff)
                    elif isinstance(exc, psycopg.Error):
                        logger.error(
                            "claimer: %s; retrying in %.2fs", exc, backoff, extra={"action": "claim_error"}
                        )
                    else:
                        logger.exception(
                            "claimer: unexpected error; retrying in %.2fs",
                            backoff,
                            extra={"action": "claim_error"},
                        )
                    await self._drop(conn)
                    conn = None
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                if rows:
                    busy_backoff = 0.005
                    empty_wakes = 0
                elif woken:
                    empty_wakes += 1
                timeout = cfg.poll_interval
                if wait is not None:
                    if wait <= 0:
                        # Due rows exist that another claimer holds locked: look again shortly.
                        timeout = min(timeout, busy_backoff)
                        busy_backoff = min(busy_backoff * 2, cfg.poll_interval)
                    else:
                        timeout = min(timeout, wait + 0.001)
                await self._sleep(timeout)
                woken = self._wake.is_set()
                if woken and empty_wakes >= WAKE_GRACE and not self._stopping:
                    # Wake-ups keep finding nothing (other workers won the tasks, or a role
                    # floods pgq_wake: RELIABILITY S4): let them gather before claiming.
                    await asyncio.sleep(min(WAKE_COOLDOWN_MAX, 0.005 * 2 ** (empty_wakes - WAKE_GRACE)))
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.execute("RESET synchronous_commit")
                    await conn.execute("RESET plan_cache_mode")
                await self.pool.putconn(conn)

    async def _drop(self, conn: psycopg.AsyncConnection[Any] | None) -> None:
        if conn is not None:
            with contextlib.suppress(Exception):
                await self.pool.putconn(conn)

    async def _sleep(self, seconds: float) -> None:
        await self._wake.wait(seconds)

    def stop_claiming(self) -> None:
        self._stopping = True
        self._wake.set()
        self._slot_free.set()
        self._flushed.set()

    # ---------------------------------------------------------------- running

    def _start(self, row: tuple[Any, ...], lease_until: float) -> None:
        (
            pk,
            task_id,
            queue,
            type_,
            payload,
            headers,
            group,
            retried,
            max_retry,
            attempt,
            enqueued_at,
            deadline,
            remaining,
            plain,
        ) = row
        # payload and headers come as JSON text; a row written by SQL may hold what no handler
        # can take (R19): fail it, never the claimer.
        payload = safe_json_loads(payload)
        bad: Exception | None = None
        if headers is None:
            headers = {}
        elif type(headers := safe_json_loads(headers)) is not dict:
            if isinstance(headers, UndecodableJSON):
                bad = UndecodableTaskError(f"the stored payload or headers cannot be decoded: {headers}")
            else:
                bad = UndecodableTaskError(
                    "the stored task is invalid: headers must be a mapping of str to str, "
                    f"not {type(headers).__name__}"
                )
            headers = {}
        if isinstance(payload, UndecodableJSON):
            bad = UndecodableTaskError(f"the stored payload or headers cannot be decoded: {payload}")
            payload = None
        # What Task(type_, payload, headers=headers) builds, without re-checking options that
        # come from the database (a few microseconds per task in a drain).
        task: Task = _new_object(Task)
        task.type = type_
        task.payload = payload
        task.headers = headers
        task.options = {"max_retry": max_retry}
        task._id = task_id if task_id is not None else str(pk)
        task._queue = queue
        task._group = group
        task._retried = retried
        task._enqueued_at = enqueued_at
        task._deadline = deadline
        job = _Job(self, pk, attempt, task, lease_until)
        job.plain = plain
        task.result_writer = _ResultWriter(job)
        task._completer = _Completer(job)
        old = self.running.get(pk)
        if old is not None:
            # This worker lost the task (its lease ran out while it was starved) and has just
            # claimed it again: the older attempt is fenced off; stop trusting it first.
            self._lose(old, f"claimed again as attempt {attempt}")
        self.running[pk] = job
        self._idle.clear()
        self.claimed += 1
        if bad is not None:
            self._finish_err(job, bad)
            return
        if remaining <= 0:
            late = TaskDeadlineExceeded("task deadline exceeded")
            self._call_error_handler(task, late)
            self._finish_err(job, late)
            return
        loop = self._loop
        if remaining <= NEAR_DEADLINE:
            job.timer = loop.call_later(remaining, self._on_deadline, job)
        else:
            job.deadline_at = loop.time() + remaining
        resolved = self.resolve(type_)
        if resolved is None:
            missing = HandlerNotFoundError(f"no handler registered for task type {type_!r}")
            self._call_error_handler(task, missing)
            self._finish_err(job, missing)
            return
        fn, is_async = resolved
        if is_async:
            # One asyncio task per job, which records the outcome itself (no done callback).
            job.handle = _AsyncTask(_run_async(job, fn), loop=loop)
        else:
            job.sync = True
            self._threads.submit(job, fn)

    def _sync_done(self, job: _Job, exc: BaseException | None) -> None:
        if job.finished:
            return
        if exc is None:
            self._finish_ok(job)
        else:
            self._finish_err(job, exc)

    def _call_error_handler(self, task: Task, exc: BaseException) -> None:
        eh = self.cfg.error_handler
        if eh is None:
            return
        try:
            r = eh(task, exc)
            if inspect.isawaitable(r):
                if threading.get_ident() == self._loop_thread:
                    self._loop.create_task(_await(r))
                else:
                    asyncio.run_coroutine_threadsafe(_await(r), self._loop).result()
        except Exception:
            logger.exception("error_handler raised", extra={"action": "error_handler_failed"})

    def _on_deadline(self, job: _Job) -> None:
        if not job.finished:
            self._interrupt(job, TaskDeadlineExceeded("task deadline exceeded"))

    def _interrupt(self, job: _Job, reason: BaseException) -> None:
        """Stop a running handler for `reason` and record the failure."""
        job.reason = reason
        if job.sync or job.handle is None or not job.started:
            if not job.sync and job.handle is not None:
                job.handle.cancel()  # not started yet: it never runs, so the failure is recorded here
            self._abandon(job)
            self._call_error_handler(job.task, reason)
            self._finish_err(job, reason)
        else:
            job.handle.cancel()  # _run_async records the failure

    def _abandon(self, job: _Job) -> None:
        """Stop waiting for a sync handler. Its thread cannot be stopped: if it already
        runs the handler, start a replacement so that the pool keeps its size (the
        thread exits when the handler returns)."""
        job.abandoned = True
        if job.sync and job.started and not job.replaced:
            job.replaced = True
            self._threads.replace()

    def _release(self, job: _Job) -> None:
        job.finished = True
        if self.running.get(job.id) is job:  # not a newer attempt of the same task (see _start)
            del self.running[job.id]
        if job.timer is not None:
            job.timer.cancel()
        self._slot_free.set()
        if not self.running:
            self._idle.set()

    def _finish_ok(self, job: _Job) -> None:
        self._release(job)
        self.succeeded += 1
        self._acks.append(Ack(job.id, job.attempt, DONE, None, None, None, False, job.plain))
        self._flush_wanted.set()

    def _finish_err(self, job: _Job, exc: BaseException) -> None:
        self._release(job)
        task = job.task
        err = error_text(exc)
        failed = True
        if self.cfg.is_failure is not None:
            try:
                failed = bool(self.cfg.is_failure(exc))
            except Exception:
                logger.exception("is_failure raised; counting the error as a failure")
        if failed and (isinstance(exc, SkipRetry) or task.retried >= task.max_retry):
            ack = Ack(job.id, job.attempt, ARCHIVE, None, err, None, True)
        else:
            ack = Ack(job.id, job.attempt, RETRY, self._delay(task, exc), err, None, failed)
        self.failed += 1
        level = logging.INFO if ack.kind == RETRY else logging.WARNING
        logger.log(
            level,
            "task %s (%s) failed: %s; %s",
            task.id,
            task.type,
            err,
            "retrying" if ack.kind == RETRY else "archived",
            extra={"action": "task_failed", "task_id": task.id, "outcome": ack.kind},
        )
        self._acks.append(ack)
        self._flush_wanted.set()

    def _delay(self, task: Task, exc: BaseException) -> float:
        try:
            d = self._retry_delay(task.retried, exc, task)
            s = d.total_seconds() if isinstance(d, timedelta) else float(d)
            if not math.isfinite(s) or s < 0:
                raise ValueError(f"retry_delay_func returned {d!r}")
            return s
        except Exception:
            logger.exception("retry_delay_func failed; using the default backoff")
            return default_retry_delay(task.retried, exc, task)

    def _lose(self, job: _Job, why: str) -> None:
        """Stop trusting a task: cancel its handler; its outcome is not written."""
        if job.finished:
            return
        logger.warning(
            "task %s: %s; abandoning it",
            job.task.id,
            why,
            extra={"action": "lease_lost", "task_id": job.task.id},
        )
        self.lost += 1
        job.reason = LeaseLost(why)
        self._release(job)
        if job.sync or job.handle is None:
            self._abandon(job)
        else:
            job.handle.cancel()

    def _queue_result(
        self, job: _Job, text: str, waiter: asyncio.Future[None] | concurrent.futures.Future[None] | None
    ) -> None:
        if job.finished:
            err = LeaseLost(f"task {job.task.id} is no longer running here; its result was not written")
            if waiter is None:
                raise err
            waiter.set_exception(err)
            return
        self._acks.append(Ack(job.id, job.attempt, RESULT, None, None, text, False))
        self._has_results = True
        if waiter is not None:
            self._waiters.append((job.id, waiter))
        self._flush_wanted.set()

    # ---------------------------------------------------------------- flusher

    async def run_flusher(self) -> None:
        """Write buffered outcomes in batches until close_flusher() and the buffer is empty."""
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            while True:
                if not self._acks:
                    if self._closing:
                        return
                    self._flush_wanted.clear()
                    await self._flush_wanted.wait()
                    continue
                batch, self._acks = self._acks, []
                waiters, self._waiters = self._waiters, []
                if self._has_results:
                    batch = _merge_results(batch)
                    self._has_results = False
                n = self.cfg.ack_batch_max
                applied: set[int] = set()
                # Plain completions and the other outcomes are written by different statements
                # (tasks.ack_many): each group is written (and retried or split) on its own,
                # so that a retry never sends again what another statement already applied.
                plain = [a for a in batch if a.plain and a.kind == DONE and a.result is None]
                other = [a for a in batch if not (a.plain and a.kind == DONE and a.result is None)]
                for group in (plain, other):
                    for i in range(0, len(group), n):
                        done, conn = await self._write(group[i : i + n], conn)
                        applied |= done
                self._report(batch, applied, waiters)
                self._flushed.set()
        finally:
            if conn is not None:
                await self.pool.putconn(conn)

    async def _write(
        self, batch: list[Ack], conn: psycopg.AsyncConnection[Any] | None
    ) -> tuple[set[int], psycopg.AsyncConnection[Any] | None]:
        backoff = 0.05
        while True:
            try:
                if conn is None:
                    conn = await self.pool.getconn()
                applied = await tasks.ack_many(conn.cursor(row_factory=tuple_row), self.q, batch)
                OUTAGE.ok("flusher")
                return applied, conn
            except DATABASE_ERRORS as exc:
                OUTAGE.failed("flusher", exc, backoff)
                await self._drop(conn)
                conn = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except psycopg.Error as exc:
                if len(batch) == 1:
                    logger.error(
                        "flusher: cannot write the outcome of task %s: %s",
                        batch[0].id,
                        exc,
                        extra={"action": "ack_rejected"},
                    )
                    return set(), conn
                mid = len(batch) // 2
                a, conn = await self._write(batch[:mid], conn)
                b, conn = await self._write(batch[mid:], conn)
                return a | b, conn

    def _report(
        self,
        batch: list[Ack],
        applied: set[int],
        waiters: list[tuple[int, asyncio.Future[None] | concurrent.futures.Future[None]]],
    ) -> None:
        if self._completed_in_tx:
            for a in batch:
                if a.id in self._completed_in_tx and a.kind != RESULT:
                    # The handler completed the task in its transaction: this outcome
                    # changed nothing if that committed, and applied if it rolled back.
                    self._completed_in_tx.discard(a.id)
                    applied = applied | {a.id}
        if len(applied) < len(batch):
            for a in batch:
                if a.id not in applied:
                    self.lost += 1
                    logger.warning(
                        "task %s: lease lost; its %s was not written",
                        a.id,
                        a.kind,
                        extra={"action": "lease_lost", "task_pk": a.id, "outcome": a.kind},
                    )
        for pk, w in waiters:
            if w.done():
                continue
            if pk in applied:
                w.set_result(None)
            else:
                w.set_exception(LeaseLost(f"task {pk}: lease lost; the result was not written"))

    async def close_flusher(self, flusher: asyncio.Task[None], within: float) -> None:
        self._closing = True
        self._flush_wanted.set()
        try:
            await asyncio.wait_for(asyncio.shield(flusher), within)
        except TimeoutError:
            logger.error(
                "flusher: %d outcomes not written at shutdown (the recoverer will retry them)",
                len(self._acks),
                extra={"action": "ack_abandoned"},
            )
            flusher.cancel()
            with contextlib.suppress(BaseException):
                await flusher

    # ---------------------------------------------------------------- heartbeat

    def abandon_expired(self, why: str) -> None:
        """Abandon every running task whose local lease estimate has run out (see _lose)."""
        now = self._loop.time()
        for job in list(self.running.values()):
            if job.lease_until <= now:
                self._lose(job, why)

    async def beat(self) -> None:
        """Extend the leases of the running tasks; abandon those lost; sweep far deadlines."""
        loop = self._loop
        self.abandon_expired("lease expired before it could be extended")
        now = loop.time()
        for job in self.running.values():
            if job.timer is None and job.deadline_at - now <= NEAR_DEADLINE:
                job.timer = loop.call_later(max(0.0, job.deadline_at - now), self._on_deadline, job)
        owned = [(j.id, j.attempt) for j in self.running.values()]
        if not owned:
            return
        sent = loop.time()
        kept = await self._extend_within_leases(owned)
        if kept is None:
            return
        for pk, attempt in owned:
            still = self.running.get(pk)
            if still is None or still.attempt != attempt:
                continue
            if pk in kept:
                still.lease_until = sent + self.cfg.lease_duration
            else:
                self._lose(still, "lease lost (the task was recovered or changed elsewhere)")

    async def _extend(self, owned: list[tuple[int, int]]) -> set[int]:
        async with self.pool.connection() as conn:
            return await tasks.extend_leases(
                conn.cursor(row_factory=tuple_row), self.q, owned, lease=self.cfg.lease_duration
            )

    async def _extend_within_leases(self, owned: list[tuple[int, int]]) -> set[int] | None:
        """The ids whose leases the heartbeat extended, waiting no longer than the leases last.

        A half-open socket (a partition, a dead peer, a stalled proxy) leaves the statement, or
        the pool's wait for a connection, unanswered for as long as TCP allows (minutes without
        tcp_user_timeout; for ever if the peer keeps the socket open). The local lease estimate
        must not wait for it: each task whose lease runs out meanwhile is abandoned at its local
        deadline (handler cancelled, outcome not written), which comes before the database's
        (lease_until is taken before the extension is sent). Once no task is left to extend, the
        statement is cancelled (psycopg closes a connection it cannot cancel within 10 s and the
        pool replaces it). None then; database errors are raised as before (R12).
        """
        loop = self._loop
        ext = loop.create_task(self._extend(owned))
        try:
            while True:
                jobs = [j for pk, a in owned if (j := self.running.get(pk)) is not None and j.attempt == a]
                if not jobs:
                    return None
                wait = min(j.lease_until for j in jobs) - loop.time()
                done, _ = await asyncio.wait({ext}, timeout=max(0.0, wait))
                if done:
                    return ext.result()
                self.abandon_expired("lease expired: the database did not answer the heartbeat in time")
        finally:
            if not ext.done():
                ext.cancel()
                ext.add_done_callback(_consume)

    # ---------------------------------------------------------------- shutdown

    async def wait_idle(self, within: float) -> bool:
        if not self.running:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), within)
        return not self.running

    def requeue_running(self) -> int:
        """Return every unfinished task to 'pending' (no retry counted) and stop its handler."""
        n = 0
        for job in list(self.running.values()):
            self._release(job)
            job.reason = LeaseLost("shutdown")
            if job.sync or job.handle is None:
                job.abandoned = True
            else:
                job.handle.cancel()
            self._acks.append(Ack(job.id, job.attempt, REQUEUE))
            n += 1
        if n:
            self._flush_wanted.set()
        return n

    def stop_threads(self) -> None:
        self._threads.stop()


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned statement's outcome (no 'exception never retrieved' log)."""
    if not fut.cancelled():
        fut.exception()


def _merge_results(batch: list[Ack]) -> list[Ack]:
    """One row per task: a result write folds into the task's later outcome in the same batch."""
    merged: dict[int, Ack] = {}
    for a in batch:
        prev = merged.get(a.id)
        if prev is not None and prev.kind == RESULT and a.kind != RESULT and a.result is None:
            a = a._replace(result=prev.result)
        merged[a.id] = a
    return list(merged.values())
