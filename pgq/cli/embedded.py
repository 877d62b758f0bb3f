"""`pgq embedded status|start|stop|dsn`: manage the embedded PostgreSQL that pgq
uses when no DSN is given (see pgq/embedded.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from pgq.cli._common import EXIT_FAILED, fail, print_json
from pgq.errors import PgqError

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def register(app: typer.Typer) -> None:
    sub = typer.Typer(
        name="embedded",
        help="Manage the embedded PostgreSQL pgq uses when no --dsn or PGQ_DSN is given.",
        no_args_is_help=True,
    )
    app.add_typer(sub, name="embedded")

    @sub.command("status")
    def status_cmd(as_json: JsonOption = False) -> None:
        """Show where the embedded PostgreSQL lives and whether it is running (starts nothing).

        Exit code 0 when it runs, 1 when it does not."""
        from pgq import embedded

        st = embedded.status()
        if as_json:
            print_json(st.as_dict())
        else:
            installed = "yes" if st.available else "no (pip install 'pgq-jobs[embedded]')"
            typer.echo(f"installed:   {installed}")
            typer.echo(f"directory:   {st.directory}  (override with PGQ_EMBEDDED_DIR)")
            typer.echo(f"initialized: {'yes, PostgreSQL ' + st.version if st.version else 'no'}")
            if st.os_user:
                typer.echo(f"runs as:     {st.os_user}")
            typer.echo(f"running:     {'yes, pid ' + str(st.pid) if st.running else 'no'}")
            if st.dsn:
                typer.echo(f"dsn:         {st.dsn}")
        if not st.running:
            raise typer.Exit(EXIT_FAILED)

    @sub.command("start")
    def start_cmd() -> None:
        """Start the embedded PostgreSQL (initialising it on first use) and print its DSN."""
        from pgq import embedded

        try:
            typer.echo(embedded.start())
        except PgqError as exc:
            fail(str(exc))

    @sub.command("dsn")
    def dsn_cmd() -> None:
        """Print the embedded PostgreSQL's DSN, starting it if needed.

        E.g. `export PGQ_DSN="$(pgq embedded dsn)"`."""
        from pgq import embedded

        try:
            typer.echo(embedded.start())
        except PgqError as exc:
            fail(str(exc))

    @sub.command("stop")
    def stop_cmd() -> None:
        """Stop the embedded PostgreSQL (fast shutdown). The data is kept; the next use starts it again."""
        from pgq import embedded

        try:
            was_running = embedded.stop()
        except PgqError as exc:
            fail(str(exc))
            return
        typer.echo("stopped" if was_running else "not running")
