"""Churn soak (RELIABILITY R15): bloat, the xmin horizon and xids per job under steady churn.

    python benchmarks/soak.py [--dsn postgresql://root@127.0.0.1:5432/postgres | --own-cluster]
                              [--jobs 100000] [--rate 1000] [--interval 10] [--hold 60]
                              [--fillfactor N] [--autovacuum-defaults] [--json]

Creates a scratch database (dropped at the end); with `--own-cluster`, first a private
PostgreSQL cluster (initdb on a free port, autovacuum on with `--naptime`, fsync off;
removed at the end), since autovacuum may be off on a shared CI server and the xid
counter is cluster-wide. Two processes besides this one:

  enqueuer  pgq.Client.enqueue, one task per transaction, at `--rate` per second on an
            absolute schedule, each with `retention=--retention` (so the worker marks
            it completed and the cleaner deletes it; 0: deleted at completion).
  worker    a pgq.Server (async no-op handler, `--concurrency`, the cleaner every
            `--clean-interval` s). The handler records enqueue-to-start: the task's
            enqueued_at (database clock) against its own start, put on the database
            clock with an offset measured once at start-up (the claim latency a user
            sees: commit, wake-up, claim, dispatch).

Phases, one JSON line per `--interval` seconds (and a summary line at the end):

  A  steady churn until `--jobs` tasks have been enqueued (and two lines printed).
  B  another connection of the scratch database opens a REPEATABLE READ transaction,
     runs a SELECT on pgq.task and stays idle in it for `--hold` seconds (the churn goes
     on). pgq.Inspector(dsn).doctor(long_transaction=--long-transaction) runs every
     second until it names the blocker's pid: the time to detect, from BEGIN.
  R  the transaction ends (the churn goes on); recovered at the first interval whose
     n_dead_tup is at most max(2 x the median of phase A, 1,000) and whose growth of
     pg_total_relation_size(pgq.task) is no more than phase A's largest growth per
     interval over its last half (at least 64 kB): the time to recover, from the end of
     the transaction. Gives up after `--recover-timeout` s.

Each interval line: sizes of pgq.task (total, heap, indexes), n_live_tup, n_dead_tup,
autovacuum_count / last_autovacuum, jobs enqueued and started, claim p50/p99/max (ms)
over the interval, xids per job (delta of pg_current_xact_id() read by this process,
minus its own, over the jobs started; cluster-wide, so other databases' writes count
too: use --own-cluster for a clean figure) and transactions per job (this database's
xact_commit + xact_rollback, read-only ones included), and doctor's level and whether
it names the blocker.

Compare pgq's table settings (fillfactor 90, autovacuum scale factors 0.01 / 0.02) with
`--fillfactor 100 --autovacuum-defaults` (RESET to the server's). Nightly size:
`--own-cluster --jobs 1000000 --hold 600 --interval 60`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from _scratch import scratch_db
from psycopg.rows import dict_row

import pgq

QUEUE = "soak"
PG_BIN = Path(os.environ.get("PGQ_BENCH_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


# ------------------------------------------------------------------ a private cluster


@contextlib.contextmanager
def own_cluster(naptime: float) -> Iterator[str]:
    """A throw-away PostgreSQL cluster with autovacuum on; yields its admin DSN."""
    base = Path(tempfile.mkdtemp(prefix="pgq-soak-"))
    data, log = base / "data", base / "postgres.log"
    as_root = os.geteuid() == 0

    def as_pg(*argv: str) -> None:
        cmd = ["runuser", "-u", PG_USER, "--", *argv] if as_root else list(argv)
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    try:
        if as_root:
            shutil.chown(base, PG_USER, PG_USER)
        as_pg(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", PG_USER, "--no-sync")
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": f"'{base}'",
            "fsync": "off",
            "full_page_writes": "off",
            "autovacuum": "on",
            "autovacuum_naptime": f"'{naptime}s'",
            "log_min_messages": "warning",
        }
        with open(data / "postgresql.auto.conf", "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        as_pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start")
        yield f"postgresql://{PG_USER}@127.0.0.1:{port}/postgres"
    finally:
        with contextlib.suppress(Exception):
            as_pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ the two processes


def _enqueue_process(dsn: str, rate: float, retention: float, stop: Any, count: Any) -> None:
    logging.basicConfig(level=logging.WARNING)
    opts: dict[str, Any] = {"queue": QUEUE}
    if retention > 0:
        opts["retention"] = retention
    with pgq.Client(dsn) as client:
        start = time.monotonic()
        k = 0
        while not stop.is_set():
            delay = start + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(min(delay, 0.1))
                continue
            client.enqueue(pgq.Task("noop", {"i": k}), **opts)
            k += 1
            count.value = k


def _db_clock_offset(dsn: str) -> float:
    """Database clock minus this machine's clock (s), from the fastest of 7 round trips."""
    best: tuple[float, float] | None = None
    with psycopg.connect(dsn, autocommit=True) as c:
        for _ in range(7):
            t0 = time.time()
            row = c.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
            t1 = time.time()
            assert row is not None
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, row[0] - (t0 + t1) / 2)
    assert best is not None
    return best[1]


