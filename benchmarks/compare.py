"""pgq side by side with PGQueuer, Procrastinate and a plain-SQL reference: one command, one report.

    python benchmarks/compare.py            # full run (~8 min on 2 cores), prints the report
    python benchmarks/compare.py --quick    # ~1 minute smoke run, the same workloads smaller
    python benchmarks/compare.py --update-docs   # also puts the report into docs/benchmarks.md

Run it with pgq's interpreter (the environment where `pgq` is installed). Each peer is
installed into its own virtualenv under benchmarks/.venvs (created on first use,
reused while its pinned requirements are unchanged): PGQueuer installs a `pgq`
command of its own, so peers never share pgq's environment.

Every measurement runs one workload script (benchmarks/peers/<system>.py, see
peers/_common.py for the protocols) in a fresh scratch database on the same
PostgreSQL (created before and dropped after). Systems alternate round by round (the
order rotates each round), and every ratio to pgq is computed inside one round
before the median over rounds is taken, so a burst of load from elsewhere on the
machine hits both sides of a ratio alike. The report is written to
benchmarks/.results/<timestamp>.md as well as printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from _scratch import dsn_for

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
VENVS = HERE / ".venvs"
RESULTS = HERE / ".results"
DOCS = HERE.parent / "docs" / "benchmarks.md"
DEFAULT_DSN = "postgresql://root@127.0.0.1:5432/postgres"

#: Peer environments: pinned so that a report names exactly what it measured.
VENV_REQUIREMENTS: dict[str, list[str]] = {
    "pgqueuer": ["pgqueuer==1.6.0", "psycopg[binary]>=3.2", "asyncpg>=0.29"],
    "procrastinate": ["procrastinate==3.10.0", "psycopg[binary]>=3.2", "psycopg-pool>=3.2"],
    "oban": ["oban==0.7.0", "psycopg[binary]>=3.2"],
}
#: Interpreter for a peer environment when the peer needs a newer Python than pgq's.
VENV_PYTHON: dict[str, tuple[int, int]] = {"oban": (3, 12)}


@dataclass(frozen=True)
class System:
    key: str
    label: str
    script: str
    venv: str | None = None  # None: pgq's own interpreter (sys.executable)
    args: tuple[str, ...] = ()
    workloads: frozenset[str] | None = None  # None: every workload
    settings: str = ""

    def python(self) -> str:
        return sys.executable if self.venv is None else str(VENVS / self.venv / "bin" / "python")


SYSTEMS: list[System] = [
    System(
        "pgq",
        "pgq",
        "pgq_bench.py",
        args=("--concurrency", "100"),
        settings="`Client(dsn)` (sync) and `enqueue_many`; `Server(concurrency=100)`, async handler, "
        "one Server per process",
    ),
    System(
        "pgq-async",
        "pgq (AsyncClient)",
        "pgq_bench.py",
        args=("--client", "async"),
        workloads=frozenset({"enqueue", "bulk"}),
        settings="`AsyncClient(dsn)`",
    ),
    System(
        "pgq-c10",
        "pgq (concurrency=10)",
        "pgq_bench.py",
        args=("--concurrency", "10"),
        workloads=frozenset({"drain1", "drain2"}),
        settings="`Server(concurrency=10)`, pgq's default",
    ),
    System(
        "sql",
        "plain SQL (reference)",
        "handrolled.py",
        settings="psycopg 3 sync; INSERT per transaction / INSERT..unnest; claim 100 with SKIP LOCKED, "
        "one DELETE per batch; LISTEN on a dedicated connection",
    ),
    System(
        "pgqueuer",
        "PGQueuer (psycopg)",
        "pgqueuer_bench.py",
        venv="pgqueuer",
        args=("--driver", "psycopg"),
        settings="`PsycopgDriver(AsyncConnection(autocommit=True))`; `QueueManager.run()` defaults: "
        "batch_size=10, no max_concurrent_tasks; entrypoint concurrency_limit=0; async entrypoint",
    ),
    System(
        "pgqueuer-asyncpg",
        "PGQueuer (asyncpg)",
        "pgqueuer_bench.py",
        venv="pgqueuer",
        args=("--driver", "asyncpg"),
        settings="`AsyncpgDriver(asyncpg.connect())`; otherwise as above",
    ),
    System(
        "pgqueuer-b100",
        "PGQueuer (psycopg, batch_size=100)",
        "pgqueuer_bench.py",
        venv="pgqueuer",
        args=("--driver", "psycopg", "--batch-size", "100"),
        workloads=frozenset({"drain1", "drain2"}),
        settings="as PGQueuer (psycopg) with `run(batch_size=100)`: the claim size pgq runs with",
    ),
    System(
        "oban",
        "Oban for Python",
        "oban_bench.py",
        venv="oban",
        workloads=frozenset({"enqueue", "bulk", "drain1", "drain2", "latency"}),
        settings='`Oban.create_pool(dsn)` (default pool), `Oban(pool, queues={"default": 100})` (the '
        "queue limit is its claim size and concurrency), `@job` async function; `enqueue` / `enqueue_many`",
    ),
    System(
        "procrastinate",
        "Procrastinate",
        "procrastinate_bench.py",
        venv="procrastinate",
        args=("--concurrency", "10"),
        workloads=frozenset({"enqueue", "bulk", "drain1", "drain2", "latency"}),
        settings="`PsycopgConnector` (default pool); async task; `run_worker_async(concurrency=10)`, "
        "listen_notify=True, jobs kept (delete_jobs=never, the default); `defer_async` / "
        "`batch_defer_async`",
    ),
]
SYSTEM_BY_KEY = {s.key: s for s in SYSTEMS}
#: Extra rows run only with --variants (or when named in --systems).
VARIANTS = ("pgq-async", "pgq-c10")
PEER_ORDER = ["pgqueuer", "pgqueuer-asyncpg", "pgqueuer-b100", "oban", "procrastinate"]


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    script_workload: str
    metric: str  # "rate" (higher is better) or "latency" (p99, lower is better)
    only: frozenset[str] | None = None


WORKLOADS: list[Workload] = [
    Workload("enqueue", "enqueue, one task per transaction (tasks/s)", "enqueue", "rate"),
    Workload("bulk", "bulk enqueue, 10,000 per call (tasks/s)", "bulk", "rate"),
    Workload("drain1", "drain no-op tasks, 1 worker process (tasks/s)", "drain", "rate"),
    Workload("drain2", "drain no-op tasks, 2 worker processes (tasks/s)", "drain", "rate"),
    Workload("latency", "enqueue-to-start latency, idle worker (ms)", "latency", "latency"),
    Workload("aggregation", "aggregation (pgq only)", "aggregation", "aggregation", only=frozenset({"pgq"})),
]
WORKLOAD_BY_KEY = {w.key: w for w in WORKLOADS}


@dataclass
class Sizes:
    rounds: int = 3
    # 2,000 one-task transactions take 1-2 s per system: with 500 (0.2-0.5 s) a hiccup of
    # this shared machine swung the per-round single-enqueue ratios from 0.5x to 2x.
    n_single: int = 2000
    n_bulk: int = 10_000
    bulk_reps: int = 3
    n_drain: int = 5000
    drain_budget: float = 10.0  # a drain still running then is cut short: rate = finished / elapsed
    rate: float = 50.0
    duration: float = 5.0
    agg_n: int = 5000
    agg_group_size: int = 100
    agg_groups: int = 20

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            rounds=1,
            n_single=200,
            bulk_reps=1,
            n_drain=1000,
            drain_budget=6.0,
            duration=1.0,
            agg_n=1000,
            agg_groups=3,
        )

    def args_for(self, w: Workload) -> list[str]:
        if w.key == "enqueue":
            return ["--n", str(self.n_single)]
        if w.key == "bulk":
            return ["--bulk", str(self.n_bulk), "--reps", str(self.bulk_reps)]
        if w.key in ("drain1", "drain2"):
            procs = "1" if w.key == "drain1" else "2"
            return ["--n", str(self.n_drain), "--processes", procs, "--budget", str(self.drain_budget)]
        if w.key == "latency":
            return ["--rate", str(self.rate), "--duration", str(self.duration)]
        if w.key == "aggregation":
            return [
                "--n",
                str(self.agg_n),
                "--group-size",
                str(self.agg_group_size),
                "--groups",
                str(self.agg_groups),
            ]
        raise KeyError(w.key)


@dataclass
class Result:
    system: str
    workload: str
    round: int
    data: dict[str, Any] | None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    started: str = ""
    finished: str = ""
    load_before: str = ""
    load_after: str = ""
    wall: float = 0.0


# -- environments ---------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def find_python(minimum: tuple[int, int]) -> str | None:
    """An interpreter of at least `minimum`: this one, one on PATH, or a pyenv install."""
    if sys.version_info[:2] >= minimum:
        return sys.executable
    candidates = [shutil.which(f"python3.{m}") for m in range(minimum[1], 20)]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if pyenv.is_dir():
        candidates += [str(p / "bin" / "python") for p in sorted(pyenv.iterdir(), reverse=True)]
    for c in candidates:
        if not c or not Path(c).exists():
            continue
        r = subprocess.run(
            [c, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True
        )
        parts = r.stdout.split()
        if r.returncode == 0 and len(parts) == 2 and (int(parts[0]), int(parts[1])) >= minimum:
            return c
    return None


def ensure_venv(name: str) -> str | None:
    """Create or reuse the peer's virtualenv; returns why it cannot be had, or None."""
    reqs = VENV_REQUIREMENTS[name]
    path = VENVS / name
    marker = path / ".pgq-bench-requirements"
    want = "\n".join(reqs) + "\n"
    if marker.exists() and marker.read_text() == want and (path / "bin" / "python").exists():
        return None
    base: str | None = sys.executable
    if name in VENV_PYTHON:
        base = find_python(VENV_PYTHON[name])
        if base is None:
            v = ".".join(map(str, VENV_PYTHON[name]))
            return f"{name} needs Python >= {v} and none was found (PATH, pyenv)"
    log(f"[setup] creating {path} with {' '.join(reqs)}")
    if path.exists():
        shutil.rmtree(path)
    subprocess.run([base, "-m", "venv", str(path)], check=True)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    r = subprocess.run([*pip, *reqs])
    if r.returncode != 0:
        return f"pip install {' '.join(reqs)} failed (rc={r.returncode})"
    marker.write_text(want)
    return None


