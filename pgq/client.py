"""Client and AsyncClient: enqueue tasks, alone or inside the caller's transaction.

Both are thin twins over pure helpers: `build_params` validates every option
and turns a list of tasks into the bound arrays of the insert (`task_enqueue`),
and `to_infos` turns its rows into TaskInfo. Validation runs before any SQL is
sent, so a bad enqueue never aborts the caller's transaction.

Three shapes of the same insert, chosen by what the call needs:
- one task with no option but its queue (`lean_args`): `task_enqueue_lean`,
  three bound values, every other column its default. A single enqueue is one
  round trip and one commit, so the Python around it is most of what pgq adds;
- one task with other options: `task_enqueue_plain` (scalars), or the general
  statement when it needs a group or a unique lock;
- many tasks: COPY from 64 tasks when none needs a unique lock or a schedule
  (`_CopyPlan`), else the general statement over arrays. On pgq's own
  connection a batch sharing one options dict is encoded row by row as COPY
  writes it (`build_params(defer_payloads=True)`): the server inserts while
  Python encodes, and a bad payload fails the COPY, which rolls back whole. On
  the caller's connection every payload is checked first.

With `conn=`, the enqueue runs on the caller's connection and never commits it.
The only error that PostgreSQL itself detects is a task_id conflict; when a
task_id is given, the insert runs under a savepoint so that conflict leaves the
caller's transaction usable.

Wake-ups: the insert sends one NOTIFY per queue (PostgreSQL folds duplicates
within a transaction). On its own connections the Client debounces them per
queue (see `WakeDebouncer`): a NOTIFY serialises commits database-wide, so
under a stream of enqueues only the first in each short window notifies and a
trailing NOTIFY covers the rest.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, nullcontext
from datetime import UTC, datetime, timedelta
from typing import Any, LiteralString

import psycopg
import psycopg_pool

from pgq import _sql, db
from pgq.errors import (
    DuplicateTaskError,
    InvalidArgumentError,
    PayloadTooLargeError,
    TaskIDConflictError,
)
from pgq.task import (
    MAX_PAYLOAD_BYTES,
    Task,
    TaskInfo,
    check_name,
    check_options,
    encode_headers,
    encode_payload,
    parse_duration,
)

_SAVEPOINT = "SAVEPOINT pgq_enqueue"
_ROLLBACK_SAVEPOINT = "ROLLBACK TO SAVEPOINT pgq_enqueue"
_RELEASE_SAVEPOINT = "RELEASE SAVEPOINT pgq_enqueue"

_COLUMNS = (
    "task_id",
    "queue",
    "type",
    "payload",
    "headers",
    "group_key",
    "max_retry",
    "timeout",
    "deadline",
    "retention",
    "unique_ttl",
    "process_at",
    "process_in",
)


def _positive(value: Any, name: str) -> float:
    s = parse_duration(value, name)
    if s <= 0:
        raise InvalidArgumentError(f"{name} must be positive, got {value!r}")
    return s


def _aware(value: Any, name: str) -> datetime:
    if not isinstance(value, datetime):
        raise InvalidArgumentError(f"{name} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise InvalidArgumentError(f"{name} must be timezone-aware (got a naive datetime: {value})")
    return value


def _options(o: dict[str, Any]) -> tuple[Any, ...]:
    """The checked options (None values already dropped), in the order of `_COLUMNS` minus
    type, payload and headers: task_id, queue, group, max_retry, timeout, deadline,
    retention, unique, process_at, process_in."""
    queue = check_name(o.get("queue", "default"), "queue")
    group = o.get("group")
    if group is not None:
        check_name(group, "group")
    task_id = o.get("task_id")
    if task_id is not None:
        check_name(task_id, "task_id", allow_digits=False)
    max_retry = o.get("max_retry", 25)
    if isinstance(max_retry, bool) or not isinstance(max_retry, int):
        raise InvalidArgumentError(f"max_retry must be an int, not {type(max_retry).__name__}")
    if max_retry < 0:
        raise InvalidArgumentError(f"max_retry must be >= 0, got {max_retry}")
    if max_retry > 2**31 - 1:
        raise InvalidArgumentError(f"max_retry is too large: {max_retry}")
    timeout = o.get("timeout")
    timeout_s = _positive(timeout, "timeout") if timeout is not None else None
    deadline = o.get("deadline")
    if deadline is not None:
        _aware(deadline, "deadline")
    retention = o.get("retention")
    retention_s = None
    if retention is not None:
        retention_s = parse_duration(retention, "retention")
        if retention_s < 0:
            raise InvalidArgumentError(f"retention must not be negative, got {retention!r}")
    unique = o.get("unique")
    unique_s = _positive(unique, "unique") if unique is not None else None
    process_at, process_in = o.get("process_at"), o.get("process_in")
    if process_at is not None and process_in is not None:
        raise InvalidArgumentError("give process_at or process_in, not both")
    if process_at is not None:
        _aware(process_at, "process_at")
    process_in_s = None
    if process_in is not None:
        process_in_s = parse_duration(process_in, "process_in")
        if process_in_s < 0:
            raise InvalidArgumentError(f"process_in must not be negative, got {process_in!r}")
    return (
        task_id,
        queue,
        group,
        max_retry,
        timeout_s,
        deadline,
        retention_s,
        unique_s,
        process_at,
        process_in_s,
    )


def build_params(
    items: Sequence[tuple[Task, dict[str, Any]]], *, defer_payloads: bool = False
) -> dict[str, Any]:
    """Validate each (task, options) pair and build the arrays of `task_enqueue`.

    enqueue_many passes one options dict for every task: it is checked once, and
    each task costs only its type check and its payload encoding (the hot path).

    defer_payloads=True (pgq's own connection, where a failed statement harms
    nobody): a batch bound for COPY keeps its payloads as given, and the COPY
    encodes each as it writes its row, while the server inserts the rows before
    it. A payload that is not JSON then fails the COPY, which rolls back; its
    error is the one encode_payload raises. params["deferred"] says which.
    """
    if not items:
        raise InvalidArgumentError("nothing to enqueue")
    if len(items) > 1 and not any(isinstance(t, Task) and t.options for t, _ in items):
        shared_params = _shared_params(items, defer_payloads)
        if shared_params is not None:
            return shared_params
    task_id: list[Any] = []
    queue: list[Any] = []
    type_: list[Any] = []
    payload: list[Any] = []
    headers: list[Any] = []
    group: list[Any] = []
    max_retry: list[Any] = []
    timeout: list[Any] = []
    deadline: list[Any] = []
    retention: list[Any] = []
    unique: list[Any] = []
    process_at: list[Any] = []
    process_in: list[Any] = []
    shared: dict[int, tuple[Any, ...]] = {}  # id(opts) -> checked options, for tasks without their own
    types_ok: set[str] = set()
    for task, opts in items:
        if not isinstance(task, Task):
            raise InvalidArgumentError(f"enqueue takes a pgq.Task, not {type(task).__name__}")
        if task.options:
            check_options(opts, "enqueue()")
            # An option given as None is "not given": the task's own value or the default applies.
            o = {k: v for k, v in task.options.items() if v is not None}
            o.update((k, v) for k, v in opts.items() if v is not None)
            opt = _options(o)
        else:
            cached = shared.get(id(opts))
            if cached is None:
                check_options(opts, "enqueue()")
                cached = shared[id(opts)] = _options({k: v for k, v in opts.items() if v is not None})
            opt = cached
        t = task.type
        if t not in types_ok:
            types_ok.add(check_name(t, "task type"))
        task_id.append(opt[0])
        queue.append(opt[1])
        type_.append(t)
        payload.append(encode_payload(task.payload))
        headers.append(encode_headers(task.headers) if task.headers else None)
        group.append(opt[2])
        max_retry.append(opt[3])
        timeout.append(opt[4])
        deadline.append(opt[5])
        retention.append(opt[6])
        unique.append(opt[7])
        process_at.append(opt[8])
        process_in.append(opt[9])
    if any(x is not None for x in task_id):
        seen_ids: set[tuple[str, str]] = set()
        for tid, q in zip(task_id, queue, strict=True):
            if tid is not None:
                if (q, tid) in seen_ids:
                    raise TaskIDConflictError(f"task_id {tid!r} appears twice in queue {q!r}")
                seen_ids.add((q, tid))
    if len(items) > 1 and any(x is not None for x in unique):
        seen_unique: set[tuple[str, str, str]] = set()
        for u, q, t, p in zip(unique, queue, type_, payload, strict=True):
            if u is not None:
                # the lock key is the jsonb text, whose key order is canonical: compare canonically too
                key = (q, t, json.dumps(json.loads(p), sort_keys=True))
                if key in seen_unique:
                    raise DuplicateTaskError(
                        f"two unique tasks of type {t!r} with the same payload in queue {q!r}"
                    )
                seen_unique.add(key)
    return {
        "task_id": task_id,
        "queue": queue,
        "type": type_,
        "payload": payload,
        "headers": headers,
        "group_key": group,
        "max_retry": max_retry,
        "timeout": timeout,
        "deadline": deadline,
        "retention": retention,
        "unique_ttl": unique,
        "process_at": process_at,
        "process_in": process_in,
        "deferred": False,
    }


def _shared_params(
    items: Sequence[tuple[Task, dict[str, Any]]], defer_payloads: bool
) -> dict[str, Any] | None:
    """build_params for a batch whose tasks share one options dict and carry none of
    their own (enqueue_many's usual call): the options are checked once and their
    columns repeat one value, so each task costs only its type check and its payload.
    None when the shared options need build_params' per-task checks (task_id, unique)."""
    opts = items[0][1]
    if any(o is not opts for _, o in items):
        return None
    check_options(opts, "enqueue()")
    opt = _options({k: v for k, v in opts.items() if v is not None})
    if opt[0] is not None or opt[7] is not None:
        return None
    n = len(items)
    deferred = defer_payloads and n >= COPY_MIN_TASKS and opt[8] is None and opt[9] is None
    types_ok: set[str] = set()
    type_, payload, headers = [], [], []
    for task, _ in items:
        if not isinstance(task, Task):
            raise InvalidArgumentError(f"enqueue takes a pgq.Task, not {type(task).__name__}")
        t = task.type
        if t not in types_ok:
            types_ok.add(check_name(t, "task type"))
        type_.append(t)
        payload.append(task.payload if deferred else encode_payload(task.payload))
        headers.append(encode_headers(task.headers) if task.headers else None)
    columns = dict(zip(_SHARED_COLUMNS, opt, strict=True))
    return {
        **{k: [v] * n for k, v in columns.items()},
        "type": type_,
        "payload": payload,
        "headers": headers,
        "deferred": deferred,
    }


#: The columns of task_enqueue that `_options` gives, in its order.
_SHARED_COLUMNS = tuple(c for c in _COLUMNS if c not in ("type", "payload", "headers"))


def to_infos(
    rows: Iterable[Sequence[Any]], items: Sequence[tuple[Task, dict[str, Any]]], params: dict[str, Any]
) -> list[TaskInfo]:
    """TaskInfo for each inserted row; DuplicateTaskError when a unique task was skipped.

    Rows are in the column order of task_enqueue's result:
    (id, task_id, queue, state, group_key, enqueued_at, run_at, notified). A list of
    rows is checked for skipped tasks; any other iterable must hold one row per task.
    """
    if isinstance(rows, list) and len(rows) != len(items):
        skipped = len(items) - len(rows)
        raise DuplicateTaskError(
            f"{skipped} task(s) not enqueued: a task with the same queue, type and payload "
            "holds its unique lock"
        )
    out = []
    max_retry, timeout, deadline, retention = (
        params["max_retry"],
        params["timeout"],
        params["deadline"],
        params["retention"],
    )
    for r, (task, _), i in zip(rows, items, range(len(items)), strict=True):
        # positional, in TaskInfo's field order (id ... enqueued_at): half the cost of
        # keywords, which counts at 10,000 a call; the rarer fields are set after
        info = TaskInfo(
            r[1] if r[1] is not None else str(r[0]),
            r[2],
            task.type,
            task.payload,
            r[3],
            r[4],
            max_retry[i],
            0,
            r[6],
            None,
            None,
            None,
            r[5],
        )
        if task.headers:
            info.headers = dict(task.headers)
        if timeout[i] is not None:
            info.timeout = timedelta(seconds=timeout[i])
        if deadline[i] is not None:
            info.deadline = deadline[i]
        if retention[i] is not None:
            info.retention = timedelta(seconds=retention[i])
        out.append(info)
    return out


def _td(seconds: float | None) -> timedelta | None:
    return None if seconds is None else timedelta(seconds=seconds)


def _map_error(exc: psycopg.errors.UniqueViolation, params: dict[str, Any]) -> Exception:
    if exc.diag.constraint_name and "task_id" in exc.diag.constraint_name:
        given = [(t, q) for t, q in zip(params["task_id"], params["queue"], strict=True) if t is not None]
        if len(given) == 1:
            tid, queue = given[0]
            return TaskIDConflictError(f"a task with task_id {tid!r} already exists in queue {queue!r}")
        ids = [t for t, _ in given]
        return TaskIDConflictError(f"one of the task_ids {ids!r} already exists in its queue")
    return exc


#: How long a trailing NOTIFY may lag the last enqueue of a stream (see WakeDebouncer).
STREAM_TRAIL = 0.02


class WakeDebouncer:
    """Decides which queues an enqueue on pgq's own connection should NOTIFY.

    A queue notified less than `window` seconds ago is not notified again; it is
    marked for a trailing NOTIFY instead. An enqueue that comes after the window
    notifies (and so covers the skipped ones); `take_due()` hands out the trailing
    NOTIFY when no enqueue has done so by the time it is due. So a steady stream
    costs one NOTIFY per window, carried by an enqueue's own statement, and no
    extra transaction. With window=0 every enqueue notifies.

    When the trailing NOTIFY is due: two windows after the last NOTIFY, so a burst
    that stops is followed by one within two windows (4 ms by default). But once a
    queue is *streaming* (an enqueue notified while a skipped one still waited for
    its trailing NOTIFY: the enqueues go on past a window), a skipped enqueue puts
    its queue's trailing NOTIFY `trail` (STREAM_TRAIL, at least two windows) after
    itself. Whoever sends the trailing NOTIFY (the Client's thread, the
    AsyncClient's task) wakes when one may be due, and during a stream every
    inline NOTIFY pushes that moment on: with two windows it woke every ~2 ms to
    find nothing due (0.25-0.33 wake-ups per enqueue). With `trail` it wakes at
    most about once per `trail - window` (0.04-0.06 per enqueue), and one-task
    enqueues take 0.89-1.00x the time on an idle 2-core machine, 0.92-0.94x with
    one core kept busy (benchmarks/wakeups.py). The price: when a stream stops,
    its last tasks wait up to `trail` for their wake-up, if no busy worker finds
    them first. A queue stops streaming when its trailing NOTIFY is sent or an
    enqueue notifies with none pending.
    """

    def __init__(self, window: float, trail: float = STREAM_TRAIL) -> None:
        self.window = window
        self.trail = max(2 * window, trail)
        self._last: dict[str, float] = {}
        self._trailing: dict[str, float] = {}  # queue -> when the trailing NOTIFY is to be sent
        self._streaming: set[str] = set()
        self._lock = threading.Lock()

    def choose(self, queues: Iterable[str]) -> tuple[list[str], float | None]:
        """(queues to notify now, delay after which a trailing one may be due, or None)."""
        if self.window <= 0:
            return sorted(set(queues)), None
        now = time.monotonic()
        notify, delay = [], None
        with self._lock:
            for q in set(queues):
                last = self._last.get(q)
                if last is None or now - last >= self.window:
                    self._last[q] = now
                    if self._trailing.pop(q, None) is None:
                        self._streaming.discard(q)
                    else:
                        self._streaming.add(q)
                    notify.append(q)
                else:
                    at = now + self.trail if q in self._streaming else last + 2 * self.window
                    self._trailing[q] = at
                    delay = at - now if delay is None else min(delay, at - now)
        return notify, delay

    def take_due(self) -> tuple[list[str], float | None]:
        """(queues whose trailing NOTIFY is due now, delay until the next one, or None)."""
        now = time.monotonic()
        due, nxt = [], None
        with self._lock:
            for q, at in list(self._trailing.items()):
                if at <= now:
                    del self._trailing[q]
                    self._streaming.discard(q)
                    self._last[q] = now
                    due.append(q)
                else:
                    nxt = at - now if nxt is None else min(nxt, at - now)
        return due, nxt

    def drain(self) -> list[str]:
        """Every queue still waiting for a trailing NOTIFY (at close)."""
        with self._lock:
            queues = list(self._trailing)
            self._trailing.clear()
            self._streaming.clear()
        return queues


def _items(tasks: Iterable[Task], opts: dict[str, Any]) -> list[tuple[Task, dict[str, Any]]]:
    return [(t, opts) for t in tasks]


#: The parameters of task_enqueue_lean, in the order of lean_args' result.
_LEAN_PARAMS = ("queue", "type", "payload")

#: How many valid queue and type names a client remembers (then it starts over).
_NAMES_KEPT = 4096


def lean_args(task: Task, opts: dict[str, Any], names: set[str]) -> tuple[str, str, str] | None:
    """(queue, type, payload JSON) when one task can take `task_enqueue_lean`: no option
    but its queue, no headers, a payload below the guard size. None sends it down the
    general path (build_params), which also names whatever is wrong with it.

    `names` holds names already checked (queues and types obey the same rules), so a
    client that enqueues the same types over and over checks each name once.
    """
    if not isinstance(task, Task) or task.options or task.headers:
        return None
    queue = "default"
    if opts:
        if len(opts) != 1 or opts.get("queue") is None:
            return None
        queue = opts["queue"]
    type_ = task.type
    if queue not in names or type_ not in names:
        check_name(queue, "queue")
        check_name(type_, "task type")
        if len(names) >= _NAMES_KEPT:
            names.clear()
        names.update((queue, type_))
    payload = encode_payload(task.payload)
    if len(payload) > _GUARD_PAYLOAD_CHARS:
        return None
    return queue, type_, payload


def lean_info(task: Task, queue: str, row: tuple[Any, ...]) -> TaskInfo:
    """TaskInfo of a task enqueued by `task_enqueue_lean` from its row (id, enqueued_at, _)."""
    return TaskInfo(
        id=str(row[0]),
        queue=queue,
        type=task.type,
        payload=task.payload,
        state="pending",
        next_process_at=row[1],
        enqueued_at=row[1],
    )


_ARRAY_PARAM = re.compile(r"%\((\w+)\)b::(\w+)\[\]")


def one_row_query(query: LiteralString) -> LiteralString:
    """`task_enqueue` for one task: each array parameter becomes ARRAY[scalar].

    The statement is the same text otherwise, so one task and many behave alike;
    binding 13 scalars instead of 13 one-element lists is what makes a single
    enqueue cheap on the client.
    """
    # We vouch for this: only our own placeholders are rewritten, into other placeholders.
    return _ARRAY_PARAM.sub(r"ARRAY[%(\1)s::\2]", query)


class _Cursors:
    """One tuple-row cursor per connection of the Client's own pool, kept for reuse.

    A psycopg cursor learns how to dump each parameter type and caches it; a new
    cursor per call relearns it, which costs about as much client CPU as the rest
    of a single enqueue. Connections of the pool are used by one thread at a time,
    and so are their cursors. Keyed by id(conn) and checked against the
    connection itself; cursors of closed connections are dropped as new ones come.
    """

    def __init__(self) -> None:
        self._by_conn: dict[int, Any] = {}

    def get(self, conn: Any) -> Any:
        cur = self._by_conn.get(id(conn))
        if cur is None or cur.connection is not conn:
            cur = conn.cursor(row_factory=psycopg.rows.tuple_row)
            if len(self._by_conn) >= 64:
                for key, old in list(self._by_conn.items()):
                    if old.connection.closed:
                        self._by_conn.pop(key, None)
            self._by_conn[id(conn)] = cur
        return cur


#: How long the Client keeps one pooled connection out of its pool between calls
#: (see _Kept) before handing it back, so the pool's lifetime rules reach it.
KEPT_SECONDS = 60.0


class _Kept:
    """One connection of the Client's own pool, kept out of it for the next call.

    A single enqueue is one round trip, so the pool's getconn and putconn (locks,
    queue, statistics, reset and lifetime checks) were a sixth of the Python it
    runs. The first call that finds the kept connection free takes it with a
    non-blocking lock; a call that finds it taken (another thread or task is in a
    call) checks one out of the pool as before, so no call ever waits for it. It
    goes back through the pool when it breaks, when a call leaves it in a
    transaction, after KEPT_SECONDS (the pool then applies max_lifetime and
    replaces a closed one), at close(), and after a call that ran while close()
    closed the pool. A threading lock in the AsyncClient
    too: it is only ever tried, never waited on, so it cannot block a loop.
    """

    __slots__ = ("conn", "lock", "since")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: Any = None
        self.since = 0.0

    def take(self) -> tuple[bool, Any]:
        """Try to take the kept connection for a call: (taken, a connection to hand back
        to the pool first: the kept one, closed or kept past KEPT_SECONDS). Taken, the
        caller holds the lock until `done`, and gets a new one from the pool when
        `conn` is None."""
        if not self.lock.acquire(blocking=False):
            return False, None
        conn = self.conn
        stale = conn is not None and (conn.closed or time.monotonic() - self.since > KEPT_SECONDS)
        return True, self.release() if stale else None

    def hold(self, conn: Any) -> None:
        self.conn, self.since = conn, time.monotonic()

    def done(self, pool_closed: bool) -> Any:
        """After a call: release the lock; the connection to hand back to the pool when
        the call left it unfit to keep (broken, in a transaction) or the pool closed."""
        try:
            conn = self.conn
            spent = conn is not None and (
                pool_closed
                or conn.broken
                or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
            )
            return self.release() if spent else None
        finally:
            self.lock.release()

    def leave(self) -> Any:
        """At close: the kept connection, to hand back to the pool; None when there is none
        or a call in flight holds it (that call hands it back, the pool being closed)."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            return self.release()
        finally:
            self.lock.release()

    def release(self) -> Any:
        """The kept connection, no longer kept (to hand back to the pool)."""
        conn, self.conn = self.conn, None
        return conn


class _Checkout:
    """A connection of the Client's own pool for one call: the kept one when it is
    free (see _Kept), else getconn / putconn.

    Its connections are autocommit, so `pool.connection()`'s `with conn:` (a
    no-op commit) and its generator context managers buy nothing on this path
    and cost about 8 µs of a single enqueue; putconn still rolls back a
    connection left in a transaction and discards a broken one. A pool passed
    in by the caller keeps `pool.connection()` (its connections may not be
    autocommit).
    """

    __slots__ = ("_conn", "_kept", "_pool")

    def __init__(self, pool: psycopg_pool.ConnectionPool[Any], kept: _Kept) -> None:
        self._pool = pool
        self._kept: _Kept | None = kept

    def __enter__(self) -> psycopg.Connection[Any]:
        kept = self._kept
        assert kept is not None
        taken, stale = kept.take()
        if not taken:
            self._kept = None
            pooled: psycopg.Connection[Any] = self._pool.getconn()
            self._conn = pooled
            return pooled
        try:
            if stale is not None:
                self._pool.putconn(stale)
            if kept.conn is None:
                kept.hold(self._pool.getconn())
        except BaseException:
            leftover = kept.done(False)
            if leftover is not None:
                self._pool.putconn(leftover)
            raise
        conn: psycopg.Connection[Any] = kept.conn
        self._conn = conn
        return conn

    def __exit__(self, *exc: object) -> None:
        conn = self._conn if self._kept is None else self._kept.done(self._pool.closed)
        if conn is not None:
            self._pool.putconn(conn)  # the pool rolls it back, replaces or closes it


class _AsyncCheckout:
    """_Checkout for the AsyncClient's own pool."""

    __slots__ = ("_conn", "_kept", "_pool")

    def __init__(self, pool: psycopg_pool.AsyncConnectionPool[Any], kept: _Kept) -> None:
        self._pool = pool
        self._kept: _Kept | None = kept

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        kept = self._kept
        assert kept is not None
        taken, stale = kept.take()
        if not taken:
            self._kept = None
            pooled: psycopg.AsyncConnection[Any] = await self._pool.getconn()
            self._conn = pooled
            return pooled
        try:
            if stale is not None:
                await self._pool.putconn(stale)
            if kept.conn is None:
                kept.hold(await self._pool.getconn())
        except BaseException:
            leftover = kept.done(False)
            if leftover is not None:
                await self._pool.putconn(leftover)
            raise
        conn: psycopg.AsyncConnection[Any] = kept.conn
        self._conn = conn
        return conn

    async def __aexit__(self, *exc: object) -> None:
        conn = self._conn if self._kept is None else self._kept.done(self._pool.closed)
        if conn is not None:
            await self._pool.putconn(conn)


