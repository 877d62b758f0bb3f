"""`import pgq`, `import pgq.cli` and `pgq --help` stay cheap: they do not import psycopg,
asyncio, the client, the server, the inspector, rich and the other heavy modules, which
the commands import when they run (pgq/__init__.py, pgq/cli/). Checked by the modules a
fresh interpreter has loaded, not by timing, so it fails as soon as an eager import of
one of them comes back. The lazy package keeps its public API: one table of names
(`_EXPORTS`), `__all__` and the `TYPE_CHECKING` imports agree, and every name resolves.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import pgq

ROOT = Path(__file__).resolve().parents[2]

#: Top-level packages that `import pgq`, `import pgq.cli` and `pgq --help` must not load.
HEAVY_PACKAGES = {"psycopg", "psycopg_pool", "asyncio", "rich", "prometheus_client", "starlette", "uvicorn"}
#: pgq's own modules that need psycopg (or more) and must be imported by the commands alone.
HEAVY_PGQ = {
    "pgq.client",
    "pgq.server",
    "pgq.worker",
    "pgq.inspector",
    "pgq.scheduler",
    "pgq.db",
    "pgq.migrate",
    "pgq.embedded",
    "pgq.metrics",
    "pgq.dashboard",
}

_PROBE = """
import json, sys
{body}
print(json.dumps(sorted(sys.modules)))
"""


def loaded_after(body: str) -> set[str]:
    """The modules a fresh interpreter has imported after running `body`."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(body=body)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY_PACKAGES or m in HEAVY_PGQ)


def test_import_pgq_loads_nothing_heavy() -> None:
    loaded = loaded_after("import pgq")
    assert heavy(loaded) == []
    assert "typer" not in loaded  # the library does not need the CLI's dependencies


def test_import_pgq_cli_loads_nothing_heavy() -> None:
    assert heavy(loaded_after("import pgq.cli")) == []


@pytest.mark.parametrize(
    "argv", [["--help"], ["task", "--help"], ["worker", "--help"], ["cron", "ls", "--help"]]
)
def test_help_loads_nothing_heavy_of_pgq(argv: list[str]) -> None:
    """Typer renders its help with rich when rich is installed (typer's choice, not pgq's);
    psycopg, asyncio and pgq's own heavy modules stay out."""
    body = f"""
import contextlib, io, sys
sys.argv = ["pgq", *{argv!r}]
import pgq.cli
with contextlib.redirect_stdout(io.StringIO()):
    try:
        pgq.cli.main()
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
"""
    loaded = loaded_after(body)
    assert sorted(m for m in loaded if m.split(".")[0] in {"psycopg", "psycopg_pool", "asyncio"}) == []
    assert sorted(m for m in loaded if m in HEAVY_PGQ) == []


def test_a_command_loads_what_it_uses_only() -> None:
    """`pgq stats` needs the inspector and psycopg, not the client, the server or the pool."""
    body = """
import contextlib, io, sys
sys.argv = ["pgq", "stats", "--dsn", "host=/nonexistent-pgq-lazy-import-test dbname=x connect_timeout=2"]
import pgq.cli
with contextlib.redirect_stderr(io.StringIO()):
    try:
        pgq.cli.main()
    except SystemExit as exc:
        assert exc.code == 1, exc.code  # cannot reach PostgreSQL
"""
    loaded = loaded_after(body)
    assert {"pgq.inspector", "psycopg"} <= loaded
    assert sorted(loaded & {"pgq.client", "pgq.server", "pgq.worker", "pgq.scheduler", "psycopg_pool"}) == []


def _type_checking_imports() -> dict[str, str]:
    """name -> module of the `if TYPE_CHECKING:` imports of pgq/__init__.py."""
    tree = ast.parse((ROOT / "pgq" / "__init__.py").read_text())
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module, ast.dump(imp)
                for alias in imp.names:
                    out[alias.asname or alias.name] = imp.module
    return out


def test_public_api_table_all_and_type_checking_imports_agree() -> None:
    exports: dict[str, str] = pgq._EXPORTS
    assert len(pgq.__all__) == len(set(pgq.__all__))
    assert set(pgq.__all__) == set(exports)
    assert _type_checking_imports() == exports


def test_every_public_name_resolves_to_its_module() -> None:
    for name, module in pgq._EXPORTS.items():
        assert getattr(pgq, name) is getattr(importlib.import_module(module), name), name
    assert set(pgq.__all__) <= set(dir(pgq))


def test_from_import_star_unknown_names_and_submodules() -> None:
    loaded = loaded_after(
        """
from pgq import *
import pgq
assert Client is pgq.Client and STATES is pgq.STATES and Inspector.__module__ == "pgq.inspector"
assert pgq.db.redact("postgresql://u:secret@h/d").count("secret") == 0  # a submodule, on first access
try:
    pgq.no_such_name
except AttributeError:
    pass
else:
    raise AssertionError("pgq.no_such_name resolved")
try:
    from pgq import no_such_name  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("from pgq import no_such_name worked")
"""
    )
    assert "pgq.db" in loaded