def versions(system: System) -> str:
    code = (
        "import importlib.metadata as m, sys\n"
        "out=[]\n"
        "for d in ('pgq-jobs','pgqueuer','procrastinate','oban','psycopg','psycopg-pool','asyncpg'):\n"
        "    try: out.append(d+' '+m.version(d))\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(', '.join(out) + ', Python ' + sys.version.split()[0])\n"
    )
    r = subprocess.run([system.python(), "-c", code], capture_output=True, text=True)
    return r.stdout.strip() or r.stderr.strip()


# -- databases ------------------------------------------------------------------------------


class Scratch:
    """A scratch database, created on entry and dropped (WITH FORCE) on exit."""

    def __init__(self, admin_dsn: str, tag: str) -> None:
        self.admin = admin_dsn
        self.name = f"pgqbench_{tag}_{uuid.uuid4().hex[:8]}".replace("-", "_")

    def __enter__(self) -> str:
        with psycopg.connect(self.admin, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{self.name}"')
        return dsn_for(self.admin, self.name)

    def __exit__(self, *exc: object) -> None:
        with psycopg.connect(self.admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


# -- running --------------------------------------------------------------------------------


def run_one(admin_dsn: str, system: System, w: Workload, sizes: Sizes, rnd: int, timeout: float) -> Result:
    cmd = [system.python(), str(PEERS / system.script), w.script_workload]
    t0 = time.monotonic()
    with Scratch(admin_dsn, f"{system.key}_{w.key}") as dsn:
        cmd += ["--dsn", dsn, *system.args, *sizes.args_for(w)]
        # Own process group: on a timeout or Ctrl-C the script and its workers go together.
        p = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE, start_new_session=True
        )
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except BaseException as exc:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            if isinstance(exc, subprocess.TimeoutExpired):
                return Result(
                    system.key, w.key, rnd, None, f"timed out after {timeout:.0f} s", time.monotonic() - t0
                )
            raise
    elapsed = time.monotonic() - t0
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["(no stderr)"])[-3:]
        return Result(system.key, w.key, rnd, None, f"rc={p.returncode}: {' | '.join(tail)}", elapsed)
    return Result(system.key, w.key, rnd, json.loads(lines[-1]), None, elapsed)