def _worker_process(
    dsn: str, concurrency: int, clean_interval: float, ready: Any, stop: Any, out: Any
) -> None:
    logging.basicConfig(level=logging.WARNING)
    offset = _db_clock_offset(dsn)
    lock = threading.Lock()
    box: list[list[float]] = [[]]

    async def noop(task: pgq.Task) -> None:
        started = time.time() + offset
        enqueued = task.enqueued_at
        assert enqueued is not None
        with lock:
            box[0].append(started - enqueued.timestamp())

    mux = pgq.ServeMux()
    mux.handle("noop", noop)
    server = pgq.Server(dsn, queues={QUEUE: 1}, concurrency=concurrency, clean_interval=clean_interval)
    server.start(mux)
    ready.set()

    def ship() -> None:
        with lock:
            batch, box[0] = box[0], []
        if batch:
            out.put(batch)

    while not stop.wait(0.2):
        ship()
    server.shutdown()
    ship()
    out.put(None)


# ------------------------------------------------------------------ sampling

STATS = """
SELECT pg_total_relation_size('pgq.task') AS total_bytes,
       pg_relation_size('pgq.task') AS heap_bytes,
       pg_indexes_size('pgq.task') AS index_bytes,
       s.n_live_tup, s.n_dead_tup, s.autovacuum_count, s.vacuum_count,
       s.last_autovacuum::text AS last_autovacuum,
       d.xact_commit + d.xact_rollback AS xacts
FROM pg_stat_user_tables s, pg_stat_database d
WHERE s.relid = 'pgq.task'::regclass AND d.datname = current_database()
"""


