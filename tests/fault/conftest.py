"""Fixtures of the fault suite: a PostgreSQL cluster per module, worker subprocesses,
the chaos controller and the TCP proxy. See docs/reliability.md.

CI runs the short sizes; `PGQ_FAULT_FULL=1 pytest tests/fault -m fault` runs
the full ones (benchmarks/fault_full.py does that and records the figures).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.fault import chaos as chaos_mod
from tests.fault.cluster import Cluster, available, golden_cluster, running_cluster
from tests.fault.proxy import Proxy

_why_not = available()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/fault/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.fault)
            if _why_not:
                item.add_marker(pytest.mark.skip(reason=f"no PostgreSQL cluster for fault tests: {_why_not}"))


@pytest.fixture(scope="session")
def golden() -> Iterator[Path]:
    with golden_cluster() as data:
        yield data


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, golden: Path) -> Iterator[Cluster]:
    """This module's own PostgreSQL. A module sets FSYNC = True to keep fsync on (R11)."""
    fsync = bool(getattr(request.module, "FSYNC", False))
    settings = getattr(request.module, "PG_SETTINGS", None)
    with running_cluster(fsync=fsync, settings=settings, golden=golden) as c:
        yield c


@pytest.fixture
def fdb(cluster: Cluster) -> Iterator[str]:
    """A fresh migrated database (with the chaos ledger) on the module's cluster."""
    dsn = cluster.new_db()
    yield dsn
    cluster.drop_db(dsn)


@pytest.fixture
def admin_dsn(cluster: Cluster) -> str:
    return cluster.dsn("postgres")


WorkerFactory = Callable[..., chaos_mod.WorkerProc]


@pytest.fixture
def workers(fdb: str, tmp_path: Path) -> Iterator[WorkerFactory]:
    """start(env=..., n=...) -> a started WorkerProc; every one is stopped after the test."""
    procs: list[chaos_mod.WorkerProc] = []

    def start(
        env: Mapping[str, str] | None = None,
        *,
        dsn: str | None = None,
        argv: Any = None,
        n: int | None = None,
    ) -> chaos_mod.WorkerProc:
        w = chaos_mod.WorkerProc(dsn or fdb, tmp_path, len(procs) if n is None else n, env, argv)
        procs.append(w)
        return w.start()

    yield start
    for w in procs:
        if w.alive():
            w.kill()


@pytest.fixture
def chaos(admin_dsn: str, tmp_path: Path) -> chaos_mod.Chaos:
    return chaos_mod.Chaos(admin_dsn, tmp_path / "chaos.jsonl")


@pytest.fixture
def proxy(cluster: Cluster) -> Iterator[Proxy]:
    p = Proxy(cluster.port).start()
    yield p
    p.stop()
