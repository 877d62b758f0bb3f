"""The aggregator service (pgq/services/aggregator.py, sql/queries/group.sql)
against a real PostgreSQL, one round at a time with an injected clock: the
time and size rules of SPEC-aggregation.md (G1-G15 scenarios 1-7 and 10-15),
failures, lineage, unique locks, leadership and the cost of the due check.

Members are enqueued for real; `Members.add(..., at=T)` then moves the
member's enqueue time (and its arrival row) to T, so a test can lay members
out on a timeline without sleeping and call run_once(now=...) at any instant.
End-to-end scenarios with real Servers are in test_aggregation_server.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

import pgq
from pgq import db
from pgq.config import GroupPolicy, resolve_group_policies
from pgq.services.aggregator import AggregationResult, Aggregator

Q = "q"


def concat(group: str, tasks: list[pgq.Task]) -> pgq.Task:
    return pgq.Task("digest", [t.payload for t in tasks])


class Harness:
    """An Aggregator on its own event loop, driven one round at a time."""

    def __init__(self, dsn: str, policies: dict[str, Any], **kw: Any) -> None:
        self.runner = asyncio.Runner()
        self.pool = self.runner.run(db.pool_async(dsn, "aggregator", max_size=4))
        kw.setdefault("leadership", False)
        self.agg = Aggregator(dsn, self.pool, policies, worker_id="test", **kw)

    def once(self, now: datetime | None = None) -> AggregationResult:
        return self.runner.run(self.agg.run_once(now))

    def close(self) -> None:
        self.runner.run(self.pool.close())
        self.runner.close()


@pytest.fixture
def make(dsn: str) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def factory(
        aggregator: Any = concat,
        queues: tuple[str, ...] = (Q,),
        harness_kw: dict[str, Any] | None = None,
        **settings: Any,
    ) -> Harness:
        settings.setdefault("grace_period", 60)
        pols = resolve_group_policies(list(queues), aggregator=aggregator, **settings)
        h = Harness(dsn, pols, **(harness_kw or {}))
        made.append(h)
        return h

    yield factory
    for h in made:
        h.close()


@pytest.fixture
def client(dsn: str) -> Iterator[pgq.Client]:
    with pgq.Client(dsn, notify_window=0) as c:
        yield c


@pytest.fixture
def insp(dsn: str) -> Iterator[pgq.Inspector]:
    i = pgq.Inspector(dsn)
    yield i
    i.close()


def db_now(conn: psycopg.Connection[Any]) -> datetime:
    row = conn.execute("SELECT clock_timestamp() AS t").fetchone()
    assert row is not None
    return row["t"]  # type: ignore[no-any-return]


class Members:
    """Enqueue members and place them on a timeline."""

    def __init__(self, client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
        self.client = client
        self.conn = conn
        self.t0 = db_now(conn)

    def t(self, seconds: float) -> datetime:
        return self.t0 + timedelta(seconds=seconds)

    def add(
        self,
        payload: Any,
        *,
        at: float | None = None,
        queue: str = Q,
        group: str = "g",
        headers: dict[str, str] | None = None,
        **opts: Any,
    ) -> pgq.TaskInfo:
        task = pgq.Task("item", payload, headers=headers)
        info = self.client.enqueue(task, queue=queue, group=group, **opts)
        if at is not None and info.state == "aggregating":
            when = self.t(at)
            self.conn.execute(
                "UPDATE pgq.task SET enqueued_at = %s WHERE queue = %s AND coalesce(task_id, id::text) = %s",
                (when, queue, info.id),
            )
            self.conn.execute(
                "UPDATE pgq.group_arrival SET oldest_at = %s, newest_at = %s "
                "WHERE queue = %s AND group_key = %s AND newest_at = %s",
                (when, when, queue, group, info.enqueued_at),
            )
        return info


@pytest.fixture
def members(client: pgq.Client, conn: psycopg.Connection[Any]) -> Members:
    return Members(client, conn)


def tasks(conn: psycopg.Connection[Any], queue: str = Q, state: str | None = None) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT * FROM pgq.task WHERE queue = %s AND (%s::text IS NULL OR state = %s) ORDER BY id",
        (queue, state, state),
    ).fetchall()


def aggregates(conn: psycopg.Connection[Any], queue: str = Q) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT * FROM pgq.task WHERE queue = %s AND members IS NOT NULL ORDER BY id", (queue,)
    ).fetchall()


def summary(conn: psycopg.Connection[Any], queue: str = Q) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT * FROM pgq.task_group WHERE queue = %s ORDER BY group_key", (queue,)
    ).fetchall()


# --- scenario 1-3: the time rules ----------------------------------------------------------------


def test_s1_grace_period_takes_all_members_in_order(
    make: Callable[..., Harness], members: Members, conn: psycopg.Connection[Any], insp: pgq.Inspector
) -> None:
    h = make(grace_period=1)
    ids = [members.add(i, at=0.3 * i).id for i in range(3)]
    assert [g.size for g in insp.groups(Q)] == [3]
    r = h.once(members.t(0.6 + 0.999))
    assert r.tasks == 0 and r.arrivals == 3
    assert r.next_due is not None and 0 < r.next_due <= 0.002
    r = h.once(members.t(1.6))
    assert (r.tasks, r.members) == (1, 3)
    [agg] = aggregates(conn)
    assert agg["payload"] == [0, 1, 2] and agg["type"] == "digest" and agg["state"] == "pending"
    assert agg["members"] == ids and agg["group_key"] is None
    assert tasks(conn, state="aggregating") == []
    assert insp.groups(Q) == [] and summary(conn) == []
    assert r.next_due is None


def test_s2_every_member_renews_the_grace_period(
    make: Callable[..., Harness], members: Members, conn: psycopg.Connection[Any]
) -> None:
    h = make(grace_period=2)
    for i in range(7):
        members.add(i, at=i)
        r = h.once(members.t(i + 0.999))
        assert r.tasks == 0, f"aggregated while members keep coming (t={i})"
    assert h.once(members.t(6 + 1.999)).tasks == 0
    r = h.once(members.t(8))
    assert (r.tasks, r.members) == (1, 7)
    assert aggregates(conn)[0]["payload"] == list(range(7))


def test_s3_max_delay_counts_from_the_oldest(
    make: Callable[..., Harness], members: Members, conn: psycopg.Connection[Any]
) -> None:
    h = make(grace_period=2, max_delay=4)
    for i in range(4):
        members.add(i, at=i)
        assert h.once(members.t(i + 0.999)).tasks == 0
    r = h.once(members.t(4))
    assert (r.tasks, r.members) == (1, 4)
    assert aggregates(conn)[0]["payload"] == [0, 1, 2, 3]
    # The next member starts a new wait, measured from itself.
    members.add(4, at=4.5)
    assert h.once(members.t(6.499)).tasks == 0
    assert h.once(members.t(6.5)).members == 1


def test_next_due_reports_the_earliest_rule(make: Callable[..., Harness], members: Members) -> None:
    h = make(grace_period=10, max_delay=3)
    members.add(0, at=0)
    members.add(1, at=2)
    r = h.once(members.t(2.5))
    assert r.tasks == 0 and r.next_due == pytest.approx(0.5, abs=1e-6)  # oldest + max_delay


# --- scenario 4-5: the size rule -----------------------------------------------------------------


def test_s4_size_trigger_needs_no_time(
    make: Callable[..., Harness], members: Members, conn: psycopg.Connection[Any]
) -> None:
    h = make(grace_period=3600, max_size=5)
    for i in range(4):
        members.add(i)
    assert h.once().tasks == 0
    members.add(4)
    r = h.once()
    assert (r.tasks, r.members) == (1, 5)
    assert summary(conn) == []


def test_s5_k_times_max_size_gives_k_tasks_at_once(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any], insp: pgq.Inspector
) -> None:
    h = make(grace_period=3600, max_size=3)
    infos = client.enqueue_many([pgq.Task("item", i) for i in range(1, 8)], queue=Q, group="g")
    r = h.once()
    assert (r.tasks, r.members) == (2, 6)
    a, b = aggregates(conn)
    assert a["payload"] == [1, 2, 3] and b["payload"] == [4, 5, 6]
    assert a["members"] == [i.id for i in infos[:3]] and b["members"] == [i.id for i in infos[3:6]]
    [left] = tasks(conn, state="aggregating")
    assert left["payload"] == 7
    [g] = insp.groups(Q)
    assert g.size == 1
    assert [s["size"] for s in summary(conn)] == [1]
    assert h.once().tasks == 0  # the 7th waits for its grace period
    stats = conn.execute(
        "SELECT aggregated, aggregated_members, processed FROM pgq.stat_daily WHERE queue = %s", (Q,)
    ).fetchall()
    assert stats == [{"aggregated": 2, "aggregated_members": 6, "processed": 0}]
    [qs] = conn.execute("SELECT * FROM pgq.queue_stats WHERE queue = %s", (Q,)).fetchall()
    assert (qs["aggregated_today"], qs["aggregated_total"], qs["aggregated_members_total"]) == (2, 2, 6)


def test_remainder_goes_too_when_the_group_is_time_due(
    make: Callable[..., Harness], members: Members, conn: psycopg.Connection[Any]
) -> None:
    h = make(grace_period=1, max_size=3)
    for i in range(7):
        members.add(i, at=0)
    r = h.once(members.t(1))
    assert [len(a["members"]) for a in aggregates(conn)] == [3, 3, 1]
    assert r.tasks == 3


def test_chunk_limit_spreads_a_huge_group_over_rounds(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    h = make(grace_period=3600, max_size=2, harness_kw={"chunk_limit": 4})
    client.enqueue_many([pgq.Task("item", i) for i in range(10)], queue=Q, group="g")
    r = h.once()
    assert (r.tasks, r.members, r.more) == (2, 4, True)
    assert h.once().members == 4
    assert h.once().members == 2
    assert [a["payload"] for a in aggregates(conn)] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def test_batch_size_limits_groups_per_round(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    h = make(grace_period=3600, max_size=1, harness_kw={"batch_size": 3})
    for g in range(5):
        client.enqueue(pgq.Task("item", g), queue=Q, group=f"g{g}")
    r = h.once()
    assert (r.tasks, r.more) == (3, True)
    r = h.once()
    assert (r.tasks, r.more) == (2, False)
    assert len(aggregates(conn)) == 5


# --- scenario 6: the aggregated task ----------------------------------------------------------------


def test_s6_aggregated_task_lands_in_the_groups_queue(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    def to_other(group: str, ts: list[pgq.Task]) -> pgq.Task:
        return pgq.Task(
            "digest",
            len(ts),
            queue="other",
            group="nope",
            max_retry=3,
            timeout=5,
            retention=60,
            headers={"h": "v"},
        )

    h = make(to_other, grace_period=3600, max_size=2)
    client.enqueue_many([pgq.Task("item", 1), pgq.Task("item", 2)], queue=Q, group="g")
    assert h.once().tasks == 1
    [agg] = aggregates(conn)
    assert agg["queue"] == Q and agg["state"] == "pending" and agg["group_key"] is None
    assert agg["max_retry"] == 3 and agg["timeout"] == timedelta(seconds=5)
    assert agg["retention"] == timedelta(seconds=60) and agg["headers"] == {"h": "v"}
    assert tasks(conn, "other") == []


def test_aggregated_task_options_process_in_and_task_id(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any], insp: pgq.Inspector
) -> None:
    def later(group: str, ts: list[pgq.Task]) -> pgq.Task:
        return pgq.Task("digest", group, process_in=60, task_id=f"digest-{group}")

    h = make(later, grace_period=3600, max_size=1, queues=(Q,))
    client.enqueue(pgq.Task("item", 1), queue=Q, group="a")
    assert h.once().tasks == 1
    info = insp.get_task_info(Q, "digest-a")
    assert info.state == "scheduled" and info.payload == "a"
    # The same task_id again conflicts: the group fails, nothing is lost, and it retries later.
    m = client.enqueue(pgq.Task("item", 2), queue=Q, group="a")
    r = h.once()
    assert r.tasks == 0 and r.failed == 1
    assert "TaskIDConflictError" in r.errors[(Q, "a")]
    assert insp.get_task_info(Q, m.id).state == "aggregating"
    [g] = insp.groups(Q)
    assert g.errors == 1 and g.last_error and "TaskIDConflictError" in g.last_error
    insp.delete_task(Q, "digest-a")
    assert h.once(db_now(conn) + timedelta(seconds=1.001)).tasks == 1


def test_aggregator_receives_read_only_facts_in_fifo_order(
    make: Callable[..., Harness], members: Members
) -> None:
    seen: list[tuple[str | None, str | None, datetime | None, dict[str, str], Any]] = []

    def look(group: str, ts: list[pgq.Task]) -> pgq.Task:
        seen.extend((t.id, t.group, t.enqueued_at, t.headers, t.payload) for t in ts)
        return pgq.Task("digest", group)

    h = make(look, grace_period=1)
    infos = [members.add(i, at=2 - i) for i in range(3)]  # enqueued later, placed earlier
    members.add("h", at=3, headers={"k": "v"})
    h.once(members.t(10))
    assert [s[4] for s in seen] == [2, 1, 0, "h"]
    assert [s[0] for s in seen[:3]] == [infos[2].id, infos[1].id, infos[0].id]
    assert all(s[1] == "g" for s in seen) and seen[0][2] == members.t(0)
    assert seen[3][3] == {"k": "v"}


def test_members_are_the_tasks_a_row_makes(
    make: Callable[..., Harness], members: Members, conn: psycopg.Connection[Any]
) -> None:
    """The aggregator builds member Tasks without Task._from_row (the hot path): every slot
    must come out the same as a worker's Task of that row would have it."""
    seen: list[pgq.Task] = []

    def keep(group: str, ts: list[pgq.Task]) -> pgq.Task:
        seen.extend(ts)
        return pgq.Task("digest", group)

    h = make(keep, grace_period=1)
    members.add({"a": [1, 2.5, None, "é"]}, at=0, headers={"k": "v"}, max_retry=3)
    members.add(7, at=0.5, task_id="mine")
    rows = conn.execute(
        "SELECT * FROM pgq.task WHERE state = 'aggregating' ORDER BY enqueued_at, id"
    ).fetchall()
    h.once(members.t(10))
    assert len(seen) == len(rows) == 2
    for t, row in zip(seen, rows, strict=True):
        ref = pgq.Task._from_row(row)
        for slot in pgq.Task.__slots__:
            assert getattr(t, slot) == getattr(ref, slot), slot
    assert seen[0].max_retry == 3 and seen[0].headers == {"k": "v"} and seen[1].id == "mine"
    assert seen[0].payload == {"a": [1, 2.5, None, "é"]} and seen[0].enqueued_at == members.t(0)


