"""The benchmark script runs end to end on tiny sizes and prints its three tables; no timing asserted."""

from __future__ import annotations

import subprocess
import sys

from conftest import PROJECT_DIR, clean_environment


def test_benchmark_runs_and_prints_both_tables() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(PROJECT_DIR / "bench" / "bench_insert.py"),
            "--sizes",
            "2000",
            "--orm-max",
            "2000",
            "--sharded-users",
            "2000",
        ],
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for method in ("server-ceiling", "copy-baseline", "demo", "naive-orm"):
        assert any(line.split()[1:2] == [method] for line in lines if line.strip().startswith("2,000")), method
    assert any(line.startswith("End to end: ") for line in lines)
    end_to_end = [line for line in lines if line.strip().startswith("2,000") and line.split()[2] == "s"]
    assert len(end_to_end) == 1, lines
    assert any(line.startswith("UUIDv7 ") for line in lines)
    assert any(line.startswith("UUIDv4 ") for line in lines)
    assert [line.split()[0] for line in lines if line.startswith(("unsharded ", "sharded "))] == [
        "unsharded",
        "sharded",
    ]