def uptime() -> str:
    try:
        with open("/proc/loadavg") as f:
            a, b, c_, *_ = f.read().split()
        return f"load average {a}, {b}, {c_}"
    except OSError:
        return "load average unknown"


def applies(system: System, w: Workload) -> bool:
    if w.only is not None and system.key not in w.only:
        return False
    return system.workloads is None or w.key in system.workloads


def run_all(args: argparse.Namespace, systems: list[System], workloads: list[Workload], sizes: Sizes) -> Run:
    run = Run(started=dt.datetime.now().astimezone().isoformat(timespec="seconds"), load_before=uptime())
    t_start = time.monotonic()
    for rnd in range(sizes.rounds):
        for w in workloads:
            order = [s for s in systems if applies(s, w)]
            if not order:
                continue
            k = rnd % len(order)
            order = order[k:] + order[:k]  # alternate: a different system goes first each round
            for s in order:
                r = run_one(args.dsn, s, w, sizes, rnd, args.timeout)
                run.results.append(r)
                what = r.error if r.error else _short(w, r.data or {})
                log(f"[round {rnd + 1}/{sizes.rounds}] {w.key:<11} {s.label:<24} {what}  ({r.seconds:.1f} s)")
    run.wall = time.monotonic() - t_start
    run.finished = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    run.load_after = uptime()
    return run


