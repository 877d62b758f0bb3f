"""pgq.Scheduler against a real PostgreSQL, with the clock pinned (run_once(now=...))."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import pgq
from pgq.scheduler import EntryNotFoundError, Scheduler, entry_history, list_entries

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def sec(n: float) -> timedelta:
    return timedelta(seconds=n)


@pytest.fixture
def schedulers(dsn: str) -> Iterator[list[Scheduler]]:
    made: list[Scheduler] = []
    yield made
    for s in made:
        s.shutdown()


def make(made: list[Scheduler], dsn: str, **kw: Any) -> Scheduler:
    s = Scheduler(dsn, **kw)
    made.append(s)
    return s


def tasks(conn: psycopg.Connection[Any], type_: str = "tick") -> list[dict[str, Any]]:
    return conn.execute("SELECT * FROM pgq.task WHERE type = %s ORDER BY id", (type_,)).fetchall()


def ticks(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return conn.execute("SELECT * FROM pgq.cron_tick ORDER BY entry_id, tick_at").fetchall()


def test_many_ticks_one_scheduler(
    dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]
) -> None:
    s = make(schedulers, dsn)
    eid = s.register("*/5 * * * *", pgq.Task("tick", {"n": 1}), queue="cron")
    now = T0
    enqueued = 0
    for _ in range(6 * 60):  # six hours, one pass a minute
        enqueued += len(s.run_once(now).enqueued)
        now += timedelta(minutes=1)
    rows = tasks(conn)
    assert enqueued == len(rows) == 72
    assert {r["queue"] for r in rows} == {"cron"} and rows[0]["payload"] == {"n": 1}
    recorded = ticks(conn)
    assert len(recorded) == 72
    assert [r["tick_at"] for r in recorded] == [T0 + timedelta(minutes=5 * i) for i in range(72)]
    assert {r["task_id"] for r in recorded} == {str(r["id"]) for r in rows}
    assert all(r["entry_id"] == eid for r in recorded)


def test_passes_between_ticks_enqueue_nothing(
    dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]
) -> None:
    s = make(schedulers, dsn)
    s.register("@every 10s", pgq.Task("tick"))
    assert len(s.run_once(T0 + sec(0.5)).enqueued) == 1
    for k in range(1, 20):
        assert s.run_once(T0 + sec(0.5 + k * 0.4)).enqueued == []
    assert len(s.run_once(T0 + sec(10)).enqueued) == 1
    assert len(tasks(conn)) == 2


def test_acceptance_three_schedulers_every_1s_for_20s(
    dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]
) -> None:
    """Issue 9: three schedulers running the same entry `@every 1s` for 20 s enqueue
    20 +- 1 tasks, none at the same tick twice. Time is pinned; the three interleave
    with passes every 250 ms, each offset differently."""
    nodes = [make(schedulers, dsn) for _ in range(3)]
    ids = {n.register("@every 1s", pgq.Task("tick", {"job": "ping"}), queue="cron") for n in nodes}
    assert len(ids) == 1, "three nodes registering the same entry must agree on its id"
    step = sec(0.25)
    wins = [0, 0, 0]
    for i in range(80):  # 20 s
        for j in (i % 3, (i + 1) % 3, (i + 2) % 3):
            now = T0 + step * i + sec(0.07 * j)
            wins[j] += len(nodes[j].run_once(now).enqueued)
    rows = tasks(conn)
    recorded = ticks(conn)
    assert 19 <= len(rows) <= 21, len(rows)
    assert len(recorded) == len(rows) == sum(wins)
    tick_times = [r["tick_at"] for r in recorded]
    assert len(set(tick_times)) == len(tick_times)
    assert tick_times == [T0 + sec(i) for i in range(20)]
    assert sum(1 for w in wins if w) >= 2, f"the work should spread over the nodes: {wins}"


def test_three_schedulers_racing_on_threads(
    dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]
) -> None:
    """The same tick claimed by three threads at once: exactly one enqueue per tick."""
    nodes = [make(schedulers, dsn) for _ in range(3)]
    for n in nodes:
        n.register("@every 1s", pgq.Task("tick"))
    barrier = threading.Barrier(3)
    counts = [0, 0, 0]
    errors: list[BaseException] = []

    def node(j: int) -> None:
        try:
            for i in range(30):
                barrier.wait(timeout=10)
                counts[j] += len(nodes[j].run_once(T0 + sec(i)).enqueued)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=node, args=(j,)) for j in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sum(counts) == 30
    assert len(tasks(conn)) == 30
    assert len({r["tick_at"] for r in ticks(conn)}) == 30


def test_restart_after_downtime_skips_missed_ticks(
    dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]
) -> None:
    a = make(schedulers, dsn)
    a.register("*/1 * * * *", pgq.Task("tick"))
    for i in range(3):
        a.run_once(T0 + timedelta(minutes=i))
    a.shutdown()
    assert len(tasks(conn)) == 3
    # down from 00:02 to 03:00:30: 178 ticks missed; a new scheduler enqueues only the current one
    b = make(schedulers, dsn)
    b.register("*/1 * * * *", pgq.Task("tick"))
    res = b.run_once(T0 + timedelta(hours=3, seconds=30))
    assert [e.tick_at for e in res.enqueued] == [T0 + timedelta(hours=3)]
    assert len(tasks(conn)) == 4


def test_restart_beyond_grace_skips_and_reports(
    dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]
) -> None:
    a = make(schedulers, dsn)
    a.register("@hourly", pgq.Task("tick"))
    a.run_once(T0)
    b = make(schedulers, dsn)
    b.register("@hourly", pgq.Task("tick"))
    res = b.run_once(T0 + timedelta(hours=5, minutes=20))
    assert res.enqueued == []
    assert res.missed == [(next(iter(b.entries)), T0 + timedelta(hours=5))]
    assert b.run_once(T0 + timedelta(hours=5, minutes=21)).missed == []  # reported once
    assert len(b.run_once(T0 + timedelta(hours=6)).enqueued) == 1
    assert len(tasks(conn)) == 2


def test_missed_latest_runs_only_the_latest_missed_tick(
    dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]
) -> None:
    a = make(schedulers, dsn, missed="latest")
    eid = a.register("@hourly", pgq.Task("tick"))
    a.run_once(T0)
    a.shutdown()
    b = make(schedulers, dsn, missed="latest")
    assert b.register("@hourly", pgq.Task("tick")) == eid
    res = b.run_once(T0 + timedelta(hours=5, minutes=20))
    assert [e.tick_at for e in res.enqueued] == [T0 + timedelta(hours=5)]
    assert b.run_once(T0 + timedelta(hours=5, minutes=40)).enqueued == []
    assert len(tasks(conn)) == 2


def test_missed_latest_does_not_run_ticks_from_before_the_entry_existed(
    dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]
) -> None:
    s = make(schedulers, dsn, missed="latest")
    s.register("@daily", pgq.Task("tick"))
    assert s.run_once(T0 + timedelta(hours=13)).enqueued == []
    assert len(s.run_once(T0 + timedelta(days=1)).enqueued) == 1


def test_a_late_scheduler_never_enqueues_an_older_tick(
    dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]
) -> None:
    fast, slow = make(schedulers, dsn), make(schedulers, dsn)
    for s in (fast, slow):
        s.register("@every 1s", pgq.Task("tick"))
    assert len(fast.run_once(T0 + sec(3)).enqueued) + len(slow.run_once(T0 + sec(3)).enqueued) == 1
    assert len(fast.run_once(T0 + sec(5)).enqueued) == 1
    # slow's memory says tick 3; the database refuses tick 4, older than the recorded tick 5
    assert slow.run_once(T0 + sec(4.5)).enqueued == []
    assert [r["tick_at"] for r in ticks(conn)] == [T0 + sec(3), T0 + sec(5)]
    assert len(tasks(conn)) == 2


def test_entry_ids_are_stable_and_distinct(dsn: str, schedulers: list[Scheduler]) -> None:
    a, b = make(schedulers, dsn), make(schedulers, dsn, location="Europe/Paris")
    t = pgq.Task("report", {"x": 1, "y": 2})
    ida = a.register("0 9 * * *", t, queue="q", timeout=timedelta(seconds=30))
    assert ida == make(schedulers, dsn).register(
        "0  9 * * *", pgq.Task("report", {"y": 2, "x": 1}), queue="q", timeout=30
    )
    assert ida.startswith("report@")
    assert b.register("0 9 * * *", t, queue="q", timeout=30) != ida  # another time zone
    assert a.register("0 9 * * *", t, queue="other") != ida
    assert a.register("0 9 * * *", pgq.Task("report", {"x": 2})) != ida
    assert a.register("0 10 * * *", t, queue="q", timeout=30) != ida
    assert a.register("0 9 * * *", t, entry_id="morning-report") == "morning-report"


def test_register_validates_before_storing(dsn: str, schedulers: list[Scheduler]) -> None:
    s = make(schedulers, dsn)
    with pytest.raises(pgq.ConfigError, match="bad hour field '25'"):
        s.register("0 25 * * *", pgq.Task("t"))
    with pytest.raises(pgq.InvalidArgumentError, match="task_id"):
        s.register("@daily", pgq.Task("t"), task_id="fixed")
    with pytest.raises(pgq.InvalidArgumentError, match="process_at"):
        s.register("@daily", pgq.Task("t"), process_at=T0)
    with pytest.raises(pgq.InvalidArgumentError, match="max_retry"):
        s.register("@daily", pgq.Task("t"), max_retry=-1)
    with pytest.raises(pgq.InvalidName):
        s.register("@daily", pgq.Task("t"), entry_id="  ")
    with pytest.raises(pgq.ConfigError, match="missed"):
        s.register("@daily", pgq.Task("t"), missed="all")  # type: ignore[arg-type]
    with pytest.raises(pgq.ConfigError, match="time zone"):
        Scheduler(dsn, location="Nowhere/Town")
    assert s.entries == {}


def test_unregister(dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]) -> None:
    s = make(schedulers, dsn)
    eid = s.register("@every 1s", pgq.Task("tick"))
    s.run_once(T0)
    assert [e.id for e in list_entries(conn)] == [eid]
    s.unregister(eid)
    assert list_entries(conn) == []
    assert s.run_once(T0 + sec(1)).enqueued == []
    with pytest.raises(EntryNotFoundError):
        s.unregister(eid)
    assert len(entry_history(conn, eid)) == 1  # history stays until pruned


def test_ls_and_history(dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]) -> None:
    s = make(schedulers, dsn, location="Europe/Paris")
    eid = s.register("0 9 * * *", pgq.Task("report", {"k": 1}), queue="reports")
    s.run_once(T0 + timedelta(hours=8, seconds=5))  # 09:00 Paris = 08:00 UTC in January
    (info,) = list_entries(conn, now=T0 + timedelta(hours=9))
    assert info.id == eid and info.location == "Europe/Paris" and info.options == {"queue": "reports"}
    assert info.prev_run_at == T0 + timedelta(hours=8)
    assert info.next_run_at == T0 + timedelta(days=1, hours=8)
    (h,) = entry_history(conn, eid)
    assert h.tick_at == T0 + timedelta(hours=8) and h.queue == "reports" and h.state == "pending"
    assert h.task_id == info.prev_task_id == str(tasks(conn, "report")[0]["id"])
    with pytest.raises(EntryNotFoundError, match="nope"):
        entry_history(conn, "nope")


def test_history_is_pruned(dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]) -> None:
    s = make(schedulers, dsn, keep_ticks=10, prune_interval=30)
    eid = s.register("@every 1s", pgq.Task("tick"))
    for i in range(100):
        s.run_once(T0 + sec(i))
    kept = ticks(conn)
    assert 10 <= len(kept) < 40
    assert kept[-1]["tick_at"] == T0 + sec(99)
    assert len(tasks(conn)) == 100  # pruning history never touches tasks
    # age: after the retention only the newest tick of a live entry stays
    s2 = make(schedulers, dsn, tick_retention=timedelta(days=1))
    s2.register("@daily", pgq.Task("other"))
    s2.run_once(T0 + timedelta(days=3, hours=2))  # its own tick is 2 h late: skipped
    assert [r["tick_at"] for r in ticks(conn)] == [T0 + sec(99)]
    assert entry_history(conn, eid)[0].tick_at == T0 + sec(99)


def test_unique_option_skips_while_locked(
    dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]
) -> None:
    s = make(schedulers, dsn)
    eid = s.register("@every 1s", pgq.Task("tick"), unique=3600)
    s.run_once(T0)
    res = s.run_once(T0 + sec(1))
    assert res.enqueued[0].task_id is None  # the first task still holds its unique lock
    assert len(tasks(conn)) == 1
    assert [h.task_id is None for h in entry_history(conn, eid)] == [True, False]


def test_start_and_shutdown_real_time(
    dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]
) -> None:
    s = make(schedulers, dsn)
    s.register("@every 1s", pgq.Task("tick"))
    s.start()
    deadline = datetime.now(UTC) + sec(10)
    while len(tasks(conn)) < 2 and datetime.now(UTC) < deadline:
        threading.Event().wait(0.05)
    s.shutdown()
    n = len(tasks(conn))
    assert n >= 2
    assert s._thread is None


@pytest.mark.slow
def test_three_schedulers_real_time(
    dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]
) -> None:
    """The acceptance scenario on the real clock, for 3 s."""
    nodes = [make(schedulers, dsn) for _ in range(3)]
    for n in nodes:
        n.register("@every 1s", pgq.Task("tick"))
    for n in nodes:
        n.start()
    threading.Event().wait(3.0)
    for n in nodes:
        n.shutdown()
    recorded = ticks(conn)
    assert 3 <= len(recorded) <= 4
    assert len(tasks(conn)) == len(recorded) == len({r["tick_at"] for r in recorded})


def test_cli_cron_ls_and_history(dsn: str, schedulers: list[Scheduler]) -> None:
    from typer.testing import CliRunner

    from pgq.cli import app

    s = make(schedulers, dsn)
    eid = s.register("*/10 * * * *", pgq.Task("report"), queue="reports")
    s.run_once(T0)
    s.run_once(T0 + timedelta(minutes=10))
    runner = CliRunner()
    out = runner.invoke(app, ["cron", "ls", "--dsn", dsn])
    assert out.exit_code == 0, out.output
    assert eid in out.output and "*/10 * * * *" in out.output and "reports" in out.output
    assert "2030-01-01 00:10:00+00:00" in out.output  # previous run
    out = runner.invoke(app, ["cron", "history", eid, "--dsn", dsn, "--json"])
    assert out.exit_code == 0, out.output
    assert '"tick_at": "2030-01-01 00:10:00+00:00"' in out.output and '"state": "pending"' in out.output
    out = runner.invoke(app, ["cron", "history", eid, "--dsn", dsn])
    assert out.exit_code == 0 and out.output.count("2030-01-01") >= 2
    out = runner.invoke(app, ["cron", "history", "missing", "--dsn", dsn])
    assert out.exit_code == 1 and "missing" in out.output


def test_a_rolled_back_claim_leaves_the_tick_to_the_next_scheduler(
    dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]
) -> None:
    """A node that dies mid-transaction (claim inserted, not committed) blocks the
    others on the tick's key; when it rolls back, another node enqueues the tick."""
    s = make(schedulers, dsn)
    eid = s.register("@every 1s", pgq.Task("tick"))
    s.run_once(T0 - sec(1))  # registers the entry, enqueues tick -1
    with psycopg.connect(dsn) as dying:
        dying.execute(
            "INSERT INTO pgq.cron_tick (entry_id, tick_at, queue) VALUES (%s, %s, 'default')", (eid, T0)
        )
        done = threading.Event()
        results: list[int] = []

        def other() -> None:
            results.append(len(s.run_once(T0).enqueued))
            done.set()

        t = threading.Thread(target=other)
        t.start()
        assert not done.wait(0.3), "the second claim must wait for the first transaction"
        dying.rollback()
    t.join(10)
    assert results == [1]
    assert [r["tick_at"] for r in ticks(conn)] == [T0 - sec(1), T0]
    assert len(tasks(conn)) == 2