class Soak:
    def __init__(self, dsn: str, args: argparse.Namespace) -> None:
        self.dsn, self.args = dsn, args
        self.lines: list[dict[str, Any]] = []
        self.lat: list[float] = []  # latencies since the last line (s)
        self.lat_by_phase: dict[str, list[float]] = {"A": [], "B": [], "R": []}
        self.started = 0
        self.phase = "A"
        self.blocker: psycopg.Connection[Any] | None = None
        self.blocker_pid: int | None = None
        self.t_block = self.t_release = math.nan
        self.detect_s: float | None = None
        self.detect_message: str | None = None
        self.recover_s: float | None = None
        self.first_av_after_release_s: float | None = None
        self.latency_recovered_s: float | None = None
        self.av_at_release = 0
        self.next_doctor = 0.0
        self.inspector = pgq.Inspector(dsn)
        self.c = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)

    def xid(self) -> int:
        row = self.c.execute("SELECT pg_current_xact_id()::text::bigint AS x").fetchone()
        assert row is not None
        return int(row["x"])

    def stats(self) -> dict[str, Any]:
        row = self.c.execute(STATS).fetchone()
        assert row is not None
        return dict(row)

    def doctor(self) -> tuple[str, bool, str | None]:
        rep = self.inspector.doctor(long_transaction=self.args.long_transaction)
        for f in rep.findings:
            if f.check == "long_transaction" and f.level != "ok" and f.values.get("pid") == self.blocker_pid:
                return rep.level, True, f.message
        return rep.level, False, None

    def block(self) -> None:
        self.blocker = psycopg.connect(self.dsn, autocommit=True)
        self.blocker_pid = self.blocker.info.backend_pid
        self.blocker.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        self.blocker.execute("SELECT count(*) FROM pgq.task").fetchone()
        self.t_block = time.monotonic()

    def release(self) -> None:
        assert self.blocker is not None
        self.blocker.execute("COMMIT")
        self.blocker.close()
        self.t_release = time.monotonic()
        self.av_at_release = self.stats()["autovacuum_count"]

    def phase_a(self) -> list[dict[str, Any]]:
        return [x for x in self.lines if x["phase"] == "A"]

    def recovered(self, line: dict[str, Any], prev: dict[str, Any]) -> bool:
        a = self.phase_a()
        dead_limit = max(2 * statistics.median(x["n_dead_tup"] for x in a), 1000)
        half = a[len(a) // 2 :]
        growth = [y["task_total_bytes"] - x["task_total_bytes"] for x, y in itertools.pairwise(half)]
        size_limit = max([65536, *growth])
        return bool(
            line["n_dead_tup"] <= dead_limit
            and line["task_total_bytes"] - prev["task_total_bytes"] <= size_limit
        )

    def run(self, count: Any, out: Any) -> None:
        args = self.args
        t0 = time.monotonic()
        xid0, st0, done0 = self.xid(), self.stats(), 0
        next_line = t0 + args.interval
        while True:
            time.sleep(0.05)
            while True:
                try:
                    batch = out.get_nowait()
                except queue.Empty:
                    break
                if batch:
                    self.lat.extend(batch)
                    self.lat_by_phase[self.phase].extend(batch)
                    self.started += len(batch)
            now = time.monotonic()
            if self.phase == "A" and count.value >= args.jobs and len(self.lines) >= 2:
                self.block()
                self.phase = "B"
            elif self.phase == "B":
                if self.detect_s is None and now >= self.next_doctor:
                    self.next_doctor = now + 1.0
                    _, named, msg = self.doctor()
                    if named:
                        self.detect_s = round(time.monotonic() - self.t_block, 2)
                        self.detect_message = msg
                if now - self.t_block >= args.hold:
                    self.release()
                    self.phase = "R"
            if now < next_line:
                continue
            next_line += args.interval
            xid1, st1 = self.xid(), self.stats()
            jobs = self.started - done0
            level, named, _ = self.doctor()
            line = {
                "phase": self.phase,
                "elapsed_s": round(now - t0, 1),
                "jobs_enqueued": count.value,
                "jobs_done": self.started,
                "interval_jobs": jobs,
                "task_total_bytes": st1["total_bytes"],
                "task_heap_bytes": st1["heap_bytes"],
                "task_index_bytes": st1["index_bytes"],
                "n_live_tup": st1["n_live_tup"],
                "n_dead_tup": st1["n_dead_tup"],
                "autovacuum_count": st1["autovacuum_count"],
                "vacuum_count": st1["vacuum_count"],
                "last_autovacuum": st1["last_autovacuum"],
                "claim_p50_ms": _ms(pct(self.lat, 50)),
                "claim_p99_ms": _ms(pct(self.lat, 99)),
                "claim_max_ms": _ms(max(self.lat, default=None)),
                # minus 1: this process's own pg_current_xact_id() of the previous reading
                "xids_per_job": round((xid1 - xid0 - 1) / jobs, 3) if jobs else None,
                "xacts_per_job": round((st1["xacts"] - st0["xacts"]) / jobs, 3) if jobs else None,
                "doctor_level": level,
                "doctor_names_blocker": named,
            }
            if self.phase == "R":
                since = now - self.t_release
                if self.first_av_after_release_s is None and st1["autovacuum_count"] > self.av_at_release:
                    self.first_av_after_release_s = round(since, 1)
                a_p99 = pct(self.lat_by_phase["A"], 99)
                if self.latency_recovered_s is None and a_p99 is not None and self.lat:
                    if (pct(self.lat, 99) or 0) <= 2 * a_p99:
                        self.latency_recovered_s = round(since, 1)
                if self.recover_s is None and self.recovered(line, self.lines[-1]):
                    self.recover_s = round(since, 1)
                line["recovered"] = self.recover_s is not None
            self.lines.append(line)
            print(json.dumps(line), flush=True)
            xid0, st0, done0 = self.xid(), st1, self.started
            self.lat = []
            if self.phase == "R" and (
                self.recover_s is not None or now - self.t_release >= args.recover_timeout
            ):
                return

    def summary(self, settings: dict[str, Any], wall: float) -> dict[str, Any]:
        a = self.phase_a()
        half = a[len(a) // 2 :] or a
        sizes = [x["task_total_bytes"] for x in half]
        b = [x for x in self.lines if x["phase"] == "B"]
        jobs_a = sum(x["interval_jobs"] for x in a)

        def per_job(key: str, xs: list[dict[str, Any]]) -> float | None:
            pairs = [(x[key] * x["interval_jobs"], x["interval_jobs"]) for x in xs if x[key] is not None]
            n = sum(p[1] for p in pairs)
            return round(sum(p[0] for p in pairs) / n, 3) if n else None

        la, lb = self.lat_by_phase["A"], self.lat_by_phase["B"]
        peak = max(self.lines, key=lambda x: x["task_total_bytes"])
        return {
            "bench": "soak",
            **settings,
            "wall_s": round(wall, 1),
            "jobs_done": self.started,
            "phase_a": {
                "jobs": jobs_a,
                "intervals": len(a),
                "rate_per_s": round(jobs_a / (len(a) * self.args.interval), 1) if a else None,
                "enqueued_per_s": round(a[-1]["jobs_enqueued"] / a[-1]["elapsed_s"], 1) if a else None,
                "size_last_half_min_bytes": min(sizes) if sizes else None,
                "size_last_half_max_bytes": max(sizes) if sizes else None,
                "size_max_over_min": round(max(sizes) / min(sizes), 3) if sizes else None,
                "size_flat": bool(sizes) and max(sizes) <= 1.1 * min(sizes),
                "n_dead_tup_median": statistics.median(x["n_dead_tup"] for x in a) if a else None,
                "autovacuums": (a[-1]["autovacuum_count"] - a[0]["autovacuum_count"]) if a else None,
                "claim_p50_ms": _ms(pct(la, 50)),
                "claim_p99_ms": _ms(pct(la, 99)),
                "xids_per_job": per_job("xids_per_job", a),
                "xacts_per_job": per_job("xacts_per_job", a),
            },
            "phase_b": {
                "hold_s": self.args.hold,
                "blocker_pid": self.blocker_pid,
                "doctor_long_transaction_s": self.args.long_transaction,
                "detected": self.detect_s is not None,
                "detect_s": self.detect_s,
                "doctor_message": self.detect_message,
                "n_dead_tup_end": b[-1]["n_dead_tup"] if b else None,
                "size_end_bytes": b[-1]["task_total_bytes"] if b else None,
                "claim_p99_ms": _ms(pct(lb, 99)),
            },
            "recovery": {
                "recovered": self.recover_s is not None,
                "recover_s": self.recover_s,
                "first_autovacuum_after_s": self.first_av_after_release_s,
                "claim_p99_back_s": self.latency_recovered_s,
                "claim_p99_ms": _ms(pct(self.lat_by_phase["R"], 99)),
            },
            "size_peak_bytes": peak["task_total_bytes"],
            "xids_per_job": per_job("xids_per_job", self.lines),
        }


def prepare(dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    """Apply --fillfactor / --autovacuum-defaults; the settings the run had."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as c:
        if args.fillfactor is not None:
            c.execute(f"ALTER TABLE pgq.task SET (fillfactor = {int(args.fillfactor)})")
        if args.autovacuum_defaults:
            c.execute(
                "ALTER TABLE pgq.task RESET (autovacuum_vacuum_scale_factor, autovacuum_analyze_scale_factor)"
            )
        c.execute("INSERT INTO pgq.queue (name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (QUEUE,))
        rel = c.execute("SELECT reloptions FROM pg_class WHERE oid = 'pgq.task'::regclass").fetchone()
        gucs = c.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('autovacuum', 'autovacuum_naptime', "
            "'server_version', 'fsync')"
        ).fetchall()
    g = {r["name"]: r["setting"] for r in gucs}
    return {
        "jobs": args.jobs,
        "rate": args.rate,
        "interval_s": args.interval,
        "retention_s": args.retention,
        "clean_interval_s": args.clean_interval,
        "concurrency": args.concurrency,
        "task_reloptions": (rel or {}).get("reloptions"),
        "own_cluster": args.own_cluster,
        "server": {
            "version": g.get("server_version"),
            "autovacuum": g.get("autovacuum"),
            "autovacuum_naptime_s": g.get("autovacuum_naptime"),
            "fsync": g.get("fsync"),
        },
    }


def soak(admin: str, args: argparse.Namespace) -> None:
    with scratch_db(admin, prefix="pgq_soak") as dsn:
        settings = prepare(dsn, args)
        if settings["server"]["autovacuum"] != "on":
            print(
                "soak: autovacuum is off on this server: dead tuples are only pruned, never vacuumed "
                "(use --own-cluster)",
                file=sys.stderr,
            )
        ctx = multiprocessing.get_context("spawn")
        ready, stop_w, stop_e, out = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
        count = ctx.RawValue("q", 0)
        worker = ctx.Process(
            target=_worker_process,
            args=(dsn, args.concurrency, args.clean_interval, ready, stop_w, out),
            daemon=True,
        )
        enq = ctx.Process(
            target=_enqueue_process, args=(dsn, args.rate, args.retention, stop_e, count), daemon=True
        )
        worker.start()
        s: Soak | None = None
        try:
            if not ready.wait(60):
                raise RuntimeError("the worker process did not start")
            s = Soak(dsn, args)
            t0 = time.monotonic()
            enq.start()
            s.run(count, out)
            wall = time.monotonic() - t0
        finally:
            stop_e.set()
            enq.join(30)
            stop_w.set()
            with contextlib.suppress(Exception):
                while out.get(timeout=30) is not None:
                    pass
            worker.join(30)
            if s is not None:
                if s.blocker is not None and not s.blocker.closed:
                    s.blocker.close()
                s.c.close()
        summary = s.summary(settings, wall)
        print(json.dumps({"summary": summary}), flush=True)
        if not args.json:
            a, b, r = summary["phase_a"], summary["phase_b"], summary["recovery"]
            print(
                f"phase A: {a['jobs']} jobs at {a['rate_per_s']}/s, size (last half) "
                f"{a['size_last_half_min_bytes']}..{a['size_last_half_max_bytes']} B "
                f"(flat: {a['size_flat']}), claim p99 {a['claim_p99_ms']} ms, xids/job {a['xids_per_job']}; "
                f"phase B ({b['hold_s']} s): doctor named pid {b['blocker_pid']}: {b['detected']} "
                f"after {b['detect_s']} s; recovered: {r['recovered']} after {r['recover_s']} s",
                file=sys.stderr,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--dsn", default=os.environ.get("PGQ_BENCH_DSN", "postgresql://root@127.0.0.1:5432/postgres")
    )
    ap.add_argument("--own-cluster", action="store_true", help="run on a private cluster with autovacuum on")
    ap.add_argument("--naptime", type=float, default=60.0, help="autovacuum_naptime of --own-cluster (s)")
    ap.add_argument("--jobs", type=int, default=100_000, help="jobs enqueued in phase A")
    ap.add_argument("--rate", type=float, default=1000.0, help="enqueues per second, all phases")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between JSON lines")
    ap.add_argument("--hold", type=float, default=60.0, help="phase B: seconds the transaction stays open")
    ap.add_argument(
        "--long-transaction", type=float, default=None, help="doctor's threshold (s); default min(60, hold/3)"
    )
    ap.add_argument("--recover-timeout", type=float, default=300.0, help="give up recovery after this (s)")
    ap.add_argument("--fillfactor", type=int, default=None, help="ALTER TABLE pgq.task SET (fillfactor=N)")
    ap.add_argument(
        "--autovacuum-defaults", action="store_true", help="RESET pgq.task's per-table autovacuum settings"
    )
    ap.add_argument("--retention", type=float, default=1.0, help="retention of each task (s); 0: none")
    ap.add_argument("--clean-interval", type=float, default=1.0, help="the cleaner's interval (s)")
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print only the JSON lines")
    args = ap.parse_args()
    if args.long_transaction is None:
        args.long_transaction = min(60.0, args.hold / 3)
    if args.fillfactor is not None and not 10 <= args.fillfactor <= 100:
        ap.error("--fillfactor must be between 10 and 100")
    logging.basicConfig(level=logging.WARNING)
    if args.own_cluster:
        with own_cluster(args.naptime) as admin:
            soak(admin, args)
    else:
        soak(args.dsn, args)


if __name__ == "__main__":
    main()
