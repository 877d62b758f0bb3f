"""The code samples of the newcomer docs run, as written.

A fenced block in docs/quickstart.md, docs/concepts.md and docs/howto-*.md is
checked as follows:

- ```python blocks run (a block whose first line is `# file: NAME.py` is written to
  that file in a scratch directory instead, to be imported); a block right after a
  line `<!-- norun -->` is only compiled.
- ```sql blocks run on the test database.
- every `pgq ...` line of a ```bash block names an existing command, and each of
  its `--options` appears in that command's --help.

PGQ_DSN points at the test's database; DATABASE_URL is the SQLAlchemy URL of it.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import pgq

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
NEWCOMER_DOCS = sorted([DOCS / "quickstart.md", DOCS / "concepts.md", *DOCS.glob("howto-*.md")])


@dataclass
class Block:
    lang: str
    code: str
    norun: bool
    line: int


def blocks(path: Path) -> list[Block]:
    out: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w+)\s*$", lines[i])
        if not m:
            i += 1
            continue
        prev = next((x.strip() for x in reversed(lines[:i]) if x.strip()), "")
        j = i + 1
        while not lines[j].startswith("```"):
            j += 1
        out.append(Block(m.group(1), "\n".join(lines[i + 1 : j]) + "\n", prev == "<!-- norun -->", i + 1))
        i = j + 1
    return out


def test_the_docs_exist_and_link_to_each_other() -> None:
    names = {p.name for p in NEWCOMER_DOCS}
    assert {"quickstart.md", "concepts.md"} <= names
    assert len([n for n in names if n.startswith("howto-")]) >= 4, names
    for doc in NEWCOMER_DOCS:
        for target in re.findall(r"\]\(([\w-]+\.md)\)", doc.read_text()):
            assert (DOCS / target).exists(), f"{doc.name} links to missing {target}"


@pytest.mark.parametrize("doc", NEWCOMER_DOCS, ids=lambda p: p.name)
def test_python_samples_compile(doc: Path) -> None:
    for b in blocks(doc):
        if b.lang == "python":
            compile(b.code, f"{doc.name}:{b.line}", "exec")


# --- pgq command lines in bash blocks ----------------------------------------------------


@dataclass(frozen=True)
class Help:
    returncode: int
    stdout: str
    stderr: str


@cache
def cli_help(words: tuple[str, ...]) -> Help:
    """`pgq WORDS --help`, in process (a subprocess per line would cost a second each)."""
    from typer.testing import CliRunner

    from pgq.cli import app

    res = CliRunner().invoke(app, [*words, "--help"], env={"COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb"})
    return Help(res.exit_code, res.stdout, res.output if res.exit_code else "")


def check_pgq_command(line: str) -> None:
    """`pgq sub [sub] [args] [--opts]`: the command exists and takes those options."""
    words = shlex.split(line, comments=True)
    assert words and words[0] == "pgq", line
    cmd: list[str] = []
    for w in words[1:]:
        if w.startswith("-") or (cmd and "Commands" not in cli_help(tuple(cmd)).stdout):
            break  # options, or the arguments of a leaf command
        if cli_help((*cmd, w)).returncode != 0:
            break
        cmd.append(w)
    res = cli_help(tuple(cmd))
    assert cmd and res.returncode == 0, f"{line!r}: `pgq {' '.join(cmd)} --help` failed: {res.stderr}"
    for w in words[1:]:
        if w.startswith("--"):
            opt = w.split("=", 1)[0]
            assert opt in res.stdout, f"{line!r}: `pgq {' '.join(cmd)}` has no option {opt}"


def pgq_lines(doc: Path) -> Iterator[str]:
    for b in blocks(doc):
        if b.lang in ("bash", "sh", "shell"):
            for raw in b.code.splitlines():
                for part in re.split(r"&&|\|\||;|\$\(", raw):
                    part = part.strip().rstrip(")\"'").strip()
                    if part.startswith("export "):
                        continue
                    if part.startswith("pgq "):
                        yield part


@pytest.mark.parametrize("doc", NEWCOMER_DOCS, ids=lambda p: p.name)
def test_pgq_commands_in_the_docs_exist(doc: Path) -> None:
    for line in pgq_lines(doc):
        check_pgq_command(line)


def test_command_check_can_fail() -> None:
    with pytest.raises(AssertionError):
        check_pgq_command("pgq embedded status --no-such-option")
    with pytest.raises(AssertionError):
        check_pgq_command("pgq no-such-command")


# --- running the samples -----------------------------------------------------------------


@pytest.fixture
def docs_env(dsn: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """PGQ_DSN and DATABASE_URL for the test database, an orders table, a scratch cwd."""
    import sqlalchemy as sa

    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or "")
    socket_dir = host.startswith("/")  # the embedded server: a Unix socket directory
    url = sa.engine.URL.create(
        "postgresql+psycopg",
        username=str(params.get("user") or ""),
        password=str(params["password"]) if params.get("password") else None,
        host=None if socket_dir or not host else host,
        port=None if socket_dir or not params.get("port") else int(params["port"]),
        database=str(params["dbname"]),
        query={"host": host, "port": str(params.get("port") or 5432)} if socket_dir else {},
    )
    monkeypatch.setenv("PGQ_DSN", dsn)
    monkeypatch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE orders (id int PRIMARY KEY, item text NOT NULL)")
    yield tmp_path


def run_python_blocks(
    doc: Path, where: Path, before: Callable[[Block], None] | None = None
) -> dict[str, Any]:
    ns: dict[str, Any] = {"__name__": "__docs__"}
    for b in blocks(doc):
        if b.lang != "python" or b.norun:
            continue
        first = b.code.splitlines()[0]
        m = re.match(r"#\s*file:\s*([\w.]+\.py)\s*$", first)
        if m:
            (where / m.group(1)).write_text(b.code)
            continue
        if before:
            before(b)
        exec(compile(b.code, f"{doc.name}:{b.line}", "exec"), ns)
    return ns


def close_all(ns: dict[str, Any]) -> None:
    """Close what the samples left open, as their process's exit would."""
    for value in ns.values():
        if isinstance(value, pgq.Client):
            value.close()
        elif type(value).__name__ == "Engine" and hasattr(value, "dispose"):
            value.dispose()


