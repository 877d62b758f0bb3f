"""Session-wide hooks. The fault tests' figures (tests/fault/chaos.py `report`) are
appended to a file named by $PGQ_FAULT_SUMMARY, which this process creates before the
suite starts; the processes of `pytest -n 2` inherit it, so the figures of every
process reach the one terminal summary printed here."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["tests.fixtures.db"]

SUMMARY_ENV = "PGQ_FAULT_SUMMARY"
_summary_key = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: its controller made the file
        return
    fd, path = tempfile.mkstemp(prefix="pgq-fault-figures-", suffix=".jsonl")
    os.close(fd)
    os.environ[SUMMARY_ENV] = path
    config.stash[_summary_key] = Path(path)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    path = config.stash.get(_summary_key, None)
    if path is None or not path.exists():
        return
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    path.unlink()
    if lines:
        terminalreporter.section("pgq fault figures (one JSON line per test)")
        for line in lines:
            terminalreporter.write_line(json.dumps(line, default=str))
