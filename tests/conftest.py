"""Shared fixtures: one real primary + two streaming replicas for the whole test session.

The cluster comes from local_cluster.py (the same files docker-compose.yml uses), on free ports
on 127.0.0.1. Which PostgreSQL it runs is local_cluster's choice: set PG_BINDIR to pick one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

from local_cluster import DEFAULT_PASSWORD, LocalCluster, PostgresNode, free_port_base  # noqa: E402

DEMO = PROJECT_DIR / "sharding_demo.py"
COMPOSE_FILE = PROJECT_DIR / "docker-compose.yml"
DEMO_VARIABLE_PREFIXES = ("MASTER_DB_", "REPLICA_ONE_", "REPLICA_TWO_", "SHARD_ONE_", "SHARD_TWO_", "DEMO_")


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
        resume_replay(replica)
    cluster.wait_for_streaming()


def pause_replay(cluster: LocalCluster, replica: PostgresNode) -> None:
    """Stop `replica` replaying WAL, and wait until it has: a pause asked for takes effect at the next
    WAL record, so the primary writes one (a WAL switch)."""
    with connect(replica) as connection:
        connection.execute("SELECT pg_wal_replay_pause()")
        with connect(cluster.primary) as primary:
            primary.execute("SELECT pg_switch_wal()")

        def paused() -> bool:
            return connection.execute("SELECT pg_get_wal_replay_pause_state()").fetchone() == ("paused",)

        assert wait_until(paused, timeout=30), f"{replica.name} did not pause its replay"


def resume_replay(replica: PostgresNode) -> None:
    """Let `replica` replay WAL again, after pause_replay (a no-op if it was not paused)."""
    with connect(replica) as connection:
        connection.execute("SELECT pg_wal_replay_resume()")


def connect(node: PostgresNode, dbname: str = "postgres", **options: object) -> psycopg.Connection[tuple[object, ...]]:
    """A client connection over TCP with a password, as the demo makes."""
    return psycopg.connect(
        host="127.0.0.1",
        port=node.port,
        user="postgres",
        password=DEFAULT_PASSWORD,  # the cluster's superuser password (tests keep the default)
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


@pytest.fixture
def run_in_process(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Call sharding_demo.run() in this process, against `cluster` (a real one), and return its Report:
    a test can then look at the value the text and the JSON are made from. Only the environment and
    the current folder (empty, so no stray .env) are set for the call; no server is mocked."""
    import sharding_demo

    def run(cluster: LocalCluster = cluster, env: dict[str, str] | None = None, **settings: object):  # type: ignore[no-untyped-def]
        for name in os.environ:
            if name.startswith(DEMO_VARIABLE_PREFIXES):
                monkeypatch.delenv(name)
        for name, value in (cluster.demo_environment() | (env or {})).items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(tmp_path)
        return sharding_demo.run(sharding_demo.DemoSettings(**settings))  # type: ignore[arg-type]

    return run


# Run the demo's main() as `python sharding_demo.py` does, with every Python function call in any thread noted
# (sys.setprofile), and print, as JSON, the first line of each function of sharding_demo.py that ran.
PROFILED_MAIN = """
import json, sys, threading
import sharding_demo
called = set()
def profile(frame, event, arg):
    if event == "call" and frame.f_code.co_filename == sharding_demo.__file__:
        called.add((frame.f_code.co_qualname, frame.f_code.co_firstlineno))
threading.setprofile(profile)
sys.setprofile(profile)
code = sharding_demo.main(sys.argv[1:])
sys.setprofile(None)
print(json.dumps(sorted(called)), file=sys.stderr)
sys.exit(code)
"""


