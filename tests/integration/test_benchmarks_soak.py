"""benchmarks/soak.py (R15) runs: its JSON lines, and doctor naming the blocker in phase B.

A smoke run at a tiny size (300 jobs, a 2 s hold) on the test server; the figures
themselves come from the nightly size (benchmarks/README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_soak_smoke(server_dsn: str) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "soak.py"),
        "--dsn",
        server_dsn,
        "--jobs",
        "300",
        "--rate",
        "1000",
        "--hold",
        "2",
        "--interval",
        "1",
        "--recover-timeout",
        "2",
        "--json",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    lines, summary = rows[:-1], rows[-1]["summary"]

    phases = [x["phase"] for x in lines]
    assert phases == sorted(phases, key="ABR".index), phases  # A, then B, then R
    assert phases.count("A") >= 2 and "B" in phases and "R" in phases, phases
    for x in lines:
        for key in ("task_total_bytes", "n_dead_tup", "n_live_tup", "autovacuum_count", "interval_jobs"):
            assert isinstance(x[key], int) and x[key] >= 0, (key, x)
    a = [x for x in lines if x["phase"] == "A"]
    # phase A ends once every job is enqueued (its last line may come a little before)
    assert lines[len(a)]["jobs_enqueued"] >= 300
    assert all(x["claim_p99_ms"] is not None and x["xids_per_job"] > 0 for x in a if x["interval_jobs"]), a
    assert lines[-1]["jobs_done"] >= 300

    # Phase B: doctor names the pid of the REPEATABLE READ transaction while it is open,
    # and no longer once it has ended.
    b = summary["phase_b"]
    assert b["detected"] is True, summary
    assert 0 < b["detect_s"] <= 2, b
    assert f"pid {b['blocker_pid']}" in b["doctor_message"], b
    assert any(x["doctor_names_blocker"] for x in lines if x["phase"] == "B"), lines
    assert not any(x["doctor_names_blocker"] for x in lines if x["phase"] != "B"), lines

    assert summary["phase_a"]["xids_per_job"] > 0
    assert summary["jobs_done"] == lines[-1]["jobs_done"]