class _Queries:
    _q_one: LiteralString
    _q_plain: LiteralString
    _q_plain_quiet: LiteralString
    _q_lean: LiteralString
    _q_lean_quiet: LiteralString

    _debounce: WakeDebouncer

    def _lean_wake(self, queue: str, callers: bool, notify: bool) -> tuple[bool, float | None]:
        """(whether this lean enqueue sends the NOTIFY, when a trailing one may be due).
        On the caller's connection every enqueue notifies (its commit is the caller's)."""
        if not notify:
            return False, None
        if callers:
            return True, None
        now, delay = self._debounce.choose((queue,))
        return bool(now), delay

    def _single_query(self, params: dict[str, Any]) -> LiteralString:
        """The statement for one task: the slim one unless it needs a group or a unique lock."""
        if params["group_key"][0] is None and params["unique_ttl"][0] is None:
            return self._q_plain if params["notify"] else self._q_plain_quiet
        return self._q_one


class _CollectorPause:
    """Python's cyclic garbage collector, held off while enqueue_many turns a batch
    into rows and TaskInfos, then given back as it was.

    Everything such a call makes stays reachable until it returns (its items, its
    TaskInfos) or is freed by reference counting (its rows), so a collection during
    it finds no garbage of the call's, yet walks all of it: a 10,000-task call set
    off ~110 collections, about one a full one, ~20% of its time. A scratch A/B of
    such calls, the collector on and held off in alternating rounds: 1.29x as fast.

    Process-wide, as the collector is: garbage cycles that other threads (or, for
    the AsyncClient, other coroutines) make meanwhile wait for the next collection,
    that is until the call returns, as a COPY of 10,000 tasks takes ~0.1 s. Calls
    that overlap count themselves in: the first one in records whether the
    collector was enabled, and the last one out enables it again only then.
    """

    __slots__ = ()
    _lock = threading.Lock()
    _depth = 0
    _was_enabled = False

    def __enter__(self) -> None:
        cls = _CollectorPause
        with cls._lock:
            if cls._depth == 0:
                cls._was_enabled = gc.isenabled()
                gc.disable()
            cls._depth += 1

    def __exit__(self, *exc: object) -> None:
        cls = _CollectorPause
        with cls._lock:
            cls._depth -= 1
            if cls._depth == 0 and cls._was_enabled:
                gc.enable()


