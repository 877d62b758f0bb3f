"""A PgBouncer in front of a fault-test module's cluster (R13).

`Bouncer(cluster, pool_mode)` writes a pgbouncer.ini in a temporary directory:
listen on a free 127.0.0.1 port, `auth_type = trust` with an auth_file naming
the cluster's user, every database (`*`) forwarded to the cluster, and the
given pool_mode ("transaction" or "session"). pgbouncer refuses to run as root,
so under root it is started with its own `-u postgres` (the cluster's system
user, see cluster.py); it runs in the foreground as a child process and is
stopped with SIGINT (then SIGKILL). `available()` says why not when the binary
is absent (the Debian `pgbouncer` package provides it; .ci/run installs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.fault.cluster import PG_USER, Cluster
from tests.fixtures.util import free_port, read_log

PGBOUNCER = os.environ.get("PGQ_FAULT_PGBOUNCER") or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def available() -> str | None:
    """None when pgbouncer can run here, else why not."""
    if not Path(PGBOUNCER).exists():
        return "the pgbouncer binary is absent (Debian: apt-get install pgbouncer)"
    return None


def version() -> str:
    out = subprocess.run([PGBOUNCER, "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0].strip() if out else "?"


class Bouncer:
    """One pgbouncer process in front of `cluster`; dsn(target) rewrites a cluster DSN onto it."""

    def __init__(self, cluster: Cluster, pool_mode: str = "transaction", pool_size: int = 20) -> None:
        self.cluster = cluster
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix=f"pgq-bouncer-{pool_mode}-"))
        self.ini = self.base / "pgbouncer.ini"
        self.log = self.base / "pgbouncer.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        (self.base / "users.txt").write_text(f'"{PG_USER}" ""\n')
        self.ini.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={self.cluster.port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.base / 'users.txt'}\n"
            f"pool_mode = {self.pool_mode}\n"
            "max_client_conn = 500\n"
            f"default_pool_size = {self.pool_size}\n"
            f"logfile = {self.log}\n"
            f"pidfile = {self.base / 'pgbouncer.pid'}\n"
            f"admin_users = {PG_USER}\n"
            # psycopg sends none of these, but clients may: keep the startup packet accepted
            "ignore_startup_parameters = extra_float_digits,options\n"
        )
        if os.geteuid() == 0:
            for p in (self.base, *self.base.iterdir()):
                shutil.chown(p, PG_USER, PG_USER)

    def start(self, timeout: float = 15) -> Bouncer:
        self.write_config()
        argv = [PGBOUNCER, *(["-u", PG_USER] if os.geteuid() == 0 else []), str(self.ini)]
        out = open(self.base / "stdout.log", "ab")
        try:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out)
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while True:  # ready when a client connection gets through to PostgreSQL
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                with psycopg.connect(self.dsn(self.cluster.dsn("postgres")), connect_timeout=2) as c:
                    c.execute("SELECT 1")
                return self
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)

    def dsn(self, target: str, **extra: Any) -> str:
        """`target` (a DSN of the cluster) through this bouncer."""
        params = conninfo_to_dict(target)
        params.update(host="127.0.0.1", port=str(self.port), **extra)
        return make_conninfo("", **params)

    def show(self, what: str) -> list[dict[str, Any]]:
        """SHOW <what> on the admin console (e.g. "pools", "servers")."""
        from psycopg.rows import dict_row

        admin = make_conninfo("", host="127.0.0.1", port=str(self.port), user=PG_USER, dbname="pgbouncer")
        with psycopg.connect(admin, autocommit=True, row_factory=dict_row) as c:
            c.prepare_threshold = None  # the admin console has no extended protocol for prepares
            return c.execute(f"SHOW {what}").fetchall()  # type: ignore[call-overload]

    def log_text(self) -> str:
        return read_log(self.log)

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        shutil.rmtree(self.base, ignore_errors=True)
