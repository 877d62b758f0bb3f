"""Run the fault-injection suite at its full sizes, from one command:

    python benchmarks/fault_full.py [--out fault-full.jsonl] [extra pytest args]

Same as `PGQ_FAULT_FULL=1 pytest tests/fault -m fault -o timeout=3600`, with each
test's JSON line also written to --out. docs/reliability.md records a run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="fault-full.jsonl", help="JSON lines of the figures (appended)")
    args, extra = ap.parse_known_args()
    env = {**os.environ, "PGQ_FAULT_FULL": "1", "PGQ_FAULT_REPORT": str(Path(args.out).resolve())}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests/fault",
        "-m",
        "fault",
        "-o",
        "timeout=3600",
        "-q",
        "-p",
        "no:cacheprovider",
        *extra,
    ]
    return subprocess.call(cmd, cwd=REPO, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