def collector_paused(n_tasks: int) -> AbstractContextManager[None]:
    """_CollectorPause for a batch of at least COPY_MIN_TASKS tasks; else nothing."""
    return _CollectorPause() if n_tasks >= COPY_MIN_TASKS else nullcontext()


#: Rows of COPY data sent to the server at a time (see _CopyPlan.chunks).
COPY_CHUNK_ROWS = 512

_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _copy_value(value: Any) -> str:
    """One value as COPY's text format writes it: NULL as \\N, text with its backslashes,
    newlines, carriage returns and tabs escaped, an interval as days and seconds."""
    if value is None:
        return "\\N"
    if isinstance(value, str):
        return value.translate(_COPY_ESCAPES)
    if isinstance(value, timedelta):
        return f"{value.days} days {value.seconds}.{value.microseconds:06d} seconds"
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return str(value)


def _copy_tail(
    queue: str,
    type_: str,
    group: str | None,
    headers: str | None,
    task_id: str | None,
    max_retry: int,
    timeout: float | None,
    deadline: datetime | None,
    retention: float | None,
) -> str:
    """The columns of a COPY row after its id and payload, through its newline."""
    values = (
        queue,
        type_,
        group,
        "pending" if group is None else "aggregating",
        headers,
        task_id,
        max_retry,
        _td(timeout),
        deadline,
        _td(retention),
    )
    return "\t".join(map(_copy_value, values)) + "\n"


