"""`pgq migrate`: apply the schema migrations."""

from __future__ import annotations

from typing import Annotated

import typer

from pgq.cli._common import DsnOption, SchemaOption, dsn_or_default, print_json


def register(app: typer.Typer) -> None:
    @app.command("migrate")
    def migrate_cmd(
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
        status: Annotated[
            bool, typer.Option("--status", help="Only show applied and pending versions.")
        ] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """Apply pending schema migrations (idempotent; safe to run concurrently)."""
        from pgq import db, migrate

        target = dsn_or_default(dsn)
        if status:
            st = migrate.status(target, schema)
            if as_json:
                print_json(st)
            else:
                typer.echo(f"applied: {st['applied']}  pending: {st['pending']}")
            return
        ran = migrate.migrate(target, schema)
        if as_json:
            print_json({"applied": [m.version for m in ran]})
        elif ran:
            for m in ran:
                typer.echo(f"applied {m.version:04d}_{m.name}")
        else:
            typer.echo(f"schema {schema} is up to date on {db.redact(target)}")