def _short(w: Workload, d: dict[str, Any]) -> str:
    if w.metric == "rate":
        return f"{d['rate']:,.0f}/s"
    if w.metric == "latency":
        return f"p50 {d['p50']:.2f} p95 {d['p95']:.2f} p99 {d['p99']:.2f} ms ({d['samples']}/{d['sent']})"
    return ", ".join(f"{k}={v:,.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


# -- the report -----------------------------------------------------------------------------


def _val(r: Result, w: Workload) -> float | None:
    if r.data is None:
        return None
    return float(r.data["rate"] if w.metric == "rate" else r.data["p99"])


def _fmt(x: float, w: Workload) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:,.0f}" if w.metric == "rate" else f"{x:.2f}"


def _span(xs: list[float], fmt: Any) -> str:
    if not xs:
        return "n/a"
    return f"{fmt(min(xs))}\u2013{fmt(max(xs))}"


def per_round(run: Run, w: Workload, system: str) -> dict[int, Result]:
    return {
        r.round: r for r in run.results if r.workload == w.key and r.system == system and r.data is not None
    }


def ratios(run: Run, w: Workload, system: str, base: str = "pgq") -> list[float]:
    """system / base, within each round where both have a result."""
    a, b = per_round(run, w, system), per_round(run, w, base)
    out = []
    for rnd in sorted(set(a) & set(b)):
        va, vb = _val(a[rnd], w), _val(b[rnd], w)
        if va and vb:
            out.append(va / vb)
    return out