#: enqueue_many of at least this many tasks goes through COPY when it can (see _copy_plan).
COPY_MIN_TASKS = 64


class _CopyPlan:
    """What task_copy_in / task_enqueue_copied need: the rows to copy (made as they are
    written), the finishing params, and the TaskInfos (made while the server inserts)."""

    __slots__ = ("finish", "n", "params")

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.n = len(params["payload"])
        arrivals: dict[tuple[str, str], int] = {}
        for q, g in zip(params["queue"], params["group_key"], strict=True):
            if g is not None:
                arrivals[(q, g)] = arrivals.get((q, g), 0) + 1
        self.finish: dict[str, Any] = {
            "queues": sorted(set(params["queue"])),
            "arrival_queue": [k[0] for k in arrivals],
            "arrival_group": [k[1] for k in arrivals],
            "arrival_size": list(arrivals.values()),
            "notify": params["notify"],
        }

    def chunks(self, ids: list[int]) -> Iterator[str]:
        """The COPY data in COPY's text format, COPY_CHUNK_ROWS rows a chunk, in the column
        order of task_copy_in: id, payload, then the tail (queue, type, group_key, state,
        headers, task_id, max_retry, timeout, deadline, retention).

        A row is its id, its payload and a tail shared by every task with the same queue,
        type, group, headers and options: each distinct tail is formatted once, so a batch
        costs one f-string per task instead of psycopg's per-row write_row (about a tenth
        of enqueue_many's time). Payloads are JSON text from encode_payload, which never
        holds a raw tab, newline or carriage return; only its backslashes need doubling.
        """
        p = self.params
        payloads = map(encode_payload, p["payload"]) if p["deferred"] else iter(p["payload"])
        keys = zip(
            p["queue"],
            p["type"],
            p["group_key"],
            p["headers"],
            p["task_id"],
            p["max_retry"],
            p["timeout"],
            p["deadline"],
            p["retention"],
            strict=True,
        )
        tails: dict[tuple[Any, ...], str] = {}
        lines: list[str] = []
        for id_, payload, key in zip(ids, payloads, keys, strict=True):
            tail = tails.get(key)
            if tail is None:
                tail = tails[key] = _copy_tail(*key)
            if "\\" in payload:
                payload = payload.replace("\\", "\\\\")
            lines.append(f"{id_}\t{payload}\t{tail}")
            if len(lines) >= COPY_CHUNK_ROWS:
                yield "".join(lines)
                lines.clear()
        if lines:
            yield "".join(lines)

    def infos(self, ids: list[int], items: Sequence[tuple[Task, dict[str, Any]]]) -> list[TaskInfo]:
        """TaskInfos of the copied tasks, without their enqueue time (see `stamp`)."""
        rows = (
            (i, tid, q, "pending" if g is None else "aggregating", g, None, None)
            for i, tid, q, g in zip(
                ids, self.params["task_id"], self.params["queue"], self.params["group_key"], strict=True
            )
        )  # made as to_infos takes them: no list of 10,000 tuples for the collector to walk
        return to_infos(rows, items, self.params)

    @staticmethod
    def stamp(infos: list[TaskInfo], enqueued_at: datetime) -> list[TaskInfo]:
        """Set the COPY's statement time as each task's enqueue and run time."""
        for info in infos:
            info.enqueued_at = info.next_process_at = enqueued_at
        return infos


