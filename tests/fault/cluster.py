"""A PostgreSQL cluster of a fault-test module's own (initdb + pg_ctl on a free port).

The fault tests restart, crash and starve PostgreSQL, so they never touch the
shared server on :5432. Everything here runs as root, and PostgreSQL refuses
to run as root: initdb and pg_ctl run as the `postgres` system user
(`runuser -u postgres --`), with the data directory in a temporary directory
that user owns. fsync is off unless the module asks for it (R11 wants it on).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

import pgq.migrate
from tests.fixtures.util import free_port

PG_BIN = Path(os.environ.get("PGQ_FAULT_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"

#: The ledger every fault-test handler writes first: one row per execution.
LEDGER_SQL = """
CREATE SCHEMA IF NOT EXISTS chaos;
CREATE TABLE IF NOT EXISTS chaos.exec_log (
    task_pk  bigint NOT NULL,
    attempt  integer,
    retried  integer,
    type     text NOT NULL,
    pid      integer NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS exec_log_task_idx ON chaos.exec_log (task_pk);
"""


def available() -> str | None:
    """None when a cluster can be made here, else why not."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / tool).exists():
            return f"{PG_BIN / tool} is missing (set PGQ_FAULT_PG_BIN)"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root without runuser"
        try:
            import pwd

            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root and there is no {PG_USER!r} system user"
    return None


class Cluster:
    """One PostgreSQL cluster; `new_db()` gives each test a migrated database of its own."""

    def __init__(
        self, *, fsync: bool = False, settings: dict[str, str] | None = None, golden: Path | None = None
    ) -> None:
        self.fsync = fsync
        self.golden = golden
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="pgq-fault-"))
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.settings = settings or {}
        self.template = "pgq_tpl"
        self._dbs: list[str] = []

    # -------------------------------------------------------------- commands

    def _as_pg(
        self, *argv: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        cmd = list(argv)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._as_pg(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), *args, check=check
        )

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.base, PG_USER, PG_USER)
        if self.golden is not None:
            # A copy of a stopped cluster that already holds the migrated template: fast.
            subprocess.run(["cp", "-a", str(self.golden), str(self.data)], check=True)
        else:
            self._as_pg(
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                PG_USER,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.base}'",
            "max_connections": "200",
            "shared_buffers": "64MB",
            "fsync": "on" if self.fsync else "off",
            "synchronous_commit": "on" if self.fsync else "off",
            "full_page_writes": "on" if self.fsync else "off",
            "log_min_messages": "warning",
            "logging_collector": "off",
            **self.settings,
        }
        with open(self.data / "postgresql.auto.conf", "a") as f:
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        if os.geteuid() == 0:
            shutil.chown(self.data / "postgresql.auto.conf", PG_USER, PG_USER)

    def start(self) -> None:
        self.pg_ctl("-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-w", "-t", "60", "-m", mode, "stop", check=False)

    def restart(self, mode: str = "fast") -> float:
        """pg_ctl restart -m fast|immediate; returns the seconds it took until PostgreSQL accepts."""
        t0 = time.monotonic()
        self.pg_ctl("-w", "-t", "120", "-m", mode, "restart")
        self.wait_ready()
        return time.monotonic() - t0

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)

    # -------------------------------------------------------------- databases

    def dsn(self, dbname: str, **extra: Any) -> str:
        parts = [f"host=127.0.0.1 port={self.port} user={PG_USER} dbname={dbname}"]
        parts += [f"{k}={v}" for k, v in extra.items()]
        return " ".join(parts)

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn("postgres"), autocommit=True, row_factory=dict_row)

    def make_template(self) -> None:
        with self.admin() as a:
            a.execute(f'CREATE DATABASE "{self.template}"')
        pgq.migrate.migrate(self.dsn(self.template))
        with psycopg.connect(self.dsn(self.template), autocommit=True) as c:
            c.execute(LEDGER_SQL)

    def new_db(self) -> str:
        name = f"t_{uuid.uuid4().hex[:10]}"
        with self.admin() as a:
            a.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}" STRATEGY FILE_COPY')
        self._dbs.append(name)
        return self.dsn(name)

    def drop_db(self, dsn: str) -> None:
        name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        with self.admin() as a:
            a.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


@contextmanager
def golden_cluster() -> Iterator[Path]:
    """A stopped, initialised cluster with the migrated template: modules copy its data dir."""
    c = Cluster()
    try:
        c.init()
        c.start()
        c.make_template()
        c.stop("fast")
        yield c.data
    finally:
        c.destroy()


@contextmanager
def running_cluster(
    *, fsync: bool = False, settings: dict[str, str] | None = None, golden: Path | None = None
) -> Iterator[Cluster]:
    c = Cluster(fsync=fsync, settings=settings, golden=golden)
    try:
        c.init()
        c.start()
        if golden is None:
            c.make_template()
        yield c
    finally:
        c.destroy()
