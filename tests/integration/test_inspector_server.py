"""The Inspector with a real pgq.Server: a member run by hand is processed on its own (G14),
servers() shows the heartbeat and the active task, and cancel_task reaches the handler."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest

import pgq
from tests.fixtures.util import blocking_mux, wait_for


@pytest.mark.slow
def test_member_run_by_hand_is_processed_alone_and_cancel_reaches_handler(dsn: str) -> None:
    seen: list[tuple[str, Any]] = []
    done = threading.Event()

    def email(task: pgq.Task) -> None:
        seen.append((task.type, task.payload))
        done.set()

    mux, started, cancelled = blocking_mux("slow")
    mux.handle("email", email)
    with pgq.Client(dsn, notify_window=0) as client, pgq.Inspector(dsn) as insp:
        member = client.enqueue(pgq.Task("email", "hi"), queue="q", group="g")  # no aggregator: waits
        server = pgq.Server(dsn, queues={"q": 1}, concurrency=2, poll_interval=0.2)
        server.start(mux)
        try:
            wait_for(lambda: len(insp.servers()) == 1, timeout=20)
            assert insp.get_task_info("q", member.id).state == "aggregating"
            insp.run_task("q", member.id)
            assert done.wait(20)
            assert seen == [("email", "hi")]
            assert insp.groups("q") == []

            slow_task = client.enqueue(pgq.Task("slow"), queue="q", max_retry=3)
            assert started.wait(20)
            wait_for(lambda: insp.get_task_info("q", slow_task.id).state == "active", timeout=20)
            # the email task's completion is written by the outcome writer, in its own time:
            # until then it is still active beside the slow one
            wait_for(
                lambda: [w.task_id for w in insp.servers()[0].active_workers] == [slow_task.id],
                timeout=20,
                what="the slow task alone among the server's active workers",
            )
            insp.cancel_task("q", slow_task.id)
            assert cancelled.wait(20)
            wait_for(lambda: insp.get_task_info("q", slow_task.id).state != "active", timeout=20)
            info = insp.get_task_info("q", slow_task.id)
            assert info.state in ("retry", "pending") and info.retried == 1
        finally:
            server.shutdown()


@pytest.mark.slow
def test_a_running_server_publishes_its_group_policy(dsn: str) -> None:
    def aggregate(group: str, tasks: list[pgq.Task]) -> pgq.Task:
        return pgq.Task("batch", [t.payload for t in tasks])

    mux = pgq.ServeMux()
    mux.handle("batch", lambda task: None)
    with pgq.Client(dsn) as client, pgq.Inspector(dsn) as insp:
        first = client.enqueue(pgq.Task("email", 1), queue="q", group="g")
        last = client.enqueue(pgq.Task("email", 2), queue="q", group="g")
        (g,) = insp.groups("q")
        assert (g.next_due_at, g.due_by) == (None, None)  # nobody aggregates q yet
        server = pgq.Server(
            dsn,
            queues={"q": 1, "plain": 1},
            group_aggregator=aggregate,
            group_policies={"q": pgq.GroupPolicy(grace_period="1h", max_delay="2h", max_size=50)},
        )
        server.start(mux)
        try:
            wait_for(lambda: len(insp.servers()) == 1, timeout=20)
            (g,) = insp.groups("q")
            assert (g.next_due_at, g.due_by) == (last.enqueued_at + timedelta(hours=1), "grace_period")
            assert g.oldest_at == first.enqueued_at
        finally:
            server.shutdown()
        (g,) = insp.groups("q")  # the server removed its row at shutdown
        assert (g.next_due_at, g.due_by) == (None, None)