def report(
    run: Run, systems: list[System], workloads: list[Workload], sizes: Sizes, args: argparse.Namespace
) -> str:
    out: list[str] = []
    mode = "quick" if args.quick else "full"
    out.append(
        f"Run ({mode}): {run.started} → {run.finished}, {run.wall / 60:.1f} min, {sizes.rounds} round(s). "
    )
    out.append(f"Machine load: {run.load_before} before, {run.load_after} after.")
    out.append("")
    out.append(
        "Throughputs in tasks/s, latency in ms; medians over rounds with min\u2013max. "
        "'x pgq' is system ÷ pgq computed within each round, then the median (min\u2013max) "
        "of those per-round ratios: above 1 the system is faster (throughput) or slower "
        "(latency) than pgq."
    )
    out.append("")
    out.append("| workload | system | median | min\u2013max | x pgq |")
    out.append("|---|---|---:|---:|---:|")
    for w in workloads:
        if w.metric == "aggregation":
            continue
        for s in systems:
            if not applies(s, w):
                continue
            rs = per_round(run, w, s.key)
            errs = [r.error for r in run.results if r.workload == w.key and r.system == s.key and r.error]
            if not rs:
                out.append(f"| {w.title} | {s.label} | failed | {errs[0] if errs else ''} | |")
                continue
            vals = [_val(r, w) for r in rs.values()]
            vals = [v for v in vals if v is not None]
            med = statistics.median(vals)
            if w.metric == "latency":
                p50 = statistics.median(r.data["p50"] for r in rs.values() if r.data)
                p95 = statistics.median(r.data["p95"] for r in rs.values() if r.data)
                cell = f"p50 {p50:.2f} / p95 {p95:.2f} / **p99 {med:.2f}**"
                span = "p99 " + _span(vals, lambda x: f"{x:.2f}")
            else:
                cell = f"**{_fmt(med, w)}**"
                span = _span(vals, lambda x, w=w: _fmt(x, w))
            if s.key == "pgq":
                rat = "1"
            else:
                rr = ratios(run, w, s.key)
                rat = f"{statistics.median(rr):.2f} ({min(rr):.2f}\u2013{max(rr):.2f})" if rr else "n/a"
            note = f" ({len(errs)} failed)" if errs else ""
            slow = [r.data["first_s"] for r in rs.values() if r.data and (r.data.get("first_s") or 0) > 0.5]
            if slow:
                firsts = ", ".join(f"{x:.1f}" for x in slow)
                note += f" \u2021 first task finished only {firsts} s after the enqueue"
            cut = [r for r in rs.values() if r.data and r.data.get("complete") is False]
            if cut:
                done = ", ".join(f"{r.data['done']:,}" for r in cut)
                n = cut[0].data["n"]
                note += f" \u2020 cut at the time budget in {len(cut)} round(s) ({done} of {n:,} done)"
            out.append(f"| {w.title} | {s.label}{note} | {cell} | {span} | {rat} |")
    out.append("")
    agg = WORKLOAD_BY_KEY["aggregation"]
    if agg in workloads:
        rs = per_round(run, agg, "pgq")
        out.append(
            "**Aggregation (pgq only).** PGQueuer, Procrastinate and Oban for Python (its open-source "
            "package) have no task aggregation (nothing that collects tasks into groups and hands "
            "a group to one handler), so there is nothing to compare with; these are pgq's own figures."
        )
        out.append("")
        if rs:
            d = [r.data for r in rs.values() if r.data]

            def med(k: str) -> float:
                return statistics.median(x[k] for x in d)

            def span(k: str, f: str = "{:,.0f}") -> str:
                return f"{f.format(min(x[k] for x in d))}\u2013{f.format(max(x[k] for x in d))}"

            out.append("| aggregation measure | median | min\u2013max |")
            out.append("|---|---:|---:|")
            out.append(
                f"| members aggregated and handled per second (groups of {d[0]['agg_group_size']}, "
                f"due by size; {d[0]['agg_expected']:,} members) | **{med('agg_members_per_s'):,.0f}** "
                f"| {span('agg_members_per_s')} |"
            )
            out.append(
                f"| aggregated tasks per second (same run) | {med('agg_groups_per_s'):,.0f} | "
                f"{span('agg_groups_per_s')} |"
            )
            out.append(
                f"| delay after due, p50 (grace {d[0]['agg_grace']} s, {d[0]['agg_delay_samples']} "
                f"groups of 3; ms) | **{med('agg_delay_p50'):.1f}** | {span('agg_delay_p50', '{:.1f}')} |"
            )
            for k in ("p95", "max"):
                key = f"agg_delay_{k}"
                out.append(f"| delay after due, {k} (ms) | {med(key):.1f} | {span(key, '{:.1f}')} |")
            bad = [x for x in d if x["agg_members"] != x["agg_expected"]]
            if bad:
                out.append(
                    f"\nWARNING: {len(bad)} round(s) handled a member count different from the enqueued one."
                )
        else:
            errs = [r.error for r in run.results if r.workload == "aggregation" and r.error]
            out.append(f"Aggregation failed: {errs[0] if errs else 'not run'}")
        out.append("")
    out.extend(targets(run, workloads))
    out.append("")
    out.append("Sizes: " + ", ".join(f"{k}={v}" for k, v in vars(sizes).items()) + ".")
    out.append("")
    out.append("Settings and versions:")
    out.append("")
    for s in systems:
        if any(applies(s, w) for w in workloads):
            out.append(f"- **{s.label}** ({versions(s)}): {s.settings}")
    return "\n".join(out) + "\n"


