"""Faults: replicas down or lagging, primary down, repeated and concurrent runs.

Each test sets up the fault on the real cluster, runs the demo as a subprocess, and checks both its
output and the data in the servers. The `healthy_cluster` fixture puts every server back (started,
replaying, streaming) after each test, so the tests after these find the cluster as it was.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import DEMO, clean_environment, connect, named, pause_replay, run_demo, wait_until
from local_cluster import LocalCluster, PostgresNode, free_port_base

# Every test here breaks the shared cluster on purpose; put it back after each one.
pytestmark = pytest.mark.usefixtures("healthy_cluster")


def ids_on(node: PostgresNode) -> set[str]:
    with connect(node) as connection:
        return {str(user_id) for (user_id,) in connection.execute("SELECT id::text FROM tbl_users").fetchall()}


def partition_of_each_row(node: PostgresNode) -> dict[str, str]:
    with connect(node) as connection:
        rows = connection.execute("SELECT id::text, tableoid::regclass::text FROM tbl_users").fetchall()
    return {str(user_id): str(partition) for user_id, partition in rows}


def run_json(
    cluster: LocalCluster, *arguments: str, env: dict[str, str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    result = run_demo(cluster, "--json", *arguments, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr.splitlines()


def assert_report_matches_primary(cluster: LocalCluster, report: dict[str, Any]) -> None:
    """The five new users are where the primary says, and the counts add up."""
    on_primary = partition_of_each_row(cluster.primary)
    for user in report["inserted"]:
        assert user["actual_partition"] == user["predicted_partition"] == on_primary[user["id"]]
    assert sum(p["actual"] for p in report["partitions"]) == 5
    for partition in report["partitions"]:
        assert partition["predicted"] == partition["actual"]
        assert len(partition["rows"]) == min(partition["count"], 10)  # --show defaults to 10


def test_one_replica_stopped_reads_go_to_the_other(cluster: LocalCluster) -> None:
    stopped, survivor = cluster.replicas
    stopped.stop()
    report, warnings = run_json(cluster)

    assert [skip["replica"] for skip in report["skipped"]] == [stopped.name]
    assert report["skipped"][0]["reason"].startswith("unreachable: ")
    assert len(warnings) == 1 and warnings[0].startswith(f"sharding_demo.py: warning: {stopped.name} ")
    reads = [*report["partitions"], report["first_user"]]
    assert {read["read_from"] for read in reads} == {survivor.name}
    assert all(read["in_recovery"] for read in reads)
    assert [entry["replica"] for entry in report["catchup"]] == [survivor.name]
    assert_report_matches_primary(cluster, report)


def test_a_replica_started_without_hot_standby_is_told_with_the_servers_reason(cluster: LocalCluster) -> None:
    # hot_standby = off: the standby replays, and refuses every connection. libpq puts the reason in a DETAIL line,
    # which the report adds in brackets: "not accepting connections" alone does not say why.
    refusing, survivor = cluster.replicas
    refusing.execute("ALTER SYSTEM SET hot_standby = off")
    refusing.stop()
    try:
        refusing.start()
        report, _ = run_json(cluster)
    finally:
        refusing.stop()
        refusing.run("sed", "-i", "/^hot_standby = /d", refusing.data_dir / "postgresql.auto.conf")
        refusing.start()
    [skip] = report["skipped"]
    assert skip["replica"] == refusing.name
    assert skip["reason"].startswith("refused the connection: ")
    assert skip["reason"].endswith("the database system is not accepting connections (Hot standby mode is disabled.)")
    assert {partition["read_from"] for partition in report["partitions"]} == {survivor.name}
    assert_report_matches_primary(cluster, report)


def test_both_replicas_stopped_reads_fall_back_to_the_primary(cluster: LocalCluster) -> None:
    for replica in cluster.replicas:
        replica.stop()
    report, warnings = run_json(cluster)

    assert {skip["replica"] for skip in report["skipped"]} == {"replica-one", "replica-two"}
    # Both were found unreachable by the wait, before any read, so no replica caught up.
    assert report["catchup"] == []
    for skip in report["skipped"]:
        assert skip["when"] == "waited for"
        assert skip["reason"].startswith("unreachable: ")
    reads = [*report["partitions"], report["first_user"]]
    assert {read["read_from"] for read in reads} == {"master-db"}
    assert not any(read["in_recovery"] for read in reads)
    assert warnings[-1] == "sharding_demo.py: warning: no replica left: reads went to the primary master-db"
    assert_report_matches_primary(cluster, report)


def test_a_lagging_replica_is_named_and_left_out(cluster: LocalCluster) -> None:
    lagging, current = cluster.replicas
    pause_replay(cluster, lagging)
    report, warnings = run_json(cluster, "--catchup-timeout", "1")

    assert [entry["replica"] for entry in report["catchup"]] == [current.name]
    [skip] = report["skipped"]
    assert (skip["replica"], skip["when"]) == (lagging.name, "waited for")
    assert re.fullmatch(r"still [\d,]+ bytes of WAL behind after 1\.\ds", skip["reason"]), skip["reason"]
    assert "bytes of WAL behind" in warnings[0]
    reads = [*report["partitions"], report["first_user"]]
    assert {read["read_from"] for read in reads} == {current.name}
    assert_report_matches_primary(cluster, report)

    # The anomaly the wait prevented: the paused replica really does not have the new rows.
    new_ids = {user["id"] for user in report["inserted"]}
    assert not new_ids & ids_on(lagging)


def test_read_your_writes_holds_with_asynchronous_commit() -> None:
    # With synchronous_commit = off, COMMIT returns before its WAL record is written: the WAL writer writes it
    # up to wal_writer_delay later (here 10 s, its maximum). The WAL written so far then ends before the commit, so
    # a wait for that position is over at once, and the reads would not find the users. (A cluster of its own: the
    # setting needs a reload, which the shared cluster's log should not show.)
    with LocalCluster(port_base=free_port_base()) as cluster:
        with connect(cluster.primary) as primary:
            primary.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
            primary.execute("SELECT pg_reload_conf()")
        report, _ = run_json(cluster, env={"PGOPTIONS": "-c synchronous_commit=off"})
        assert {entry["replica"] for entry in report["catchup"]} == {replica.name for replica in cluster.replicas}
        assert_report_matches_primary(cluster, report)


def test_primary_stopped_is_one_clear_error(cluster: LocalCluster) -> None:
    cluster.primary.stop()
    result = run_demo(cluster)
    assert result.returncode == 3
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"sharding_demo.py: error: cannot connect to {named(cluster.primary)}")


def truncate_users(cluster: LocalCluster) -> None:
    with connect(cluster.primary) as primary:
        primary.execute("TRUNCATE tbl_users")
    assert wait_until(lambda: all(not ids_on(replica) for replica in cluster.replicas))


def test_running_twice_gives_ten_rows_everywhere(cluster: LocalCluster) -> None:
    truncate_users(cluster)
    first, _ = run_json(cluster)
    second, _ = run_json(cluster)
    assert sum(p["count"] for p in first["partitions"]) == 5
    assert sum(p["count"] for p in second["partitions"]) == 10
    inserted = {user["id"] for report in (first, second) for user in report["inserted"]}
    assert ids_on(cluster.primary) == inserted
    for replica in cluster.replicas:
        assert wait_until(lambda replica=replica: ids_on(replica) == inserted), replica.name


def test_eight_concurrent_runs_lose_and_duplicate_nothing(cluster: LocalCluster, tmp_path: Path) -> None:
    truncate_users(cluster)
    environment = clean_environment() | cluster.demo_environment()
    processes = [
        subprocess.Popen(
            [sys.executable, str(DEMO), "--json"],
            env=environment,
            cwd=tmp_path,  # an empty folder: no stray .env file
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0] * 8, [err for _, err in outputs]

    reports = [json.loads(stdout) for stdout, _ in outputs]
    inserted = [user["id"] for report in reports for user in report["inserted"]]
    assert len(inserted) == len(set(inserted)) == 40
    assert ids_on(cluster.primary) == set(inserted)
    for replica in cluster.replicas:
        assert wait_until(lambda replica=replica: ids_on(replica) == set(inserted)), replica.name
    # Each run found its own five users where it predicted, whatever the others were doing.
    for report in reports:
        assert sum(p["actual"] for p in report["partitions"]) == 5
        assert [p["predicted"] for p in report["partitions"]] == [p["actual"] for p in report["partitions"]]
        assert all(user["predicted_partition"] == user["actual_partition"] for user in report["inserted"])


def test_text_report_names_a_stopped_replica_once(cluster: LocalCluster) -> None:
    stopped = cluster.replicas[0]
    stopped.stop()
    result = run_demo(cluster)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the text report says it; no second copy on stderr
    assert f"  {named(stopped)}: unreachable: " in result.stdout
    assert result.stdout.count(f"port {stopped.port} failed") == 1


def test_both_replicas_lagging_wait_one_deadline_together(cluster: LocalCluster) -> None:
    for replica in cluster.replicas:
        pause_replay(cluster, replica)
    timeout = 3.0
    started = time.monotonic()
    report, _ = run_json(cluster, "--catchup-timeout", str(timeout))
    run_seconds = time.monotonic() - started

    assert report["catchup"] == []
    # One deadline for both: each replica is left out once the wait, which started once for both, has lasted
    # the timeout (waiting for one after the other, the second would say about twice that). This is the wait's
    # own clock; the whole run's adds start-up and reads, which a loaded machine stretches by seconds.
    assert len(report["skipped"]) == 2
    for skip in report["skipped"]:
        seconds = float(re.search(r"after ([\d.]+)s", skip["reason"])[1])  # type: ignore[index]
        assert timeout <= seconds < timeout + 0.5
    assert run_seconds < 3 * timeout, run_seconds  # and nothing else waited a catch-up timeout of its own
    assert report["warnings"][-1] == "no replica left: reads went to the primary master-db"
