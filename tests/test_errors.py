"""Expected failures: one line on stderr naming the server and the cause, a distinct exit code,
no traceback and nothing written."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import text

import sharding_demo
from conftest import (
    a_login_role,
    connect,
    counts_everywhere,
    database_with,
    database_with_a_commit_trigger,
    lets_in,
    logged_in_as,
    named,
    run_demo,
    wait_until,
)
from local_cluster import LocalCluster, PostgresNode, free_port_base


def count_rows(cluster: LocalCluster) -> int:
    with connect(cluster.primary) as primary:
        return int(primary.execute("SELECT count(*) FROM tbl_users").fetchone()[0])  # type: ignore[index]


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("sharding_demo.py: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_primary_unreachable(cluster: LocalCluster) -> None:
    closed_port = str(free_port_base())
    result = run_demo(cluster, env={"MASTER_DB_PORT": closed_port})
    assert result.returncode == 3
    assert_one_line_error(result.stderr, f"cannot connect to master-db (127.0.0.1:{closed_port})")


def test_an_ipv6_address_is_shown_in_brackets(cluster: LocalCluster) -> None:
    closed_port = str(free_port_base())  # nothing listens there, on ::1 either (the cluster listens on 127.0.0.1)
    result = run_demo(cluster, env={"MASTER_DB_HOST": "::1", "MASTER_DB_PORT": closed_port})
    assert result.returncode == 3
    assert_one_line_error(result.stderr, f"cannot connect to master-db ([::1]:{closed_port}): ")


def test_a_compose_service_name_as_the_host_is_unreachable_from_here(cluster: LocalCluster) -> None:
    # Copied from docker-compose.yml, where the containers reach each other by service name: from this machine the
    # name resolves to nothing (the README's troubleshooting says to use localhost).
    result = run_demo(cluster, env={"MASTER_DB_HOST": "master-db"})
    assert result.returncode == 3
    assert_one_line_error(
        result.stderr,
        f"cannot connect to master-db (master-db:{cluster.primary.port}): failed to resolve host 'master-db'",
    )
    result = run_demo(cluster, "--json", env={"REPLICA_TWO_HOST": "replica-two"})
    assert result.returncode == 0, result.stderr
    [skip] = json.loads(result.stdout)["skipped"]
    assert skip["replica"] == "replica-two" and skip["reason"].startswith("unreachable: failed to resolve host")


def test_wrong_password(cluster: LocalCluster) -> None:
    before = count_rows(cluster)
    result = run_demo(cluster, env={"MASTER_DB_PASSWORD": "not-the-password"})
    assert result.returncode == 4
    assert_one_line_error(result.stderr, "master-db", "refused the login", "password authentication failed")
    assert "not-the-password" not in result.stderr
    assert count_rows(cluster) == before


def test_a_tbl_users_that_the_name_does_not_find_is_told_with_where_it_looked(cluster: LocalCluster) -> None:
    # Four ways the name finds no table, each exit 5 with nothing written: another database (MASTER_DB_NAME), the
    # table gone (another PostgreSQL on the demo's port, say; renamed here, and back), a role without USAGE on its
    # schema (REVOKE ALL ON SCHEMA public FROM PUBLIC, a common hardening step), and a search_path without public.
    # The demo cannot tell them apart by the name alone, so the one line says where it looked, and what it expects.
    with connect(cluster.primary) as primary:
        primary.execute("DROP DATABASE IF EXISTS uninitialised")
        primary.execute("CREATE DATABASE uninitialised")
    a_login_role(cluster, "no_schema")
    schemaless = database_with(
        cluster,
        "no_schema_here",
        "CREATE TABLE tbl_users (id uuid PRIMARY KEY, first_name varchar(255)) PARTITION BY HASH (id)",
        "CREATE TABLE tbl_users_p0 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 1, REMAINDER 0)",
        "GRANT SELECT, INSERT ON tbl_users, tbl_users_p0 TO no_schema",
        "REVOKE ALL ON SCHEMA public FROM PUBLIC",
    )
    results = [  # (user, database, what the demo said)
        ("postgres", "uninitialised", run_demo(cluster, env={"MASTER_DB_NAME": "uninitialised"})),
        ("no_schema", "no_schema_here", run_demo(cluster, env=logged_in_as("no_schema", "x") | schemaless)),
        ("postgres", "postgres", run_demo(cluster, env={"PGOPTIONS": "-c search_path=elsewhere"})),
    ]
    with connect(cluster.primary) as primary:
        primary.execute("ALTER TABLE tbl_users RENAME TO tbl_users_away")
        try:
            results.append(("postgres", "postgres", run_demo(cluster)))
        finally:
            primary.execute("ALTER TABLE tbl_users_away RENAME TO tbl_users")
    for user, database, result in results:
        assert result.returncode == 5, result.stderr
        assert_one_line_error(
            result.stderr,
            f"{named(cluster.primary)} has no table tbl_users that user {user} finds by name in "
            f"database {database} (on its search_path, in a schema it may use); init-master.sql makes it in public, "
            "in database postgres: check MASTER_DB_PORT and MASTER_DB_NAME",
        )
    with connect(cluster.primary, dbname="no_schema_here") as database:
        assert database.execute("SELECT count(*) FROM tbl_users").fetchone() == (0,)


def test_a_database_that_does_not_exist_names_the_setting(cluster: LocalCluster) -> None:
    # The server answers the login: "unreachable", or "cannot connect", would send the user to the network.
    before = count_rows(cluster)
    result = run_demo(cluster, env={"MASTER_DB_NAME": "no_such_db"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"sharding_demo.py: error: {named(cluster.primary)} has no database no_such_db: check MASTER_DB_NAME"
    ]
    result = run_demo(cluster, "--json", env={"REPLICA_ONE_NAME": "no_such_db"})
    assert result.returncode == 0, result.stderr
    [skip] = json.loads(result.stdout)["skipped"]
    assert (skip["replica"], skip["reason"]) == ("replica-one", "has no database no_such_db: check REPLICA_ONE_NAME")
    assert count_rows(cluster) == before + 5


def test_a_replica_that_answers_no_is_not_called_unreachable(cluster: LocalCluster) -> None:
    # A role that may not connect at all: the replica answers "too many connections", so it was reached.
    a_login_role(cluster, "no_connections", options="CONNECTION LIMIT 0")
    result = run_demo(cluster, "--json", env={"REPLICA_ONE_USER": "no_connections", "REPLICA_ONE_PASSWORD": "x"})
    assert result.returncode == 0, result.stderr
    [skip] = json.loads(result.stdout)["skipped"]
    assert skip["replica"] == "replica-one"
    assert skip["reason"].startswith("refused the connection: "), skip["reason"]
    assert 'FATAL:  too many connections for role "no_connections"' in skip["reason"]


def a_role_no_control(cluster: LocalCluster) -> None:
    """The role no_control (password 'x'), made once: in a database whose pg_control_system() is revoked from
    PUBLIC, it may not call that function."""
    a_login_role(cluster, "no_control")


def test_a_primary_that_answers_the_checks_with_an_error_is_not_called_unreachable(cluster: LocalCluster) -> None:
    # A role that may not call pg_control_system(), in a database of its own: master-db lets it in, then answers the
    # first question of the checks with an ERROR.
    a_role_no_control(cluster)
    settings = database_with(cluster, "no_control_here", "REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
    result = run_demo(cluster, env={"MASTER_DB_USER": "no_control", "MASTER_DB_PASSWORD": "x"} | settings)
    assert result.returncode == 7, result.stderr
    assert_one_line_error(
        result.stderr,
        f"{named(cluster.primary)} answered the demo's checks with an error: permission denied "
        "for function pg_control_system; nothing was written",
    )


def test_a_replica_that_answers_the_wait_with_an_error_is_not_called_unreachable(cluster: LocalCluster) -> None:
    # In a database of its own, a role that may not call pg_control_system(), which the wait's question
    # uses: replica-one, asked as that role, connects and answers with an ERROR.
    a_role_no_control(cluster)
    settings = database_with(
        cluster,
        "no_control",
        "CREATE TABLE tbl_users (id uuid PRIMARY KEY, first_name varchar(255)) PARTITION BY HASH (id)",
        "CREATE TABLE tbl_users_p0 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 2, REMAINDER 0)",
        "CREATE TABLE tbl_users_p1 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 2, REMAINDER 1)",
        "REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC",
    )

    def replicated() -> bool:  # the role, the database and its tables are on replica-one too
        try:
            with connect(cluster.replicas[0], dbname="no_control") as replica:
                return bool(replica.execute("SELECT to_regclass('tbl_users_p1')").fetchone()[0])  # type: ignore[index]
        except psycopg.OperationalError:  # the database is not there yet
            return False

    assert wait_until(replicated, timeout=30)
    result = run_demo(cluster, "--json", env=settings | {"REPLICA_ONE_USER": "no_control", "REPLICA_ONE_PASSWORD": "x"})
    assert result.returncode == 0, result.stderr
    [skip] = json.loads(result.stdout)["skipped"]
    assert skip["replica"] == "replica-one" and skip["when"] == "waited for"
    assert skip["reason"] == (
        "answered the demo's question with an error: permission denied for function pg_control_system: check "
        "REPLICA_ONE_USER"
    ), skip["reason"]


# How the replica loses the demo's session in the middle of a read, and the reason the demo must give. In each case
# it had been reached: it is left out, and the read retried on the other replica.
LOSING_THE_SESSION = {
    # The replica ends the session itself: pg_terminate_backend, as here, or shut down mid-run (docker compose stop,
    # pg_ctl stop). Once, this was called "unreachable".
    "pg_terminate_backend": re.escape("ended the connection: terminating connection due to administrator command"),
    # Its own timeout ends the session, with an error of severity FATAL: not an answer to the read, which no other
    # replica would improve on. The FATAL may be read as the connection closed, if the demo writes first.
    "idle_in_transaction_session_timeout": "|".join(
        re.escape(reason)
        for reason in (
            "ended the connection: terminating connection due to idle-in-transaction timeout",
            "lost the connection: consuming input failed: server closed the connection unexpectedly",
        )
    ),
    # Its server process dies (SIGKILL, as the kernel's OOM killer would): the connection goes without a word.
    "SIGKILL": "lost the connection: .*server closed the connection unexpectedly.*",
}


@pytest.mark.parametrize("how", list(LOSING_THE_SESSION))
def test_a_replica_that_loses_the_demo_s_session_during_a_read_is_left_out_and_told_how(
    healthy_cluster: LocalCluster, run_in_process: Any, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    cluster, original = healthy_cluster, sharding_demo.where_users_landed
    lost: list[PostgresNode] = []  # the replica that served the first read

    def lose_the_session_then_read(session: Any, ids: Any, show: int) -> Any:
        if not lost:
            backend = session.connection().connection.driver_connection.info.backend_pid
            lost.append(next(node for node in cluster.replicas if node.port == session.get_bind().url.port))
            if how == "pg_terminate_backend":
                lost[0].query("SELECT pg_terminate_backend(%s)", [backend])
            elif how == "SIGKILL":
                os.kill(backend, signal.SIGKILL)
            else:
                session.execute(text("SET idle_in_transaction_session_timeout = '50ms'"))
                time.sleep(0.5)
        return original(session, ids, show)

    monkeypatch.setattr(sharding_demo, "where_users_landed", lose_the_session_then_read)
    try:
        report = run_in_process(cluster)
    finally:
        assert wait_until(lambda: lets_in(lost[0]), timeout=60)  # after a SIGKILL its postmaster recovers it
    [skip] = report.skipped
    assert (skip.replica.service, skip.when) == (lost[0].name, "during the reads")
    assert re.fullmatch(LOSING_THE_SESSION[how], skip.reason), skip.reason
    assert sum(report.landing.value[0].values()) == 5  # the other replica answered


def test_primary_address_pointing_at_a_replica(cluster: LocalCluster) -> None:
    before = count_rows(cluster)
    result = run_demo(cluster, env={"MASTER_DB_PORT": str(cluster.replicas[0].port)})
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "is a standby, not the primary", "MASTER_DB_PORT")
    assert count_rows(cluster) == before


@pytest.mark.parametrize("password", ["p@ss:w/rd% with 'quotes' and \"doubles\"", "100%/@:"])
def test_password_with_special_characters(cluster: LocalCluster, password: str) -> None:
    # A role of its own, so the superuser's password stays as the other tests expect. Roles are
    # cluster-wide and replicate, so the replicas accept the same login.
    with connect(cluster.primary) as primary:
        # Keep this session's own statements out of the server log (log_statement = 'all'), so the
        # check below can show that the demo never puts the password there.
        primary.execute("SET log_statement = 'none'")
        exists = primary.execute("SELECT 1 FROM pg_roles WHERE rolname = 'special_chars'").fetchone()
        verb = "ALTER" if exists else "CREATE"
        statement = verb + " ROLE special_chars LOGIN PASSWORD {}"
        # CREATE/ALTER ROLE take no bind parameters: sql.Literal quotes the password as a SQL string.
        primary.execute(sql.SQL(statement).format(sql.Literal(password)))
        primary.execute("GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO special_chars")
    credentials = {
        f"{prefix}{name}": value
        for prefix in ("MASTER_DB_", "REPLICA_ONE_", "REPLICA_TWO_")
        for name, value in (("USER", "special_chars"), ("PASSWORD", password))
    }
    result = run_demo(cluster, "--json", env=credentials)
    assert result.returncode == 0, result.stderr
    assert password not in result.stdout and password not in result.stderr
    for node in cluster.nodes:
        assert password not in node.log_text(), node.name
    report = json.loads(result.stdout)
    assert len(report["inserted"]) == 5
    assert all(p["in_recovery"] for p in report["partitions"])


@pytest.mark.parametrize("users", ["5", "200"])  # the ORM path, and the bulk path (COPY)
def test_a_commit_that_the_primary_refuses_is_told_as_nothing_written(cluster: LocalCluster, users: str) -> None:
    # The trigger refuses inside COMMIT: the primary answers the COMMIT with that error and rolls the transaction
    # back. One server, so nothing was written.
    settings = database_with_a_commit_trigger(cluster, f"refused_commit_{users}", "RAISE EXCEPTION 'no, at commit';")
    result = run_demo(cluster, "--users", users, env=settings)
    assert result.returncode == 7, result.stderr
    assert_one_line_error(
        result.stderr,
        f"{named(cluster.primary)} refused the COMMIT: no, at commit; the transaction was rolled back: nothing was "
        "written",
    )
    assert counts_everywhere(cluster, settings["MASTER_DB_NAME"]) == [0, 0, 0]
