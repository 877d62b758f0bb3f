"""`pgq metrics --port N`: a standalone Prometheus exporter of pgq's state."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from pgq.cli._common import DsnOption, SchemaOption, dsn_or_default, fail
from pgq.cli._output import errors


def register(app: typer.Typer) -> None:
    @app.command("metrics")
    def metrics(
        port: Annotated[
            int, typer.Option("--port", min=0, max=65535, help="Port to serve /metrics on.")
        ] = 9187,
        addr: Annotated[str, typer.Option("--addr", help="Address to listen on.")] = "0.0.0.0",
        dsn: DsnOption = None,
        schema: SchemaOption = "pgq",
    ) -> None:
        """Serve Prometheus metrics (tasks per state, latency, groups, servers) until interrupted."""
        from pgq import db
        from pgq.metrics import start_exporter

        target = dsn_or_default(dsn)
        stop = threading.Event()
        with errors(target):
            try:
                exporter = start_exporter(target, port, schema, addr=addr)
            except OSError as exc:
                fail(f"cannot listen on {addr}:{port}: {exc.strerror or exc}")
                raise
        if exporter.collector.reading() is None:
            exporter.stop()
            fail(f"cannot read pgq's state at {db.redact(target)} (is it migrated? see the warning above)")
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        typer.echo(f"serving pgq metrics on http://{addr}:{exporter.port}/metrics", err=True)
        try:
            while not stop.wait(1.0):
                pass
        finally:
            exporter.stop()
