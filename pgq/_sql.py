"""Named SQL, loaded once from the sql/ folder shipped inside the wheel.

Files in sql/queries/ hold queries headed by `-- name: <entity>_<verb>`. The
only text substitution pgq ever makes is the schema name (validated against a
strict pattern before use); every other value is a bound parameter.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path
from typing import LiteralString

from pgq.errors import ConfigError

SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,50}$")
_HEADER = re.compile(r"^-- name: (\w+)\n(?:--.*\n)*", re.M)


def sql_dir() -> Path:
    """The sql/ folder: inside the installed package, or beside it in a source checkout."""
    packaged = resources.files("pgq") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[1] / "sql"


def check_schema(schema: str) -> str:
    if not isinstance(schema, str) or not SCHEMA_RE.match(schema):
        raise ConfigError(
            f"schema name {schema!r} is not allowed: use lower-case letters, digits and _ "
            "(at most 51 characters, not starting with a digit)"
        )
    return schema


def channel(schema: str) -> str:
    """The one NOTIFY channel of a schema; its payload is a queue name."""
    return f"{check_schema(schema)}_wake"


def with_schema(text: str, schema: str) -> str:
    """Replace the schema name `pgq` (as `pgq.` and in `pgq_wake`) by another checked one."""
    check_schema(schema)
    if schema == "pgq":
        return text
    text = re.sub(r"\bpgq\.", f"{schema}.", text)
    return re.sub(r"\bpgq_wake\b", f"{schema}_wake", text)


def parse(text: str) -> dict[str, str]:
    parts = _HEADER.split(text)[1:]
    return {name: body.strip().rstrip(";") for name, body in zip(parts[::2], parts[1::2], strict=True)}


@functools.cache
def queries(schema: str = "pgq") -> dict[str, LiteralString]:
    """Every named query in sql/queries/*.sql, for one schema."""
    out: dict[str, LiteralString] = {}
    for path in sorted((sql_dir() / "queries").glob("*.sql")):
        for name, body in parse(path.read_text()).items():
            if name in out:
                raise RuntimeError(f"query {name!r} is defined twice (second in {path.name})")
            # We vouch for these: they come from our files; only the checked schema name changed.
            out[name] = with_schema(body, schema)  # type: ignore[assignment,unused-ignore]
    return out


def query(name: str, schema: str = "pgq") -> LiteralString:
    return queries(schema)[name]


def script(relpath: str, schema: str = "pgq") -> LiteralString:
    """A whole SQL file (a migration or views), for one schema."""
    return with_schema((sql_dir() / relpath).read_text(), schema)  # type: ignore[return-value,unused-ignore]
