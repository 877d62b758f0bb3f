"""`pgq cron ls` and `pgq cron history ENTRY`: the periodic entries and their enqueues."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Annotated

import typer

from pgq import _sql
from pgq.cli._common import DsnOption, SchemaOption, dsn_or_default, fail, print_json
from pgq.errors import PgqError


def _t(value: datetime | None) -> str:
    return "-" if value is None else value.isoformat(sep=" ", timespec="seconds")


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    typer.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def register(app: typer.Typer) -> None:
    cron_app = typer.Typer(help="Periodic tasks: entries and their enqueues.", no_args_is_help=True)
    app.add_typer(cron_app, name="cron")

    @cron_app.command("ls")
    def ls_cmd(
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """List periodic entries with their previous and next run (database clock)."""
        from pgq import db
        from pgq.scheduler import list_entries

        try:
            _sql.check_schema(schema)
            with db.connect(dsn_or_default(dsn), "cli") as conn:
                entries = list_entries(conn, schema)
        except PgqError as exc:
            fail(str(exc))
            return
        if as_json:
            print_json([dataclasses.asdict(e) for e in entries])
            return
        if not entries:
            typer.echo("no periodic entries")
            return
        _table(
            ["ID", "SPEC", "TZ", "TYPE", "QUEUE", "PREV", "NEXT", "SEEN"],
            [
                [
                    e.id,
                    e.spec,
                    e.location,
                    e.type,
                    str(e.options.get("queue", "default")),
                    _t(e.prev_run_at),
                    _t(e.next_run_at),
                    _t(e.seen_at),
                ]
                for e in entries
            ],
        )

    @cron_app.command("history")
    def history_cmd(
        entry: Annotated[str, typer.Argument(help="The entry id (see `pgq cron ls`).")],
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
        limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many enqueues to show.")] = 20,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """Show the recent enqueues of one periodic entry, newest first, with task ids."""
        from pgq import db
        from pgq.scheduler import entry_history

        try:
            _sql.check_schema(schema)
            with db.connect(dsn_or_default(dsn), "cli") as conn:
                ticks = entry_history(conn, entry, schema, limit)
        except PgqError as exc:  # EntryNotFoundError included: exit 1
            fail(str(exc))
            return
        if as_json:
            print_json([dataclasses.asdict(t) for t in ticks])
            return
        if not ticks:
            typer.echo(f"entry {entry} has not enqueued anything yet")
            return
        _table(
            ["TICK", "ENQUEUED", "QUEUE", "TASK", "STATE"],
            [
                [
                    _t(t.tick_at),
                    _t(t.enqueued_at),
                    t.queue,
                    t.task_id or "(skipped: unique lock held)",
                    t.state or ("-" if t.task_id is None else "done/deleted"),
                ]
                for t in ticks
            ],
        )
