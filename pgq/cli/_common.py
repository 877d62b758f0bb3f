"""Helpers shared by the CLI modules: options, DSN resolution, error exits.

Exit codes: 0 success; 1 an operation failed (e.g. a task or queue not found);
2 bad usage or arguments (typer's own convention).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from pgq.errors import PgqError

DsnOption = Annotated[
    str | None,
    typer.Option(
        "--dsn", envvar="PGQ_DSN", help="PostgreSQL DSN (default: $PGQ_DSN, else the embedded server)."
    ),
]
SchemaOption = Annotated[str, typer.Option("--schema", help="pgq's schema name.")]

EXIT_FAILED = 1
EXIT_USAGE = 2


def dsn_or_default(dsn: str | None) -> str:
    from pgq import db  # psycopg: imported by the commands that connect, not by `pgq --help`

    try:
        return db.resolve_dsn(dsn)
    except PgqError as exc:
        fail(str(exc), EXIT_USAGE)
        raise  # unreachable


def fail(message: str, code: int = EXIT_FAILED) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, default=str, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
