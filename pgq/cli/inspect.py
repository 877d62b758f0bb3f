"""Inspection commands: `pgq stats`, `pgq queue ...`, `pgq task ...`, `pgq group ...`,
`pgq server ...`. Thin wrappers over pgq.Inspector; see docs/cli.md. pgq.inspector
(and psycopg with it) is imported when a command runs, not when the commands are
registered, so `pgq --help` and the other commands do not pay for it.

Exit codes: 0 ok; 1 not found or the operation was refused/failed; 2 bad usage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from pgq.cli._common import EXIT_USAGE, DsnOption, SchemaOption, dsn_or_default, fail
from pgq.cli._output import JsonOption, emit_json, errors, human, short, table
from pgq.task import STATES

if TYPE_CHECKING:
    from pgq.inspector import Inspector, QueueInfo
    from pgq.task import TaskInfo

QueueOpt = Annotated[str, typer.Option("--queue", "-q", help="Queue name.")]
StateOpt = Annotated[str | None, typer.Option("--state", "-s", help=f"Task state: {', '.join(STATES)}.")]
GroupOpt = Annotated[str | None, typer.Option("--group", "-g", help="Aggregation group (state aggregating).")]
PageOpt = Annotated[int, typer.Option("--page", min=1, help="Page number, from 1.")]
PageSizeOpt = Annotated[int, typer.Option("--page-size", min=1, max=10_000, help="Tasks per page.")]
TaskIdArg = Annotated[str, typer.Argument(help="Task id.", show_default=False)]


@contextmanager
def inspector(dsn: str | None, schema: str) -> Iterator[Inspector]:
    from pgq.inspector import Inspector

    target = dsn_or_default(dsn)
    with errors(target), Inspector(target, schema=schema) as insp:
        yield insp


def _state(state: str | None, allowed: tuple[str, ...] = STATES, *, group: str | None = None) -> str:
    """The --state value, checked; with --group alone, aggregating."""
    if state is None:
        if group is not None:
            return "aggregating"
        fail(f"--state is required; one of: {', '.join(allowed)}", EXIT_USAGE)
        raise AssertionError
    if state not in STATES:
        fail(f"unknown state {state!r}; states are: {', '.join(STATES)}", EXIT_USAGE)
    if state not in allowed:
        fail(f"this command does not apply to {state} tasks; it applies to: {', '.join(allowed)}", EXIT_USAGE)
    if group is not None and state != "aggregating":
        fail(f"--group applies to aggregating tasks, not {state}", EXIT_USAGE)
    return state


# -- rendering ------------------------------------------------------------------------

_QUEUE_COLUMNS = (
    "queue",
    "paused",
    "size",
    "pending",
    "active",
    "scheduled",
    "retry",
    "aggregating",
    "groups",
    "archived",
    "completed",
    "processed",
    "failed",
    "latency",
)


def _queue_row(i: QueueInfo) -> list[object]:
    return [
        i.queue,
        i.paused,
        i.size,
        i.pending,
        i.active,
        i.scheduled,
        i.retry,
        i.aggregating,
        i.groups,
        i.archived,
        i.completed,
        i.processed,
        i.failed,
        i.latency,
    ]


def _task_rows(state: str, tasks: list[TaskInfo]) -> tuple[list[str], list[list[object]]]:
    cols = ["id", "type", "payload"]
    extra: dict[str, tuple[str, ...]] = {
        "pending": ("next process at", "retried"),
        "scheduled": ("next process at", "group"),
        "retry": ("next process at", "retried", "last error"),
        "active": ("started at", "worker", "lease expires"),
        "aggregating": ("group", "enqueued at"),
        "completed": ("completed at", "result"),
        "archived": ("last failed at", "retried", "last error"),
    }
    cols += list(extra[state])
    rows: list[list[object]] = []
    for t in tasks:
        by_name: dict[str, object] = {
            "next process at": t.next_process_at,
            "retried": f"{t.retried}/{t.max_retry}",
            "last error": short(t.last_error, 50),
            "group": t.group,
            "started at": t.started_at,
            "worker": t.locked_by,
            "lease expires": t.lease_expires_at,
            "enqueued at": t.enqueued_at,
            "completed at": t.completed_at,
            "result": short(t.result, 40),
            "last failed at": t.last_failed_at,
        }
        rows.append([t.id, t.type, short(t.payload), *(by_name[c] for c in extra[state])])
    return cols, rows


def _task_detail(t: TaskInfo) -> None:
    fields = [
        ("id", t.id),
        ("queue", t.queue),
        ("type", t.type),
        ("state", t.state),
        ("payload", t.payload),
        ("headers", t.headers or None),
        ("group", t.group),
        ("retried", f"{t.retried}/{t.max_retry}"),
        ("enqueued at", t.enqueued_at),
        ("next process at", t.next_process_at),
        ("started at", t.started_at),
        ("worker", t.locked_by),
        ("lease expires at", t.lease_expires_at),
        ("timeout", t.timeout),
        ("deadline", t.deadline),
        ("last error", t.last_error),
        ("last failed at", t.last_failed_at),
        ("completed at", t.completed_at),
        ("retention", t.retention),
        ("result", t.result),
        ("members", ", ".join(t.members) if t.members else None),
    ]
    table(f"task {t.id}", ["field", "value"], [[k, human(v)] for k, v in fields])


# -- commands -------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    queue_app = typer.Typer(help="List, inspect, pause and remove queues.", no_args_is_help=True)
    task_app = typer.Typer(help="List, inspect, run, archive and delete tasks.", no_args_is_help=True)
    group_app = typer.Typer(help="Aggregation groups.", no_args_is_help=True)
    server_app = typer.Typer(help="Worker servers and what they run.", no_args_is_help=True)
    app.add_typer(queue_app, name="queue")
    app.add_typer(task_app, name="task")
    app.add_typer(group_app, name="group")
    app.add_typer(server_app, name="server")

    @app.command("stats")
    def stats(dsn: DsnOption = None, schema: SchemaOption = "pgq", as_json: JsonOption = False) -> None:
        """Every queue at a glance: tasks per state, groups, today's stats, latency; and servers."""
        with inspector(dsn, schema) as insp:
            infos = [insp.get_queue_info(q) for q in insp.queues()]
            servers = insp.servers()
        if as_json:
            emit_json({"queues": infos, "servers": servers})
            return
        if not infos:
            typer.echo("no queues yet")
        else:
            table("queues", _QUEUE_COLUMNS, [_queue_row(i) for i in infos])
        busy = sum(len(s.active_workers) for s in servers)
        slots = sum(s.concurrency for s in servers)
        typer.echo(f"servers: {len(servers)}, active tasks: {busy} of {slots} slots")

    # -- queue ------------------------------------------------------------------------

    @queue_app.command("ls")
    def queue_ls(dsn: DsnOption = None, schema: SchemaOption = "pgq", as_json: JsonOption = False) -> None:
        """List queues."""
        with inspector(dsn, schema) as insp:
            infos = [insp.get_queue_info(q) for q in insp.queues()]
        if as_json:
            emit_json([{"queue": i.queue, "paused": i.paused, "size": i.size} for i in infos])
            return
        table(None, ["queue", "paused", "size"], [[i.queue, i.paused, i.size] for i in infos])

    @queue_app.command("inspect")
    def queue_inspect(
        queues: Annotated[list[str], typer.Argument(help="Queue names.", show_default=False)],
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
        as_json: JsonOption = False,
    ) -> None:
        """Show a queue's counts per state, groups, stats, pause flag and latency."""
        with inspector(dsn, schema) as insp:
            infos = [insp.get_queue_info(q) for q in queues]
        if as_json:
            emit_json(infos if len(infos) > 1 else infos[0])
            return
        for i in infos:
            table(
                f"queue {i.queue}",
                ["field", "value"],
                [
                    *([c, v] for c, v in zip(_QUEUE_COLUMNS[1:], _queue_row(i)[1:], strict=True)),
                    ["processed total", i.processed_total],
                    ["failed total", i.failed_total],
                ],
            )

    @queue_app.command("history")
    def queue_history(
        queue: Annotated[str, typer.Argument(help="Queue name.", show_default=False)],
        days: Annotated[int, typer.Option("--days", min=1, max=3660, help="How many days back.")] = 7,
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
        as_json: JsonOption = False,
    ) -> None:
        """Processed and failed tasks per day."""
        with inspector(dsn, schema) as insp:
            hist = insp.history(queue, days)
        if as_json:
            emit_json(hist)
            return
        table(
            f"queue {queue}",
            ["date", "processed", "failed", "error rate"],
            [
                [h.date, h.processed, h.failed, f"{h.failed / h.processed:.1%}" if h.processed else "-"]
                for h in hist
            ],
        )

    @queue_app.command("pause")
    def queue_pause(
        queue: Annotated[str, typer.Argument(help="Queue name.", show_default=False)],
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
    ) -> None:
        """Stop workers from taking this queue's tasks (aggregation goes on)."""
        with inspector(dsn, schema) as insp:
            insp.pause_queue(queue)
        typer.echo(f"queue {queue} paused")

    @queue_app.command("unpause")
    def queue_unpause(
        queue: Annotated[str, typer.Argument(help="Queue name.", show_default=False)],
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
    ) -> None:
        """Let workers take this queue's tasks again."""
        with inspector(dsn, schema) as insp:
            insp.unpause_queue(queue)
        typer.echo(f"queue {queue} unpaused")

    @queue_app.command("remove")
    def queue_remove(
        queue: Annotated[str, typer.Argument(help="Queue name.", show_default=False)],
        force: Annotated[bool, typer.Option("--force", help="Delete the queue's tasks too.")] = False,
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
        as_json: JsonOption = False,
    ) -> None:
        """Remove a queue. Refused while it holds tasks, unless --force; always while tasks are active."""
        with inspector(dsn, schema) as insp:
            n = insp.delete_queue(queue, force=force)
        if as_json:
            emit_json({"queue": queue, "deleted_tasks": n})
        else:
            typer.echo(f"queue {queue} removed ({n} task(s) deleted)")

    # -- task -------------------------------------------------------------------------

    @task_app.command("ls")
    def task_ls(
        queue: QueueOpt,
        state: StateOpt = None,
        group: GroupOpt = None,
        page: PageOpt = 1,
        page_size: PageSizeOpt = 30,
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
        as_json: JsonOption = False,
    ) -> None:
        """List a queue's tasks in one state, a page at a time (--group: one group's members)."""
        st = _state(state, group=group)
        with inspector(dsn, schema) as insp:
            if group is not None:
                tasks = insp.list_aggregating_tasks(queue, group, page=page, page_size=page_size)
            else:
                tasks = insp.list_tasks(queue, st, page=page, page_size=page_size)
        if as_json:
            emit_json(tasks)
            return
        cols, rows = _task_rows(st, tasks)
        where = f"group {group} of queue {queue}" if group else f"queue {queue}"
        table(f"{st} tasks in {where} (page {page})", cols, rows)
        if not tasks:
            typer.echo("no tasks")

    @task_app.command("inspect")
    def task_inspect(
        task_id: TaskIdArg,
        queue: QueueOpt,
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
        as_json: JsonOption = False,
    ) -> None:
        """Show everything about one task."""
        with inspector(dsn, schema) as insp:
            info = insp.get_task_info(queue, task_id)
        if as_json:
            emit_json(info)
        else:
            _task_detail(info)

    def _task_action(verb: str, queue: str, task_id: str, dsn: str | None, schema: str, done: str) -> None:
        with inspector(dsn, schema) as insp:
            actions: dict[str, Callable[[str, str], object]] = {
                "run": insp.run_task,
                "archive": insp.archive_task,
                "delete": insp.delete_task,
                "cancel": insp.cancel_task,
            }
            actions[verb](queue, task_id)
        typer.echo(done)

    @task_app.command("run")
    def task_run(
        task_id: TaskIdArg, queue: QueueOpt, dsn: DsnOption = None, schema: SchemaOption = "pgq"
    ) -> None:
        """Make a scheduled, retry, archived or aggregating task pending now."""
        _task_action("run", queue, task_id, dsn, schema, f"task {task_id} is pending")

    @task_app.command("archive")
    def task_archive(
        task_id: TaskIdArg, queue: QueueOpt, dsn: DsnOption = None, schema: SchemaOption = "pgq"
    ) -> None:
        """Archive a pending, scheduled, retry or aggregating task."""
        _task_action("archive", queue, task_id, dsn, schema, f"task {task_id} archived")

    @task_app.command("delete")
    def task_delete(
        task_id: TaskIdArg, queue: QueueOpt, dsn: DsnOption = None, schema: SchemaOption = "pgq"
    ) -> None:
        """Delete a task that is not active (releases its unique lock)."""
        _task_action("delete", queue, task_id, dsn, schema, f"task {task_id} deleted")

    @task_app.command("cancel")
    def task_cancel(
        task_id: TaskIdArg, queue: QueueOpt, dsn: DsnOption = None, schema: SchemaOption = "pgq"
    ) -> None:
        """Ask the worker running an active task to cancel it (best effort; the task is retried)."""
        _task_action("cancel", queue, task_id, dsn, schema, f"cancel sent for task {task_id}")

    def _bulk(
        verb: str,
        queue: str,
        state: str | None,
        group: str | None,
        dsn: str | None,
        schema: str,
        as_json: bool,
    ) -> None:
        from pgq.inspector import ARCHIVABLE_STATES, DELETABLE_STATES, RUNNABLE_STATES

        allowed = {"run": RUNNABLE_STATES, "archive": ARCHIVABLE_STATES, "delete": DELETABLE_STATES}[verb]
        st = _state(state, allowed, group=group)
        with inspector(dsn, schema) as insp:
            if group is not None:
                n = {
                    "run": insp.run_all_aggregating_tasks,
                    "archive": insp.archive_all_aggregating_tasks,
                    "delete": insp.delete_all_aggregating_tasks,
                }[verb](queue, group)
            else:
                n = {
                    "run": insp.run_all_tasks,
                    "archive": insp.archive_all_tasks,
                    "delete": insp.delete_all_tasks,
                }[verb](queue, st)
        if as_json:
            emit_json({"queue": queue, "state": st, "group": group, verb: n})
        else:
            past = {"run": "now pending", "archive": "archived", "delete": "deleted"}[verb]
            where = f" of group {group}" if group else ""
            typer.echo(f"{n} {st} task(s){where} in queue {queue} {past}")

    @task_app.command("runall")
    def task_runall(
        queue: QueueOpt,
        state: StateOpt = None,
        group: GroupOpt = None,
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
        as_json: JsonOption = False,
    ) -> None:
        """Make every task of a state (scheduled, retry, archived, aggregating) pending now."""
        _bulk("run", queue, state, group, dsn, schema, as_json)

    @task_app.command("archiveall")
    def task_archiveall(
        queue: QueueOpt,
        state: StateOpt = None,
        group: GroupOpt = None,
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
        as_json: JsonOption = False,
    ) -> None:
        """Archive every task of a state (pending, scheduled, retry, aggregating)."""
        _bulk("archive", queue, state, group, dsn, schema, as_json)

    @task_app.command("deleteall")
    def task_deleteall(
        queue: QueueOpt,
        state: StateOpt = None,
        group: GroupOpt = None,
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
        as_json: JsonOption = False,
    ) -> None:
        """Delete every task of a state (any state but active)."""
        _bulk("delete", queue, state, group, dsn, schema, as_json)

    # -- group ------------------------------------------------------------------------

    @group_app.command("ls")
    def group_ls(
        queue: QueueOpt, dsn: DsnOption = None, schema: SchemaOption = "pgq", as_json: JsonOption = False
    ) -> None:
        """List a queue's aggregation groups: size, oldest/newest member, when due (by the
        policy of the running servers), last aggregation error."""
        with inspector(dsn, schema) as insp:
            groups = insp.groups(queue)
        if as_json:
            emit_json(groups)
            return
        if not groups:
            typer.echo(f"no groups waiting in queue {queue}")
            return
        table(
            f"groups in queue {queue}",
            ["group", "size", "oldest", "newest", "due", "by", "errors", "last error"],
            [
                [
                    g.group,
                    g.size,
                    g.oldest_at,
                    g.newest_at,
                    g.next_due_at,
                    g.due_by,
                    g.errors,
                    short(g.last_error, 60),
                ]
                for g in groups
            ],
        )

    # -- server -----------------------------------------------------------------------

    @server_app.command("ls")
    def server_ls(dsn: DsnOption = None, schema: SchemaOption = "pgq", as_json: JsonOption = False) -> None:
        """List worker servers (from their heartbeats) and the tasks they are running."""
        with inspector(dsn, schema) as insp:
            servers = insp.servers()
        if as_json:
            emit_json(servers)
            return
        if not servers:
            typer.echo("no servers")
            return
        table(
            "servers",
            ["id", "host", "pid", "queues", "busy", "status", "started", "heartbeat age"],
            [
                [
                    s.id,
                    s.host,
                    s.pid,
                    s.queues,
                    f"{len(s.active_workers)}/{s.concurrency}",
                    s.status,
                    s.started_at,
                    s.heartbeat_age,
                ]
                for s in servers
            ],
        )
        workers = [w for s in servers for w in s.active_workers]
        if workers:
            table(
                "active tasks",
                ["server", "queue", "task", "type", "payload", "started", "lease expires"],
                [
                    [
                        w.server_id,
                        w.queue,
                        w.task_id,
                        w.type,
                        short(w.payload, 40),
                        w.started_at,
                        w.lease_expires_at,
                    ]
                    for w in workers
                ],
            )
