"""`pgq demo`: the aggregation tutorial, end to end, in a few seconds.

On the configured database (``--dsn``, else ``$PGQ_DSN``, else the embedded
PostgreSQL): apply the migrations, start a pgq.Server with a short grace period
and an aggregator that joins messages, enqueue a few messages into one group of
the ``tutorial`` queue, show them waiting as ``aggregating`` (via the
Inspector), then the aggregation and the handler printing the joined messages,
each line stamped with the time since the demo started.

The group name is new on every run (``demo-<hex>``), so runs never mix, and the
demo waits only for its own aggregated task. Exit code 0 when the handler saw
the joined messages, 1 when it did not within ``--timeout``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from typing import Annotated, Any

import typer

from pgq.cli._common import EXIT_FAILED, DsnOption, SchemaOption, dsn_or_default, fail
from pgq.errors import PgqError

DEFAULT_MESSAGES = ["hi", "how are you?", "bye"]


class _Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        with self.lock:
            for i, line in enumerate(text.splitlines() or [""]):
                prefix = f"[{self.now():6.2f}s] " if i == 0 else " " * 10
                sys.stdout.write(prefix + line + "\n")
            sys.stdout.flush()


class _ClockLogHandler(logging.Handler):
    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self.clock = clock

    def emit(self, record: logging.LogRecord) -> None:
        self.clock.say(f"log {record.levelname.lower()} {record.name}: {record.getMessage()}")


def run_demo(
    dsn: str | None,
    *,
    schema: str = "pgq",
    queue: str = "tutorial",
    messages: list[str] | None = None,
    grace_period: float = 1.5,
    timeout: float = 30.0,
) -> bool:
    """Run the tutorial; True when the handler printed the joined messages."""
    import pgq  # the public API, as a user's program would use it
    from pgq import db, migrate

    clock = _Clock()
    msgs = messages or DEFAULT_MESSAGES
    group = f"demo-{uuid.uuid4().hex[:6]}"

    target = dsn_or_default(dsn)
    clock.say(f"database: {db.redact(target)}")
    ran = migrate.migrate(target, schema)
    clock.say(
        "migrate: applied " + ", ".join(f"{m.version:04d}_{m.name}" for m in ran)
        if ran
        else f"migrate: schema {schema!r} is up to date"
    )

    handled = threading.Event()
    result: dict[str, Any] = {}

    def aggregate(group_name: str, tasks: list[pgq.Task]) -> pgq.Task:
        clock.say(f"aggregator: joining {len(tasks)} messages of group {group_name!r}")
        joined = "\n".join(str(t.payload) for t in tasks)
        # retention keeps the finished task for a minute, so the demo can show its lineage
        return pgq.Task("aggregated-task", joined, headers={"group": group_name}, retention=60)

    def handle_aggregated(task: pgq.Task) -> None:
        if task.headers.get("group") != group:
            clock.say(f"handler: a task of an earlier run ({task.headers.get('group')}), done")
            return
        clock.say(f"handler: got task {task.id} ({task.type}), the joined messages are:\n{task.payload}")
        result["id"] = task.id
        result["at"] = clock.now()
        handled.set()

    mux = pgq.ServeMux()
    mux.handle("aggregated-task", handle_aggregated)

    agg_logger = logging.getLogger("pgq.services.aggregator")
    log_handler = _ClockLogHandler(clock)
    old_level, old_propagate = agg_logger.level, agg_logger.propagate
    agg_logger.addHandler(log_handler)
    agg_logger.setLevel(logging.INFO)
    agg_logger.propagate = False

    server = pgq.Server(
        target,
        queues={queue: 1},
        concurrency=2,
        group_aggregator=aggregate,
        group_grace_period=grace_period,
        shutdown_timeout=2.0,
        schema=schema,
    )
    try:
        server.start(mux)
        clock.say(f"server: started on queue {queue!r}, grace period {grace_period:g}s")

        with pgq.Client(target, schema=schema) as client:
            first_enqueue = None
            for text in msgs:
                info = client.enqueue(pgq.Task("tutorial:message", text), queue=queue, group=group)
                first_enqueue = first_enqueue if first_enqueue is not None else clock.now()
                clock.say(f"client: enqueued {text!r} as task {info.id} -> state {info.state}")
            last_enqueue = clock.now()

        with pgq.Inspector(target, schema=schema) as insp:
            waiting = insp.list_aggregating_tasks(queue, group)
            groups = [g for g in insp.groups(queue) if g.group == group]
        lines = [f"inspector: group {group!r} in queue {queue!r} holds {len(waiting)} tasks:"]
        lines += [f"  {t.id}  {t.state:<11}  {t.payload!r}" for t in waiting]
        if groups:
            lines.append(f"  (size {groups[0].size}, newest member at {groups[0].newest_at:%H:%M:%S.%f})")
        lines.append(
            f"  the same from a shell: pgq task ls --queue {queue} --state aggregating; "
            f"pgq group ls --queue {queue}"
        )
        clock.say("\n".join(lines))
        clock.say(f"waiting: the group is aggregated {grace_period:g}s after its newest member ...")

        if not handled.wait(timeout):
            clock.say(
                f"error: the aggregated task was not handled within {timeout:g}s. Is another pgq worker "
                f"serving queue {queue!r} on this database? Try another --queue"
            )
            return False
        server.shutdown()
        clock.say("server: shut down")

        with pgq.Inspector(target, schema=schema) as insp:
            info = insp.get_task_info(queue, result["id"])
        clock.say(f"inspector: task {info.id} is {info.state}; it was made of members {list(info.members)}")
        clock.say(
            "timings: "
            f"enqueue of {len(msgs)} messages {last_enqueue - (first_enqueue or 0):.2f}s; "
            f"last enqueue -> handled {result['at'] - last_enqueue:.2f}s "
            f"(grace period {grace_period:g}s); total {clock.now():.2f}s"
        )
        return True
    finally:
        server.shutdown()
        agg_logger.removeHandler(log_handler)
        agg_logger.setLevel(old_level)
        agg_logger.propagate = old_propagate


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
        queue: Annotated[str, typer.Option("--queue", help="Queue to use.")] = "tutorial",
        message: Annotated[
            list[str] | None, typer.Option("--message", "-m", help="A message to enqueue (repeatable).")
        ] = None,
        grace_period: Annotated[
            float, typer.Option("--grace-period", help="Seconds the group waits after its newest member.")
        ] = 1.5,
        timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the handler.")] = 30.0,
    ) -> None:
        """Run the aggregation tutorial end to end (embedded PostgreSQL unless --dsn/PGQ_DSN).

        Migrates, starts a server with an aggregator, enqueues a few messages into one
        group, shows them aggregating, then the handler printing the joined messages."""
        if grace_period <= 0:
            fail(f"--grace-period must be positive, got {grace_period:g}", 2)
        try:
            ok = run_demo(
                dsn, schema=schema, queue=queue, messages=message, grace_period=grace_period, timeout=timeout
            )
        except PgqError as exc:
            fail(str(exc))
            return
        if not ok:
            raise typer.Exit(EXIT_FAILED)
