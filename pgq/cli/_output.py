"""Output and error handling shared by the inspection commands (inspect.py, enqueue.py).

People get rich tables; scripts get `--json` (times as ISO 8601 text, durations
as seconds). Errors print one `error: ...` line on stderr and exit 1 (not
found, refused, failed) or 2 (bad usage or arguments).

rich and psycopg are imported by the functions that use them, not with the module:
`pgq --help` and the commands that print no table do not pay for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pgq.cli._common import EXIT_FAILED, EXIT_USAGE, fail
from pgq.errors import PgqError

if TYPE_CHECKING:
    from rich.console import Console

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]


def jsonable(value: Any) -> Any:
    """Dataclasses, datetimes and timedeltas as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def emit_json(value: Any) -> None:
    json.dump(jsonable(value), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def console() -> Console:
    """A console that never wraps ids or truncates columns when piped."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    width = int(os.environ.get("COLUMNS", "0") or 0) or 200
    return Console(width=max(width, 120), no_color=True, soft_wrap=False)


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.table import Table

    t = Table(title=title, show_lines=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*(human(v) for v in r))
    console().print(t)


def human(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, timedelta):
        return duration(value)
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def duration(d: timedelta) -> str:
    s = d.total_seconds()
    if s < 1:
        return f"{s * 1000:.0f}ms" if s > 0 else "0s"
    if s < 60:
        return f"{s:.1f}s"
    mins, secs = divmod(int(s), 60)
    hours, mins = divmod(mins, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours}h{mins}m"
    if hours:
        return f"{hours}h{mins}m{secs}s"
    return f"{mins}m{secs}s"


def short(value: Any, limit: int = 60) -> str:
    text = human(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def errors(dsn: str | None = None) -> Iterator[None]:
    """Map pgq's errors to one line on stderr and an exit code."""
    import psycopg

    from pgq import db

    try:
        yield
    except (ValueError, TypeError) as exc:  # bad arguments (ConfigError, InvalidArgumentError, ...)
        fail(str(exc), EXIT_USAGE)
    except PgqError as exc:  # not found, refused, conflicts
        fail(str(exc), EXIT_FAILED)
    except psycopg.OperationalError as exc:
        where = f" at {db.redact(dsn)}" if dsn else ""
        fail(f"cannot reach PostgreSQL{where}: {str(exc).strip()}", EXIT_FAILED)
    except psycopg.errors.UndefinedTable as exc:
        fail(f"{exc.diag.message_primary} (has `pgq migrate` been run on this database?)", EXIT_FAILED)
