"""A fresh start, as `docker compose up -d --wait` makes it on empty volumes, succeeds every time.

Compose starts both replicas as soon as the primary is healthy, so both clone it at once. Before
replica-bootstrap.sh created each slot ahead of its copy, about half of such starts failed with
"requested WAL segment ... has already been removed" (see that script's comments). These tests
clone the way compose does, many times, with the project's own files on the real binaries.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import PROJECT_DIR
from local_cluster import (
    INIT_FILES,
    REPLICA_BOOTSTRAP,
    REPLICAS,
    SHARD_INIT_FILES,
    ClusterError,
    LocalCluster,
    free_port_base,
)

# Pairs of clones to make. With the slot created by pg_basebackup itself (the old script), about a
# third of the pairs failed here (PostgreSQL 15 and 18), so twelve pairs all passing by chance
# would be a 1-in-200 event.
CLONE_ROUNDS = 12
# Containers that compose starts "together" begin a few milliseconds apart; sweep that gap.
STAGGERS = [0.0, 0.01, 0.02, 0.03, 0.04]


def remove_replicas(cluster: LocalCluster) -> None:
    """Stop both replicas and delete their data directories, as `docker compose rm -sfv` would."""
    for replica in cluster.replicas:
        replica.stop()
        shutil.rmtree(replica.data_dir, ignore_errors=True)


def test_both_replicas_clone_at_once_every_time() -> None:
    failures = []
    with LocalCluster(port_base=free_port_base()) as cluster:
        primary_system_id = cluster.primary.query("SELECT system_identifier FROM pg_control_system()")
        for round_number in range(CLONE_ROUNDS):
            remove_replicas(cluster)
            stagger = STAGGERS[round_number % len(STAGGERS)]
            try:
                cluster.clone_replicas_at_once(stagger=stagger)
                cluster.wait_for_streaming(timeout=30)
            except ClusterError as error:
                failures.append(f"round {round_number} ({stagger * 1000:.0f} ms apart): {error}")
                continue
            for replica in cluster.replicas:
                # A clone of THIS primary: the same system identifier, made by its initdb.
                assert replica.query("SELECT system_identifier FROM pg_control_system()") == primary_system_id
            # Each replica streams through its own slot, which holds the WAL it has not yet received.
            slots = cluster.primary.query(
                "SELECT slot_name, active, wal_status FROM pg_replication_slots ORDER BY slot_name"
            )
            assert slots == [(slot, True, "reserved") for slot in sorted(REPLICAS.values())]
    assert not failures, f"{len(failures)} of {CLONE_ROUNDS} fresh double clones failed:\n" + "\n".join(failures)


def project_copy(destination: Path) -> Path:
    """The files local_cluster.py stages, copied with their modes, to modify in one test."""
    for name in {*INIT_FILES.values(), *SHARD_INIT_FILES.values(), REPLICA_BOOTSTRAP}:
        shutil.copy(PROJECT_DIR / name, destination / name)
    return destination


def test_setup_config_works_when_the_image_sources_it(tmp_path: Path) -> None:
    # A checkout without the executable bit (a zip download, some Windows set-ups): the image
    # then sources the script into its own shell instead of running it.
    project = project_copy(tmp_path)
    script = project / "setup-config.sh"
    script.chmod(script.stat().st_mode & ~(stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))
    with LocalCluster(port_base=free_port_base(), project_dir=project) as cluster:
        assert cluster.primary.query("SHOW log_statement") == [("all",)]
        assert cluster.primary.query("SELECT count(*) FROM pg_stat_replication") == [(2,)]


def test_a_failing_init_file_is_one_clear_error(tmp_path: Path) -> None:
    project = project_copy(tmp_path)
    (project / "init-master.sql").write_text("CREATE TABLE broken (;\n")
    with pytest.raises(ClusterError) as error, LocalCluster(port_base=free_port_base(), project_dir=project):
        pass
    assert "master-db: psql failed" in str(error.value)
    assert "syntax error" in str(error.value)


def test_first_start_logs_utc_and_no_configuration_error(cluster: LocalCluster) -> None:
    log = cluster.primary.log_text()
    assert "contains errors" not in log
    timestamped = [line for line in log.splitlines() if line[:4].isdigit()]
    assert timestamped, log
    for line in timestamped:
        # '2026-11-27 13:38:17.090 UTC [6972] ...': the third field is the log's time zone.
        assert line.split()[2] == "UTC", line


def test_scripts_and_config_are_checked_out_with_lf_everywhere(tmp_path: Path) -> None:
    if not (PROJECT_DIR / ".git").exists():
        pytest.skip("not a git checkout")
    # core.autocrlf=true is Git for Windows' default: without .gitattributes it would write CRLF.
    clone = tmp_path / "clone"
    subprocess.run(["git", "-c", "core.autocrlf=true", "clone", "--quiet", str(PROJECT_DIR), str(clone)], check=True)
    for name in [*INIT_FILES.values(), REPLICA_BOOTSTRAP, "docker-compose.yml", ".ci/run"]:
        assert b"\r" not in (clone / name).read_bytes(), name