def targets(run: Run, workloads: list[Workload]) -> list[str]:
    """The issue's targets, each judged on ratios measured within the same round."""
    wanted = [
        ("enqueue", "pgqueuer", 1.3, "single enqueue ≥ 1.3x PGQueuer (psycopg)"),
        ("enqueue", "pgqueuer-asyncpg", 1.3, "single enqueue ≥ 1.3x PGQueuer (asyncpg)"),
        ("bulk", "pgqueuer", 2.0, "bulk enqueue ≥ 2x PGQueuer (psycopg)"),
        ("bulk", "pgqueuer-asyncpg", 2.0, "bulk enqueue ≥ 2x PGQueuer (asyncpg)"),
        ("drain1", "pgqueuer", 5.0, "drain, 1 process ≥ 5x PGQueuer (psycopg)"),
        ("drain2", "pgqueuer", 5.0, "drain, 2 processes ≥ 5x PGQueuer (psycopg)"),
        ("drain1", "procrastinate", 25.0, "drain, 1 process ≥ 25x Procrastinate"),
        ("drain2", "procrastinate", 25.0, "drain, 2 processes ≥ 25x Procrastinate"),
    ]
    keys = {w.key for w in workloads}
    out = ["| target (pgq ÷ peer, per round) | median | min\u2013max | met? |", "|---|---:|---:|---|"]
    for wk, peer, goal, title in wanted:
        if wk not in keys:
            continue
        rr = [1 / x for x in ratios(run, WORKLOAD_BY_KEY[wk], peer) if x]
        if not rr:
            out.append(f"| {title} | n/a | | not measured |")
            continue
        m = statistics.median(rr)
        verdict = "yes" if m >= goal else "**no**"
        if m >= goal and min(rr) < goal:
            verdict = "yes (median; not in every round)"
        out.append(f"| {title} | {m:.2f}x | {min(rr):.2f}\u2013{max(rr):.2f}x | {verdict} |")
    if "latency" in keys:
        w = WORKLOAD_BY_KEY["latency"]
        pg = per_round(run, w, "pgq")
        margins = []
        for rnd, r in pg.items():
            peers = [per_round(run, w, p).get(rnd) for p in PEER_ORDER]
            best = min((p.data["p99"] for p in peers if p and p.data), default=None)
            if best is not None and r.data:
                margins.append(r.data["p99"] / best)
        if margins:
            m = statistics.median(margins)
            verdict = "yes" if m <= 1.0 else "**no**"
            out.append(
                f"| latency p99 no worse than the best peer (pgq p99 ÷ best peer p99; ≤ 1 is met) "
                f"| {m:.2f} | {min(margins):.2f}\u2013{max(margins):.2f} | {verdict} |"
            )
    return out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except OSError:
        pass
    return f"{os.cpu_count()} vCPU ({cpu}){mem}, {platform.system()} {platform.release()}"


