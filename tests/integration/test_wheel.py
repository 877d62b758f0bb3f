"""The wheel ships sql/ inside the package (pgq/sql/...), so an installed pgq finds its SQL."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_contains_the_sql_files(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (wheel,) = tmp_path.glob("pgq_jobs-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"pgq/sql/{p.relative_to(ROOT / 'sql').as_posix()}" for p in (ROOT / "sql").rglob("*.sql")}
    assert "pgq/sql/schema.sql" in expected and "pgq/sql/queries/task.sql" in expected
    assert any(n.startswith("pgq/sql/migrations/0001_") for n in expected)
    missing = expected - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert "pgq/__init__.py" in names and "pgq/_sql.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "pgq = pgq.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # the files in the wheel are the files in the tree
    with zipfile.ZipFile(wheel) as z:
        assert z.read("pgq/sql/schema.sql") == (ROOT / "sql" / "schema.sql").read_bytes()