def _copy_plan(params: dict[str, Any]) -> _CopyPlan | None:
    """A COPY plan when every task is plain enough: no unique lock and no schedule
    (then its state is known without the database clock), and the batch is large."""
    if len(params["payload"]) < COPY_MIN_TASKS:
        return None
    for k in ("unique_ttl", "process_at", "process_in"):
        v = params[k]
        if v.count(None) != len(v):
            return None
    return _CopyPlan(params)


def _compact(params: dict[str, Any]) -> dict[str, Any]:
    """The arrays of task_enqueue with each all-equal column (but payload) cut to one
    element, which the statement repeats: less to encode, send and parse."""
    out = {"payload": params["payload"], "notify": params["notify"]}
    n = len(params["payload"])
    for k in _COLUMNS:
        v = params[k]
        if k != "payload":
            out[k] = v[:1] if n > 1 and v.count(v[0]) == n else v
    return out


_NOTIFY_SUBQUERY = re.compile(
    r"\(SELECT count\(pg_notify\('\w+', q\)\) FROM unnest\(%\(notify\)s::text\[\]\) AS q\)"
)


def quiet_query(query: LiteralString) -> LiteralString:
    """The query without its NOTIFY subquery (for a call whose notify list is empty:
    the debouncer skips most), which saves the subplan on every such call."""
    out, n = _NOTIFY_SUBQUERY.subn("NULL::bigint", query)
    if n != 1:
        raise RuntimeError("enqueue query: the NOTIFY subquery was not found")
    # We vouch for this: a subquery of our own text replaced by a constant.
    return out


