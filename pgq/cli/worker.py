"""`pgq worker module:attr`: run a Server (or a ServeMux with default settings).

`attr` names a pgq.Server or a pgq.ServeMux in `module` (the current directory
is importable, as with uvicorn). With a Server, the module must also define
exactly one ServeMux (or give `module:server:mux`). Flags override the
Server's own settings. `--processes N` starts N worker processes (to use every
core) and supervises them: signals are forwarded, a child that dies is
restarted. Logs are structured: `--log-format json` prints one JSON object a
line; text lines carry the record's extra fields as key=value. pgq.server (asyncio,
psycopg, the worker) is imported when the command runs, not when it is registered.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pgq.cli._common import EXIT_USAGE, DsnOption, fail
from pgq.errors import ConfigError

if TYPE_CHECKING:
    from pgq.mux import ServeMux
    from pgq.server import Server

_STD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in record.__dict__.items() if k not in _STD_ATTRS and not k.startswith("_")}
        if self.as_json:
            out: dict[str, Any] = {
                "ts": self.formatTime(record),
                "level": record.levelname,
                "logger": record.name,
                "pid": record.process,
                "msg": record.getMessage(),
                **extra,
            }
            if record.exc_info:
                out["exc"] = self.formatException(record.exc_info)
            return json.dumps(out, default=str)
        text = super().format(record)
        if extra:
            text += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return text


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def parse_queues(text: str) -> dict[str, int]:
    """'critical=6,default=3,low' -> {'critical': 6, 'default': 3, 'low': 1}."""
    out: dict[str, int] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, weight = part.partition("=")
        name = name.strip()
        if not name:
            raise ConfigError(f"--queues: empty queue name in {text!r}")
        try:
            w = int(weight) if sep else 1
        except ValueError:
            raise ConfigError(f"--queues: weight of {name!r} must be an integer, got {weight!r}") from None
        if w < 1:
            raise ConfigError(f"--queues: weight of {name!r} must be >= 1, got {w}")
        out[name] = w
    if not out:
        raise ConfigError("--queues: no queue given (example: --queues critical=6,default=3)")
    return out


def load_app(spec: str) -> tuple[Server | None, ServeMux]:
    """Import `module:attr[:mux]`; the Server (if any) and the ServeMux to run."""
    from pgq.mux import ServeMux
    from pgq.server import Server

    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"app must be 'module:attr' (a Server or a ServeMux), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(parts[0])
    except ImportError as exc:
        raise ConfigError(f"cannot import module {parts[0]!r}: {exc}") from exc

    def attr(name: str) -> Any:
        try:
            return getattr(module, name)
        except AttributeError:
            raise ConfigError(f"module {parts[0]!r} has no attribute {name!r}") from None

    obj = attr(parts[1])
    if isinstance(obj, ServeMux):
        if len(parts) == 3:
            raise ConfigError("give 'module:mux' or 'module:server:mux'")
        return None, obj
    if not isinstance(obj, Server):
        raise ConfigError(f"{spec}: expected a pgq.Server or a pgq.ServeMux, got {type(obj).__name__}")
    if len(parts) == 3:
        mux = attr(parts[2])
        if not isinstance(mux, ServeMux):
            raise ConfigError(f"{parts[0]}:{parts[2]} is not a pgq.ServeMux")
        return obj, mux
    muxes = [v for v in vars(module).values() if isinstance(v, ServeMux)]
    if len(muxes) != 1:
        raise ConfigError(
            f"module {parts[0]!r} defines {len(muxes)} ServeMux objects; name the one to run: "
            f"'{parts[0]}:{parts[1]}:<mux>'"
        )
    return obj, muxes[0]


def _supervise(argv: list[str], n: int) -> int:
    """Run n copies of `argv`; forward SIGTERM/SIGINT; restart a child that dies."""
    log = logging.getLogger("pgq.cli.worker")
    children: list[subprocess.Popen[bytes]] = [subprocess.Popen(argv) for _ in range(n)]
    stopping = {"n": 0}

    def forward(sig: int, _frame: Any) -> None:
        stopping["n"] += 1
        for c in children:
            if c.poll() is None:
                c.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("started %d worker processes: %s", n, [c.pid for c in children], extra={"action": "supervisor"})
    while True:
        alive = [c for c in children if c.poll() is None]
        if stopping["n"]:
            if not alive:
                return 0
        else:
            for i, c in enumerate(children):
                if c.poll() is not None:
                    log.warning(
                        "worker process %d exited with %s; restarting",
                        c.pid,
                        c.returncode,
                        extra={"action": "worker_restart"},
                    )
                    time.sleep(1.0)
                    if not stopping["n"]:
                        children[i] = subprocess.Popen(argv)
        time.sleep(0.2)


def register(app: typer.Typer) -> None:
    @app.command("worker")
    def worker_cmd(
        app_spec: Annotated[str, typer.Argument(metavar="MODULE:ATTR", help="A pgq.Server or pgq.ServeMux.")],
        dsn: DsnOption = None,
        queues: Annotated[
            str | None, typer.Option("--queues", "-q", help="Queues and weights: critical=6,default=3.")
        ] = None,
        concurrency: Annotated[int | None, typer.Option("--concurrency", "-c", min=1)] = None,
        processes: Annotated[int, typer.Option("--processes", "-p", min=1, help="Worker processes.")] = 1,
        poll_interval: Annotated[
            float | None, typer.Option("--poll-interval", help="Polling floor, s.")
        ] = None,
        strict_priority: Annotated[bool | None, typer.Option("--strict-priority/--weighted")] = None,
        schema: Annotated[str | None, typer.Option("--schema", help="pgq's schema name.")] = None,
        log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning, error.")] = "info",
        log_format: Annotated[str, typer.Option("--log-format", help="text or json.")] = "text",
        metrics_port: Annotated[
            int | None,
            typer.Option("--metrics-port", min=0, max=65535, help="Serve Prometheus metrics on this port."),
        ] = None,
        metrics_addr: Annotated[
            str, typer.Option("--metrics-addr", help="Address the metrics endpoint binds to.")
        ] = "0.0.0.0",
    ) -> None:
        """Run workers for MODULE:ATTR (a pgq.Server or a pgq.ServeMux)."""
        if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            fail(f"--log-level: unknown level {log_level!r}", EXIT_USAGE)
        if log_format not in ("text", "json"):
            fail(f"--log-format must be text or json, got {log_format!r}", EXIT_USAGE)
        setup_logging(log_level, log_format)
        from pgq.server import Server

        try:
            overrides: dict[str, Any] = {}
            if dsn is not None:
                overrides["dsn"] = dsn
            if queues is not None:
                overrides["queues"] = parse_queues(queues)
            if concurrency is not None:
                overrides["concurrency"] = concurrency
            if poll_interval is not None:
                overrides["poll_interval"] = poll_interval
            if strict_priority is not None:
                overrides["strict_priority"] = strict_priority
            if schema is not None:
                overrides["schema"] = schema
            server, mux = load_app(app_spec)
            server = server.with_options(**overrides) if server is not None else Server(**overrides)
        except ConfigError as exc:
            fail(str(exc), EXIT_USAGE)
            raise
        if metrics_port is not None:
            # One exporter per command, in the supervisor when there are several processes:
            # its figures cover the whole database, not one process.
            from pgq import db
            from pgq.metrics import start_exporter

            start_exporter(db.resolve_dsn(server._dsn), metrics_port, server.schema, addr=metrics_addr)
        if processes > 1:
            argv = [sys.executable, "-m", "pgq", *_child_args(sys.argv[1:])]
            raise typer.Exit(_supervise(argv, processes))
        server.run(mux)


def _child_args(args: list[str]) -> list[str]:
    """The command line without --processes/-p N (children run one process each)."""
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("--processes", "-p", "--metrics-port", "--metrics-addr"):
            skip = True
            continue
        if a.startswith(("--processes=", "--metrics-port=", "--metrics-addr=")):
            continue
        out.append(a)
    return out
