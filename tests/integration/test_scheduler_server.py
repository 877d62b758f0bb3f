"""server.periodic(): `pgq worker` processes run the schedule; ticks stay exactly-once."""

from __future__ import annotations

import threading
from typing import Any

import psycopg

import pgq


def test_two_servers_with_the_same_periodic_entry(dsn: str, conn: psycopg.Connection[Any]) -> None:
    handled: list[str] = []
    lock = threading.Lock()
    mux = pgq.ServeMux()

    def on_beat(task: pgq.Task) -> None:
        with lock:
            handled.append(str(task.id))

    mux.handle("beat", on_beat)
    servers = [pgq.Server(dsn, queues={"cron": 1}, poll_interval=0.2, shutdown_timeout=1) for _ in range(2)]
    ids = {s.periodic("@every 1s", pgq.Task("beat"), queue="cron") for s in servers}
    assert len(ids) == 1
    assert servers[0].with_options(concurrency=2).scheduler is servers[0].scheduler
    for s in servers:
        s.start(mux)
    try:
        done = threading.Event()
        for _ in range(300):
            with lock:
                if len(handled) >= 2:
                    break
            done.wait(0.02)
    finally:
        for s in servers:
            s.shutdown()
    ticks = conn.execute("SELECT tick_at, task_id FROM pgq.cron_tick ORDER BY tick_at").fetchall()
    assert len(handled) >= 2
    assert len(ticks) == len({t["tick_at"] for t in ticks}) >= 2
    assert set(handled) <= {t["task_id"] for t in ticks}
    assert len(handled) == len(set(handled))