def _scalars(params: dict[str, Any]) -> dict[str, Any]:
    out = {k: params[k][0] for k in _COLUMNS}
    out["notify"] = params["notify"]
    return out


def _any_unique(params: dict[str, Any]) -> bool:
    return any(u is not None for u in params["unique_ttl"])


#: jsonb can be several times larger than its JSON text, so a payload under the Python limit
#: may still fail the table's size CHECK: above this size the insert runs under a savepoint,
#: and the CHECK becomes PayloadTooLargeError with the caller's transaction intact (S2).
_GUARD_PAYLOAD_CHARS = MAX_PAYLOAD_BYTES // 16


def _any_big(params: dict[str, Any]) -> bool:
    return any(p is not None and len(p) > _GUARD_PAYLOAD_CHARS for p in params["payload"])


def _map_check(exc: psycopg.errors.CheckViolation) -> Exception:
    if exc.diag.constraint_name == "task_payload_size_check":
        return PayloadTooLargeError(
            f"payload is too large as stored jsonb (the limit is {MAX_PAYLOAD_BYTES} bytes)"
        )
    return exc


class _TrailingNotifier:
    """One daemon thread per Client that sends the trailing NOTIFYs the debouncer asks for."""

    def __init__(self, debounce: WakeDebouncer, send: Callable[[list[str]], None]) -> None:
        self._debounce = debounce
        self._send = send
        self._cond = threading.Condition()
        self._due_at: float | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    def arm(self, delay: float) -> None:
        at = time.monotonic() + delay
        with self._cond:
            if self._stopped or (self._due_at is not None and self._due_at <= at):
                return
            self._due_at = at
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pgq-client-notify", daemon=True)
                self._thread.start()
            else:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if self._due_at is None:
                        self._cond.wait()
                        continue
                    wait = self._due_at - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stopped:
                    return
                self._due_at = None
            due, nxt = self._debounce.take_due()
            if due:
                self._send(due)
            if nxt is not None:
                self.arm(nxt)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)


