"""The `pgq` command line. Each module in this package adds its commands through
a `register(app)` function; this module only assembles them."""

from __future__ import annotations

import importlib
import pkgutil

import typer

app = typer.Typer(
    name="pgq",
    help="pgq: a durable job queue on PostgreSQL, with task aggregation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """pgq: a durable job queue on PostgreSQL, with task aggregation."""


def _register_all() -> None:
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{mod.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_all()


def main() -> None:
    app()
