"""`pgq dashboard`: serve the web dashboard (pgq/dashboard/) with uvicorn.

Binds 127.0.0.1 by default and refuses any other address unless --token or
--basic-auth is given. The DSN is shown and logged only without its password;
prefer PGPASSFILE or PGPASSWORD to a password on the command line, which `ps`
shows to every user of the machine.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from pgq.cli._common import EXIT_USAGE, DsnOption, SchemaOption, dsn_or_default, fail
from pgq.errors import ConfigError


def dashboard(
    dsn: DsnOption = None,
    schema: SchemaOption = "pgq",
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.", min=0, max=65535)] = 8080,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="PGQ_DASHBOARD_TOKEN",
            help="Require this token (login form, or Authorization: Bearer). "
            "Prefer $PGQ_DASHBOARD_TOKEN to the command line.",
        ),
    ] = None,
    basic_auth: Annotated[
        str | None,
        typer.Option(
            "--basic-auth",
            envvar="PGQ_DASHBOARD_BASIC_AUTH",
            help="Require HTTP basic auth USER:PASSWORD (or $PGQ_DASHBOARD_BASIC_AUTH).",
        ),
    ] = None,
    refresh: Annotated[
        float, typer.Option("--refresh", help="Seconds between auto-refreshes of a page (0: off).", min=0)
    ] = 2.0,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Show, never act (no POST actions).")
    ] = False,
    group_grace_period: Annotated[
        float | None,
        typer.Option(
            "--group-grace-period",
            help="Your servers' group_grace_period in seconds, for the groups' next-due estimate "
            "while no server aggregating the queue runs (running servers publish their own).",
            min=0,
        ),
    ] = None,
    group_max_delay: Annotated[
        float | None,
        typer.Option("--group-max-delay", help="Your servers' group_max_delay in seconds (estimate).", min=0),
    ] = None,
    group_max_size: Annotated[
        int | None,
        typer.Option("--group-max-size", help="Your servers' group_max_size (estimate).", min=0),
    ] = None,
) -> None:
    """Serve the web dashboard: queues, groups, tasks, servers and periodic entries."""
    try:
        import uvicorn

        from pgq import db
        from pgq.dashboard import Auth, Settings, check_bind, create_app, parse_basic_auth
    except ImportError as exc:
        fail(f"the dashboard needs its extra: pip install 'pgq-jobs[dashboard]' ({exc.name} is missing)", 1)
        raise  # unreachable
    try:
        auth = Auth(token=token or None, basic=parse_basic_auth(basic_auth or None))
        check_bind(host, auth)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
        raise  # unreachable
    target = dsn_or_default(dsn)
    try:
        db.conninfo(target, "dashboard")
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    settings = Settings(
        refresh=refresh,
        read_only=read_only,
        group_grace_period=group_grace_period if group_grace_period else Settings.group_grace_period,
        group_max_delay=group_max_delay or None,
        group_max_size=group_max_size or None,
    )
    app = create_app(target, schema=schema, auth=auth, settings=settings)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"pgq dashboard on http://{shown}:{port}/ (database {db.redact(target)})", err=True)
    if not auth.enabled:
        typer.echo("no authentication: serving loopback clients only", err=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False, server_header=False)


def register(app: typer.Typer) -> None:
    app.command("dashboard")(dashboard)