class Client(_Queries):
    """Enqueues tasks. Thread-safe; share one per process.

    Client(dsn) owns a small connection pool; Client(pool=...) uses yours.
    prepare=False: its pool never prepares statements (psycopg prepare_threshold=None), for
    PgBouncer in transaction mode before 1.21 or without max_prepared_statements (see
    docs/howto-pgbouncer.md and pgq/db.py).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: psycopg_pool.ConnectionPool[Any] | None = None,
        schema: str = "pgq",
        notify_window: float = 0.002,
        prepare: bool = True,
    ) -> None:
        self._schema = _sql.check_schema(schema)
        self._q = _sql.query("task_enqueue", schema)
        self._q_one = one_row_query(self._q)
        self._q_plain = _sql.query("task_enqueue_plain", schema)
        self._q_plain_quiet = quiet_query(self._q_plain)
        self._q_lean = _sql.query("task_enqueue_lean", schema)
        self._q_lean_quiet = _sql.query("task_enqueue_lean_quiet", schema)
        self._names: set[str] = set()
        self._cursors = _Cursors()
        self._q_reserve = _sql.query("task_reserve_ids", schema)
        self._q_copy = _sql.query("task_copy_in", schema)
        self._q_copied = _sql.query("task_enqueue_copied", schema)
        self._q_notify = _sql.query("task_notify", schema)
        self._own_pool = pool is None
        self._pool = (
            pool if pool is not None else db.pool(db.resolve_dsn(dsn), "client", max_size=8, prepare=prepare)
        )
        self._debounce = WakeDebouncer(notify_window)
        self._trailer = _TrailingNotifier(self._debounce, self._send_notify)
        self._kept = _Kept()
        self._closed = False

    def _checkout(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A pooled connection for one call (see _Checkout)."""
        return _Checkout(self._pool, self._kept) if self._own_pool else self._pool.connection()

    def enqueue(
        self, task: Task, *, conn: psycopg.Connection[Any] | None = None, notify: bool = True, **opts: Any
    ) -> TaskInfo:
        """Enqueue one task; see DESIGN.md for the options. notify=False sends no wake-up."""
        if self._closed:
            raise RuntimeError("this Client is closed")
        lean = lean_args(task, opts, self._names)
        if lean is None:
            return self._run(_items([task], opts), conn, notify)[0]
        queue, params = lean[0], dict(zip(_LEAN_PARAMS, lean, strict=True))
        wake, delay = self._lean_wake(queue, conn is not None, notify)
        query = self._q_lean if wake else self._q_lean_quiet
        if conn is not None:
            row = conn.cursor(row_factory=psycopg.rows.tuple_row).execute(query, params).fetchone()
        else:
            with self._checkout() as c:
                row = self._cursors.get(c).execute(query, params).fetchone()
        if delay is not None:
            self._trailer.arm(delay)
        assert row is not None
        return lean_info(task, queue, row)

    def enqueue_many(
        self,
        tasks: Iterable[Task],
        *,
        conn: psycopg.Connection[Any] | None = None,
        notify: bool = True,
        **opts: Any,
    ) -> list[TaskInfo]:
        """Enqueue many tasks in one statement; all or nothing."""
        items = _items(tasks, opts)
        with collector_paused(len(items)):
            return self._run(items, conn, notify)

    def _run(
        self, items: list[tuple[Task, dict[str, Any]]], conn: psycopg.Connection[Any] | None, notify: bool
    ) -> list[TaskInfo]:
        if self._closed:
            raise RuntimeError("this Client is closed")
        params = build_params(items, defer_payloads=conn is None)
        if conn is not None:
            params["notify"] = sorted(set(params["queue"])) if notify else []
            return self._run_on(conn, items, params)
        if notify:
            params["notify"], delay = self._debounce.choose(params["queue"])
        else:
            params["notify"], delay = [], None
        with self._checkout() as c:
            if len(items) == 1 or not _any_unique(params):  # one statement: atomic by itself
                infos = self._execute(self._cursors.get(c), items, params)
            else:
                with c.transaction():  # all or nothing: a skipped unique task rolls back the rest
                    infos = self._execute(self._cursors.get(c), items, params)
        if delay is not None:
            self._trailer.arm(delay)
        return infos

    def _run_on(
        self, conn: psycopg.Connection[Any], items: list[tuple[Task, dict[str, Any]]], params: dict[str, Any]
    ) -> list[TaskInfo]:
        guard = (
            any(t is not None for t in params["task_id"])
            or (len(items) > 1 and _any_unique(params))
            or _any_big(params)
        )
        idle_autocommit = (
            conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        )
        cur = conn.cursor(row_factory=psycopg.rows.tuple_row)
        if not guard or (idle_autocommit and len(items) == 1):
            return self._execute(cur, items, params)
        if idle_autocommit:
            with conn.transaction():
                return self._execute(cur, items, params)
        conn.execute(_SAVEPOINT)
        try:
            infos = self._execute(cur, items, params)
        except BaseException:
            conn.execute(_ROLLBACK_SAVEPOINT)
            conn.execute(_RELEASE_SAVEPOINT)
            raise
        conn.execute(_RELEASE_SAVEPOINT)
        return infos

    def _execute(
        self,
        cur: psycopg.Cursor[tuple[Any, ...]],
        items: list[tuple[Task, dict[str, Any]]],
        params: dict[str, Any],
    ) -> list[TaskInfo]:
        conn = cur.connection
        try:
            if len(params["queue"]) == 1:
                rows = cur.execute(self._single_query(params), _scalars(params)).fetchall()
                return to_infos(rows, items, params)
            plan = _copy_plan(params)
            if plan is None:
                assert not params["deferred"], "deferred payloads go through COPY"
                return to_infos(cur.execute(self._q, _compact(params)).fetchall(), items, params)
            if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                with conn.transaction():
                    return self._copy(cur, plan, items)
            return self._copy(cur, plan, items)
        except psycopg.errors.UniqueViolation as exc:
            raise _map_error(exc, params) from None
        except psycopg.errors.CheckViolation as exc:
            raise _map_check(exc) from None

    def _copy(
        self, cur: psycopg.Cursor[tuple[Any, ...]], plan: _CopyPlan, items: list[tuple[Task, dict[str, Any]]]
    ) -> list[TaskInfo]:
        row = cur.execute(self._q_reserve, {"n": plan.n}, binary=True).fetchone()
        assert row is not None
        ids: list[int] = row[0]
        with cur.copy(self._q_copy) as copy:
            for chunk in plan.chunks(ids):
                copy.write(chunk)
            infos = plan.infos(ids, items)  # while the server inserts the rows
        done = cur.execute(self._q_copied, {**plan.finish, "first_id": ids[0]}).fetchone()
        assert done is not None
        return plan.stamp(infos, done[0])

    def _send_notify(self, queues: list[str]) -> None:
        try:
            with self._checkout() as c:
                c.execute(self._q_notify, {"queues": queues})
        except psycopg.Error:  # a wake-up is a hint; workers poll on a floor anyway
            pass

    def close(self) -> None:
        self._trailer.stop()
        pending = self._debounce.drain()
        if pending:
            self._send_notify(pending)
        self._closed = True
        if self._own_pool:
            conn = self._kept.leave()
            if conn is not None:
                self._pool.putconn(conn)
            self._pool.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Queries):
    """The asyncio twin of Client: the same methods (and prepare=), awaitable; conn= takes an
    AsyncConnection."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: psycopg_pool.AsyncConnectionPool[Any] | None = None,
        schema: str = "pgq",
        notify_window: float = 0.002,
        prepare: bool = True,
    ) -> None:
        self._schema = _sql.check_schema(schema)
        self._q = _sql.query("task_enqueue", schema)
        self._q_one = one_row_query(self._q)
        self._q_plain = _sql.query("task_enqueue_plain", schema)
        self._q_plain_quiet = quiet_query(self._q_plain)
        self._q_lean = _sql.query("task_enqueue_lean", schema)
        self._q_lean_quiet = _sql.query("task_enqueue_lean_quiet", schema)
        self._names: set[str] = set()
        self._cursors = _Cursors()
        self._q_reserve = _sql.query("task_reserve_ids", schema)
        self._q_copy = _sql.query("task_copy_in", schema)
        self._q_copied = _sql.query("task_enqueue_copied", schema)
        self._q_notify = _sql.query("task_notify", schema)
        self._dsn = None if pool is not None else db.resolve_dsn(dsn)
        self._prepare = prepare
        self._pool = pool
        self._own_pool = pool is None
        self._debounce = WakeDebouncer(notify_window)
        self._trailing_task: asyncio.Task[None] | None = None
        self._kept = _Kept()
        self._closed = False

    async def _get_pool(self) -> psycopg_pool.AsyncConnectionPool[Any]:
        if self._pool is None:
            assert self._dsn is not None
            self._pool = await db.pool_async(self._dsn, "client", max_size=8, prepare=self._prepare)
        return self._pool

    async def _checkout(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """A pooled connection for one call (see _Checkout)."""
        pool = await self._get_pool()
        return _AsyncCheckout(pool, self._kept) if self._own_pool else pool.connection()

    async def enqueue(
        self,
        task: Task,
        *,
        conn: psycopg.AsyncConnection[Any] | None = None,
        notify: bool = True,
        **opts: Any,
    ) -> TaskInfo:
        if self._closed:
            raise RuntimeError("this AsyncClient is closed")
        lean = lean_args(task, opts, self._names)
        if lean is None:
            return (await self._run(_items([task], opts), conn, notify))[0]
        queue, params = lean[0], dict(zip(_LEAN_PARAMS, lean, strict=True))
        wake, delay = self._lean_wake(queue, conn is not None, notify)
        query = self._q_lean if wake else self._q_lean_quiet
        if conn is not None:
            cur = conn.cursor(row_factory=psycopg.rows.tuple_row)
            row = await (await cur.execute(query, params)).fetchone()
        else:
            async with await self._checkout() as c:
                row = await (await self._cursors.get(c).execute(query, params)).fetchone()
        if delay is not None and self._trailing_task is None:
            self._trailing_task = asyncio.ensure_future(self._trailing(delay))
        assert row is not None
        return lean_info(task, queue, row)

    async def enqueue_many(
        self,
        tasks: Iterable[Task],
        *,
        conn: psycopg.AsyncConnection[Any] | None = None,
        notify: bool = True,
        **opts: Any,
    ) -> list[TaskInfo]:
        items = _items(tasks, opts)
        with collector_paused(len(items)):
            return await self._run(items, conn, notify)

    async def _run(
        self,
        items: list[tuple[Task, dict[str, Any]]],
        conn: psycopg.AsyncConnection[Any] | None,
        notify: bool,
    ) -> list[TaskInfo]:
        if self._closed:
            raise RuntimeError("this AsyncClient is closed")
        params = build_params(items, defer_payloads=conn is None)
        if conn is not None:
            params["notify"] = sorted(set(params["queue"])) if notify else []
            return await self._run_on(conn, items, params)
        if notify:
            params["notify"], delay = self._debounce.choose(params["queue"])
        else:
            params["notify"], delay = [], None
        async with await self._checkout() as c:
            if len(items) == 1 or not _any_unique(params):  # one statement: atomic by itself
                infos = await self._execute(self._cursors.get(c), items, params)
            else:
                async with c.transaction():  # all or nothing: a skipped unique task rolls back the rest
                    infos = await self._execute(self._cursors.get(c), items, params)
        if delay is not None and self._trailing_task is None:
            self._trailing_task = asyncio.ensure_future(self._trailing(delay))
        return infos

    async def _run_on(
        self,
        conn: psycopg.AsyncConnection[Any],
        items: list[tuple[Task, dict[str, Any]]],
        params: dict[str, Any],
    ) -> list[TaskInfo]:
        guard = (
            any(t is not None for t in params["task_id"])
            or (len(items) > 1 and _any_unique(params))
            or _any_big(params)
        )
        idle_autocommit = (
            conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        )
        cur = conn.cursor(row_factory=psycopg.rows.tuple_row)
        if not guard or (idle_autocommit and len(items) == 1):
            return await self._execute(cur, items, params)
        if idle_autocommit:
            async with conn.transaction():
                return await self._execute(cur, items, params)
        await conn.execute(_SAVEPOINT)
        try:
            infos = await self._execute(cur, items, params)
        except BaseException:
            await conn.execute(_ROLLBACK_SAVEPOINT)
            await conn.execute(_RELEASE_SAVEPOINT)
            raise
        await conn.execute(_RELEASE_SAVEPOINT)
        return infos

    async def _execute(
        self,
        cur: psycopg.AsyncCursor[tuple[Any, ...]],
        items: list[tuple[Task, dict[str, Any]]],
        params: dict[str, Any],
    ) -> list[TaskInfo]:
        conn = cur.connection
        try:
            plan = None if len(params["queue"]) == 1 else _copy_plan(params)
            assert plan is not None or not params["deferred"], "deferred payloads go through COPY"
            if plan is not None:
                if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                    async with conn.transaction():
                        return await self._copy(cur, plan, items)
                return await self._copy(cur, plan, items)
            if len(params["queue"]) == 1:
                await cur.execute(self._single_query(params), _scalars(params))
            else:
                await cur.execute(self._q, _compact(params))
            return to_infos(await cur.fetchall(), items, params)
        except psycopg.errors.UniqueViolation as exc:
            raise _map_error(exc, params) from None
        except psycopg.errors.CheckViolation as exc:
            raise _map_check(exc) from None

    async def _copy(
        self,
        cur: psycopg.AsyncCursor[tuple[Any, ...]],
        plan: _CopyPlan,
        items: list[tuple[Task, dict[str, Any]]],
    ) -> list[TaskInfo]:
        await cur.execute(self._q_reserve, {"n": plan.n}, binary=True)
        row = await cur.fetchone()
        assert row is not None
        ids: list[int] = row[0]
        async with cur.copy(self._q_copy) as copy:
            for chunk in plan.chunks(ids):
                await copy.write(chunk)
            infos = plan.infos(ids, items)  # while the server inserts the rows
        await cur.execute(self._q_copied, {**plan.finish, "first_id": ids[0]})
        done = await cur.fetchone()
        assert done is not None
        return plan.stamp(infos, done[0])

    async def _trailing(self, delay: float | None) -> None:
        try:
            while delay is not None:
                await asyncio.sleep(delay)
                due, delay = self._debounce.take_due()
                if due:
                    await self._notify(due)
        finally:
            self._trailing_task = None

    async def _notify(self, queues: list[str]) -> None:
        try:
            async with await self._checkout() as c:
                await c.execute(self._q_notify, {"queues": queues})
        except psycopg.Error:  # a wake-up is a hint; workers poll on a floor anyway
            pass

    async def close(self) -> None:
        if self._trailing_task is not None:
            self._trailing_task.cancel()
            self._trailing_task = None
        pending = self._debounce.drain()
        if pending:
            await self._notify(pending)
        self._closed = True
        if self._own_pool and self._pool is not None:
            conn = self._kept.leave()
            if conn is not None:
                await self._pool.putconn(conn)
            await self._pool.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
