"""`pgq doctor`: what in the cluster slows or blocks pgq (Inspector.doctor; docs/cli.md).

Exit codes: 0 every finding ok; 1 a warning; 2 a critical finding (and, as
everywhere in the CLI, 2 for bad usage, 1 when PostgreSQL cannot be reached).
"""

from __future__ import annotations

from typing import Annotated

import typer

from pgq.cli._common import DsnOption, SchemaOption, dsn_or_default
from pgq.cli._output import JsonOption, emit_json, errors, table

EXIT_BY_LEVEL = {"ok": 0, "warn": 1, "critical": 2}


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
        as_json: JsonOption = False,
        long_transaction: Annotated[
            float,
            typer.Option("--long-transaction", min=0, help="Warn about transactions open longer (seconds)."),
        ] = 60.0,
        notify_queue_warn: Annotated[
            float,
            typer.Option("--notify-queue-warn", min=0, max=1, help="Warn at this NOTIFY queue usage (0-1)."),
        ] = 0.5,
        pgq_idle: Annotated[
            float,
            typer.Option("--pgq-idle", min=0, help="Warn about pgq sessions idle in a transaction (s)."),
        ] = 1.0,
        xid_age_warn: Annotated[
            int | None,
            typer.Option(
                "--xid-age-warn",
                min=0,
                help="Warn above this age(relfrozenxid) of pgq.task (default: 1.5 x freeze max age).",
            ),
        ] = None,
        limit: Annotated[
            int, typer.Option("--limit", min=1, max=1000, help="Most transactions listed.")
        ] = 10,
    ) -> None:
        """Check the NOTIFY queue, long transactions, slots, prepared transactions, pgq's own
        sessions, the aggregation leadership keys and pgq.task. Exit 0 ok, 1 warn, 2 critical."""
        from pgq.inspector import LEVELS, Inspector

        target = dsn_or_default(dsn)
        with errors(target), Inspector(target, schema=schema) as insp:
            report = insp.doctor(
                long_transaction=long_transaction,
                notify_queue_warn=notify_queue_warn,
                pgq_idle_in_transaction=pgq_idle,
                xid_age_warn=xid_age_warn,
                limit=limit,
            )
        if as_json:
            emit_json({"level": report.level, "findings": list(report.findings)})
        else:
            rows = [
                [f.level.upper() if f.level != "ok" else "ok", f.check, f.message] for f in report.findings
            ]
            table(None, ["level", "check", "finding"], rows)
            counts = {lv: sum(f.level == lv for f in report.findings) for lv in LEVELS}
            typer.echo(f"doctor: {report.level} ({counts['warn']} warning(s), {counts['critical']} critical)")
        raise typer.Exit(EXIT_BY_LEVEL[report.level])
