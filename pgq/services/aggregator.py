"""The aggregator: due groups become one aggregated task each, exactly once.

Data model (sql/schema.sql)
---------------------------
A member is a pgq.task row in state 'aggregating' with a group_key. Every
grouped enqueue also appends a row to pgq.group_arrival in its own
transaction (no row shared between enqueuers, so enqueues never wait on each
other: G12). The aggregator folds arrivals into pgq.task_group, one summary
row per group (size as an upper bound, oldest/newest enqueue times, back-off
and last error). The summary only steers *which* groups to look at; the
database rows of the members are authoritative for *what* gets aggregated.

One round (`run_once`)
----------------------
1. Fold: DELETE arrivals ... RETURNING, summed per group and upserted
   additively (size += n, oldest = least, newest = greatest). Commutative, so
   concurrent folders are safe; SKIP LOCKED splits arrivals between them.
   After folding into ANALYZE_AFTER_GROUPS group rows, ANALYZE task_group
   (best effort), so a freshly filled summary keeps its index plans.
2. Due check on task_group only, one index range scan per rule (newest_at <=
   now - grace, oldest_at <= now - max_delay, size >= max_size), skipping
   groups backing off (retry_at > now). Its cost follows the due groups, not
   the members or groups waiting (G13). Fold and due check travel in one
   pipeline (one round trip; the due check, a statement of its own, sees the
   fold).
3. One transaction per batch of due groups. With many due groups (>= 2 *
   min_split), they are cut into up to 2 * `parallel` batches that `parallel`
   connections take in turn, so one batch's Python work (decoding members,
   the user's aggregator, building rows) overlaps another's database work.
   Each transaction runs in pipeline mode: BEGIN goes with the lock, and e-g
   below go out together, then one sync; results are checked before COMMIT.
   a. lock their summary rows FOR UPDATE SKIP LOCKED: that row lock is the
      per-group mutex between aggregators (a group held by another is left to
      it), and folds of those rows wait until we commit;
   b. read up to `cap` members per group, in enqueue order (enqueued_at, id),
      in a statement of its own so that its snapshot follows the locks; they
      come as one JSON document, built straight into pgq.Task objects;
   c. re-check the rules on those real rows: with max_size S, the k*S oldest
      become k aggregated tasks of exactly S (G3); the rest becomes one more
      task when its own newest member is older than the grace period or its
      oldest older than the max delay;
   d. call the user's aggregator for each chunk while the transaction is open
      (sync ones in one worker thread per batch, each call under
      `aggregate_timeout`; async ones on the loop under the same timeout) and
      check it returned a pgq.Task;
   e. insert the aggregated tasks in the group's queue (G6) with their member
      ids (lineage, G8); tasks with task_id= or unique= each under a savepoint,
      so a conflict fails only that group;
   f. delete the members by row address (ctid, read in b) and release their
      unique= locks, checking that every one read in (b) was still
      'aggregating' at that address with that id; if the inspector (or anyone)
      changed one meanwhile, the batch rolls back and is retried next round;
   g. set each locked group's summary from the members read in (b) and not
      taken (exact: the read saw every member whose arrival was folded), or
      recount them in a fresh statement when only the first `cap` were read,
      or delete the summary when none remain; record aggregator errors there
      (errors + 1, last_error, retry_at = now + back-off);
   h. commit. Failpoints: aggregate.after_select, after_insert, after_delete,
      before_commit, after_commit.
4. Compute when the next group becomes due (index endpoint lookups).

Exactly once (G7). Members are only ever removed by the transaction that
inserts their aggregated task, by row address, with a count check (rows
deleted = rows whose id was read = members taken): if any member read was no
longer 'aggregating' at its address when deleted, the whole batch rolls back. A
crash, a killed connection or a failed statement rolls the batch back too:
members stay 'aggregating' and are eligible again at once (no reclaim
timeout). Two aggregators cannot work on one group at once (the summary row
lock; a group has one summary row at a time, deleted only under that lock),
and even if they did, the count check would roll one back. Members are not
row-locked: the summary lock makes it unnecessary, and skipping it halves the
writes. Never an empty aggregate (a chunk has at least one member), never
above max_size (chunks are cut at S).

A failing aggregator (raises, returns a non-Task, times out, or its task is
refused: bad options, task_id conflict, unique lock held) fails its group
only: that group's chunk and the later chunks of the same group are left
untouched in the batch (the same effect as rolling back its part), the error
is logged with queue and group and kept on the summary row for the inspector,
and the group backs off (1 s, 2 s, 4 s ... at most `backoff_max`). Other
groups of the batch commit. If the batch itself fails in the database, each
of its groups is retried alone, and a group that fails alone gets its error
recorded in a short transaction of its own (group_record_error). A timed-out
sync aggregator keeps running in its thread (Python cannot stop it); its
result is ignored and the next batch uses a fresh thread.

Leadership (G11). Per queue, a session advisory lock (two int4 keys hashed
from the schema and queue name) taken on a dedicated connection named
`pgq:leader:<pid>`; only the holder aggregates that queue, the others retry
every `elect_interval`. When the holder's session dies, PostgreSQL frees the
lock and another server takes over within one elect interval. Leadership
only saves duplicated work: correctness rests on the row locks above, so a
dead leader that still acts (it learns of its lost session only at its next
query) cannot duplicate or lose a member. leadership=False runs every queue
without it (tests, split-brain drills).

Promptness (G4). No fixed tick: after each round the loop sleeps until the
next due moment computed by the database (sub-second grace periods work), or
until `wake(queue)` (the Server forwards every enqueue NOTIFY), so a size
trigger fires when the completing member commits. A floor poll every
`poll_interval` covers lost notifications.

When work can repeat. The user's aggregator may be called more than once for
the same members: after a rollback (crash, connection loss, a failure of the
batch in the database, shutdown mid-transaction) or a timeout. Its result is
used only once. Aggregators should be pure functions of their input.

A paused queue still aggregates (G15): its aggregated tasks wait in
'pending'. Members never reach 'completed' and never count in stats.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import inspect
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import psycopg
import psycopg_pool
from psycopg.rows import dict_row

from pgq import _failpoints, _sql, db
from pgq._outage import OUTAGE, is_database_error
from pgq.client import build_params
from pgq.config import ResolvedPolicy
from pgq.errors import DuplicateTaskError, TaskIDConflictError
from pgq.task import Task, task_id_of

logger = logging.getLogger(__name__)

#: After folding arrivals into this many group rows, refresh task_group's statistics.
ANALYZE_AFTER_GROUPS = 20_000

_INSERT_COLUMNS = (
    "task_id",
    "queue",
    "type",
    "payload",
    "headers",
    "max_retry",
    "timeout",
    "deadline",
    "retention",
    "unique_ttl",
    "process_at",
    "process_in",
)


@dataclass
class Aggregate:
    """One aggregated task created by a round."""

    queue: str
    group: str
    task_id: str
    members: list[str]


@dataclass
class AggregationResult:
    """What one round did (returned by run_once, logged, asserted on in tests)."""

    arrivals: int = 0  # arrival rows folded into the summary
    due: int = 0  # groups found due by their summary
    groups: int = 0  # groups that produced at least one aggregated task
    tasks: int = 0  # aggregated tasks inserted
    members: int = 0  # members aggregated
    failed: int = 0  # groups whose aggregation failed (aggregator or task refused)
    contended: int = 0  # due groups held by another aggregator this round
    more: bool = False  # a limit was reached: run again at once
    next_due: float | None = None  # seconds until a group is due by its summary; None: none waits
    created: list[Aggregate] = field(default_factory=list)
    errors: dict[tuple[str, str], str] = field(default_factory=dict)


@dataclass(eq=False)
class _Group:
    queue: str
    group: str
    errors: int
    members: list[Task] = field(default_factory=list)  # read under the lock, in enqueue order
    rows: list[list[Any]] = field(default_factory=list)  # their group_members entries, same order
    capped: bool = False
    taken: int = 0  # members aggregated: always a prefix of `members`
    error: str | None = None
    tasks: int = 0


@dataclass(eq=False)
class _Chunk:
    group: _Group
    start: int  # members[start:end] of the group
    end: int
    func: Any
    tasks: list[Task]
    result: Any = None  # a Task, an exception, or _NOT_RUN
    row: dict[str, Any] | None = None  # the aggregated task as group_insert_aggregates reads it
    member_ids: list[str] = field(default_factory=list)
    inserted: bool = False


_NOT_RUN = object()


class _MembersChanged(Exception):
    """A member read by this batch was changed by someone else (say the inspector) before
    the delete: the batch rolls back and its groups are looked at again next round."""


#: Longest wait after a failed round (database trouble), in seconds.
ROUND_RETRY_MAX = 2.0


def leader_namespace(schema: str) -> str:
    """The namespace of a schema's per-queue leadership keys (group_leader_elect hashes it
    with the queue name into two int4 keys; `pgq doctor` looks the same keys up)."""
    return f"{schema}:aggregate:"


class AggregatorTimeout(TimeoutError):
    """The group aggregator did not return within aggregate_timeout."""


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _rows_json(chunks: Sequence[_Chunk]) -> str:
    """The aggregated tasks of `chunks` as the JSON document group_insert_aggregates reads."""
    return json.dumps([c.row for c in chunks], default=_json_default, separators=(",", ":"))


def _insert_rows(results: Sequence[tuple[Task, dict[str, Any]]]) -> list[dict[str, Any]]:
    """build_params for several aggregated tasks at once, one row dict per task."""
    params = build_params(results)
    cols = [params[k] for k in _INSERT_COLUMNS]
    return [dict(zip(_INSERT_COLUMNS, vals, strict=True)) for vals in zip(*cols, strict=True)]


def _array(values: Sequence[object]) -> str:
    """An array literal of str, int, float, datetime or None values ('{"a","b",NULL}'), cast
    in SQL with ::text[], ::int[] ...: far cheaper to build than psycopg's per-element dump
    of a list. Every element is quoted, so any text (commas, braces, quotes, 'NULL') is safe."""
    if not values:
        return "{}"
    if all(type(v) is str for v in values):
        strs = cast(Sequence[str], values)
        return '{"' + '","'.join([v.replace("\\", "\\\\").replace('"', '\\"') for v in strs]) + '"}'
    if all(type(v) is int for v in values):
        return "{" + ",".join(map(str, values)) + "}"
    return "{" + ",".join([_quote(v) for v in values]) + "}"


def _quote(value: object) -> str:
    if value is None:
        return "NULL"
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pipeline(conn: psycopg.AsyncConnection[Any]) -> contextlib.AbstractAsyncContextManager[Any]:
    """Pipeline mode (statements sent together, one round trip) where libpq supports it."""
    if psycopg.Pipeline.is_supported():
        return conn.pipeline()
    return contextlib.nullcontext()


_new_task = Task.__new__
_fromisoformat = datetime.fromisoformat


def _members(doc: str | None, groups: Sequence[_Group]) -> None:
    """Decode group_members' document into each group's Tasks (as Task._from_row builds them,
    without a row dict, a jsonb decode and option checks per member: this is the hot path)."""
    if not doc:
        return
    rows = json.loads(doc)
    tasks: list[Task] = []
    append = tasks.append
    g = groups[0]
    ord_now = start = 0
    for ord_, id_, task_id, type_, payload, headers, max_retry, retried, enqueued_at, _tid in rows:
        if ord_ != ord_now:  # rows come group by group
            if ord_now:
                g.members, g.rows = tasks[start:], rows[start : len(tasks)]
            start, ord_now, g = len(tasks), ord_, groups[ord_ - 1]
        t = _new_task(Task)
        t.type = type_
        t.payload = payload
        t.headers = headers or {}
        t.options = {"max_retry": max_retry}
        t._id = task_id if task_id is not None else str(id_)
        t._queue = g.queue
        t._group = g.group
        t._retried = retried
        t._enqueued_at = _fromisoformat(enqueued_at)
        t._deadline = None
        t.result_writer = None
        t._completer = None
        append(t)
    if ord_now:
        g.members, g.rows = tasks[start:], rows[start:]


def _is_async(func: Any) -> bool:
    call = type(func).__call__ if not inspect.isroutine(func) else None
    return inspect.iscoroutinefunction(func) or (call is not None and inspect.iscoroutinefunction(call))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Aggregator:
    """Turns due groups into aggregated tasks. See the module docstring."""

    def __init__(
        self,
        dsn: str,
        pool: psycopg_pool.AsyncConnectionPool[Any],
        policies: Mapping[str, ResolvedPolicy],
        *,
        schema: str = "pgq",
        worker_id: str,
        batch_size: int = 1000,
        chunk_limit: int = 10_000,
        aggregate_timeout: float = 30.0,
        poll_interval: float = 5.0,
        elect_interval: float = 1.0,
        leadership: bool = True,
        backoff_base: float = 1.0,
        backoff_max: float = 300.0,
        fold_limit: int = 10_000,
        parallel: int = 2,
        min_split: int = 50,
    ) -> None:
        if batch_size < 1 or chunk_limit < 1 or fold_limit < 1:
            raise ValueError("batch_size, chunk_limit and fold_limit must be >= 1")
        if aggregate_timeout <= 0 or poll_interval <= 0 or elect_interval <= 0:
            raise ValueError("aggregate_timeout, poll_interval and elect_interval must be positive")
        self._dsn = dsn
        self._pool = pool
        self._policies = dict(policies)
        self._schema = _sql.check_schema(schema)
        self.worker_id = worker_id
        self.batch_size = batch_size
        self.chunk_limit = chunk_limit
        self.aggregate_timeout = aggregate_timeout
        self.poll_interval = poll_interval
        self.elect_interval = elect_interval
        self.leadership = leadership
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.fold_limit = fold_limit
        self.parallel = parallel
        self.min_split = max(1, min_split)
        q = _sql.queries(schema)
        self._q_fold = q["group_fold_arrivals"]
        self._q_due = q["group_due"]
        self._q_next = q["group_next_due"]
        self._q_lock = q["group_lock"]
        self._q_members = q["group_members"]
        self._q_insert = q["group_insert_aggregates"]
        self._q_delete = q["group_delete_members"]
        self._q_refresh = q["group_refresh"]
        self._q_record = q["group_record_error"]
        self._q_elect = q["group_leader_elect"]
        self._q_analyze = q["group_analyze"]
        self._folded_groups = 0
        self._leader_ns = leader_namespace(schema)
        self._count_cap = max([1000] + [2 * p.max_size for p in self._policies.values() if p.max_size])
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._leader_conn: psycopg.AsyncConnection[Any] | None = None
        self._held: set[str] = set()

    # ------------------------------------------------------------------ public

    @property
    def queues(self) -> list[str]:
        return sorted(self._policies)

    @property
    def leading(self) -> frozenset[str]:
        """Queues this aggregator currently leads (all of them without leadership)."""
        return frozenset(self._policies) if not self.leadership else frozenset(self._held)

    def wake(self, queue: str) -> None:
        """A member may have arrived in `queue`: run a round soon. Never blocks; any thread."""
        if queue not in self._policies:
            return
        loop, event = self._loop, self._event
        if loop is None or event is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        else:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: nothing to wake
                pass

    async def run_once(
        self, now: datetime | None = None, *, queues: Iterable[str] | None = None
    ) -> AggregationResult:
        """One round over `queues` (default: every queue with a policy), leadership aside."""
        names = sorted(self._policies if queues is None else {q for q in queues if q in self._policies})
        res = AggregationResult()
        if not names:
            return res
        policies = [self._policies[q] for q in names]
        arrays = {
            "queue": names,
            "grace": [p.grace_period for p in policies],
            "max_delay": [p.max_delay for p in policies],
            "max_size": [p.max_size for p in policies],
            "now": now,
        }
        async with self._pool.connection() as conn:
            # Fold and due check in one round trip (the due check, a statement of its own,
            # sees the fold). If the fold hit its limit, fold the rest and check again.
            fold_cur = conn.cursor(row_factory=dict_row)
            cur = conn.cursor(row_factory=dict_row)
            due_params = {**arrays, "limit": self.batch_size}
            async with _pipeline(conn):
                await fold_cur.execute(self._q_fold, {"limit": self.fold_limit})
                await cur.execute(self._q_due, due_params)
            row = await fold_cur.fetchone()
            due = await cur.fetchall()
            res.arrivals = row["arrivals"] if row else 0
            groups = row["groups"] if row else 0
            if res.arrivals >= self.fold_limit:
                n, g = await self._fold(conn)
                res.arrivals += n
                await self._analyze_after(conn, groups + g)
                await cur.execute(self._q_due, due_params)
                due = await cur.fetchall()
            else:
                await self._analyze_after(conn, groups)
            res.due = len(due)
            if len(due) >= 2 * self.min_split and self.parallel > 1:
                # Two or more batch transactions at once, each on its own connection:
                # one runs Python (aggregators) while the other waits on the database.
                # Twice as many parts as connections, taken in turn: once the batches drift
                # apart, one's Python work overlaps the other's database work. This round's
                # connection is one of them: a pool of two is enough.
                n = min(self.parallel, len(due) // self.min_split)
                k = min(2 * n, len(due) // self.min_split)
                todo = collections.deque(
                    sorted(due[i::k], key=lambda d: (d["queue"], d["group_key"])) for i in range(k)
                )

                async def drain(c: psycopg.AsyncConnection[Any]) -> None:
                    while todo:
                        await self._aggregate_batch(c, todo.popleft(), now, res)

                async def drain_own() -> None:
                    async with self._pool.connection() as c:
                        await drain(c)

                await asyncio.gather(drain(conn), *(drain_own() for _ in range(n - 1)))
            elif due:
                await self._aggregate_batch(conn, due, now, res)
            if len(due) >= self.batch_size:
                res.more = True
            if not res.more:
                await cur.execute(self._q_next, arrays)
                row = await cur.fetchone()
                res.next_due = row["wait"] if row else None
        return res

    async def run(self, stop: asyncio.Event) -> None:
        """Aggregate until `stop` is set: rounds at each due moment and wake-up."""
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        elector = asyncio.create_task(self._elect_loop(stop)) if self.leadership else None
        failures = 0
        idle = 0.0
        logger.info(
            "aggregator: started for queues %s (leadership %s)",
            self.queues,
            "on" if self.leadership else "off",
            extra={"action": "aggregator_started", "worker_id": self.worker_id},
        )
        try:
            while not stop.is_set():
                self._event.clear()
                queues = sorted(self.leading)
                delay: float | None = self.poll_interval
                if queues:
                    try:
                        res = await self.run_once(queues=queues)
                    except Exception as exc:
                        # A round fails on database trouble (a lost connection, a restart):
                        # retry soon, so that a leader never sits out long while it leads.
                        failures += 1
                        delay = min(ROUND_RETRY_MAX, 0.05 * 2**failures)
                        if is_database_error(exc):
                            OUTAGE.failed("aggregator", exc, delay)
                        else:
                            logger.warning(
                                "aggregator: round failed (%s); retrying in %.2f s",
                                _describe(exc),
                                delay,
                                extra={"action": "aggregator_round_failed"},
                            )
                    else:
                        failures = 0
                        OUTAGE.ok("aggregator")
                        if res.more:
                            continue
                        progress = res.tasks or res.failed
                        if res.next_due is not None and res.next_due <= 0 and not progress:
                            # Due groups we could not take (held by another aggregator,
                            # members locked): do not spin, look again soon.
                            idle = min(1.0, idle * 2 or 0.02)
                            delay = idle
                        else:
                            idle = 0.0
                            if res.next_due is not None:
                                delay = min(self.poll_interval, max(0.0, res.next_due) + 0.001)
                if delay and delay > 0:
                    await self._sleep(stop, delay)
        finally:
            if elector is not None:
                elector.cancel()
                await asyncio.gather(elector, return_exceptions=True)
            await self._resign()
            if self._executor is not None:
                self._executor.shutdown(wait=False)
                self._executor = None
            logger.info("aggregator: stopped", extra={"action": "aggregator_stopped"})

    # ------------------------------------------------------------------ rounds

    async def _fold(self, conn: psycopg.AsyncConnection[Any]) -> tuple[int, int]:
        """Fold arrivals until none is left (at most 100 batches): (arrivals, group rows)."""
        total = groups = 0
        cur = conn.cursor(row_factory=dict_row)
        for _ in range(100):
            await cur.execute(self._q_fold, {"limit": self.fold_limit})
            row = await cur.fetchone()
            n = row["arrivals"] if row else 0
            total += n
            groups += row["groups"] if row else 0
            if n < self.fold_limit:
                break
        return total, groups

    async def _analyze_after(self, conn: psycopg.AsyncConnection[Any], groups: int) -> None:
        """ANALYZE task_group once ANALYZE_AFTER_GROUPS group rows were folded since the last."""
        self._folded_groups += groups
        if self._folded_groups >= ANALYZE_AFTER_GROUPS:
            self._folded_groups = 0
            try:
                await conn.execute(self._q_analyze)
            except psycopg.Error as exc:  # not the table owner: autovacuum will do it
                logger.debug("aggregator: ANALYZE task_group failed: %s", exc)

    def _cap(self, policy: ResolvedPolicy) -> int | None:
        s = policy.max_size
        return s * max(1, self.chunk_limit // s) if s else None

    async def _aggregate_batch(
        self,
        conn: psycopg.AsyncConnection[Any],
        due: Sequence[dict[str, Any]],
        now: datetime | None,
        res: AggregationResult,
    ) -> None:
        try:
            await self._aggregate(conn, due, now, res)
        except _MembersChanged as exc:
            logger.info(
                "aggregator: a batch of %d groups rolled back (%s); trying again next round",
                len(due),
                exc,
                extra={"action": "group_batch_retry"},
            )
            res.contended += len(due)
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            if conn.closed or conn.broken:
                raise
            if len(due) == 1:
                d = due[0]
                text = _describe(exc)
                logger.error(
                    "aggregator: aggregating group %r of queue %r failed in the database: %s",
                    d["group_key"],
                    d["queue"],
                    text,
                    extra={"action": "group_aggregate_failed", "queue": d["queue"], "group": d["group_key"]},
                )
                await self._record_error(conn, d["queue"], d["group_key"], text, now)
                res.failed += 1
                res.errors[(d["queue"], d["group_key"])] = text
                return
            logger.warning(
                "aggregator: a batch of %d groups failed in the database (%s); retrying them one by one",
                len(due),
                _describe(exc),
                extra={"action": "group_batch_failed"},
            )
            for d in due:
                await self._aggregate_batch(conn, [d], now, res)

    async def _record_error(
        self, conn: psycopg.AsyncConnection[Any], queue: str, group: str, error: str, now: datetime | None
    ) -> None:
        await conn.execute(
            self._q_record,
            {
                "queue": queue,
                "group_key": group,
                "error": error,
                "backoff_base": self.backoff_base,
                "backoff_max": self.backoff_max,
                "now": now,
            },
        )

    def _backoff(self, errors_before: int) -> float:
        return float(min(self.backoff_max, self.backoff_base * 2 ** min(errors_before, 30)))

    async def _aggregate(
        self,
        conn: psycopg.AsyncConnection[Any],
        due: Sequence[dict[str, Any]],
        now: datetime | None,
        res: AggregationResult,
    ) -> None:
        created: list[Aggregate] = []
        # In pipeline mode, BEGIN goes with the lock and COMMIT needs no round trip of its own.
        async with _pipeline(conn), conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                self._q_lock,
                {
                    "queue": _array([d["queue"] for d in due]),
                    "group_key": _array([d["group_key"] for d in due]),
                    "now": now,
                },
            )
            locked = await cur.fetchall()
            res.contended += len(due) - len(locked)
            if not locked:
                return
            db_now: datetime = locked[0]["now"]
            groups: dict[tuple[str, str], _Group] = {
                (r["queue"], r["group_key"]): _Group(r["queue"], r["group_key"], r["errors"]) for r in locked
            }
            gl = list(groups.values())
            await cur.execute(
                self._q_members,
                {
                    "queue": _array([g.queue for g in gl]),
                    "group_key": _array([g.group for g in gl]),
                    "cap": _array([self._cap(self._policies[g.queue]) for g in gl]),
                },
            )
            row = await cur.fetchone()
            _members(row["members"] if row else None, gl)
            await _failpoints.hit_async("aggregate.after_select")
            chunks: list[_Chunk] = []
            for g in gl:
                pol = self._policies[g.queue]
                cap = self._cap(pol)
                g.capped = cap is not None and len(g.members) >= cap
                if g.capped:
                    res.more = True
                for start, end in self._plan(g.members, pol, db_now):
                    chunks.append(_Chunk(g, start, end, pol.aggregator, g.members[start:end]))
            bulk: list[_Chunk] = []
            if chunks:
                await self._call_all(chunks)
                bulk = await self._prepare(conn, chunks)
            # The bulk insert, the delete and the summary refresh go in one pipeline (one round
            # trip). The delete and the refresh count on every bulk row being inserted: the
            # insert's row count is checked below, and the batch rolls back if it falls short.
            for c in bulk:
                c.inserted = True
            for c in chunks:
                if c.inserted:
                    c.group.taken = c.end
                    c.group.tasks += 1
            taken = [r[1] for g in gl if g.taken for r in g.rows[: g.taken]]
            # Members left per group, known exactly unless only the first `cap` were read.
            left = [None if g.capped else g.members[g.taken :] for g in gl]
            ins_cur = conn.cursor(row_factory=dict_row)
            async with _pipeline(conn):
                if bulk:
                    await ins_cur.execute(
                        self._q_insert,
                        {"rows": _rows_json(bulk), "notify": sorted({c.group.queue for c in bulk})},
                    )
                if taken:
                    tids = '{"' + '","'.join([r[9] for g in gl if g.taken for r in g.rows[: g.taken]]) + '"}'
                    ids = "{" + ",".join(map(str, taken)) + "}"
                    await cur.execute(self._q_delete, {"tids": tids, "ids": ids})
                ref_cur = conn.cursor(row_factory=dict_row)
                await ref_cur.execute(
                    self._q_refresh,
                    {
                        "queue": _array([g.queue for g in gl]),
                        "group_key": _array([g.group for g in gl]),
                        "taken": _array([g.taken for g in gl]),
                        "error": _array([g.error for g in gl]),
                        "hold": _array(
                            [self._backoff(g.errors) if g.error is not None else None for g in gl]
                        ),
                        "size": _array([None if m is None else len(m) for m in left]),
                        "oldest_at": _array([m[0].enqueued_at if m else None for m in left]),
                        "newest_at": _array([m[-1].enqueued_at if m else None for m in left]),
                        "count_cap": self._count_cap,
                        "now": now,
                    },
                )
            if bulk:
                rows = await ins_cur.fetchall()
                if len(rows) != len(bulk):
                    raise RuntimeError(f"aggregator: inserted {len(rows)} of {len(bulk)} aggregated tasks")
                for c, r in zip(bulk, rows, strict=True):
                    c.result = task_id_of(r)
            created = [
                Aggregate(c.group.queue, c.group.group, str(c.result), c.member_ids)
                for c in chunks
                if c.inserted
            ]
            await _failpoints.hit_async("aggregate.after_insert")
            if taken:
                row = await cur.fetchone()
                deleted, matched = (row["deleted"], row["matched"]) if row else (0, 0)
                if deleted != len(taken) or matched != len(taken):
                    raise _MembersChanged(
                        f"expected to remove {len(taken)} members, removed {deleted} ({matched} of them read)"
                    )
            await _failpoints.hit_async("aggregate.after_delete")
            await _failpoints.hit_async("aggregate.before_commit")
        await _failpoints.hit_async("aggregate.after_commit")
        for g in groups.values():
            if g.tasks:
                res.groups += 1
            if g.error is not None:
                res.failed += 1
                res.errors[(g.queue, g.group)] = g.error
                logger.error(
                    "aggregator: aggregating group %r of queue %r failed (failure %d, retry in %.0f s): %s",
                    g.group,
                    g.queue,
                    g.errors + 1,
                    self._backoff(g.errors),
                    g.error,
                    extra={"action": "group_aggregate_failed", "queue": g.queue, "group": g.group},
                )
        res.tasks += len(created)
        res.members += sum(len(a.members) for a in created)
        res.created.extend(created)
        if logger.isEnabledFor(logging.INFO):
            for a in created:
                logger.info(
                    "aggregator: Aggregating %d tasks from group %r of queue %r into task %s",
                    len(a.members),
                    a.group,
                    a.queue,
                    a.task_id,
                    extra={"action": "group_aggregated", "queue": a.queue, "group": a.group},
                )

    @staticmethod
    def _plan(members: list[Task], policy: ResolvedPolicy, now: datetime) -> list[tuple[int, int]]:
        """Chunks to aggregate, as (start, end) slices of a group's locked members (in enqueue
        order), per G3."""
        n = len(members)
        s = policy.max_size
        k = n // s if s else 0
        chunks = [(i * s, (i + 1) * s) for i in range(k)] if s else []
        rest = k * s if s else 0
        if rest < n:
            newest = members[-1].enqueued_at
            oldest = members[rest].enqueued_at
            assert newest is not None and oldest is not None
            if newest <= now - timedelta(seconds=policy.grace_period) or (
                policy.max_delay is not None and oldest <= now - timedelta(seconds=policy.max_delay)
            ):
                chunks.append((rest, n))
        return chunks

    # ------------------------------------------------------------ user calls

    async def _call_all(self, chunks: list[_Chunk]) -> None:
        """Run the aggregator of every chunk, each under aggregate_timeout; fill chunk.result."""
        sync = [c for c in chunks if not _is_async(c.func)]
        for c in chunks:
            c.result = _NOT_RUN
        if sync:
            await self._call_sync(sync)
        for c in chunks:
            if c in sync:
                continue
            try:
                c.result = await asyncio.wait_for(c.func(c.group.group, c.tasks), self.aggregate_timeout)
            except TimeoutError:
                c.result = AggregatorTimeout(
                    f"group_aggregator took longer than {self.aggregate_timeout:g} s"
                )
            except Exception as exc:
                c.result = exc

    async def _call_sync(self, chunks: list[_Chunk]) -> None:
        results: list[Any] = [_NOT_RUN] * len(chunks)
        state = (-1, time.monotonic())
        cancelled = threading.Event()

        def work() -> None:
            nonlocal state
            for i, c in enumerate(chunks):
                if cancelled.is_set():
                    return
                state = (i, time.monotonic())
                try:
                    results[i] = c.func(c.group.group, c.tasks)
                except BaseException as exc:
                    results[i] = exc

        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pgq-aggregate")
        fut = asyncio.get_running_loop().run_in_executor(self._executor, work)
        timed_out: int | None = None
        try:
            while True:
                i, started = state
                left = self.aggregate_timeout - (time.monotonic() - started)
                if i >= 0 and left <= 0:
                    timed_out = i
                    break
                done, _ = await asyncio.wait({fut}, timeout=max(left, 0.005))
                if done:
                    break
        finally:
            if not fut.done():
                cancelled.set()
                # The stuck call keeps its thread; later batches get a fresh one.
                self._executor.shutdown(wait=False)
                self._executor = None
        snapshot = list(results)
        if timed_out is not None:
            snapshot[timed_out] = AggregatorTimeout(
                f"group_aggregator took longer than {self.aggregate_timeout:g} s"
            )
            for j in range(timed_out + 1, len(chunks)):
                snapshot[j] = _NOT_RUN
        for c, r in zip(chunks, snapshot, strict=True):
            if inspect.isawaitable(r):
                if inspect.iscoroutine(r):
                    r.close()
                r = TypeError("group_aggregator returned an awaitable from a plain def; declare it async def")
            c.result = r

    # ---------------------------------------------------------------- insert

    async def _prepare(self, conn: psycopg.AsyncConnection[Any], chunks: list[_Chunk]) -> list[_Chunk]:
        """Validate each result and build its row; per-group failure. Tasks with task_id= or
        unique= are inserted here, each under a savepoint; the others are returned, for one
        bulk insert."""
        stopped: set[int] = set()  # ids of groups with a failed or unrun chunk
        valid: list[_Chunk] = []
        for c in chunks:
            g = c.group
            if id(g) in stopped:
                continue
            if c.result is _NOT_RUN:
                stopped.add(id(g))
                continue
            err: str | None = None
            if isinstance(c.result, BaseException):
                err = _describe(c.result)
            elif not isinstance(c.result, Task):
                err = f"TypeError: group_aggregator must return a pgq.Task, not {type(c.result).__name__}"
            if err is not None:
                g.error = err
                stopped.add(id(g))
                continue
            valid.append(c)
        # Build every aggregated task's row at once (one option check per queue); if any is
        # refused, build them one by one below so that only its group fails.
        opts = {q: {"queue": q, "group": None} for q in {c.group.queue for c in valid}}
        try:
            built = _insert_rows([(c.result, opts[c.group.queue]) for c in valid]) if valid else []
        except Exception:
            built = []
        else:
            for c, r in zip(valid, built, strict=True):
                c.row = r
        bulk: list[_Chunk] = []
        stopped.clear()  # `valid` holds only the chunks before each group's first failure
        for c in valid:
            g = c.group
            if id(g) in stopped:
                continue
            if c.row is None:
                try:
                    c.row = _insert_rows([(c.result, opts[g.queue])])[0]
                except Exception as exc:
                    g.error = f"the aggregated task was refused: {_describe(exc)}"
                    stopped.add(id(g))
                    continue
            c.member_ids = [t._id for t in c.tasks]  # type: ignore[misc]  # set by _members
            c.row["members"] = c.member_ids
            if c.row["task_id"] is not None or c.row["unique_ttl"] is not None:
                # A conflict must fail this group only: insert it under a savepoint now.
                if not await self._insert_one(conn, c):
                    stopped.add(id(g))
                    continue
                c.inserted = True
            else:
                bulk.append(c)
        return bulk

    async def _insert_one(self, conn: psycopg.AsyncConnection[Any], c: _Chunk) -> bool:
        assert c.row is not None
        params = {"rows": _rows_json([c]), "notify": [c.group.queue]}
        cur = conn.cursor(row_factory=dict_row)
        try:
            async with conn.transaction():
                await cur.execute(self._q_insert, params)
                rows = await cur.fetchall()
        except psycopg.errors.UniqueViolation:
            c.group.error = _describe(
                TaskIDConflictError(
                    f"the aggregated task's task_id {c.row['task_id']!r} already exists in queue "
                    f"{c.group.queue!r}"
                )
            )
            return False
        if not rows:
            c.group.error = _describe(
                DuplicateTaskError(
                    "the aggregated task is unique= and a task with the same type and payload holds the lock"
                )
            )
            return False
        c.result = task_id_of(rows[0])
        return True

    # ---------------------------------------------------------------- waiting

    async def _sleep(self, stop: asyncio.Event, delay: float) -> None:
        assert self._event is not None
        waiters = [asyncio.ensure_future(self._event.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    # ------------------------------------------------------------- leadership

    async def _elect_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._elect_once()
            except (psycopg.Error, OSError) as exc:
                if self._held:
                    logger.warning(
                        "aggregator: lost the leader connection (%s); no longer leading %s",
                        _describe(exc),
                        sorted(self._held),
                        extra={"action": "leader_lost"},
                    )
                self._held.clear()
                await self._close_leader()
            try:
                await asyncio.wait_for(stop.wait(), self.elect_interval)
            except TimeoutError:
                pass

    async def _elect_once(self) -> None:
        conn = self._leader_conn
        if conn is None or conn.closed or conn.broken:
            self._held.clear()
            conn = self._leader_conn = await db.connect_async(self._dsn, "leader")
        want = [q for q in self.queues if q not in self._held]
        if not want:
            await conn.execute("SELECT 1")  # keepalive: notice a dead session
            return
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(self._q_elect, {"queues": want, "ns": self._leader_ns})
        won = {r["queue"] for r in await cur.fetchall()}
        if won:
            self._held |= won
            logger.info(
                "aggregator: now leading the aggregation of %s",
                sorted(won),
                extra={"action": "leader_elected", "worker_id": self.worker_id},
            )
            if self._event is not None:
                self._event.set()

    async def _resign(self) -> None:
        self._held.clear()
        await self._close_leader()

    async def _close_leader(self) -> None:
        conn, self._leader_conn = self._leader_conn, None
        if conn is not None:
            try:
                await conn.close()  # ending the session frees its advisory locks
            except Exception:  # pragma: no cover - closing a broken connection
                pass