def functions_outside_the_lesson(cluster: LocalCluster, *arguments: str) -> list[tuple[str, int]]:
    """The functions of sharding_demo.py that a run executes and that are defined neither in the lesson (the top of
    the file, down to "The lesson ends here") nor in appendix A (the hash), the one place the lesson sends you."""
    lines = DEMO.read_text().splitlines()

    def line_of(marker: str) -> int:
        return next(number for number, line in enumerate(lines, start=1) if line.startswith(marker))

    lesson_end, appendix_a, appendix_b = (
        line_of(marker) for marker in ("# The lesson ends here", "# ======== Appendix A.", "# ======== Appendix B.")
    )
    with tempfile.TemporaryDirectory(prefix="demo-cwd-") as empty_folder:  # no .env
        result = subprocess.run(
            [sys.executable, "-c", PROFILED_MAIN, *arguments],
            env=clean_environment() | cluster.demo_environment() | {"PYTHONPATH": str(PROJECT_DIR)},
            cwd=empty_folder,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    called = [(name, line) for name, line in json.loads(result.stderr.splitlines()[-1])]
    assert ("run", line_of("def run(")) in called  # the profile saw the run
    return [(name, line) for name, line in called if line > lesson_end and not appendix_a < line < appendix_b]


def lets_in(node: PostgresNode) -> bool:
    """Does `node` let a session in now (not: down, or starting up after a crash)?"""
    try:
        node.query("SELECT 1")
    except psycopg.Error:
        return False
    return True


def named(node: PostgresNode) -> str:
    """How the demo's messages name a server: "master-db (127.0.0.1:21000)"."""
    return f"{node.name} (127.0.0.1:{node.port})"


def count_on(node: PostgresNode, database: str = "postgres") -> int:
    with connect(node, dbname=database) as connection:
        return int(connection.execute("SELECT count(*) FROM tbl_users").fetchone()[0])  # type: ignore[index]


def counts_everywhere(cluster: LocalCluster, database: str = "postgres") -> list[int]:
    """tbl_users' rows on the primary and on each replica, once the replicas have caught up."""
    primary = count_on(cluster.primary, database)
    for replica in cluster.replicas:
        assert wait_until(lambda replica=replica: count_on(replica, database) == primary, timeout=30), replica.name
    return [primary] * 3


def start_demo(cluster: LocalCluster, *arguments: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The demo in a process of its own, pointed at `cluster`, for a test to act on while it runs."""
    return subprocess.Popen(
        [sys.executable, str(DEMO), *arguments],
        env=clean_environment() | cluster.demo_environment() | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def database_with(cluster: LocalCluster, name: str, *statements: str) -> dict[str, str]:
    """A fresh database on the primary (the replicas get it too) and the settings to use it."""
    with connect(cluster.primary) as primary:
        primary.execute(f"DROP DATABASE IF EXISTS {name}")
        primary.execute(f"CREATE DATABASE {name}")
    with connect(cluster.primary, dbname=name) as database:
        for statement in statements:
            database.execute(statement)
    return {f"{prefix}NAME": name for prefix in ("MASTER_DB_", "REPLICA_ONE_", "REPLICA_TWO_")}


def database_with_a_commit_trigger(cluster: LocalCluster, name: str, body: str) -> dict[str, str]:
    """A fresh database whose tbl_users (two hash partitions) runs the PL/pgSQL `body` at COMMIT, for each row: a
    deferred constraint trigger runs inside COMMIT, before the commit is written. The settings to use it."""
    return database_with(
        cluster,
        name,
        "CREATE TABLE tbl_users (id uuid PRIMARY KEY, first_name varchar(255)) PARTITION BY HASH (id)",
        "CREATE TABLE tbl_users_p0 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 2, REMAINDER 0)",
        "CREATE TABLE tbl_users_p1 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 2, REMAINDER 1)",
        f"CREATE FUNCTION at_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} END $$",
        *(
            f"CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON tbl_users_p{n} DEFERRABLE INITIALLY DEFERRED "
            "FOR EACH ROW EXECUTE FUNCTION at_commit()"
            for n in range(2)
        ),
    )


@contextlib.contextmanager
def holding_a_lock(node: PostgresNode, lock: str, dbname: str = "postgres") -> Iterator[int]:
    """A transaction left open on `node` after `lock` (LOCK TABLE ...), as a learner's psql may leave one, for as long
    as the `with` lasts: its server process's pid."""
    with connect(node, dbname=dbname) as holder:
        holder.execute("BEGIN")
        holder.execute(lock)
        yield holder.info.backend_pid


# For slow_inserts: at least 1 s per 10,000 rows (one COPY of the demo's), however fast the machine. It sleeps
# at every 100th user (their names end in 00), since a pg_sleep() of any length takes a millisecond or more here.
EVERY_100TH_USER_SLEEPS_10_MS = "IF NEW.first_name LIKE '%00' THEN PERFORM pg_sleep(0.01); END IF;"


@contextlib.contextmanager
def slow_inserts(node: PostgresNode, body: str) -> Iterator[None]:
    """A BEFORE INSERT trigger on tbl_users that runs the PL/pgSQL `body` (a pg_sleep, say) for each row, for as long
    as the `with` lasts."""
    node.execute(f"CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN {body} RETURN NEW; END$$")
    node.execute("CREATE TRIGGER slow_insert BEFORE INSERT ON tbl_users FOR EACH ROW EXECUTE FUNCTION slow_insert()")
    try:
        yield
    finally:
        node.execute("DROP FUNCTION slow_insert() CASCADE")


def a_login_role(cluster: LocalCluster, name: str, *grants: str, options: str = "") -> None:
    """The role `name`, password 'x', made once on the primary with `options` (CONNECTION LIMIT 0, say), then
    `grants`; it returns once both replicas have it too, so that a run may log in there as that role."""
    with connect(cluster.primary) as primary:
        if not primary.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [name]).fetchone():
            primary.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'x' " + options).format(sql.Identifier(name)))
            for grant in grants:
                primary.execute(grant)
    for replica in cluster.replicas:
        assert wait_until(
            lambda replica=replica: bool(replica.query("SELECT FROM pg_roles WHERE rolname = %s", [name]))
        )


def logged_in_as(role: str, password: str) -> dict[str, str]:
    """The settings that make the demo log in to the primary and both replicas as `role`."""
    prefixes = ("MASTER_DB_", "REPLICA_ONE_", "REPLICA_TWO_")
    return {
        f"{prefix}{field}": value for prefix in prefixes for field, value in (("USER", role), ("PASSWORD", password))
    }


def docker_compose(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """docker-compose (v1) with the project's compose file, offline: skipped without it, except in CI."""
    executable = shutil.which("docker-compose")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed: .ci/run must install it (apt-get install docker-compose)")
        pytest.skip("docker-compose (v1, Debian package docker-compose) is not installed")
    return subprocess.run(
        [executable, "-f", str(COMPOSE_FILE), *arguments],
        env=clean_environment() | (env or {}),
        capture_output=True,
        text=True,
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


def pytest_configure() -> None:
    """A SIGTERM (`kill`, `pkill`, a CI job's time limit) ends the run as Ctrl-C does: pytest then tears down the
    fixtures, which stop the clusters' servers and delete their data. By default it would end pytest at once and
    leave every server of the session running."""
    signal.signal(signal.SIGTERM, stop_as_ctrl_c)


def stop_as_ctrl_c(signal_number: int, frame: object) -> None:
    raise KeyboardInterrupt
