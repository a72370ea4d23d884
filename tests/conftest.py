"""Shared fixtures: one real primary + two streaming replicas for the whole test session.

The cluster comes from local_cluster.py (the same files docker-compose.yml uses), on free ports
on 127.0.0.1. Which PostgreSQL it runs is local_cluster's choice: set PG_BINDIR to pick one.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

from local_cluster import LocalCluster, PostgresNode, port_is_free  # noqa: E402

DEMO = PROJECT_DIR / "sharding_demo.py"
DEMO_VARIABLE_PREFIXES = ("MASTER_DB_", "REPLICA_ONE_", "REPLICA_TWO_", "DEMO_")


def free_port_base() -> int:
    """Three consecutive free ports, away from 5432 (which a developer's own server may hold).

    They are taken below Linux's ephemeral range (ip_local_port_range, 32768 and up by default):
    a port in that range can be free now and then taken as the local end of some client's
    connection (a replica's WAL receiver, a test's psycopg), and a server started on it later in
    the session would fail with "Address already in use".
    """
    for _ in range(100):
        base = random.randrange(20000, 32000)
        if all(port_is_free(base + offset) for offset in range(3)):
            return base
    raise RuntimeError("no three consecutive free ports found")


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(port_base=free_port_base()) as running:
        print(f"\nPostgreSQL {running.version} from {running.bindir}")
        yield running


@pytest.fixture
def healthy_cluster(cluster: LocalCluster) -> Iterator[LocalCluster]:
    """After a test that stops servers or pauses replay: every server started, replaying, streaming."""
    yield cluster
    for node in cluster.nodes:
        if not node.running:
            node.start()
    for replica in cluster.replicas:
        with connect(replica) as connection:
            connection.execute("SELECT pg_wal_replay_resume()")
    cluster.wait_for_streaming()


def connect(
    node: PostgresNode, dbname: str = "postgres", **options: object
) -> psycopg.Connection[tuple[object, ...]]:
    """A client connection over TCP with a password, as the demo makes."""
    return psycopg.connect(
        host="127.0.0.1",
        port=node.port,
        user="postgres",
        password=node.cluster.superuser_password,
        dbname=dbname,
        autocommit=True,
        **options,  # type: ignore[arg-type]
    )


def clean_environment() -> dict[str, str]:
    """This process's environment without any of the demo's own variables."""
    return {name: value for name, value in os.environ.items() if not name.startswith(DEMO_VARIABLE_PREFIXES)}


def run_demo(
    cluster: LocalCluster | None,
    *arguments: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run sharding_demo.py as a user would, in its own process, pointed at `cluster`."""
    environment = clean_environment()
    if cluster is not None:
        environment |= cluster.demo_environment()
    environment |= env or {}
    # Run in an empty folder unless told otherwise, so no stray .env file changes the settings.
    with tempfile.TemporaryDirectory(prefix="demo-cwd-") as empty_folder:
        return subprocess.run(
            [sys.executable, str(DEMO), *arguments],
            env=environment,
            cwd=cwd or empty_folder,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def wait_until(condition, timeout: float = 10.0, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def pytest_report_header() -> str:
    """Say which PostgreSQL the session's cluster will run, at the top of the test output."""
    from local_cluster import find_bindir, server_version

    bindir = find_bindir(os.environ.get("PG_BINDIR"))
    return f"PostgreSQL {server_version(bindir)} from {bindir}"