@pytest.mark.parametrize("group", ['a"b', "c\\d", "x,y", "{z}", "NULL", " sp ", "new\nline", "ü'"])
def test_any_group_name_and_error_text_round_trips(
    make: Callable[..., Harness], members: Members, conn: psycopg.Connection[Any], group: str
) -> None:
    """Group names and error texts travel as array literals: quotes, backslashes, commas,
    braces, the word NULL and whitespace must all come back as they went."""
    calls = 0

    def flaky(g: str, ts: list[pgq.Task]) -> pgq.Task:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError(f'bad {g} \\ " {{}} ,')
        return concat(g, ts)

    h = make(flaky, grace_period=1, max_size=2)
    members.add(1, at=0, group=group)
    members.add(2, at=0.1, group=group)
    members.add(3, at=0.2, group=group)
    r = h.once(members.t(0.5))
    assert r.failed == 1 and r.errors == {(Q, group): f'RuntimeError: bad {group} \\ " {{}} ,'}
    [g] = summary(conn)
    assert g["group_key"] == group and g["last_error"] == f'RuntimeError: bad {group} \\ " {{}} ,'
    assert g["size"] == 3 and g["errors"] == 1
    r = h.once(members.t(0.5) + timedelta(seconds=5))
    assert (r.tasks, r.members) == (2, 3)
    assert [a["payload"] for a in aggregates(conn)] == [[1, 2], [3]]
    assert summary(conn) == []


