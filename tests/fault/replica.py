"""A primary and a streaming replica of it, on two free ports (R18: failover).

The primary is a `Cluster` (tests/fault/cluster.py) with fsync on, wal_level
replica and a `host replication` line trusting 127.0.0.1. The replica is
`pg_basebackup -R` of the running primary into a second data directory (as the
postgres system user, like initdb and pg_ctl), started on its own port. With
`synchronous=True` the primary (once the replica streams) waits, for every commit, until the replica has
*applied* it (`synchronous_commit=remote_apply`, `synchronous_standby_names`
naming the replica), so whatever a client saw committed is on the replica.

The replica's own settings never name a synchronous standby, so once promoted
it commits alone (a promoted replica that kept the primary's
`synchronous_standby_names` would wait forever for a standby it does not have).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from tests.fault.cluster import PG_BIN, PG_USER, Cluster

STANDBY_NAME = "pgq_r18_standby"


class Replica(Cluster):
    """The streaming replica: a base backup of `primary`, not an initdb."""

    def __init__(self, primary: Cluster) -> None:
        super().__init__(fsync=True)
        self.primary = primary

    def primary_conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.primary.port} user={PG_USER} application_name={STANDBY_NAME}"

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.base, PG_USER, PG_USER)
        self._as_pg(
            str(PG_BIN / "pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.primary.port),
            "-U",
            PG_USER,
            "-D",
            str(self.data),
            "-R",  # standby.signal + primary_conninfo
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        )
        # postgresql.auto.conf came from the primary: the later lines below win.
        conf = {
            "port": str(self.port),
            "unix_socket_directories": f"'{self.base}'",
            "primary_conninfo": f"'{self.primary_conninfo()}'",
            "hot_standby": "on",
            "synchronous_standby_names": "''",
            "synchronous_commit": "on",
        }
        with open(self.data / "postgresql.auto.conf", "a") as f:
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")

    def in_recovery(self) -> bool:
        with self.admin() as a:
            row = a.execute("SELECT pg_is_in_recovery() AS r").fetchone()
        return bool(row and row["r"])

    def wal_receiver_pid(self) -> int | None:
        with self.admin() as a:
            row = a.execute("SELECT pid FROM pg_stat_wal_receiver WHERE status = 'streaming'").fetchone()
        return int(row["pid"]) if row else None

    def disconnect(self) -> None:
        """Cut the replication link: the replica's WAL receiver stops (the replica lags from here)."""
        with self.admin() as a:
            a.execute("ALTER SYSTEM SET primary_conninfo = ''")
            a.execute("SELECT pg_reload_conf()")
        end = time.monotonic() + 30
        while self.wal_receiver_pid() is not None:
            if time.monotonic() > end:
                raise TimeoutError("the replica's WAL receiver did not stop")
            time.sleep(0.02)

    def promote(self) -> float:
        """pg_ctl promote -w; the seconds until it accepts writes."""
        t0 = time.monotonic()
        self.pg_ctl("-w", "-t", "60", "promote")
        return time.monotonic() - t0


class Pair:
    """A primary and its streaming replica; `dsn()` is the multi-host conninfo of both."""

    def __init__(self, primary: Cluster, replica: Replica, synchronous: bool) -> None:
        self.primary = primary
        self.replica = replica
        self.synchronous = synchronous

    def dsn(self, dbname: str, **extra: Any) -> str:
        parts = [
            "host=127.0.0.1,127.0.0.1",
            f"port={self.primary.port},{self.replica.port}",
            f"user={PG_USER} dbname={dbname} target_session_attrs=read-write",
        ]
        parts += [f"{k}={v}" for k, v in extra.items()]
        return " ".join(parts)

    def new_db(self) -> str:
        """A migrated database (with the ledger) made on the primary; the multi-host DSN to it."""
        name = psycopg.conninfo.conninfo_to_dict(self.primary.new_db())["dbname"]
        assert isinstance(name, str)
        self.wait_replayed()
        return self.dsn(name)

    def wait_streaming(self, timeout: float = 30) -> None:
        want = "sync" if self.synchronous else "async"
        end = time.monotonic() + timeout
        while True:
            with self.primary.admin() as a:
                row = a.execute(
                    "SELECT sync_state FROM pg_stat_replication "
                    "WHERE application_name = %s AND state = 'streaming'",
                    (STANDBY_NAME,),
                ).fetchone()
            if row and row["sync_state"] == want:
                return
            if time.monotonic() > end:
                raise TimeoutError(f"the replica is not streaming ({want}): {row}")
            time.sleep(0.05)

    def wait_replayed(self, timeout: float = 30) -> None:
        """Until the replica has replayed everything the primary has written so far."""
        with self.primary.admin() as a:
            row = a.execute("SELECT pg_current_wal_lsn() AS lsn").fetchone()
        assert row is not None
        lsn = row["lsn"]
        end = time.monotonic() + timeout
        while True:
            with self.replica.admin() as a:
                r = a.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn AS ok", (lsn,)).fetchone()
            if r and r["ok"]:
                return
            if time.monotonic() > end:
                raise TimeoutError("the replica did not catch up")
            time.sleep(0.02)


#: The primary's replication settings (wal_level and max_wal_senders are the defaults, made explicit).
PRIMARY_SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "5",
    "wal_keep_size": "'256MB'",
    "hot_standby": "on",
}


@contextmanager
def replica_pair(*, synchronous: bool, golden: Path | None = None) -> Iterator[Pair]:
    """A running primary (fsync on) and a streaming replica of it; both destroyed on exit.

    The primary's template database is made (or copied from `golden`) before the base backup,
    so `Pair.new_db()` is a CREATE DATABASE ... TEMPLATE on the primary, replayed by the replica.
    """
    primary = Cluster(fsync=True, settings=PRIMARY_SETTINGS, golden=golden)
    replica: Replica | None = None
    try:
        primary.init()
        with open(primary.data / "pg_hba.conf", "a") as f:
            f.write("host replication all 127.0.0.1/32 trust\n")
        primary.start()
        if golden is None:
            primary.make_template()
        replica = Replica(primary)
        replica.init()
        replica.start()
        if synchronous:
            # Only now: with no standby connected, a synchronous commit would wait forever.
            with primary.admin() as a:
                a.execute("ALTER SYSTEM SET synchronous_commit = 'remote_apply'")
                a.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
                a.execute("SELECT pg_reload_conf()")
        pair = Pair(primary, replica, synchronous)
        pair.wait_streaming()
        yield pair
    finally:
        if replica is not None:
            replica.destroy()
        primary.destroy()
