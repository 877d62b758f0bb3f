"""Periodic tasks: a cron Scheduler that enqueues each tick exactly once across nodes.

Design
------
Any number of schedulers (standalone `pgq.Scheduler`s, or servers given
`server.periodic(...)`) may run the same entries at once. There is no leader.

- **Entries.** `register(spec, task, **options)` returns an entry id. Unless the
  caller names it, the id is derived from the spec, time zone, task type, payload,
  headers and options, so every node that registers the same entry computes the
  same id. Each scheduler upserts its entries into `pgq.cron_entry` (for
  `pgq cron ls`) when they change and every `heartbeat` seconds.
- **Ticks are instants computed from the spec** (pgq/cron.py), identical on every
  node. `run_once(now)` reads the database clock (or the pinned `now`), and for
  each entry takes the latest tick T at or before it.
- **Exactly once.** T is enqueued in one transaction that first inserts
  (entry_id, T) into `pgq.cron_tick` (`cron_tick_claim`: ON CONFLICT DO NOTHING,
  and nothing when a later tick of the entry is recorded) and, only when that row
  was inserted, inserts the task with the Client's own `task_enqueue` query, then
  records the task id on the tick row. The primary key (entry_id, tick_at)
  serialises concurrent schedulers: the loser's insert waits for the winner's
  commit and then inserts nothing; if the winner rolls back, the loser inserts.
  A task therefore exists for a tick if and only if its tick row does.
- **The database is authoritative** for which ticks were enqueued and for the
  time. A scheduler's memory (the newest tick it knows of per entry) only saves
  round trips.
- **Missed ticks.** Each pass considers only the latest due tick of each entry, and
  only while it is at most `misfire_grace` seconds old (default 60 s). A scheduler
  whose loop was delayed past several ticks, or a whole deployment that was down,
  therefore skips the ticks in between: a restart never floods the queue. With
  `missed="latest"`, the latest missed tick is enqueued however late it is,
  provided the entry existed at that tick (its `created_at`) and no later tick was
  recorded. The grace also means a scheduler started up to `misfire_grace` after a
  tick still enqueues that tick if nobody did.
- **Pruning.** Every `prune_interval` seconds a scheduler deletes ticks beyond the
  newest `keep_ticks` of each entry and ticks older than `tick_retention`, but
  always keeps each live entry's newest tick: with it, `cron_tick_claim` refuses
  any older tick, so a pruned tick can never be enqueued again.

When can this duplicate or lose work?
-------------------------------------
It cannot enqueue a tick twice while the tick rows are intact (the primary key).
It can skip ticks: while every scheduler is down, stalled or cut off from the
database for longer than `misfire_grace`, and when two ticks of an entry are
closer together than a scheduler's pass takes (the older is skipped). Two
different definitions registered under the same explicit `entry_id` share one
tick sequence, and the last scheduler to upsert sets what `pgq cron ls` shows:
give different entries different ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Any, Literal

import psycopg

from pgq import _sql, cron, db
from pgq.client import build_params
from pgq.errors import ConfigError, InvalidArgumentError, PgqError
from pgq.task import Task, check_name, encode_headers, encode_payload, parse_duration

__all__ = [
    "EntryInfo",
    "EntryNotFoundError",
    "RunResult",
    "Scheduler",
    "TickInfo",
    "entry_history",
    "list_entries",
]

log = logging.getLogger("pgq.scheduler")

Missed = Literal["skip", "latest"]
_MISSED = ("skip", "latest")
#: Options that make no sense on a task enqueued again and again.
_REFUSED = {
    "task_id": "a fixed task_id would conflict on the second tick",
    "process_at": "an absolute process_at would be in the past after the first tick; use process_in",
}


class EntryNotFoundError(PgqError, LookupError):
    """No periodic entry with this id."""


@dataclass(frozen=True)
class Entry:
    """A registered periodic entry (what register() stored)."""

    id: str
    schedule: cron.Schedule
    task: Task
    options: dict[str, Any]
    missed: Missed
    queue: str

    @property
    def spec(self) -> str:
        return self.schedule.spec


@dataclass(frozen=True)
class Enqueued:
    entry_id: str
    tick_at: datetime
    task_id: str | None  # None: a unique= lock held by an earlier task skipped this one
    queue: str


@dataclass
class RunResult:
    """What one pass did: the clock it used, the ticks it enqueued, the ticks it skipped."""

    now: datetime
    enqueued: list[Enqueued] = field(default_factory=list)
    missed: list[tuple[str, datetime]] = field(default_factory=list)
    pruned: int = 0


@dataclass
class _State:
    created_at: datetime | None = None
    last_tick: datetime | None = None
    reported_miss: datetime | None = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _canonical_options(options: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in sorted(options.items()):
        if k in ("timeout", "unique", "process_in", "retention"):
            out[k] = parse_duration(v, k)
        else:
            out[k] = _jsonable(v)
    return out


def derive_entry_id(schedule: cron.Schedule, task: Task, options: Mapping[str, Any]) -> str:
    """The stable id of an entry: the task type, '@', and a digest of its definition."""
    definition = json.dumps(
        {
            "spec": schedule.every_us if schedule.every_us is not None else schedule.expr,
            "location": schedule.location_name,
            "type": task.type,
            "payload": json.loads(encode_payload(task.payload)),
            "headers": dict(sorted(task.headers.items())),
            "options": _canonical_options(options),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    digest = hashlib.sha256(definition.encode()).hexdigest()[:12]
    return f"{task.type[:64]}@{digest}"


class Scheduler:
    """Enqueues registered tasks on cron schedules; run it on as many nodes as you like.

    `run()` blocks until SIGTERM/SIGINT; `start()`/`shutdown()` run it on a thread;
    `run_async(stop)` runs it inside an asyncio loop (the Server does this);
    `run_once(now=None)` makes one pass (tests pin `now`).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        location: str | tzinfo = "UTC",
        schema: str = "pgq",
        missed: Missed = "skip",
        misfire_grace: float | timedelta = 60.0,
        heartbeat: float | timedelta = 30.0,
        keep_ticks: int = 100,
        tick_retention: float | timedelta = timedelta(days=7),
        prune_interval: float | timedelta = 60.0,
    ) -> None:
        self._schema = _sql.check_schema(schema)
        self._location = cron.zone(location)
        self._missed = _check_missed(missed)
        self._grace = _setting(misfire_grace, "misfire_grace", allow_zero=True)
        self._heartbeat = _setting(heartbeat, "heartbeat")
        self._retention = _setting(tick_retention, "tick_retention")
        self._prune_every = _setting(prune_interval, "prune_interval")
        if isinstance(keep_ticks, bool) or not isinstance(keep_ticks, int) or keep_ticks < 1:
            raise ConfigError(f"keep_ticks must be an int >= 1, got {keep_ticks!r}")
        self._keep = keep_ticks
        self._dsn = dsn
        self._q = {
            name: _sql.query(name, schema)
            for name in (
                "cron_now",
                "cron_entry_upsert",
                "cron_entry_delete",
                "cron_tick_claim",
                "cron_tick_set_task",
                "cron_tick_prune",
                "task_enqueue",
            )
        }
        self._entries: dict[str, Entry] = {}
        self._state: dict[str, _State] = {}
        self._entries_lock = threading.Lock()
        self._dirty = True
        self._lock = threading.Lock()  # one pass (and the connection) at a time
        self._conn: psycopg.Connection[Any] | None = None
        self._synced_at: datetime | None = None
        self._pruned_at: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- entries ---------------------------------------------------------------

    def register(
        self,
        cronspec: str,
        task: Task,
        *,
        entry_id: str | None = None,
        location: str | tzinfo | None = None,
        missed: Missed | None = None,
        **enqueue_options: Any,
    ) -> str:
        """Run `task` on `cronspec`; returns the entry id (derived, or `entry_id`).

        Options are those of enqueue(); the task's own options apply under them.
        Registering the same entry twice is a no-op that returns the same id.
        """
        if not isinstance(task, Task):
            raise InvalidArgumentError(f"register takes a pgq.Task, not {type(task).__name__}")
        schedule = cron.parse(cronspec, self._location if location is None else location)
        options = {k: v for k, v in task.options.items() if v is not None}
        options.update((k, v) for k, v in enqueue_options.items() if v is not None)
        for name, why in _REFUSED.items():
            if name in options:
                raise InvalidArgumentError(f"periodic tasks cannot take {name}: {why}")
        params = build_params([(task, options)])  # every enqueue check, before anything is stored
        if entry_id is None:
            entry_id = derive_entry_id(schedule, task, options)
        else:
            check_name(entry_id, "entry_id")
        entry = Entry(
            id=entry_id,
            schedule=schedule,
            task=task,
            options=options,
            missed=self._missed if missed is None else _check_missed(missed),
            queue=params["queue"][0],
        )
        with self._entries_lock:
            self._entries[entry_id] = entry
            self._state.setdefault(entry_id, _State())
            self._dirty = True
        return entry_id

    def unregister(self, entry_id: str) -> None:
        """Stop running an entry here and remove it from `pgq.cron_entry`.

        Other schedulers that still run it add it back at their next heartbeat.
        Its tick history stays until pruned.
        """
        with self._entries_lock:
            if entry_id not in self._entries:
                raise EntryNotFoundError(f"no periodic entry {entry_id!r} is registered on this scheduler")
            del self._entries[entry_id]
            self._state.pop(entry_id, None)
        with self._lock:
            self._connection().execute(self._q["cron_entry_delete"], {"id": entry_id})

    @property
    def entries(self) -> dict[str, Entry]:
        with self._entries_lock:
            return dict(self._entries)

    # -- one pass --------------------------------------------------------------

    def run_once(self, now: datetime | None = None) -> RunResult:
        """Enqueue every entry's due tick that nobody enqueued yet; returns what it did."""
        with self._lock:
            conn = self._connection()
            row = conn.execute(self._q["cron_now"], {"now": now}).fetchone()
            assert row is not None
            result = RunResult(now=row["now"])
            with self._entries_lock:
                entries = list(self._entries.values())
                dirty, self._dirty = self._dirty, False
            try:
                if dirty or self._due(self._synced_at, result.now, self._heartbeat):
                    self._sync(conn, entries, now, result.now)
                for entry in entries:
                    self._fire(conn, entry, now, result)
                if self._due(self._pruned_at, result.now, self._prune_every):
                    pruned = conn.execute(
                        self._q["cron_tick_prune"],
                        {"now": now, "keep": self._keep, "max_age": self._retention},
                    ).fetchone()
                    result.pruned = pruned["deleted"] if pruned else 0
                    self._pruned_at = result.now
            except BaseException:
                with self._entries_lock:
                    self._dirty = self._dirty or dirty
                raise
            return result

    async def run_once_async(self, now: datetime | None = None) -> RunResult:
        """run_once on a worker thread, for callers inside an event loop."""
        return await asyncio.to_thread(self.run_once, now)

    def next_tick_after(self, t: datetime) -> datetime | None:
        """The earliest tick of any entry strictly after t (None without entries)."""
        ticks = [e.schedule.next_after(t) for e in self.entries.values()]
        return min(ticks) if ticks else None

    @staticmethod
    def _due(last: datetime | None, now: datetime, every: float) -> bool:
        return last is None or (now - last).total_seconds() >= every or now < last

    def _sync(
        self, conn: psycopg.Connection[Any], entries: list[Entry], now: datetime | None, at: datetime
    ) -> None:
        if entries:
            rows = conn.execute(
                self._q["cron_entry_upsert"],
                {
                    "now": now,
                    "id": [e.id for e in entries],
                    "spec": [e.spec for e in entries],
                    "location": [e.schedule.location_name for e in entries],
                    "type": [e.task.type for e in entries],
                    "payload": [encode_payload(e.task.payload) for e in entries],
                    "headers": [encode_headers(e.task.headers) if e.task.headers else None for e in entries],
                    "options": [json.dumps(_canonical_options(e.options)) for e in entries],
                    "missed": [e.missed for e in entries],
                },
            ).fetchall()
            with self._entries_lock:
                for r in rows:
                    st = self._state.get(r["id"])
                    if st is None:
                        continue
                    st.created_at = r["created_at"]
                    if r["last_tick_at"] is not None and (
                        st.last_tick is None or r["last_tick_at"] > st.last_tick
                    ):
                        st.last_tick = r["last_tick_at"]
        self._synced_at = at

    def _fire(
        self, conn: psycopg.Connection[Any], entry: Entry, now: datetime | None, result: RunResult
    ) -> None:
        st = self._state.get(entry.id)
        if st is None:  # unregistered meanwhile
            return
        tick = entry.schedule.last_at_or_before(result.now)
        if st.last_tick is not None and tick <= st.last_tick:
            return
        late = (result.now - tick).total_seconds()
        if late > self._grace and not (
            entry.missed == "latest" and st.created_at is not None and tick >= st.created_at
        ):
            if st.reported_miss != tick:
                st.reported_miss = tick
                result.missed.append((entry.id, tick))
                log.info("periodic entry %s: skipped tick %s (%.1f s late)", entry.id, tick, late)
            return
        done = self._enqueue_tick(conn, entry, tick, now)
        st.last_tick = tick
        if done is not None:
            result.enqueued.append(done)

    def _enqueue_tick(
        self, conn: psycopg.Connection[Any], entry: Entry, tick: datetime, now: datetime | None
    ) -> Enqueued | None:
        key = {"entry_id": entry.id, "tick_at": tick}
        with conn.transaction():
            claimed = conn.execute(
                self._q["cron_tick_claim"], {**key, "now": now, "queue": entry.queue}
            ).fetchone()
            if claimed is None:
                return None  # another scheduler enqueued this tick (or a later one)
            params = build_params([(entry.task, entry.options)])
            params["notify"] = [entry.queue]
            rows = conn.execute(self._q["task_enqueue"], params).fetchall()
            task_id = None
            if rows:
                r = rows[0]
                task_id = r["task_id"] if r["task_id"] is not None else str(r["id"])
                conn.execute(self._q["cron_tick_set_task"], {**key, "task_id": task_id})
        log.debug("periodic entry %s: enqueued tick %s as task %s", entry.id, tick, task_id)
        return Enqueued(entry.id, tick, task_id, entry.queue)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(db.resolve_dsn(self._dsn), "scheduler")
        return self._conn

    def _drop_connection(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

    # -- loops -----------------------------------------------------------------

    def _step(self) -> float:
        """One pass; returns the seconds to wait before the next one."""
        res = self.run_once()
        nxt = self.next_tick_after(res.now)
        wait = self._heartbeat if nxt is None else min(self._heartbeat, (nxt - res.now).total_seconds())
        return max(wait, 0.0) + 0.002  # land just after the tick by the database clock

    def _failed(self, failures: int, exc: BaseException) -> float:
        delay = min(30.0, 0.5 * 2.0 ** min(failures, 10))
        log.warning("scheduler pass failed (%s); retrying in %.1f s", exc, delay, exc_info=True)
        self._drop_connection()
        return delay

    def _loop(self, stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                wait = self._step()
                failures = 0
            except Exception as exc:
                wait = self._failed(failures, exc)
                failures += 1
            stop.wait(wait)

    async def run_async(self, stop: asyncio.Event) -> None:
        """Run passes on the current event loop until `stop` is set (the DB work runs on a thread)."""
        failures = 0
        try:
            while not stop.is_set():
                try:
                    wait = await asyncio.to_thread(self._step)
                    failures = 0
                except Exception as exc:
                    wait = self._failed(failures, exc)
                    failures += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        finally:
            await asyncio.to_thread(self._drop_connection)

    def run(self) -> None:
        """Run until SIGTERM or SIGINT (or shutdown() from another thread)."""
        self._stop.clear()
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, lambda *_: self._stop.set())
        try:
            self._loop(self._stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._drop_connection()

    def start(self) -> None:
        """Run on a background thread until shutdown()."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("this Scheduler is already running")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(self._stop,), name="pgq-scheduler", daemon=True
        )
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop (start() or run()) and close the connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._drop_connection()

    def close(self) -> None:
        self.shutdown()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_missed(missed: Any) -> Missed:
    if missed not in _MISSED:
        raise ConfigError(f"missed must be 'skip' or 'latest', got {missed!r}")
    return missed  # type: ignore[no-any-return]


def _setting(value: Any, name: str, *, allow_zero: bool = False) -> float:
    try:
        s = parse_duration(value, name)
    except InvalidArgumentError as exc:
        raise ConfigError(str(exc)) from None
    if s < 0 or (s == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value!r}")
    return s


# -- reading the schedule (pgq cron ls / history) -------------------------------


@dataclass(frozen=True)
class EntryInfo:
    id: str
    spec: str
    location: str
    type: str
    payload: Any
    options: dict[str, Any]
    missed: str
    created_at: datetime
    seen_at: datetime
    prev_run_at: datetime | None  # the newest enqueued tick
    prev_task_id: str | None
    next_run_at: datetime | None  # the next tick after now (None when the spec cannot be read)


@dataclass(frozen=True)
class TickInfo:
    entry_id: str
    tick_at: datetime
    enqueued_at: datetime
    task_id: str | None
    queue: str
    state: str | None  # the task's state now; None once it is completed and deleted


def list_entries(
    conn: psycopg.Connection[Any], schema: str = "pgq", now: datetime | None = None
) -> list[EntryInfo]:
    """Every entry in the database with its previous and next run (by the database clock)."""
    out = []
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    for r in cur.execute(_sql.query("cron_entry_list", schema), {"now": now}).fetchall():
        try:
            nxt: datetime | None = cron.parse(r["spec"], r["location"]).next_after(r["now"])
        except ConfigError:
            nxt = None
        out.append(
            EntryInfo(
                id=r["id"],
                spec=r["spec"],
                location=r["location"],
                type=r["type"],
                payload=r["payload"],
                options=r["options"],
                missed=r["missed"],
                created_at=r["created_at"],
                seen_at=r["seen_at"],
                prev_run_at=r["last_tick_at"],
                prev_task_id=r["last_task_id"],
                next_run_at=nxt,
            )
        )
    return out


def entry_history(
    conn: psycopg.Connection[Any], entry_id: str, schema: str = "pgq", limit: int = 20
) -> list[TickInfo]:
    """The newest enqueued ticks of an entry, newest first; EntryNotFoundError if it has none
    and does not exist."""
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    rows = cur.execute(
        _sql.query("cron_tick_history", schema), {"entry_id": entry_id, "limit": limit}
    ).fetchall()
    if not rows:
        found = cur.execute(_sql.query("cron_entry_exists", schema), {"id": entry_id}).fetchone()
        if not found or not found["exists"]:
            raise EntryNotFoundError(f"no periodic entry {entry_id!r} (see `pgq cron ls`)")
    return [
        TickInfo(r["entry_id"], r["tick_at"], r["enqueued_at"], r["task_id"], r["queue"], r["state"])
        for r in rows
    ]