def tasks_of(dsn: str, type_: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=psycopg.rows.dict_row) as c:
        return c.execute(
            "SELECT type, payload, state FROM pgq.task WHERE type = %s ORDER BY id", (type_,)
        ).fetchall()


def test_enqueue_in_your_transaction_samples(dsn: str, docs_env: Path) -> None:
    doc = DOCS / "howto-enqueue-in-your-transaction.md"

    def setup_django(b: Block) -> None:
        if "django" not in b.code:
            return
        import django
        from django.conf import settings

        params = conninfo_to_dict(dsn)
        db = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": params["dbname"],
            "USER": params.get("user", ""),
            "PASSWORD": params.get("password", ""),
            "HOST": params.get("host", ""),
            "PORT": str(params.get("port", "")),
        }
        if settings.configured:
            settings.DATABASES["default"].update(db)
        else:
            settings.configure(DATABASES={"default": db}, INSTALLED_APPS=[], USE_TZ=True)
            django.setup()

    ns: dict[str, Any] = {}
    try:
        ns = run_python_blocks(doc, docs_env, before=setup_django)
    finally:
        close_all(ns)
        if "django.db" in sys.modules:
            from django.db import connections

            connections.close_all()

    with psycopg.connect(dsn) as c:
        for b in blocks(doc):
            if b.lang == "sql":
                c.execute(b.code)
        orders = c.execute("SELECT id, item FROM orders ORDER BY id").fetchall()
    assert orders == [(1, "book"), (3, "desk"), (4, "chair"), (6, "red pen")]
    confirmed = [t["payload"]["order_id"] for t in tasks_of(dsn, "order:confirm")]
    assert confirmed == [1, 3, 4, 5], confirmed  # not 2: its transaction rolled back
    assert [t["payload"] for t in tasks_of(dsn, "order:remind")] == [{"order_id": 6}]
    assert [(t["payload"], t["state"]) for t in tasks_of(dsn, "notify")] == [("lunch?", "aggregating")]