def test_run_async_inside_an_event_loop(
    dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]
) -> None:
    import asyncio

    s = make(schedulers, dsn)
    s.register("@every 1s", pgq.Task("tick"))

    async def main() -> None:
        stop = asyncio.Event()
        runner = asyncio.create_task(s.run_async(stop))
        for _ in range(200):
            if await asyncio.to_thread(lambda: len(tasks(conn))) >= 1:
                break
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(runner, 5)

    asyncio.run(main())
    assert len(tasks(conn)) >= 1
    assert s._conn is None


def test_loop_survives_a_lost_connection(
    dsn: str, conn: psycopg.Connection[Any], schedulers: list[Scheduler]
) -> None:
    s = make(schedulers, dsn)
    s.register("@every 1s", pgq.Task("tick"))
    s.start()

    def wait_for(n: int) -> int:
        deadline = datetime.now(UTC) + sec(10)
        while (got := len(tasks(conn))) < n and datetime.now(UTC) < deadline:
            threading.Event().wait(0.02)
        return got

    assert wait_for(1) >= 1
    killed = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name LIKE 'pgq:scheduler:%%'"
    ).fetchone()
    assert killed is not None and killed["n"] == 1
    before = len(tasks(conn))
    assert wait_for(before + 2) >= before + 2
    s.shutdown()
    recorded = ticks(conn)
    assert len(tasks(conn)) == len(recorded) == len({r["tick_at"] for r in recorded})