def test_batch_failing_in_the_database_is_retried_group_by_group(
    make: Callable[..., Harness], members: Members, conn: psycopg.Connection[Any]
) -> None:
    """A statement of the batch fails in the database (here a trigger refuses one aggregated
    task): the batch rolls back, each group is tried alone, the bad one keeps its members
    and its error, the others are aggregated."""
    conn.execute(
        "CREATE FUNCTION pgq.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.type = 'boom' THEN RAISE EXCEPTION 'refused by trigger'; END IF; RETURN NEW; END $$"
    )
    conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON pgq.task FOR EACH ROW EXECUTE FUNCTION pgq.refuse()")

    def agg(group: str, ts: list[pgq.Task]) -> pgq.Task:
        return pgq.Task("boom" if group == "bad" else "digest", [t.payload for t in ts])

    h = make(agg, grace_period=1)
    for name in ("a", "bad", "c"):
        members.add(f"{name}1", at=0, group=name)
        members.add(f"{name}2", at=0.1, group=name)
    r = h.once(members.t(5))
    assert (r.tasks, r.members, r.failed) == (2, 4, 1)
    assert "refused by trigger" in r.errors[(Q, "bad")]
    assert sorted(a["payload"] for a in aggregates(conn)) == [["a1", "a2"], ["c1", "c2"]]
    [g] = summary(conn)
    assert g["group_key"] == "bad" and g["errors"] == 1 and "refused by trigger" in g["last_error"]
    assert [t["payload"] for t in tasks(conn, state="aggregating")] == ["bad1", "bad2"]


