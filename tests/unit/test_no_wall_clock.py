"""The database clock is the only clock (RELIABILITY 2.9, R9): the modules that make
time decisions never read the wall clock.

Banned: time.time(), time.time_ns(), datetime.now(), datetime.utcnow(),
datetime.today(), date.today(), however they are imported, called or passed on
(`default_factory=datetime.now` reads the clock later just the same). Allowed:
time.monotonic() and time.perf_counter() (durations on this node, not instants),
loop.time() (monotonic), and arithmetic on datetimes the database returned.

A genuine non-decision use (formatting a log line, say) may stay if its line
carries `# wall-clock: <reason>`; the reason is mandatory.
R9 (tests/fault/test_r9_clock_skew.py) checks the same rule end to end under libfaketime.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Modules that decide when something runs, is due, is rescued, expires or leads.
DECIDING = [
    "pgq/worker.py",  # claims, leases, heartbeats, task deadlines
    "pgq/tasks.py",  # the worker's queries (claim, ack, extend)
    "pgq/server.py",  # heartbeat row, services' schedule
    "pgq/listener.py",  # wake-ups and re-polls
    "pgq/scheduler.py",  # cron ticks
    "pgq/cron.py",  # cron schedule arithmetic (given a database `now`)
    "pgq/client.py",  # process_in / unique TTL / retention at enqueue
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "pgq/services").glob("*.py")),
]

_TIME_FUNCS = {"time", "time_ns"}
_CLOCK_METHODS = {"datetime": {"now", "utcnow", "today"}, "date": {"today"}}
_PRAGMA = re.compile(r"#\s*wall-clock:\s*(\S.*)$")


def wall_clock_reads(source: str, filename: str = "<src>") -> list[tuple[int, str]]:
    """(line, what) for every wall-clock read in `source` without a `# wall-clock: reason`."""
    tree = ast.parse(source, filename)
    time_mods: set[str] = set()  # names bound to the time module
    dt_mods: set[str] = set()  # names bound to the datetime module
    time_funcs: dict[str, str] = {}  # local name -> time.<func> (from time import time)
    classes: dict[str, str] = {}  # local name -> "datetime" / "date"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "time":
                    time_mods.add(a.asname or "time")
                elif a.name == "datetime":
                    dt_mods.add(a.asname or "datetime")
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            for a in node.names:
                if node.module == "time" and a.name in _TIME_FUNCS:
                    time_funcs[a.asname or a.name] = f"time.{a.name}"
                elif node.module == "datetime" and a.name in _CLOCK_METHODS:
                    classes[a.asname or a.name] = a.name

    def clock_class(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Name):
            return classes.get(expr.id)
        if (
            isinstance(expr, ast.Attribute)
            and isinstance(expr.value, ast.Name)
            and expr.value.id in dt_mods
            and expr.attr in _CLOCK_METHODS
        ):
            return expr.attr
        return None

    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            if isinstance(node.value, ast.Name) and node.value.id in time_mods and node.attr in _TIME_FUNCS:
                what = f"time.{node.attr}"
            else:
                cls = clock_class(node.value)
                if cls is not None and node.attr in _CLOCK_METHODS[cls]:
                    what = f"{cls}.{node.attr}"
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in time_funcs:
            what = time_funcs[node.id]
        if what is not None:
            found.append((getattr(node, "lineno", 0), what))
    lines = source.splitlines()
    return sorted({(n, w) for n, w in found if not _PRAGMA.search(lines[n - 1])})


@pytest.mark.parametrize("path", DECIDING)
def test_no_wall_clock_reads(path: str) -> None:
    source = (ROOT / path).read_text()
    reads = wall_clock_reads(source, path)
    assert reads == [], "wall-clock reads (the database clock is the only clock): " + ", ".join(
        f"{path}:{n} {w}()" for n, w in reads
    )


def test_the_listed_modules_exist() -> None:
    missing = [p for p in DECIDING if not (ROOT / p).is_file()]
    assert missing == []
    assert any(p.startswith("pgq/services/") for p in DECIDING)


@pytest.mark.parametrize(
    "source",
    [
        "import time\nx = time.time()",
        "import time as t\nx = t.time_ns()",
        "from time import time\nx = time()",
        "from time import time as now\nx = now()",
        "import datetime\nx = datetime.datetime.now()",
        "import datetime as dt\nx = dt.date.today()",
        "from datetime import datetime\nx = datetime.utcnow()",
        "from datetime import datetime as DT\nx = DT.now(tz=None)",
        "from datetime import date\nx = date.today()",
        "from datetime import datetime\nclock = datetime.now  # passed on: read later",
        "import time\nx = time.time()  # wall-clock:",  # a pragma without a reason
    ],
)
def test_the_checker_finds(source: str) -> None:
    assert wall_clock_reads(source) != []


@pytest.mark.parametrize(
    "source",
    [
        "import time\nx = time.monotonic() + time.perf_counter()",
        "import asyncio\nx = asyncio.get_event_loop().time()",
        "from datetime import datetime, timedelta\nx = datetime.fromisoformat('2020-01-01') + timedelta(1)",
        "from datetime import UTC, datetime\nx = datetime(2020, 1, 1, tzinfo=UTC)",
        "import time\nx = time.time()  # wall-clock: a log file name, decides nothing",
        "class C:\n    def time(self): ...\nC().time()",
    ],
)
def test_the_checker_allows(source: str) -> None:
    assert wall_clock_reads(source) == []