def pg_description(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as c:
        ver = c.execute("SHOW server_version").fetchone()[0]
        settings = []
        for s in ("fsync", "synchronous_commit", "wal_sync_method", "shared_buffers", "max_connections"):
            settings.append(f"{s}={c.execute(f'SHOW {s}').fetchone()[0]}")
    return f"PostgreSQL {ver} on the same machine over TCP 127.0.0.1 ({', '.join(settings)})"


def update_docs(text: str) -> None:
    start, end = "<!-- compare.py:start -->", "<!-- compare.py:end -->"
    doc = DOCS.read_text() if DOCS.exists() else f"# Benchmarks\n\n{start}\n{end}\n"
    if start not in doc or end not in doc:
        doc = doc.rstrip() + f"\n\n{start}\n{end}\n"
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    DOCS.write_text(f"{head}{start}\n{text}{end}{tail}")
    log(f"[docs] updated {DOCS}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dsn",
        default=os.environ.get("PGQ_BENCH_DSN", DEFAULT_DSN),
        help="an admin DSN of the server where scratch databases are created (default: %(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="a ~1 minute smoke run (1 round, small sizes)")
    p.add_argument("--rounds", type=int)
    p.add_argument(
        "--variants", action="store_true", help="also run pgq's variant rows: " + ", ".join(VARIANTS)
    )
    p.add_argument("--systems", help="comma-separated keys: " + ",".join(SYSTEM_BY_KEY))
    p.add_argument("--workloads", help="comma-separated keys: " + ",".join(WORKLOAD_BY_KEY))
    p.add_argument("--n-single", type=int)
    p.add_argument("--n-bulk", type=int)
    p.add_argument("--bulk-reps", type=int)
    p.add_argument("--n-drain", type=int)
    p.add_argument("--rate", type=float, help="latency workload: tasks per second")
    p.add_argument("--duration", type=float, help="latency workload: seconds of steady enqueueing")
    p.add_argument("--timeout", type=float, default=240.0, help="per measurement, seconds")
    p.add_argument("--update-docs", action="store_true", help=f"replace the results section of {DOCS}")
    args = p.parse_args(argv)

    sizes = Sizes.quick() if args.quick else Sizes()
    for name in ("rounds", "n_single", "n_bulk", "bulk_reps", "n_drain", "rate", "duration"):
        if getattr(args, name) is not None:
            setattr(sizes, name, getattr(args, name))
    if args.systems:
        systems = [SYSTEM_BY_KEY[k] for k in args.systems.split(",")]
    elif args.variants:
        systems = SYSTEMS
    else:  # pgq's variant rows are opt-in: they would push a full run past ten minutes
        systems = [s for s in SYSTEMS if s.key not in VARIANTS]
    if "pgq" not in [s.key for s in systems]:
        systems = [SYSTEM_BY_KEY["pgq"], *systems]  # every ratio is to pgq
    workloads = WORKLOADS if not args.workloads else [WORKLOAD_BY_KEY[k] for k in args.workloads.split(",")]

    try:
        import pgq  # noqa: F401
    except ImportError:
        log("run compare.py with pgq's interpreter (pip install -e . first)")
        return 2
    unavailable: dict[str, str] = {}
    for name in sorted({s.venv for s in systems if s.venv}):
        why = ensure_venv(name)
        if why:
            log(f"[setup] skipping {name}: {why}")
            unavailable[name] = why
    systems = [s for s in systems if s.venv not in unavailable]

    run = run_all(args, systems, workloads, sizes)
    body = report(run, systems, workloads, sizes, args)
    header = f"Machine: {machine()}; {pg_description(args.dsn)}.\n\n"
    for name, why in unavailable.items():
        header += f"Not measured: {name}: {why}.\n\n"
    text = header + body
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{stamp}{'-quick' if args.quick else ''}.md").write_text(text)
    (RESULTS / f"{stamp}{'-quick' if args.quick else ''}.json").write_text(
        json.dumps([vars(r) for r in run.results], indent=1, default=str)
    )
    print(text)
    if args.update_docs:
        update_docs(text)
    failed = [r for r in run.results if r.error]
    if failed:
        log(f"{len(failed)} measurement(s) failed; see the table")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
