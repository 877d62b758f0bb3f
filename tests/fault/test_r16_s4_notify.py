"""R16: pressure on the NOTIFY queue from a stuck listener; S4: wake-up spoofing by a
role with no pgq privileges. `pgq doctor` is the product feature both lean on.

R16 (PostgreSQL 15: only the queue's growth is measured; filling it needs
max_notify_queue_pages, PG 17): a rogue session `LISTEN pgq_wake; BEGIN;
SELECT 1;` stays idle in its transaction, so the shared NOTIFY queue cannot be
trimmed, while enqueues run through pgq.Client one transaction each. Every
payload is just the queue name; the Client's debounce bounds the NOTIFYs by
its window; doctor names the rogue pid; an enqueue with notify=False commits.

S4: the spoofer sends pg_notify('pgq_wake', <a served queue>) in a tight loop
(one transaction each) while a Server with an idle queue runs. Wake-ups are
hints: after WAKE_GRACE wake-ups in a row that find nothing, the claimer lets
them gather for up to WAKE_COOLDOWN_MAX (pgq/worker.py), so the flood costs at
most about 1/WAKE_COOLDOWN_MAX claims a second plus the polling floor (without
it: 429-532 a second, one per wake-up); no task changes state.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgq
from pgq import _sql
from pgq.worker import WAKE_COOLDOWN_MAX, WAKE_GRACE
from tests.fault.chaos import report, size
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.fault

CHANNEL = _sql.channel("pgq")


@pytest.fixture
def rogue(fdb: str) -> Iterator[psycopg.Connection[Any]]:
    """`LISTEN pgq_wake; BEGIN; SELECT 1;` and then nothing: a listener stuck in a transaction."""
    c = psycopg.connect(make_conninfo(fdb, application_name="r16-rogue"), autocommit=True)
    c.execute(f"LISTEN {CHANNEL}")
    c.autocommit = False
    c.execute("SELECT 1")  # BEGIN is implicit
    yield c
    c.close()


def _usage(c: psycopg.Connection[Any]) -> float:
    row = c.execute("SELECT pg_notification_queue_usage()::float8").fetchone()
    assert row is not None
    return float(row[0])


def test_r16_stuck_listener(fdb: str, rogue: psycopg.Connection[Any]) -> None:
    n = size(2_000, 200_000)
    queue = "r16"
    counter = psycopg.connect(fdb, autocommit=True)
    counter.execute(f"LISTEN {CHANNEL}")
    admin = psycopg.connect(fdb, autocommit=True)
    sentinel = f"end-{uuid.uuid4().hex}"
    usage0 = _usage(admin)
    peak = usage0
    client = pgq.Client(fdb)
    window = client._debounce.window  # the debounce window the bound below is made of
    t0 = time.monotonic()
    try:
        for i in range(n):
            client.enqueue(pgq.Task("t", {"i": i}), queue=queue)
            if i % 200 == 199:
                peak = max(peak, _usage(admin))
    finally:
        client.close()  # sends the trailing NOTIFY, if one is owed
    elapsed = time.monotonic() - t0
    # Usage counts whole 8 kB pages, and the debounced wake-ups of a slow run may fit in one:
    # a burst on another channel (the queue is shared) makes the held-back tail show for sure.
    for _ in range(200):
        admin.execute("SELECT pg_notify('r16_filler', repeat('x', 200))")
    peak = max(peak, _usage(admin))
    # notify=False: commits without touching the NOTIFY queue (on PG 17 with a full queue too).
    with pgq.Client(fdb) as quiet:
        quiet_id = quiet.enqueue(pgq.Task("t", {"quiet": True}), queue=queue, notify=False).id
    admin.execute("SELECT pg_notify(%s, %s)", (CHANNEL, sentinel))

    payloads: list[str] = []
    for note in counter.notifies(timeout=30):
        if note.payload == sentinel:
            break
        payloads.append(note.payload)
    else:  # pragma: no cover - the sentinel always comes (commit order)
        pytest.fail("the sentinel notification never arrived")

    with pgq.Inspector(fdb) as insp:
        doc = insp.doctor(long_transaction=0.0, notify_queue_warn=1e-9)
        assert insp.get_task_info(queue, quiet_id).state == "pending"
    rogue_pid = rogue.info.backend_pid
    named = [f for f in doc.findings if f.values.get("pid") == rogue_pid and f.level == "warn"]
    (usage_finding,) = [f for f in doc.findings if f.check == "notify_queue"]
    rogue.rollback()
    after = _usage(admin)
    counter.close()
    admin.close()

    per_1000 = 1000 * len(payloads) / n
    line = report(
        "R16",
        enqueues=n,
        seconds=round(elapsed, 2),
        notifications=len(payloads),
        notifications_per_1000=round(per_1000, 1),
        debounce_window_s=window,
        largest_payload_bytes=max((len(p.encode()) for p in payloads), default=0),
        queue_usage_before=usage0,
        queue_usage_peak=peak,
        queue_usage_after_rollback=after,
        doctor_named_rogue=bool(named),
        quiet_enqueue_committed=True,
    )
    assert payloads, line
    assert set(payloads) == {queue}, line  # the payload is only the queue name
    # Debounced: at most one per window, one trailing, and the first.
    assert len(payloads) <= elapsed / window + 2, line
    assert len(payloads) < n / 2, line
    assert peak > usage0, line  # the stuck listener keeps the queue from being trimmed
    assert named and any(f"pid {rogue_pid}" in f.message for f in named), line
    assert usage_finding.level == "warn" and usage_finding.values["oldest_pid"] == rogue_pid, line
    assert f"pid {rogue_pid}" in usage_finding.message, line


def test_s4_wakeup_spoofing(cluster: Any, fdb: str) -> None:
    seconds = size(2.0, 60.0)
    role = f"s4_spoofer_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(fdb, autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN")
    params = conninfo_to_dict(fdb)
    params["user"] = role
    spoof_dsn = make_conninfo("", **params, application_name="s4-spoofer")

    with pgq.Client(fdb) as client:
        # Tasks that must not move: scheduled an hour ahead on the served queue, and pending on
        # a queue the server does not serve.
        later = [client.enqueue(pgq.Task("t"), queue="idle", process_in=3600).id for _ in range(5)]
        other = [client.enqueue(pgq.Task("t"), queue="unserved").id for _ in range(5)]

    server = pgq.Server(fdb, queues={"idle": 1}, concurrency=4, poll_interval=1.0)
    server.start(pgq.ServeMux())
    try:
        worker = server.worker
        assert worker is not None and server.listener is not None
        wait_for(lambda: server.listener is not None and server.listener.listening.is_set(), 10, "listening")
        with psycopg.connect(spoof_dsn, autocommit=True) as spoof:
            # The spoofer has no rights on schema pgq, yet may NOTIFY any channel.
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                spoof.execute("SELECT count(*) FROM pgq.task")
            # A quiet baseline of the same length: the polling floor alone.
            quiet_s = min(seconds, 1.0)
            p0 = worker.polls
            time.sleep(quiet_s)
            quiet_rate = (worker.polls - p0) / quiet_s

            stop = time.monotonic() + seconds
            sent = 0
            p1, t1 = worker.polls, time.monotonic()
            while time.monotonic() < stop:
                spoof.execute("SELECT pg_notify('pgq_wake', 'idle')")
                sent += 1
            spoof_s = time.monotonic() - t1
            polls = worker.polls - p1
    finally:
        server.shutdown()
        with psycopg.connect(fdb, autocommit=True) as c:
            c.execute(f"DROP ROLE IF EXISTS {role}")

    with pgq.Inspector(fdb) as insp:
        moved = [i for i in later if insp.get_task_info("idle", i).state != "scheduled"]
        moved += [i for i in other if insp.get_task_info("unserved", i).state != "pending"]

    line = report(
        "S4-spoof",
        seconds=round(spoof_s, 2),
        notifies_sent=sent,
        notifies_per_s=round(sent / spoof_s),
        claim_polls=polls,
        claim_polls_per_s=round(polls / spoof_s, 1),
        quiet_claim_polls_per_s=round(quiet_rate, 2),
        poll_interval_s=1.0,
        wake_cooldown_max_s=WAKE_COOLDOWN_MAX,
        tasks_moved=len(moved),
    )
    # Wake-ups that find nothing slow the claimer down: after WAKE_GRACE of them it claims at most
    # once per WAKE_COOLDOWN_MAX (after a doubling ramp from 5 ms: 5 more), plus the polling floor.
    bound = WAKE_GRACE + 5 + spoof_s / WAKE_COOLDOWN_MAX + spoof_s / 1.0 + 2
    assert polls <= bound, line
    assert sent > 10 * bound, line  # the spoofer did send far more than that
    assert moved == [], line
