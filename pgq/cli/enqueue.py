"""`pgq enqueue TYPE [JSON]`: enqueue one task from the command line (scripts, smoke tests)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer

from pgq.cli._common import EXIT_USAGE, DsnOption, SchemaOption, dsn_or_default, fail
from pgq.cli._output import JsonOption, emit_json, errors, human


def _payload(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"payload is not valid JSON ({exc}); quote strings as JSON, e.g. '\"hello\"'", EXIT_USAGE)


def _when(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        fail(f"{name}: cannot read {text!r} as an ISO 8601 time (e.g. 2030-01-01T12:00:00+00:00)", EXIT_USAGE)
        raise
    if value.tzinfo is None:
        fail(f"{name}: {text!r} has no time zone; add one, e.g. +00:00 or Z", EXIT_USAGE)
    return value


def _headers(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--header takes KEY=VALUE, got {item!r}", EXIT_USAGE)
        out[key] = value
    return out


def register(app: typer.Typer) -> None:
    @app.command("enqueue")
    def enqueue(
        task_type: Annotated[str, typer.Argument(metavar="TYPE", help="Task type.", show_default=False)],
        payload: Annotated[str | None, typer.Argument(metavar="[JSON]", help="Payload as JSON.")] = None,
        queue: Annotated[str, typer.Option("--queue", "-q", help="Queue name.")] = "default",
        group: Annotated[str | None, typer.Option("--group", "-g", help="Aggregation group.")] = None,
        process_in: Annotated[
            str | None, typer.Option("--process-in", help="Delay before processing: 500ms, 10s, 2m, 1h.")
        ] = None,
        process_at: Annotated[
            str | None, typer.Option("--process-at", help="ISO 8601 time with zone.")
        ] = None,
        max_retry: Annotated[
            int | None, typer.Option("--max-retry", help="Retries before archiving.")
        ] = None,
        timeout: Annotated[
            str | None, typer.Option("--timeout", help="Per-attempt timeout: 30s, 5m.")
        ] = None,
        deadline: Annotated[str | None, typer.Option("--deadline", help="ISO 8601 time with zone.")] = None,
        unique: Annotated[
            str | None,
            typer.Option("--unique", help="Refuse duplicates (queue, type, payload) for this TTL: 1h."),
        ] = None,
        task_id: Annotated[
            str | None, typer.Option("--task-id", help="Your own task id (not all digits).")
        ] = None,
        retention: Annotated[
            str | None, typer.Option("--retention", help="Keep the completed task: 24h.")
        ] = None,
        header: Annotated[
            list[str] | None, typer.Option("--header", "-H", help="KEY=VALUE; repeatable.")
        ] = None,
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
        as_json: JsonOption = False,
    ) -> None:
        """Enqueue a task. Example: pgq enqueue email:send '{"to": 42}' --queue mail --process-in 10s"""
        from pgq.task import Task

        opts: dict[str, Any] = {
            "queue": queue,
            "group": group,
            "process_in": process_in,
            "process_at": _when(process_at, "--process-at"),
            "max_retry": max_retry,
            "timeout": timeout,
            "deadline": _when(deadline, "--deadline"),
            "unique": unique,
            "task_id": task_id,
            "retention": retention,
        }
        opts = {k: v for k, v in opts.items() if v is not None}
        task = Task(task_type, _payload(payload), headers=_headers(header) or None)
        target = dsn_or_default(dsn)
        from pgq.client import Client  # after the arguments are checked: a usage error exits sooner

        with errors(target), Client(target, schema=schema, notify_window=0) as client:
            info = client.enqueue(task, **opts)
        if as_json:
            emit_json(info)
            return
        extra = f" in group {info.group}" if info.group else ""
        when = f", next process at {human(info.next_process_at)}" if info.state == "scheduled" else ""
        typer.echo(f"enqueued task {info.id} ({info.type}) in queue {info.queue}{extra}: {info.state}{when}")