# --- scenario 7 / G9: failing aggregators ------------------------------------------------------------


def test_s7_raising_aggregator_loses_nothing_and_retries_with_backoff(
    make: Callable[..., Harness],
    client: pgq.Client,
    conn: psycopg.Connection[Any],
    insp: pgq.Inspector,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = []

    def flaky(group: str, ts: list[pgq.Task]) -> pgq.Task:
        calls.append(len(ts))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return concat(group, ts)

    h = make(flaky, grace_period=3600, max_size=3)
    client.enqueue_many([pgq.Task("item", i) for i in range(3)], queue=Q, group="g")
    with caplog.at_level("ERROR", logger="pgq.services.aggregator"):
        r = h.once()
    assert (r.tasks, r.failed) == (0, 1)
    assert r.errors[(Q, "g")] == "RuntimeError: boom"
    assert "'g'" in caplog.text and "'q'" in caplog.text and "boom" in caplog.text
    assert len(tasks(conn, state="aggregating")) == 3
    [g] = insp.groups(Q)
    assert g.errors == 1 and g.last_error == "RuntimeError: boom" and g.next_due_at is not None
    now = db_now(conn)
    assert h.once(now).tasks == 0 and calls == [3]  # backing off: not even called
    r = h.once(now + timedelta(seconds=1.5))
    assert (r.tasks, r.members) == (1, 3) and calls == [3, 3]
    assert aggregates(conn)[0]["payload"] == [0, 1, 2]


def test_backoff_doubles(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    def bad(group: str, ts: list[pgq.Task]) -> pgq.Task:
        raise ValueError("no")

    h = make(bad, grace_period=3600, max_size=1)
    client.enqueue(pgq.Task("item", 1), queue=Q, group="g")
    now = db_now(conn)
    holds = []
    for _ in range(3):
        r = h.once(now)
        assert r.failed == 1
        [s] = summary(conn)
        holds.append((s["retry_at"] - now).total_seconds())
        now = s["retry_at"]
    assert holds == [1.0, 2.0, 4.0]
    assert summary(conn)[0]["errors"] == 3 and len(tasks(conn, state="aggregating")) == 1


@pytest.mark.parametrize("bad", ["none", "str", "coroutine_from_def"])
def test_non_task_return_is_a_failure(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any], bad: str
) -> None:
    async def coro() -> None:
        return None

    def agg(group: str, ts: list[pgq.Task]) -> Any:
        return coro() if bad == "coroutine_from_def" else {"none": None, "str": "x"}[bad]

    h = make(agg, grace_period=3600, max_size=1)
    client.enqueue(pgq.Task("item", 1), queue=Q, group="g")
    r = h.once()
    assert r.failed == 1 and r.tasks == 0
    assert "TypeError" in r.errors[(Q, "g")]
    assert len(tasks(conn, state="aggregating")) == 1


def test_invalid_aggregated_task_is_a_failure(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    h = make(lambda g, ts: pgq.Task("digest", {1: "non-str key"}), grace_period=3600, max_size=1)
    client.enqueue(pgq.Task("item", 1), queue=Q, group="g")
    r = h.once()
    assert r.failed == 1 and "refused" in r.errors[(Q, "g")]
    assert len(tasks(conn, state="aggregating")) == 1


def test_slow_sync_aggregator_times_out_and_others_proceed(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    release = threading.Event()

    def slow(group: str, ts: list[pgq.Task]) -> pgq.Task:
        if group == "slow":
            release.wait(5)
        return concat(group, ts)

    h = make(slow, grace_period=3600, max_size=1, harness_kw={"aggregate_timeout": 0.2})
    client.enqueue(pgq.Task("item", 1), queue=Q, group="fast")
    client.enqueue(pgq.Task("item", 2), queue=Q, group="slow")
    t = time.monotonic()
    r = h.once()
    release.set()
    assert time.monotonic() - t < 2
    assert r.failed == 1 and "AggregatorTimeout" in r.errors[(Q, "slow")]
    assert [a["payload"] for a in aggregates(conn)] == [[1]]
    assert [m["group_key"] for m in tasks(conn, state="aggregating")] == ["slow"]
    # A fresh thread serves the next round.
    r = h.once(db_now(conn) + timedelta(seconds=2))
    assert r.tasks == 1


def test_async_aggregator_and_its_timeout(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    async def agg(group: str, ts: list[pgq.Task]) -> pgq.Task:
        if group == "slow":
            await asyncio.sleep(5)
        return concat(group, ts)

    h = make(agg, grace_period=3600, max_size=1, harness_kw={"aggregate_timeout": 0.2})
    client.enqueue(pgq.Task("item", 1), queue=Q, group="fast")
    client.enqueue(pgq.Task("item", 2), queue=Q, group="slow")
    r = h.once()
    assert r.tasks == 1 and r.failed == 1 and "AggregatorTimeout" in r.errors[(Q, "slow")]


def test_failure_of_a_later_chunk_keeps_the_earlier_ones(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    def second_fails(group: str, ts: list[pgq.Task]) -> pgq.Task:
        if ts[0].payload == 2:
            raise RuntimeError("second")
        return concat(group, ts)

    h = make(second_fails, grace_period=3600, max_size=2)
    client.enqueue_many([pgq.Task("item", i) for i in range(6)], queue=Q, group="g")
    r = h.once()
    assert (r.tasks, r.failed) == (1, 1)
    assert [a["payload"] for a in aggregates(conn)] == [[0, 1]]
    assert [m["payload"] for m in tasks(conn, state="aggregating")] == [2, 3, 4, 5]


# --- scenario 10-12 -----------------------------------------------------------------------------


def test_s10_without_an_aggregator_members_wait(
    make: Callable[..., Harness], members: Members, conn: psycopg.Connection[Any], insp: pgq.Inspector
) -> None:
    h = make(grace_period=1, queues=("other",))
    for i in range(3):
        members.add(i, at=0)
    r = h.once(members.t(3600))
    assert r.tasks == 0 and r.due == 0
    assert len(tasks(conn, state="aggregating")) == 3
    [g] = insp.groups(Q)
    assert g.size == 3 and g.oldest_at == members.t(0)
    info = insp.get_queue_info(Q)
    assert info.aggregating == 3 and info.groups == 1


def test_s11_process_in_with_a_group_is_scheduled_not_aggregated(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    h = make(grace_period=1, max_size=1)
    info = client.enqueue(pgq.Task("item", 1), queue=Q, group="g", process_in=2)
    assert info.state == "scheduled" and info.group == "g"
    r = h.once(db_now(conn) + timedelta(hours=1))
    assert r.tasks == 0
    [t] = tasks(conn)
    assert t["state"] == "scheduled" and t["group_key"] == "g"


def test_s12_same_group_name_in_two_queues(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    h = make(grace_period=3600, max_size=2, queues=("a", "b"))
    for q in ("a", "b"):
        client.enqueue_many([pgq.Task("item", q), pgq.Task("item", q)], queue=q, group="same")
    r = h.once()
    assert r.tasks == 2
    assert [a["payload"] for a in aggregates(conn, "a")] == [["a", "a"]]
    assert [a["payload"] for a in aggregates(conn, "b")] == [["b", "b"]]


def test_per_queue_policies(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    h = make(
        grace_period=3600,
        max_size=5,
        queues=("a", "b"),
        policies={"b": GroupPolicy(max_size=2, aggregator=lambda g, ts: pgq.Task("b-digest", len(ts)))},
    )
    for q in ("a", "b"):
        client.enqueue_many([pgq.Task("item", 1), pgq.Task("item", 2)], queue=q, group="g")
    assert h.once().tasks == 1
    assert aggregates(conn, "a") == [] and aggregates(conn, "b")[0]["type"] == "b-digest"


# --- scenario 13: inspector operations and the aggregator ---------------------------------------------


def test_s13_member_operations_then_aggregation(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any], insp: pgq.Inspector
) -> None:
    h = make(grace_period=3600, max_size=3)
    a = client.enqueue_many([pgq.Task("item", i) for i in range(4)], queue=Q, group="g")
    insp.delete_task(Q, a[0].id)
    insp.archive_task(Q, a[1].id)
    ran = insp.run_task(Q, a[2].id)
    assert ran.state == "pending" and ran.type == "item"
    assert h.once().tasks == 0  # one member left: the summary was an over-estimate
    assert [s["size"] for s in summary(conn)] == [1]
    client.enqueue_many([pgq.Task("item", i) for i in (4, 5)], queue=Q, group="g")
    assert h.once().tasks == 1
    assert aggregates(conn)[0]["payload"] == [3, 4, 5]
    # Whole-group operations.
    client.enqueue_many([pgq.Task("item", i) for i in range(2)], queue=Q, group="x")
    client.enqueue_many([pgq.Task("item", i) for i in range(2)], queue=Q, group="y")
    client.enqueue_many([pgq.Task("item", i) for i in range(2)], queue=Q, group="z")
    assert insp.run_all_aggregating_tasks(Q, "x") == 2
    assert insp.archive_all_aggregating_tasks(Q, "y") == 2
    assert insp.delete_all_aggregating_tasks(Q, "z") == 2
    assert insp.groups(Q) == []
    r = h.once(db_now(conn) + timedelta(hours=2))
    assert r.tasks == 0 and summary(conn) == []


def test_stale_summary_of_an_empty_group_is_dropped(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    h = make(grace_period=1)
    client.enqueue(pgq.Task("item", 1), queue=Q, group="g")
    conn.execute("DELETE FROM pgq.task")  # behind the aggregator's back
    r = h.once(db_now(conn) + timedelta(seconds=5))
    assert r.tasks == 0 and r.due == 1 and summary(conn) == [] and r.next_due is None


# --- scenario 14-15 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"group_max_size": -1},
        {"group_grace_period": 0},
        {"group_grace_period": -5},
        {"group_max_delay": -1},
        {"group_max_size": 2.5},
        {"group_grace_period": "soon"},
    ],
)
def test_s14_bad_settings_raise_config_error(dsn: str, kw: dict[str, Any]) -> None:
    with pytest.raises(pgq.ConfigError):
        pgq.Server(dsn, queues={Q: 1}, group_aggregator=concat, **kw)


def test_s14_bad_group_policy_raises_config_error(dsn: str) -> None:
    with pytest.raises(pgq.ConfigError, match="'q'"):
        pgq.Server(dsn, queues={Q: 1}, group_aggregator=concat, group_policies={Q: GroupPolicy(max_size=-3)})


@pytest.mark.parametrize("group", ["", "   ", "\t"])
def test_s14_blank_group_is_an_enqueue_error(client: pgq.Client, group: str) -> None:
    with pytest.raises(pgq.InvalidArgumentError, match="group"):
        client.enqueue(pgq.Task("item", 1), queue=Q, group=group)


def test_s15_lineage_and_members_gone(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any], insp: pgq.Inspector
) -> None:
    h = make(grace_period=3600, max_size=2)
    a = client.enqueue_many([pgq.Task("item", 1), pgq.Task("item", 2)], queue=Q, group="g", task_id=None)
    custom = client.enqueue(pgq.Task("item", 3), queue=Q, group="h", task_id="member-x")
    client.enqueue(pgq.Task("item", 4), queue=Q, group="h")
    r = h.once()
    assert r.tasks == 2
    for m in [*a, custom]:
        with pytest.raises(pgq.TaskNotFoundError):
            insp.get_task_info(Q, m.id)
    by_group = {c.group: c for c in r.created}
    info = insp.get_task_info(Q, by_group["g"].task_id)
    assert info.members == [a[0].id, a[1].id]
    assert insp.get_task_info(Q, by_group["h"].task_id).members[0] == "member-x"
    # A member id can be used again.
    again = client.enqueue(pgq.Task("item", 5), queue=Q, task_id="member-x")
    assert again.state == "pending"


# --- G15: unique locks, paused queues ---------------------------------------------------------------


def test_unique_lock_of_a_member_is_released_when_aggregated(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    h = make(grace_period=3600, max_size=1)
    client.enqueue(pgq.Task("item", "u"), queue=Q, group="g", unique=3600)
    with pytest.raises(pgq.DuplicateTaskError):
        client.enqueue(pgq.Task("item", "u"), queue=Q, group="g", unique=3600)
    assert h.once().tasks == 1
    assert conn.execute("SELECT count(*) AS n FROM pgq.unique_lock").fetchone() == {"n": 0}
    client.enqueue(pgq.Task("item", "u"), queue=Q, group="g", unique=3600)


def test_unique_aggregated_task_conflict_fails_the_group(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    h = make(lambda g, ts: pgq.Task("digest", "same", unique=3600), grace_period=3600, max_size=1)
    client.enqueue(pgq.Task("item", 1), queue=Q, group="a")
    client.enqueue(pgq.Task("item", 2), queue=Q, group="b")
    r = h.once()
    assert r.tasks == 1 and r.failed == 1
    assert any("DuplicateTaskError" in e for e in r.errors.values())
    assert len(tasks(conn, state="aggregating")) == 1


def test_paused_queue_still_aggregates(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any], insp: pgq.Inspector
) -> None:
    h = make(grace_period=3600, max_size=2)
    client.enqueue_many([pgq.Task("item", 1), pgq.Task("item", 2)], queue=Q, group="g")
    insp.pause_queue(Q)
    assert h.once().tasks == 1
    assert aggregates(conn)[0]["state"] == "pending"


def test_sql_enqueue_function_members_are_aggregated(
    make: Callable[..., Harness], conn: psycopg.Connection[Any]
) -> None:
    h = make(grace_period=3600, max_size=2)
    conn.execute("SELECT pgq.enqueue('q', 'item', '1', group_key => 'g')")
    conn.execute("SELECT pgq.enqueue('q', 'item', '2', group_key => 'g')")
    assert h.once().members == 2


# --- exactly once under concurrency (run_once racing run_once) ----------------------------------------


def test_concurrent_rounds_split_groups_never_members(
    dsn: str, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    pols = resolve_group_policies([Q], aggregator=concat, grace_period=3600, max_size=4)

    async def main() -> list[AggregationResult]:
        pools = [await db.pool_async(dsn, "aggregator", max_size=2) for _ in range(3)]
        try:
            aggs = [
                Aggregator(dsn, p, pols, worker_id=f"w{i}", leadership=False, batch_size=7)
                for i, p in enumerate(pools)
            ]
            out: list[AggregationResult] = []
            for _ in range(20):
                out += await asyncio.gather(*(a.run_once() for a in aggs))
            return out
        finally:
            for p in pools:
                await p.close()

    for g in range(30):
        client.enqueue_many([pgq.Task("item", f"{g}:{i}") for i in range(9)], queue=Q, group=f"g{g}")
    asyncio.run(main())
    aggs = aggregates(conn)
    payloads = [p for a in aggs for p in a["payload"]]
    assert len(payloads) == len(set(payloads)) == 30 * 8
    assert all(len(a["payload"]) == 4 for a in aggs)
    assert len(tasks(conn, state="aggregating")) == 30


# --- G13: the cost of the due check -------------------------------------------------------------------


def test_g13_due_check_reads_only_due_groups(
    make: Callable[..., Harness], conn: psycopg.Connection[Any]
) -> None:
    """20,000 groups of 5 members, none due: the due check touches no group row."""
    conn.execute(
        "INSERT INTO pgq.task (queue, type, payload, state, group_key) "
        "SELECT 'q', 'item', to_jsonb(i), 'aggregating', 'g' || (i % 20000) "
        "FROM generate_series(1, 100000) AS i"
    )
    conn.execute(
        "INSERT INTO pgq.group_arrival (queue, group_key, size, oldest_at, newest_at) "
        "SELECT queue, group_key, count(*), min(enqueued_at), max(enqueued_at) FROM pgq.task "
        "GROUP BY 1, 2"
    )
    conn.execute("ANALYZE pgq.task_group")
    h = make(grace_period=60, max_delay=600, max_size=10)
    r = h.once()
    assert r.arrivals == 20000 and r.due == 0 and r.next_due is not None and r.next_due > 50
    conn.execute("ANALYZE pgq.task_group")
    from pgq import _sql

    plan = conn.execute(
        "EXPLAIN (ANALYZE, FORMAT JSON) " + _sql.query("group_due"),
        {"queue": [Q], "grace": [60.0], "max_delay": [600.0], "max_size": [10], "now": None, "limit": 500},
    ).fetchone()
    assert plan is not None
    text = str(plan)
    assert "Seq Scan" not in text

    def rows(node: dict[str, Any]) -> int:
        own = node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
        return int(own) + sum(rows(c) for c in node.get("Plans", []))

    assert rows(plan["QUERY PLAN"][0]["Plan"]) <= 10
    t = time.perf_counter()
    h.once()
    assert time.perf_counter() - t < 1.0  # generous: the benchmark reports the real figure


# --- leadership and wake-ups -------------------------------------------------------------------------


def test_leadership_one_leader_and_handover(dsn: str, conn: psycopg.Connection[Any]) -> None:
    pols = resolve_group_policies([Q, "r"], aggregator=concat)

    async def main() -> None:
        pool = await db.pool_async(dsn, "aggregator", max_size=2)
        a = Aggregator(dsn, pool, pols, worker_id="a", elect_interval=0.05)
        b = Aggregator(dsn, pool, pols, worker_id="b", elect_interval=0.05)
        stop_a, stop_b = asyncio.Event(), asyncio.Event()
        ta = asyncio.create_task(a.run(stop_a))
        await _until(lambda: a.leading == {Q, "r"})
        tb = asyncio.create_task(b.run(stop_b))
        await asyncio.sleep(0.3)
        assert b.leading == frozenset()
        # Kill the leader's session: b takes over.
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'pgq:leader:%%' "
            "AND pid = (SELECT min(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "           AND application_name LIKE 'pgq:leader:%%')"
        )
        await _until(lambda: b.leading == {Q, "r"} or (a.leading == {Q, "r"} and b.leading == set()))
        await _until(lambda: len(a.leading) + len(b.leading) == 2 and not (a.leading & b.leading))
        stop_a.set()
        await ta
        await _until(lambda: b.leading == {Q, "r"})
        stop_b.set()
        await tb
        await pool.close()

    asyncio.run(main())


async def _until(cond: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def test_run_sleeps_until_due_and_wakes_on_wake(
    dsn: str, client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    """run(): a sub-second grace period fires on time; wake() from another thread triggers a size round."""
    pols = resolve_group_policies([Q], aggregator=concat, grace_period=0.3, max_size=3)

    async def main() -> None:
        pool = await db.pool_async(dsn, "aggregator", max_size=2)
        agg = Aggregator(dsn, pool, pols, worker_id="a", leadership=False, poll_interval=30)
        stop = asyncio.Event()
        task = asyncio.create_task(agg.run(stop))
        await asyncio.sleep(0.1)
        await asyncio.to_thread(client.enqueue, pgq.Task("item", 1), queue=Q, group="t")
        t0 = time.monotonic()
        await asyncio.to_thread(agg.wake, Q)  # from another thread: schedules a round
        await _until(lambda: bool(aggregates(conn)), within=3)
        waited = time.monotonic() - t0
        assert 0.2 <= waited <= 0.6, waited
        await asyncio.to_thread(
            client.enqueue_many, [pgq.Task("item", i) for i in range(3)], queue=Q, group="s"
        )
        t0 = time.monotonic()
        agg.wake(Q)
        await _until(lambda: len(aggregates(conn)) == 2, within=3)
        assert time.monotonic() - t0 < 0.2
        stop.set()
        await task
        await pool.close()

    asyncio.run(main())


def test_member_changed_during_aggregation_rolls_the_batch_back(
    dsn: str, make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    """Someone removes a member while its aggregator runs: nothing is half done."""
    first = True

    def sneaky(group: str, ts: list[pgq.Task]) -> pgq.Task:
        nonlocal first
        if first:
            first = False
            with psycopg.connect(dsn, autocommit=True) as other:
                other.execute("DELETE FROM pgq.task WHERE id = %s", (int(ts[0].id or 0),))
        return concat(group, ts)

    h = make(sneaky, grace_period=3600, max_size=3)
    client.enqueue_many([pgq.Task("item", i) for i in range(4)], queue=Q, group="g")
    r = h.once()
    assert r.tasks == 0 and r.contended == 1
    assert aggregates(conn) == [] and len(tasks(conn, state="aggregating")) == 3
    r = h.once()
    assert r.tasks == 1 and aggregates(conn)[0]["payload"] == [1, 2, 3]


def test_big_rounds_run_two_batch_transactions_at_once(
    make: Callable[..., Harness], client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    h = make(grace_period=3600, max_size=2, harness_kw={"min_split": 20})
    for g in range(60):
        client.enqueue_many([pgq.Task("item", f"{g}:{i}") for i in range(3)], queue=Q, group=f"g{g}")
    r = h.once()
    assert (r.due, r.tasks, r.members, r.failed, r.contended) == (60, 60, 120, 0, 0)
    payloads = [p for a in aggregates(conn) for p in a["payload"]]
    assert len(payloads) == len(set(payloads)) == 120
    assert len(tasks(conn, state="aggregating")) == 60 and [s["size"] for s in summary(conn)] == [1] * 60