def test_quickstart_program_runs_with_pgq_worker(dsn: str, docs_env: Path) -> None:
    """docs/quickstart.md step 3 as a newcomer does it: `pgq worker notifications:server`
    in one terminal, the enqueue snippet in another, the digest printed."""
    doc = DOCS / "quickstart.md"
    lines = list(pgq_lines(doc))
    assert "pgq worker notifications:server" in lines
    worker = None

    def start_worker(b: Block) -> None:
        nonlocal worker
        if worker is None:
            worker = subprocess.Popen(
                [sys.executable, "-m", "pgq", "worker", "notifications:server"],
                cwd=docs_env,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

    try:
        ns = run_python_blocks(doc, docs_env, before=start_worker)
        close_all(ns)
        assert ns["info"].state == "aggregating"
        with pgq.Inspector(dsn) as insp:
            deadline = time.monotonic() + 60
            while insp.get_queue_info("notifications").processed < 1:
                assert worker is not None and worker.poll() is None, worker and worker.communicate()
                assert time.monotonic() < deadline, "the digest was not processed within 60 s"
                time.sleep(0.1)
            assert insp.get_queue_info("notifications").processed == 1
            assert insp.get_queue_info("notifications").aggregating == 0
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            out, err = worker.communicate(timeout=30)
    assert "digest for user:42: ['you have a new follower', 'your build passed', 'lunch?']" in out, out + err
    sys.modules.pop("notifications", None)
    importlib.invalidate_caches()


def test_pgbouncer_samples(dsn: str, docs_env: Path) -> None:
    """The poll-only worker module starts and claims without LISTEN; the enqueue runs.
    (No PgBouncer here: this checks the code, not the pooler.)"""
    doc = DOCS / "howto-pgbouncer.md"
    ns = run_python_blocks(doc, docs_env)
    close_all(ns)
    module = importlib.import_module("pooled_worker")
    try:
        server = module.server
        assert server.poll_only is True
        handled: list[Any] = []
        module.mux.handle("order:confirm", lambda task: handled.append(task.payload))
        server.start(module.mux)
        try:
            with pgq.Inspector(dsn) as insp:
                deadline = time.monotonic() + 30
                while insp.get_queue_info("default").processed < 1:
                    assert time.monotonic() < deadline, "not processed within 30 s by polling"
                    time.sleep(0.05)
            assert server.listener is None  # poll_only: no LISTEN connection
        finally:
            server.shutdown()
        assert handled == [{"order_id": 10}]
    finally:
        sys.modules.pop("pooled_worker", None)


def test_aggregation_recipes(dsn: str, docs_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The recipes' worker module with the digest's 10 min grace period cut short."""
    import dataclasses

    doc = DOCS / "howto-aggregation-recipes.md"
    assert "pgq worker recipes:server" in doc.read_text()
    ns = run_python_blocks(doc, docs_env)
    close_all(ns)
    module = importlib.import_module("recipes")
    try:
        assert isinstance(module.server, pgq.Server)
        policies = dict(module.POLICIES)
        policies["digests"] = dataclasses.replace(policies["digests"], grace_period=0.2, max_delay=None)
        server = pgq.Server(queues={"digests": 1, "indexing": 2}, group_policies=policies)
        server.start(module.mux)
        try:
            with pgq.Inspector(dsn) as insp:
                deadline = time.monotonic() + 60
                while (
                    insp.get_queue_info("digests").processed < 1
                    or insp.get_queue_info("indexing").processed < 3
                ):
                    assert time.monotonic() < deadline, "the recipes were not processed within 60 s"
                    time.sleep(0.05)
        finally:
            server.shutdown()
    finally:
        sys.modules.pop("recipes", None)
    out = capsys.readouterr().out
    assert "digest to user:7: ['liked your post', 'followed you', 'mentioned you']" in out, out
    assert sorted(re.findall(r"indexing (\d+) documents", out)) == ["50", "60", "60"], out
