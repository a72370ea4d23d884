"""The sharded layout: master-db coordinates two shards through postgres_fdw.

A real coordinator, its two real streaming replicas, and two real shards, started by
`local_cluster.py --sharded` with the same files as `docker compose --profile sharded`. Every row's
place is read on the shard itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy
from psycopg import sql

import sharding_demo
from conftest import (
    PROJECT_DIR,
    a_login_role,
    docker_compose,
    functions_outside_the_lesson,
    holding_a_lock,
    lets_in,
    logged_in_as,
    named,
    run_demo,
    start_demo,
    wait_until,
)
from local_cluster import DEFAULT_PASSWORD, LocalCluster, PostgresNode, free_port_base

COORDINATOR_PASSWORD = "coordinator-secret-7b1f"  # so that the tests can look for it in every log
IDENTIFIER = "SELECT system_identifier FROM pg_control_system()"  # which cluster a server is of


@pytest.fixture(scope="module")
def sharded() -> Iterator[LocalCluster]:
    os.environ["COORDINATOR_PASSWORD"] = COORDINATOR_PASSWORD
    try:
        with LocalCluster(port_base=free_port_base(), sharded=True) as cluster:
            yield cluster
    finally:
        del os.environ["COORDINATOR_PASSWORD"]


def tcp(
    node: PostgresNode, user: str = "postgres", password: str = DEFAULT_PASSWORD, dbname: str = "postgres"
) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host="127.0.0.1", port=node.port, user=user, password=password, dbname=dbname, autocommit=True
    )


def ids_on(node: PostgresNode) -> dict[str, str]:
    """Every row the server itself stores in tbl_users: id -> partition (on a shard: its own table)."""
    with tcp(node) as connection:
        rows = connection.execute("SELECT id::text, tableoid::regclass::text FROM tbl_users").fetchall()
    return {str(user_id): str(name) for user_id, name in rows}


def shard_of(sharded: LocalCluster, name: str) -> PostgresNode:
    return next(node for node in sharded.shards if node.name == name)


def only_the_lock_holder_is_left(node: PostgresNode, holder: int) -> bool:
    """No client session on `node` but the one that holds a lock (and this question's own): none left waiting."""
    others = (
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
        "AND pid NOT IN (%s, pg_backend_pid())"
    )
    return node.query(others, [holder]) == [(0,)]


# ------------------------------------------------------------------------------------------------
# The layout
# ------------------------------------------------------------------------------------------------


def test_the_coordinator_s_partitions_are_foreign_tables_on_the_shards(sharded: LocalCluster) -> None:
    for node in [sharded.primary, *sharded.replicas]:  # the replicas have the same, by replication
        rows = node.query(
            """
            SELECT c.relname, c.relkind, s.srvname, pg_get_expr(c.relpartbound, c.oid)
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            JOIN pg_foreign_table f ON f.ftrelid = c.oid JOIN pg_foreign_server s ON s.oid = f.ftserver
            WHERE i.inhparent = 'tbl_users'::regclass ORDER BY 1
            """
        )
        assert rows == [
            (
                f"tbl_users_p{n}",
                "f",
                "shard_one" if n % 2 == 0 else "shard_two",
                f"FOR VALUES WITH (modulus 4, remainder {n})",
            )
            for n in range(4)
        ], node.name
    # A unique index cannot span foreign tables: the parent has no primary key...
    assert sharded.primary.query("SELECT count(*) FROM pg_index WHERE indrelid = 'tbl_users'::regclass") == [(0,)]
    # ...and each shard's own does the job: equal ids hash to the same partition, so to one shard.
    for shard, names in (
        ("shard-one", ["tbl_users_p0", "tbl_users_p2"]),
        ("shard-two", ["tbl_users_p1", "tbl_users_p3"]),
    ):
        node = shard_of(sharded, shard)
        assert [
            row[0]
            for row in node.query(
                "SELECT relname FROM pg_inherits JOIN pg_class ON oid = inhrelid "
                "WHERE inhparent = 'tbl_users'::regclass ORDER BY 1"
            )
        ] == names
        assert node.query("SELECT indisprimary FROM pg_index WHERE indrelid = 'tbl_users'::regclass") == [(True,)]


def test_the_coordinator_logs_in_to_the_shards_with_a_role_of_its_own(sharded: LocalCluster) -> None:
    mapping = sharded.primary.query("SELECT srvname, umuser, umoptions FROM pg_user_mappings ORDER BY srvname")
    assert [(server, user) for server, user, _ in mapping] == [("shard_one", 0), ("shard_two", 0)]  # PUBLIC
    assert all("user=coordinator" in options for _, _, options in mapping)  # type: ignore[operator]
    for shard in sharded.shards:
        assert shard.query(
            "SELECT rolsuper, rolcanlogin, rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid "
            "WHERE rolname = 'coordinator'"
        ) == [(False, True, True)]
        # over TCP, with scram-sha-256, as pg_hba.conf says; a wrong password is refused
        with tcp(shard, "coordinator", COORDINATOR_PASSWORD) as connection:
            assert connection.execute("SELECT current_user").fetchone() == ("coordinator",)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            tcp(shard, "coordinator", "wrong")


def test_a_row_sent_to_the_wrong_shard_is_refused_there(sharded: LocalCluster) -> None:
    # Find an id whose hash sends it to tbl_users_p1 (shard-two), and try to store it on shard-one.
    with tcp(sharded.primary) as connection:
        query = "SELECT satisfies_hash_partition('tbl_users'::regclass, 4, 1, %s::uuid)"
        candidates = (uuid.uuid4() for _ in range(100))
        user_id = next(c for c in candidates if connection.execute(query, [c]).fetchone() == (True,))
    with tcp(shard_of(sharded, "shard-one")) as connection:
        with pytest.raises(psycopg.errors.CheckViolation, match="violates partition constraint"):
            connection.execute("INSERT INTO tbl_users_p0 VALUES (%s, 'Wrong')", [user_id])
        with pytest.raises(psycopg.errors.CheckViolation, match="no partition of relation"):
            connection.execute("INSERT INTO tbl_users VALUES (%s, 'Wrong')", [user_id])


# ------------------------------------------------------------------------------------------------
# The same demo, the same code: every row proven on its shard
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("users", [5, 20_000])
def test_every_row_is_on_its_predicted_shard_and_on_no_other(sharded: LocalCluster, users: int) -> None:
    result = run_demo(sharded, "--json", "--users", str(users), "--show", "5")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    on_shard = {shard.name: ids_on(shard) for shard in sharded.shards}  # read here, on each shard
    partitions = {partition["name"]: partition for partition in report["partitions"]}
    assert {name: p["stored_on"] for name, p in partitions.items()} == {
        "tbl_users_p0": "shard-one",
        "tbl_users_p1": "shard-two",
        "tbl_users_p2": "shard-one",
        "tbl_users_p3": "shard-two",
    }
    for user in report["inserted"]:
        home = partitions[user["predicted_partition"]]["stored_on"]
        assert on_shard[home][user["id"]] == user["predicted_partition"] == user["actual_partition"]
        assert all(user["id"] not in rows for shard, rows in on_shard.items() if shard != home)
    # Every one of this run's users, counted on the shards themselves, where predicted.
    for name, partition in partitions.items():
        assert report["on_shards"][partition["stored_on"]].get(name, 0) == partition["predicted"] == partition["actual"]
    assert sum(partition["actual"] for partition in partitions.values()) == users
    assert all(partition["in_recovery"] for partition in partitions.values())  # read through the replicas
    assert report["pruning"]["by_id"] == [f"public.{report['inserted'][0]['predicted_partition']}"]


def test_the_text_report_says_where_each_partition_is_stored(sharded: LocalCluster) -> None:
    result = run_demo(sharded)
    assert result.returncode == 0, result.stderr
    assert "Partition tbl_users_p0: " in result.stdout and " on shard-one\n" in result.stdout
    assert "  as predicted, and on no other shard: yes" in result.stdout
    # Pruning, from the server's plan: a lookup by id reaches one shard, a query without the key every one.
    home = {
        "tbl_users_p0": "shard-one",
        "tbl_users_p1": "shard-two",
        "tbl_users_p2": "shard-one",
        "tbl_users_p3": "shard-two",
    }
    [by_id] = re.findall(r"  WHERE id = <John's id> reads public\.(tbl_users_p\d) on (shard-\w+)\n", result.stdout)
    assert home[by_id[0]] == by_id[1]
    everywhere = ", ".join(f"public.{name} on {shard}" for name, shard in home.items())
    assert f"  WHERE first_name = 'John' reads {everywhere}\n" in result.stdout
    assert result.stderr == ""


def test_the_replicas_have_replayed_master_db_s_commit_before_the_reads(sharded: LocalCluster) -> None:
    # On this layout master-db's transaction writes no WAL of its own (its INSERTs go to the shards), and PostgreSQL
    # leaves the COMMIT record of such a transaction to the WAL writer. With that process stopped, the record would
    # stay unwritten: the demo would read a commit position before it, and find the replicas "caught up" without it.
    [[walwriter]] = sharded.primary.query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'")
    [[last]] = sharded.primary.query("SELECT pg_current_xact_id()")
    demo_s = str(int(str(last)) + 1)  # the demo's transaction takes the next xid: nothing else here takes one

    def status(node: PostgresNode) -> str:  # what the node knows of the demo's transaction
        try:
            [[known]] = node.query("SELECT pg_xact_status(CAST(%s AS xid8))", [demo_s])
        except psycopg.Error as error:  # a standby that has not replayed its commit: "... is in the future"
            return str(error).splitlines()[0]
        return str(known)

    os.kill(int(str(walwriter)), signal.SIGSTOP)
    try:
        result = run_demo(sharded, "--json")
        statuses = {node.name: status(node) for node in [sharded.primary, *sharded.replicas]}
    finally:
        os.kill(int(str(walwriter)), signal.SIGCONT)
    assert result.returncode == 0, result.stderr
    assert statuses == {"master-db": "committed", "replica-one": "committed", "replica-two": "committed"}
    caught_up = {entry["replica"] for entry in json.loads(result.stdout)["catchup"]}
    assert caught_up == {"replica-one", "replica-two"}


def test_a_synchronous_standby_that_never_confirms_does_not_hold_up_a_sharded_commit(sharded: LocalCluster) -> None:
    # master-db's standbys hold none of the rows, which the shards commit before master-db does, and PostgreSQL has
    # such a COMMIT wait for no standby. Making it write its commit record (above) must not change that: with
    # synchronous_standby_names naming a standby that does not exist, the run still ends, with the users stored.
    before = sum(len(ids_on(shard)) for shard in sharded.shards)

    def set_standby_names(statement: str, expected: str) -> None:
        sharded.primary.execute(statement)
        sharded.primary.execute("SELECT pg_reload_conf()")
        assert wait_until(lambda: sharded.primary.query("SHOW synchronous_standby_names") == [(expected,)])

    set_standby_names("ALTER SYSTEM SET synchronous_standby_names = 'nobody'", "nobody")
    try:
        result = run_demo(sharded, env={"DEMO_STALL_TIMEOUT": "2"})
    finally:
        set_standby_names("ALTER SYSTEM RESET synchronous_standby_names", "")
    assert result.returncode == 0, result.stderr
    assert sum(len(ids_on(shard)) for shard in sharded.shards) == before + 5


def test_no_password_appears_in_any_log(sharded: LocalCluster) -> None:
    run_demo(sharded)
    for node in sharded.nodes:
        assert COORDINATOR_PASSWORD not in node.log_text(), node.name


# ------------------------------------------------------------------------------------------------
# The limits, live
# ------------------------------------------------------------------------------------------------


def partitions_on(node: PostgresNode) -> list[str]:
    with tcp(node) as connection:
        rows = connection.execute("SELECT relname FROM pg_class WHERE relname LIKE 'tbl_users_p_' AND relkind = 'r'")
        return sorted(name for (name,) in rows)


@contextlib.contextmanager
def at_commit(node: PostgresNode, function: str, body: str) -> Iterator[None]:
    """A deferred constraint trigger on each of the shard's partitions: `body` (PL/pgSQL) runs for each new row only
    at COMMIT, once the coordinator has sent COMMIT to every shard (parallel_commit). Dropped afterwards."""
    partitions = partitions_on(node)
    node.execute(f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} END $$")
    for name in partitions:
        node.execute(
            f"CREATE CONSTRAINT TRIGGER {function} AFTER INSERT ON {name} "
            f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {function}()"
        )
    try:
        yield
    finally:
        for name in partitions:
            node.execute(f"DROP TRIGGER {function} ON {name}")
        node.execute(f"DROP FUNCTION {function}()")


def refusing(node: PostgresNode, message: str) -> contextlib.AbstractContextManager[None]:
    return at_commit(node, "refuse", f"RAISE EXCEPTION '{message}';")


# Sleeps a second, once per transaction: the shard's COMMIT takes that much longer.
SLEEP_ONCE = (
    "IF current_setting('demo.slept', true) IS NULL THEN "
    "PERFORM set_config('demo.slept', 'yes', true); PERFORM pg_sleep(1); END IF; RETURN NULL;"
)


def test_a_shard_that_refuses_a_row_is_told_as_the_shard_s_answer(sharded: LocalCluster) -> None:
    # A constraint on the shards' own tables (NOT VALID: the rows already there are not checked) refuses the run's
    # users. master-db passes the shard's error on: the line says whose answer it is, since master-db's foreign
    # tables have no such constraint to look for.
    before = {shard.name: len(ids_on(shard)) for shard in sharded.shards}
    stored_here = (
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'tbl_users'::regclass"
    )

    def on_every_shard_table(statement: str) -> None:
        for shard in sharded.shards:
            for (name,) in shard.query(stored_here):
                shard.execute(statement.format(table=name))

    on_every_shard_table("ALTER TABLE {table} ADD CONSTRAINT refuses CHECK (first_name LIKE 'x%') NOT VALID")
    try:
        result = run_demo(sharded)
    finally:
        on_every_shard_table("ALTER TABLE {table} DROP CONSTRAINT refuses")
    assert result.returncode == 7, result.stderr
    assert re.fullmatch(
        rf"sharding_demo.py: error: {re.escape(named(sharded.primary))} refused the insert: new row for relation "
        r'"tbl_users_p\d" violates check constraint "refuses" \(Failing row contains \(.+\)\.\) '
        r"\(a shard's answer, which postgres_fdw passed on\); nothing was written",
        result.stderr.strip(),
    ), result.stderr
    assert {shard.name: len(ids_on(shard)) for shard in sharded.shards} == before


def test_a_statement_that_a_shard_cancels_is_told_as_the_shard_s_answer(sharded: LocalCluster) -> None:
    # shard-two's statement_timeout for the coordinator's role cancels master-db's INSERT there: a statement trigger
    # dawdles past it. The cancel is the shard's, passed on by postgres_fdw, not master-db's own.
    shard_two = shard_of(sharded, "shard-two")
    before = {shard.name: len(ids_on(shard)) for shard in sharded.shards}
    partitions = partitions_on(shard_two)
    shard_two.execute(
        "CREATE FUNCTION dawdle() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$"
    )
    for name in partitions:
        shard_two.execute(f"CREATE TRIGGER dawdle BEFORE INSERT ON {name} FOR EACH STATEMENT EXECUTE FUNCTION dawdle()")
    shard_two.execute("ALTER ROLE coordinator SET statement_timeout = '200ms'")  # read as master-db's session opens
    try:
        result = run_demo(sharded)
    finally:
        shard_two.execute("ALTER ROLE coordinator RESET statement_timeout")
        for name in partitions:
            shard_two.execute(f"DROP TRIGGER dawdle ON {name}")
        shard_two.execute("DROP FUNCTION dawdle()")
    assert result.returncode == 7, result.stderr
    assert result.stderr.strip() == (
        f"sharding_demo.py: error: {named(sharded.primary)} refused the insert: canceling statement due to statement "
        "timeout (a shard's answer, which postgres_fdw passed on); nothing was written"
    )
    assert {shard.name: len(ids_on(shard)) for shard in sharded.shards} == before


@pytest.mark.parametrize("users", [100, 1000])  # the ORM path, and the bulk path (COPY)
def test_a_commit_that_half_fails_says_what_each_shard_kept(sharded: LocalCluster, users: int) -> None:
    shard_two = shard_of(sharded, "shard-two")
    before = {shard.name: len(ids_on(shard)) for shard in sharded.shards}
    # shard-two refuses its rows only at COMMIT, after the coordinator has sent COMMIT to shard-one too.
    with refusing(shard_two, "shard-two refuses at commit"):
        result = run_demo(sharded, "--users", str(users))
    kept = {shard.name: len(ids_on(shard)) - before[shard.name] for shard in sharded.shards}

    assert result.returncode == 10, result.stderr
    [line] = [line for line in result.stderr.splitlines() if " of 1,000 users" not in line]  # not progress
    assert kept["shard-two"] == 0 and kept["shard-one"] > 0  # half committed, truly
    assert line == (
        f"sharding_demo.py: error: {named(sharded.primary)} refused the COMMIT: shard-two refuses at commit "
        "(a shard's answer, which postgres_fdw passed on); partly committed, as read on each shard: "
        f"{named(shard_of(sharded, 'shard-one'))} kept {kept['shard-one']:,} of this run's {users:,} users, "
        f"{named(shard_two)} kept 0 of this run's {users:,} users; those stay (postgres_fdw has no two-phase "
        "commit), and tbl_users shows them"
    )


@pytest.mark.parametrize("slow, refuser", [("shard-one", "shard-two"), ("shard-two", "shard-one")])
def test_a_half_commit_is_counted_once_the_other_shard_has_finished_committing(
    sharded: LocalCluster, slow: str, refuser: str
) -> None:
    # One shard refuses at COMMIT at once; the other takes a second to commit (a deferred trigger that sleeps once).
    # Once a shard's COMMIT has failed, postgres_fdw does not wait for the others' answers, so when the refusing
    # shard's answer is read first, the coordinator's error comes back while the slow shard is still committing:
    # counted at once, it would seem to have kept nothing. Which shard's answer is read first depends on
    # postgres_fdw's connection cache, so the test runs both ways round.
    slow_node, refusing_node = shard_of(sharded, slow), shard_of(sharded, refuser)
    before = len(ids_on(slow_node))
    with at_commit(slow_node, "slow", SLEEP_ONCE), refusing(refusing_node, f"{refuser} refuses at commit"):
        result = run_demo(sharded, "--users", "100")
    kept = len(ids_on(slow_node)) - before

    assert result.returncode == 10, result.stderr
    assert kept > 0
    told = {
        slow: f"{named(slow_node)} kept {kept:,} of this run's 100 users",
        refuser: f"{named(refusing_node)} kept 0 of this run's 100 users",
    }
    assert f"{told['shard-one']}, {told['shard-two']};" in result.stderr


@pytest.mark.parametrize("refusers", [("shard-two",), ("shard-one", "shard-two")])
def test_a_half_commit_that_cannot_be_counted_for_sure_says_so(
    sharded: LocalCluster, refusers: tuple[str, ...]
) -> None:
    # Another transaction stays open on shard-one (it holds an xid) for longer than the stall bound, so the demo
    # cannot know that shard-one has no commit of this run still in flight: it says what it counted "so far", and
    # if that is nothing anywhere, that the outcome is unknown (exit 8), not that nothing was written.
    before = {shard.name: len(ids_on(shard)) for shard in sharded.shards}
    with contextlib.ExitStack() as stack:
        for name in refusers:
            stack.enter_context(refusing(shard_of(sharded, name), "refused at commit"))
        with tcp(shard_of(sharded, "shard-one")) as other:
            other.execute("BEGIN")
            other.execute("SELECT pg_current_xact_id()")  # now it holds an xid, until it ends
            result = run_demo(sharded, "--users", "100", env={"DEMO_STALL_TIMEOUT": "1"})
            other.execute("ROLLBACK")
    kept = {shard.name: len(ids_on(shard)) - before[shard.name] for shard in sharded.shards}

    [line] = result.stderr.splitlines()
    shard_one = named(shard_of(sharded, "shard-one"))
    assert f"{shard_one} kept" in line and "of this run's 100 users so far (a transaction was still open there)" in line
    if len(refusers) == 1:
        assert result.returncode == 10, result.stderr
        assert kept["shard-one"] > 0 and kept["shard-two"] == 0
        assert f"{shard_one} kept {kept['shard-one']:,} of this run's 100 users so far" in line
    else:
        assert result.returncode == 8, result.stderr
        assert kept == {"shard-one": 0, "shard-two": 0}
        assert line.endswith("whether any of them is kept is unknown: count the rows of tbl_users before running again")


def test_a_coordinator_lost_during_its_commit_says_what_each_shard_kept(sharded: LocalCluster) -> None:
    # With parallel_commit, master-db sends COMMIT to both shards at once: shard-one commits, shard-two sleeps in a
    # deferred trigger. Then the demo's server process on master-db is terminated. Asked afterwards, master-db says
    # its own part was rolled back ('aborted'), which says nothing of the shards': the demo counts on each.
    shard_one, shard_two = shard_of(sharded, "shard-one"), shard_of(sharded, "shard-two")
    before = {shard.name: len(ids_on(shard)) for shard in sharded.shards}
    with at_commit(shard_two, "sleepy", "PERFORM pg_sleep(60); RETURN NULL;"):
        demo = start_demo(sharded, "--users", "100", env={"DEMO_STALL_TIMEOUT": "2"})
        with tcp(shard_two) as on_shard_two, tcp(sharded.primary) as on_master:

            def sleeping() -> list[tuple[Any, ...]]:
                return on_shard_two.execute("SELECT pid FROM pg_stat_activity WHERE wait_event = 'PgSleep'").fetchall()

            assert wait_until(lambda: bool(sleeping()), timeout=60, interval=0.02)
            on_master.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'sharding_demo' AND query = 'COMMIT'"
            )
            _, stderr = demo.communicate(timeout=60)
            for (pid,) in sleeping():  # its transaction is rolled back, not committed a minute later
                on_shard_two.execute("SELECT pg_terminate_backend(%s)", [pid])
    kept = {shard.name: len(ids_on(shard)) - before[shard.name] for shard in sharded.shards}

    assert demo.returncode == 10, stderr
    assert kept["shard-one"] > 0 and kept["shard-two"] == 0
    [line] = stderr.splitlines()
    assert re.fullmatch(
        rf"sharding_demo.py: error: lost {re.escape(named(sharded.primary))} during the COMMIT \(.+\), but master-db "
        r"says its transaction \d+ is 'aborted' \(pg_xact_status\); partly committed, as read on each shard: "
        f"{re.escape(named(shard_one))} kept {kept['shard-one']:,} of this run's 100 users, "
        f"{re.escape(named(shard_two))} kept 0 of this run's 100 users so far "
        r"\(a transaction was still open there\); those stay \(postgres_fdw has no two-phase commit\), and tbl_users "
        r"shows them",
        line,
    ), line
    assert len(ids_on(shard_one)) == before["shard-one"] + kept["shard-one"]


def test_an_interruption_while_the_shards_are_counted_says_the_outcome_is_unknown(sharded: LocalCluster) -> None:
    # shard-two refuses at COMMIT; shard-one commits. A transaction left open on shard-one makes the demo wait
    # before it counts there, and SIGTERM comes during that wait: the run has written on shard-one, so "interrupted
    # before the insert: nothing was written" would be false. It says what it knows: that it does not know.
    shard_one = shard_of(sharded, "shard-one")
    before = len(ids_on(shard_one))
    with refusing(shard_of(sharded, "shard-two"), "refused at commit"), tcp(shard_one) as other:
        other.execute("BEGIN")
        other.execute("SELECT pg_current_xact_id()")  # holds an xid until it ends
        demo = start_demo(sharded, "--users", "100", env={"DEMO_STALL_TIMEOUT": "60"})
        with tcp(shard_one) as watcher:

            def counting() -> bool:  # the demo's wait for the transactions in flight on shard-one
                query = "SELECT FROM pg_stat_activity WHERE application_name = 'sharding_demo' AND query LIKE %s"
                return bool(watcher.execute(query, ["%backend_xid%"]).fetchall())

            assert wait_until(counting, timeout=60, interval=0.02)
        demo.send_signal(signal.SIGTERM)
        _, stderr = demo.communicate(timeout=60)
        other.execute("ROLLBACK")
    assert demo.returncode == 143, stderr
    assert stderr.splitlines() == [
        f"sharding_demo.py: error: interrupted (SIGTERM) while the shards were counted: {named(sharded.primary)} "
        "refused the COMMIT: refused at commit (a shard's answer, which postgres_fdw passed on); as read on each "
        f"shard: {named(shard_one)} was not counted "
        f"(interrupted), {named(shard_of(sharded, 'shard-two'))} was not counted (interrupted); whether any of them "
        "is kept is unknown: count the rows of tbl_users before running again"
    ]
    assert len(ids_on(shard_one)) > before  # shard-one did keep some: "nothing was written" would have been false


def test_a_read_across_shards_can_see_half_of_a_transaction_that_committed_whole(sharded: LocalCluster) -> None:
    # docs/read-half-a-commit.sql: Ann (for p0, on shard-one) and Ben (for p1, on shard-two) are inserted and
    # committed in one transaction, while a REPEATABLE READ reader on master-db has read shard-one only. The reader
    # then sees Ben but not Ann: postgres_fdw opens its transaction on each shard when the reader first reaches it,
    # and each shard takes its own snapshot. (On one server, the reader's one snapshot would see neither.)
    before = len(ids_on(sharded.primary))
    output = sharded.primary.run("psql", "-X", "-q", "-A", "-t", "-f", PROJECT_DIR / "docs" / "read-half-a-commit.sql")
    lines = output.splitlines()
    writer = lines.index("INSERT 0 2")  # the second session's INSERT, committed on both shards
    assert lines[writer + 1 :] == [
        "Ben|tbl_users_p1",  # the reader, in the transaction that had read shard-one before the commit
        "Ann|tbl_users_p0",  # the reader, in a new transaction: both
        "Ben|tbl_users_p1",
    ], output
    assert len(ids_on(sharded.primary)) == before  # the file deletes its two rows


def test_a_shard_that_is_down_stops_the_write_and_nothing_is_written(sharded: LocalCluster) -> None:
    shard_two = shard_of(sharded, "shard-two")
    # Rows on shard-one for the lookup below, also when this test runs alone: 100 users leave tbl_users_p0 empty
    # once in 10^12 runs.
    assert run_demo(sharded, "--users", "100").returncode == 0
    before = {shard.name: len(ids_on(shard)) for shard in sharded.shards}
    shard_two.stop()
    try:
        result = run_demo(sharded, "--users", "50")
        # Reads through the coordinator: a lookup pruned to shard-one still answers, one that needs
        # shard-two says so.
        with tcp(sharded.primary) as connection:
            on_one = connection.execute("SELECT id FROM tbl_users_p0 LIMIT 1").fetchone()
            assert on_one is not None
            assert connection.execute("SELECT first_name FROM tbl_users WHERE id = %s", on_one).fetchone()
            with pytest.raises(psycopg.OperationalError, match='could not connect to server "shard_two"'):
                connection.execute("SELECT count(*) FROM tbl_users")
    finally:
        shard_two.start()
    assert result.returncode == 9, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(
        f"sharding_demo.py: error: {named(shard_two)}, which stores tbl_users_p1, "
        "tbl_users_p3 "
        "for master-db, is unreachable: "
    )
    assert line.endswith("; nothing was written on any shard")
    assert {shard.name: len(ids_on(shard)) for shard in sharded.shards} == before


def test_a_shard_that_keeps_the_checks_waiting_for_a_lock_is_named(sharded: LocalCluster) -> None:
    # The rebalancing procedure done by hand in psql, and left open on shard-one after its DROP TABLE, say: the
    # shard answers, but the demo's question about tbl_users_p2 waits for the lock.
    shard_one = shard_of(sharded, "shard-one")
    before = {shard.name: len(ids_on(shard)) for shard in sharded.shards}
    with holding_a_lock(shard_one, "LOCK TABLE tbl_users_p2 IN ACCESS EXCLUSIVE MODE"):
        result = run_demo(sharded, env={"DEMO_STALL_TIMEOUT": "2"})
    assert result.returncode == 9, result.stderr
    [line] = result.stderr.splitlines()
    assert line == (
        f"sharding_demo.py: error: {named(shard_one)}, which stores tbl_users_p0, tbl_users_p2 "
        "for master-db, did not answer for 2 s (DEMO_STALL_TIMEOUT); nothing was written on any shard"
    )
    assert {shard.name: len(ids_on(shard)) for shard in sharded.shards} == before


def test_a_lock_on_a_shard_that_keeps_the_insert_waiting_is_told_from_the_coordinator(sharded: LocalCluster) -> None:
    # SHARE keeps out writes, not the checks' reads: master-db's INSERT waits on shard-one through postgres_fdw.
    shard_one = shard_of(sharded, "shard-one")
    before = {shard.name: len(ids_on(shard)) for shard in sharded.shards}
    with holding_a_lock(shard_one, "LOCK TABLE tbl_users_p0, tbl_users_p2 IN SHARE MODE") as blocker:
        # 50 users: that none of them is for shard-one's partitions has a chance of 1 in 2**50
        result = run_demo(sharded, "--users", "50", env={"DEMO_STALL_TIMEOUT": "2"})
        # master-db's cancel reached the shard: postgres_fdw's remote INSERT is not left waiting for the lock
        assert wait_until(lambda: only_the_lock_holder_is_left(shard_one, blocker), timeout=10)
    assert result.returncode == 3, result.stderr
    [line] = result.stderr.splitlines()
    assert line == (
        f"sharding_demo.py: error: {named(sharded.primary)} did not answer for 2 s "
        "(DEMO_STALL_TIMEOUT) during the insert; nothing was written"
    )
    assert {shard.name: len(ids_on(shard)) for shard in sharded.shards} == before


def test_a_coordinator_that_cannot_log_in_to_a_shard_is_found_before_the_write(sharded: LocalCluster) -> None:
    # The coordinator's password for shard-two changed on one side only (say, COORDINATOR_PASSWORD changed after
    # the shard was made): the demo's own login to shard-two works, but master-db's does not. The check asks
    # shard-two who it is through master-db too, so this is found before the insert, with postgres_fdw's DETAIL.
    before = {shard.name: len(ids_on(shard)) for shard in sharded.shards}
    shard_two = shard_of(sharded, "shard-two")

    def set_the_coordinator_s_password(password: str) -> None:
        with tcp(sharded.primary) as connection:
            connection.execute("SET log_statement = 'none'")  # keep the password out of the log
            connection.execute(
                sql.SQL("ALTER USER MAPPING FOR PUBLIC SERVER shard_two OPTIONS (SET password {})").format(password)
            )

    set_the_coordinator_s_password("not-the-one")
    try:
        result = run_demo(sharded)
    finally:
        set_the_coordinator_s_password(COORDINATOR_PASSWORD)
    assert result.returncode == 9, result.stderr
    assert result.stderr.splitlines() == [
        f"sharding_demo.py: error: {named(sharded.primary)} could not say who stores tbl_users_p1, tbl_users_p3 for "
        f'it, to compare with {named(shard_two)}: could not connect to server "shard_two" (connection to server at '
        f'"127.0.0.1", port {shard_two.port} failed: FATAL:  password authentication failed for user "coordinator"); '
        "nothing was written on any shard"
    ]
    assert {shard.name: len(ids_on(shard)) for shard in sharded.shards} == before


def a_look_alike_database(node: PostgresNode) -> None:
    """A database `lookalike` on `node` with shard-one's tables, bound as on master-db, but none of its rows."""
    with tcp(node) as connection:
        connection.execute("DROP DATABASE IF EXISTS lookalike")
        connection.execute("CREATE DATABASE lookalike")
    with tcp(node, dbname="lookalike") as connection:
        connection.execute("CREATE TABLE tbl_users (id uuid PRIMARY KEY, first_name text) PARTITION BY HASH (id)")
        connection.execute("CREATE TABLE tbl_users_p0 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 4, REMAINDER 0)")
        connection.execute("CREATE TABLE tbl_users_p2 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 4, REMAINDER 2)")


@contextlib.contextmanager
def a_copy_of(sharded: LocalCluster, shard: PostgresNode) -> Iterator[PostgresNode]:
    """A physical copy of a shard (pg_basebackup), started on a port of its own as a server in its own right: the
    same cluster, with the same tables and rows, but not the server that master-db stores on."""
    copy = PostgresNode(f"{shard.name}-copy", free_port_base(1), sharded.base_dir, sharded.runner, shard.env)
    copy.run(
        "pg_basebackup",
        f"--pgdata={copy.data_dir}",
        f"--host={shard.socket_dir}",
        f"--port={shard.port}",
        "--username=postgres",
        "--wal-method=stream",
        "--checkpoint=fast",
    )
    copy.start()
    try:
        yield copy
    finally:
        copy.stop()


@pytest.mark.parametrize("look_alike", ["another cluster", "another database", "a copy"])
def test_a_shard_setting_that_points_at_a_look_alike_is_refused_before_the_write(
    sharded: LocalCluster, look_alike: str
) -> None:
    # A server that holds shard-one's tables, bound as on master-db, passes the check of the tables. Only asking who
    # it is, on it and through master-db, tells it from shard-one: else the run would commit, and the proof read on
    # the look-alike would say MISMATCH.
    shard_one, shard_two = shard_of(sharded, "shard-one"), shard_of(sharded, "shard-two")
    before = {node.name: len(ids_on(node)) for node in sharded.shards}
    with contextlib.ExitStack() as stack:
        if look_alike == "a copy":
            port, env = stack.enter_context(a_copy_of(sharded, shard_one)).port, {}
            started = shard_one.query("SELECT pg_postmaster_start_time()")[0][0]
        else:
            node = shard_two if look_alike == "another cluster" else shard_one
            a_look_alike_database(node)
            port, env = node.port, {"SHARD_ONE_NAME": "lookalike"}
        result = run_demo(sharded, env={"SHARD_ONE_PORT": str(port), **env})
    assert result.returncode == 9, result.stderr
    [line] = result.stderr.splitlines()
    prefix = (
        f"sharding_demo.py: error: shard-one (127.0.0.1:{port}) is not the server that master-db stores "
        "tbl_users_p0, tbl_users_p2 on: "
    )
    assert line.startswith(prefix)
    fix = "check SHARD_ONE_NAME" if look_alike == "another database" else "check SHARD_ONE_HOST and SHARD_ONE_PORT"
    options = "dbname" if look_alike == "another database" else "host and port"
    assert line.endswith(
        f"): {fix}, or the {options} of master-db's foreign server shard_one; nothing was written on any shard"
    )
    why = line.removeprefix(prefix)
    [[one]], [[two]] = shard_one.query(IDENTIFIER), shard_two.query(IDENTIFIER)
    if look_alike == "another cluster":
        assert why.startswith(f"another cluster (system identifier {two}; master-db's shard-one has {one})")
    elif look_alike == "another database":
        assert why.startswith("another database (lookalike; master-db's shard-one is database postgres)")
    else:
        assert why.startswith("another server of its cluster, a copy (started at ")
        assert f"; master-db's shard-one at {started})" in why
    assert {node.name: len(ids_on(node)) for node in sharded.shards} == before


def test_a_foreign_server_on_master_db_that_points_at_another_shard_is_refused_before_the_write(
    sharded: LocalCluster,
) -> None:
    # The other side of the same mistake: SHARD_ONE_* reach shard-one, but master-db's foreign server shard_one
    # points at shard-two. master-db would send p0 and p2 there (where shard-two has no such tables).
    shard_one, shard_two = shard_of(sharded, "shard-one"), shard_of(sharded, "shard-two")
    before = {node.name: len(ids_on(node)) for node in sharded.shards}
    sharded.primary.execute(f"ALTER SERVER shard_one OPTIONS (SET port '{shard_two.port}')")
    try:
        result = run_demo(sharded)
    finally:
        sharded.primary.execute(f"ALTER SERVER shard_one OPTIONS (SET port '{shard_one.port}')")
    assert result.returncode == 9, result.stderr
    [[one]], [[two]] = shard_one.query(IDENTIFIER), shard_two.query(IDENTIFIER)
    assert result.stderr == (
        f"sharding_demo.py: error: {named(shard_one)} is not the server that master-db stores tbl_users_p0, "
        f"tbl_users_p2 on: another cluster (system identifier {one}; master-db's shard-one has {two}): check "
        "SHARD_ONE_HOST and SHARD_ONE_PORT, or the host and port of master-db's foreign server shard_one; nothing "
        "was written on any shard\n"
    )
    assert {node.name: len(ids_on(node)) for node in sharded.shards} == before


def test_a_layout_made_before_the_shards_could_be_asked_who_they_are_says_to_make_it_afresh(
    sharded: LocalCluster,
) -> None:
    # A compose volume made by an older init-shard.sh has no foreign table shard_one_identity on master-db.
    before = {node.name: len(ids_on(node)) for node in sharded.shards}
    sharded.primary.execute("ALTER FOREIGN TABLE shard_one_identity RENAME TO shard_one_identity_hidden")
    try:
        result = run_demo(sharded)
    finally:
        sharded.primary.execute("ALTER FOREIGN TABLE shard_one_identity_hidden RENAME TO shard_one_identity")
    assert result.returncode == 9, result.stderr
    assert result.stderr.splitlines() == [
        f"sharding_demo.py: error: {named(sharded.primary)} could not say who stores tbl_users_p0, tbl_users_p2 for "
        f"it, to compare with {named(shard_of(sharded, 'shard-one'))}: it has no shard_one_identity (an older "
        "init-shard.sh made this layout; make it afresh with docker compose --profile sharded down -v, then up); "
        "nothing was written on any shard"
    ]
    assert {node.name: len(ids_on(node)) for node in sharded.shards} == before


def test_a_shard_that_keeps_master_db_s_question_waiting_is_cut_off_at_the_stall_bound(sharded: LocalCluster) -> None:
    # A lock on shard-two's view holds up only the question asked through master-db (the demo's own question calls
    # pg_control_system() directly): master-db waits on shard-two, and the demo gives up at the stall bound.
    shard_two = shard_of(sharded, "shard-two")
    before = {shard.name: len(ids_on(shard)) for shard in sharded.shards}
    with holding_a_lock(shard_two, "LOCK TABLE shard_identity IN ACCESS EXCLUSIVE MODE") as blocker:
        started = time.monotonic()
        result = run_demo(sharded, env={"DEMO_STALL_TIMEOUT": "2"})
        elapsed = time.monotonic() - started
        # master-db's backend ends its statement (client_connection_check_interval), and postgres_fdw cancels the
        # remote one: nothing is left waiting on shard-two but the lock's holder.
        assert wait_until(lambda: only_the_lock_holder_is_left(shard_two, blocker), timeout=10)
    assert result.returncode == 9, result.stderr
    assert result.stderr.splitlines() == [
        f"sharding_demo.py: error: {named(sharded.primary)} could not say who stores tbl_users_p1, tbl_users_p3 for "
        f"it, to compare with {named(shard_two)}: it did not answer for 2 s (DEMO_STALL_TIMEOUT); nothing was written "
        "on any shard"
    ]
    assert elapsed < 2 + 5  # the bound, and the demo's start-up and checks
    assert {shard.name: len(ids_on(shard)) for shard in sharded.shards} == before


def test_a_primary_user_that_may_not_read_a_shard_s_identity_is_told_the_grant_it_needs(sharded: LocalCluster) -> None:
    # A role of the learner's own on master-db, with what the write and the reads need, and no more: the check of
    # the shards asks through master-db too, so it needs SELECT on their identity tables as well.
    a_login_role(
        sharded,
        "app",
        "GRANT SELECT, INSERT ON tbl_users, tbl_users_p0, tbl_users_p1, tbl_users_p2, tbl_users_p3 TO app",
    )
    before = {shard.name: len(ids_on(shard)) for shard in sharded.shards}
    result = run_demo(sharded, env=logged_in_as("app", "x"))
    assert result.returncode == 9, result.stderr
    assert result.stderr.splitlines() == [
        f"sharding_demo.py: error: {named(sharded.primary)} could not say who stores tbl_users_p0, tbl_users_p2 for "
        f"it, to compare with {named(shard_of(sharded, 'shard-one'))}: user app may not read its shard_one_identity "
        "(the check needs SELECT on it): check MASTER_DB_USER; nothing was written on any shard"
    ]
    assert {shard.name: len(ids_on(shard)) for shard in sharded.shards} == before
    # With that grant, the role runs the whole demo.
    sharded.primary.execute("GRANT SELECT ON shard_one_identity, shard_two_identity TO app")
    assert wait_until(
        lambda: all(
            replica.query("SELECT has_table_privilege('app', 'shard_two_identity', 'SELECT')") == [(True,)]
            for replica in sharded.replicas
        )
    )
    result = run_demo(sharded, env=logged_in_as("app", "x"))
    assert result.returncode == 0, result.stderr
    assert sum(len(ids_on(shard)) for shard in sharded.shards) == sum(before.values()) + 5


def test_a_shard_without_its_identity_view_is_told_as_the_shard_s_answer(sharded: LocalCluster) -> None:
    # master-db has shard_two_identity, but shard-two's view is gone: the error is shard-two's, passed on.
    before = {node.name: len(ids_on(node)) for node in sharded.shards}
    shard_two = shard_of(sharded, "shard-two")
    shard_two.execute("ALTER VIEW shard_identity RENAME TO shard_identity_hidden")
    try:
        result = run_demo(sharded)
    finally:
        shard_two.execute("ALTER VIEW shard_identity_hidden RENAME TO shard_identity")
    assert result.returncode == 9, result.stderr
    assert result.stderr.splitlines() == [
        f"sharding_demo.py: error: {named(sharded.primary)} could not say who stores tbl_users_p1, tbl_users_p3 for "
        f'it, to compare with {named(shard_two)}: relation "public.shard_identity" does not exist (the shard'
        "'s answer, which postgres_fdw passed on); nothing was written on any shard"
    ]
    assert {node.name: len(ids_on(node)) for node in sharded.shards} == before


@pytest.mark.parametrize("points_at", ["master-db", "replica-one", "shard-two"])
def test_a_shard_setting_that_points_at_another_server_is_refused_before_the_write(
    sharded: LocalCluster, points_at: str
) -> None:
    # master-db and its replicas have tables named tbl_users_p0 and tbl_users_p2, but foreign ones, and shard-two
    # has none: none of them stores shard-one's rows, so reading "on shard-one" there would prove nothing.
    other = next(node for node in sharded.nodes if node.name == points_at)
    before = {node.name: len(ids_on(node)) for node in sharded.shards}
    result = run_demo(sharded, env={"SHARD_ONE_PORT": str(other.port)})
    assert result.returncode == 9, result.stderr
    assert result.stderr.splitlines() == [
        f"sharding_demo.py: error: shard-one (127.0.0.1:{other.port}) does not hold tbl_users_p0, tbl_users_p2 as "
        "tables of its own, bound as on master-db: check SHARD_ONE_HOST, SHARD_ONE_PORT and SHARD_ONE_NAME; nothing "
        "was written on any shard"
    ]
    assert {node.name: len(ids_on(node)) for node in sharded.shards} == before


def test_a_shard_database_without_tbl_users_is_told_as_not_holding_the_partitions(sharded: LocalCluster) -> None:
    # SHARD_ONE_NAME set to a database there that has no tables at all: no tbl_users, so none that may not be read.
    shard_one = shard_of(sharded, "shard-one")
    with tcp(shard_one) as connection:
        connection.autocommit = True
        connection.execute("DROP DATABASE IF EXISTS no_shard_tables")
        connection.execute("CREATE DATABASE no_shard_tables")
    result = run_demo(sharded, env={"SHARD_ONE_NAME": "no_shard_tables"})
    assert result.returncode == 9, result.stderr
    assert result.stderr.splitlines() == [
        f"sharding_demo.py: error: {named(shard_one)} does not hold tbl_users_p0, tbl_users_p2 "
        "as tables of its own, bound as on master-db: check SHARD_ONE_HOST, SHARD_ONE_PORT and SHARD_ONE_NAME; "
        "nothing was written on any shard"
    ]


def test_a_shard_user_that_may_not_read_its_tbl_users_is_refused_before_the_write(sharded: LocalCluster) -> None:
    # SHARD_ONE_USER=coordinator, the role master-db uses there: it may read the partitions, not the shard's parent,
    # which the demo reads to prove where each row is. Found only after the commit, it failed the run, exit 6.
    before = {node.name: len(ids_on(node)) for node in sharded.shards}
    shard_one = shard_of(sharded, "shard-one")
    result = run_demo(sharded, env={"SHARD_ONE_USER": "coordinator", "SHARD_ONE_PASSWORD": COORDINATOR_PASSWORD})
    assert result.returncode == 9, result.stderr
    assert result.stderr.splitlines() == [
        f"sharding_demo.py: error: {named(shard_one)} stores tbl_users_p0, tbl_users_p2 for "
        "master-db, but user coordinator may not read its tbl_users (SELECT), which the demo reads to prove where "
        "each row is: check SHARD_ONE_USER; nothing was written on any shard"
    ]
    assert COORDINATOR_PASSWORD not in result.stderr
    assert {node.name: len(ids_on(node)) for node in sharded.shards} == before


def test_a_read_only_role_on_a_coordinator_replica_is_left_out_with_the_grant_it_needs(sharded: LocalCluster) -> None:
    # On the sharded layout the partitions are foreign tables: "permission denied for foreign table tbl_users_p0".
    a_login_role(sharded, "parent_only", "GRANT SELECT ON tbl_users TO parent_only")
    # In turn: replica-two reads the parent first, then replica-one is asked for tbl_users_p0 (at random, maybe never)
    as_reader = {"REPLICA_ONE_USER": "parent_only", "REPLICA_ONE_PASSWORD": "x"}
    result = run_demo(sharded, "--json", "--read-policy", "round-robin", env=as_reader)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    [skip] = report["skipped"]
    assert skip["replica"] == "replica-one"
    assert skip["reason"] == (
        "answered the demo's question with an error: permission denied for foreign table tbl_users_p0 (the demo reads "
        "tbl_users and each partition: its user needs SELECT on all of them): check REPLICA_ONE_USER"
    )
    assert {partition["read_from"] for partition in report["partitions"]} == {"replica-two"}


def test_a_shard_that_refuses_the_coordinator_s_reads_is_not_blamed_on_a_replica(
    sharded: LocalCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The coordinator's role loses SELECT on tbl_users_p0 on shard-one: every read through master-db or its
    # replicas that reaches that partition gets "permission denied for table tbl_users_p0", which postgres_fdw
    # passes on. No replica's user is at fault, so none is left out, and the message says whose answer it was.
    shard_one = shard_of(sharded, "shard-one")
    before = sum(len(ids_on(shard)) for shard in sharded.shards)
    left_out: list[str] = []
    original = sharding_demo.leave_out

    def noting(router: Any, replica: Any, reason: str, when: str) -> None:
        left_out.append(replica.service)
        original(router, replica, reason, when)

    monkeypatch.setattr(sharding_demo, "leave_out", noting)
    shard_one.execute("REVOKE SELECT ON tbl_users_p0 FROM coordinator")
    try:
        with pytest.raises(sharding_demo.DemoError) as failure:
            run_here(sharded, monkeypatch, tmp_path, users=5)
    finally:
        shard_one.execute("GRANT SELECT ON tbl_users_p0 TO coordinator")
    assert failure.value.exit_code == 6
    assert re.match(
        r"failed after the commit: a read from replica-(one|two) \(127.0.0.1:\d+\) failed: permission denied for "
        r"table tbl_users_p0 \(a shard's answer, which postgres_fdw passed on\); 5 users were committed on master-db",
        str(failure.value),
    ), failure.value
    assert left_out == []
    assert sum(len(ids_on(shard)) for shard in sharded.shards) == before + 5


def run_here(sharded: LocalCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, users: int) -> Any:
    """sharding_demo.run() in this process against the sharded cluster, with a stall bound of 2 s."""
    for name, value in sharded.demo_environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return sharding_demo.run(sharding_demo.DemoSettings(users=users, stall_timeout=2.0))


def test_a_shard_that_stops_during_the_reads_is_named_not_the_servers_that_wait_on_it(
    sharded: LocalCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Once the replicas have caught up, shard-two stops answering (SIGSTOP). The reads through the coordinator's
    # replicas wait on it, through postgres_fdw, and so look stopped themselves; the message must name shard-two.
    shard_two = shard_of(sharded, "shard-two")
    before = sum(len(ids_on(shard)) for shard in sharded.shards)
    original = sharding_demo.wait_for_replicas

    def wait_then_stop_shard_two(*arguments: Any) -> Any:
        caught_up = original(*arguments)
        shard_two.pause()
        return caught_up

    monkeypatch.setattr(sharding_demo, "wait_for_replicas", wait_then_stop_shard_two)
    started = time.monotonic()
    try:
        with pytest.raises(sharding_demo.DemoError) as failure:
            run_here(sharded, monkeypatch, tmp_path, users=5)  # the reads of every partition need shard-two
    finally:
        shard_two.resume()
    seconds = time.monotonic() - started

    assert failure.value.exit_code == 6
    assert str(failure.value).startswith(
        f"failed after the commit: {named(shard_two)} did not answer for 2 s "
        "(DEMO_STALL_TIMEOUT), and the reads need it; 5 users were committed on master-db"
    )
    assert seconds < 10, seconds  # a replica's cut-off, then one question to each shard, each within the bound
    assert sum(len(ids_on(shard)) for shard in sharded.shards) == before + 5


def test_a_shard_that_shuts_down_before_the_demo_reads_it_directly_is_named(
    sharded: LocalCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Once this run's users have been found through a replica, shard-one shuts down (fast), so the demo's own read
    # of it, the proof of where each row is, fails. libpq's text ("terminating connection due to administrator
    # command") names no server: the line must.
    shard_one = shard_of(sharded, "shard-one")
    before = sum(len(ids_on(shard)) for shard in sharded.shards)
    original = sharding_demo.ReadWriteRouter.read

    def read_then_shut_down_shard_one(router: Any, work: Any) -> Any:
        answer = original(router, work)
        if shard_one.running:  # after the first read only: where this run's users landed, through a replica
            shard_one.stop()
        return answer

    monkeypatch.setattr(sharding_demo.ReadWriteRouter, "read", read_then_shut_down_shard_one)
    try:
        with pytest.raises(sharding_demo.DemoError) as failure:
            run_here(sharded, monkeypatch, tmp_path, users=5)
    finally:
        shard_one.start()

    assert failure.value.exit_code == 6
    assert str(failure.value).startswith(f"failed after the commit: a read from {named(shard_one)} failed: "), (
        failure.value
    )
    assert "; 5 users were committed on master-db" in str(failure.value)
    assert sum(len(ids_on(shard)) for shard in sharded.shards) == before + 5


def test_a_shard_that_stops_during_the_insert_is_named_and_nothing_is_written(
    sharded: LocalCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shard_two = shard_of(sharded, "shard-two")
    before = {shard.name: len(ids_on(shard)) for shard in sharded.shards}
    original = sharding_demo.commit

    def stop_shard_two_then_commit(*arguments: Any) -> Any:
        shard_two.pause()
        return original(*arguments)

    monkeypatch.setattr(sharding_demo, "commit", stop_shard_two_then_commit)
    try:
        with pytest.raises(sharding_demo.DemoError) as failure:
            # 100 users, so that some are certainly for shard-two (5 would all miss it once in 32 runs)
            run_here(sharded, monkeypatch, tmp_path, users=100)
    finally:
        shard_two.resume()

    assert failure.value.exit_code == 9
    assert str(failure.value) == (
        f"{named(shard_two)} did not answer for 2 s (DEMO_STALL_TIMEOUT) during the insert "
        "(master-db was waiting on it); nothing was written"
    )
    # master-db finishes the insert once shard-two answers again, finds the demo gone, and rolls it all back.
    time.sleep(1)
    assert {shard.name: len(ids_on(shard)) for shard in sharded.shards} == before


def test_a_shard_whose_server_process_crashes_during_the_insert_is_told_as_a_connection_lost(
    sharded: LocalCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The server process on shard-two that serves master-db's connection dies (SIGKILL, as the out-of-memory killer
    # would) in the middle of the insert. postgres_fdw says "server closed the connection unexpectedly": no answer
    # of the shard's, and no refusal of master-db's. Nothing is committed anywhere.
    shard_two = shard_of(sharded, "shard-two")
    before = {shard.name: len(ids_on(shard)) for shard in sharded.shards}
    original = sharding_demo.commit

    def crash_shard_two_then_commit(primary: Any, ids: Any, predicted: Any, method: str, write: Any, *rest: Any) -> Any:
        def crash_then_write(session: Any) -> int:
            session.execute(sqlalchemy.text("SELECT FROM tbl_users_p1 LIMIT 1"))  # master-db connects to shard-two
            for [pid] in shard_two.query("SELECT pid FROM pg_stat_activity WHERE usename = 'coordinator'"):
                os.kill(int(str(pid)), signal.SIGKILL)
            return write(session)

        return original(primary, ids, predicted, method, crash_then_write, *rest)

    monkeypatch.setattr(sharding_demo, "commit", crash_shard_two_then_commit)
    try:
        with pytest.raises(sharding_demo.DemoError) as failure:
            run_here(sharded, monkeypatch, tmp_path, users=100)  # some are certainly for shard-two
    finally:
        assert wait_until(lambda: lets_in(shard_two), timeout=60)  # its postmaster restarts it: crash recovery
    assert failure.value.exit_code == 9
    assert str(failure.value) == (
        f"{named(sharded.primary)} lost its connection to a shard during the insert: server closed the connection "
        "unexpectedly (postgres_fdw's words); nothing was written"
    )
    assert {shard.name: len(ids_on(shard)) for shard in sharded.shards} == before


def test_a_shard_whose_server_process_crashes_at_its_commit_is_told_as_a_connection_lost(sharded: LocalCluster) -> None:
    # shard-two's COMMIT takes 3 s (a deferred trigger), and its server process dies meanwhile, while shard-one has
    # committed its part: partly committed, told as a connection lost, not as a COMMIT that master-db refused.
    shard_one, shard_two = shard_of(sharded, "shard-one"), shard_of(sharded, "shard-two")
    before = {shard.name: len(ids_on(shard)) for shard in sharded.shards}
    committing = "SELECT pid FROM pg_stat_activity WHERE usename = 'coordinator' AND query LIKE 'COMMIT%'"
    with at_commit(shard_two, "slow", "PERFORM pg_sleep(3); RETURN NULL;"):
        demo = start_demo(sharded, "--users", "100")
        try:
            assert wait_until(lambda: shard_two.query(committing) != [], timeout=30)
            for [pid] in shard_two.query(committing):
                os.kill(int(str(pid)), signal.SIGKILL)
            _, stderr = demo.communicate(timeout=60)
        finally:
            assert wait_until(lambda: lets_in(shard_two), timeout=60)  # its postmaster restarts it: crash recovery
    kept = {shard.name: len(ids_on(shard)) - before[shard.name] for shard in sharded.shards}
    assert demo.returncode == 10, stderr
    assert kept["shard-one"] > 0 and kept["shard-two"] == 0
    [line] = stderr.splitlines()
    # shard-two is counted on a new connection, not on a pooled one that its crash closed, and once its crash
    # recovery lets connections in again: before, it said "kept an unknown number" ("in recovery mode").
    assert line == (
        f"sharding_demo.py: error: {named(sharded.primary)} lost its connection to a shard during the COMMIT: server "
        "closed the connection unexpectedly (postgres_fdw's words); partly committed, as read on each shard: "
        f"{named(shard_one)} kept {kept['shard-one']:,} of this run's 100 users, {named(shard_two)} kept 0 of this "
        "run's 100 users; those stay (postgres_fdw has no two-phase commit), and tbl_users shows them"
    ), line


def test_a_shard_whose_server_process_crashes_during_a_read_is_told_as_a_connection_lost(
    sharded: LocalCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # After the commit, a replica reads shard-two's partition through postgres_fdw, and the server process on
    # shard-two that serves that connection dies (SIGKILL) in the middle of the read's transaction. The replica
    # answered, so no other replica is tried; the read fails, told as a connection to a shard lost, and the users stay.
    shard_two = shard_of(sharded, "shard-two")
    before = sum(len(ids_on(shard)) for shard in sharded.shards)
    original = sharding_demo.partition_contents
    replicas = {replica.name for replica in sharded.replicas}

    def crash_shard_two_then_read(session: Any, partition: Any, show: int) -> Any:
        if partition.shard == "shard-two":
            session.execute(sqlalchemy.text("SELECT FROM tbl_users_p1 LIMIT 1"))  # the replica reaches shard-two
            for [pid] in shard_two.query("SELECT pid FROM pg_stat_activity WHERE usename = 'coordinator'"):
                os.kill(int(str(pid)), signal.SIGKILL)
        return original(session, partition, show)

    monkeypatch.setattr(sharding_demo, "partition_contents", crash_shard_two_then_read)
    try:
        with pytest.raises(sharding_demo.DemoError) as failure:
            run_here(sharded, monkeypatch, tmp_path, users=5)
    finally:
        assert wait_until(lambda: lets_in(shard_two), timeout=60)  # its postmaster restarts it: crash recovery
    assert failure.value.exit_code == 6
    message = str(failure.value)
    match = re.fullmatch(
        r"failed after the commit: a read from (\S+) \(127\.0\.0\.1:\d+\) failed: server closed the connection "
        r"unexpectedly \(a connection to a shard, lost: postgres_fdw's words\); 5 users were committed on master-db .*",
        message,
    )
    assert match is not None and match[1] in replicas, message
    assert sum(len(ids_on(shard)) for shard in sharded.shards) == before + 5
    result = run_demo(sharded, "--json")  # once shard-two has recovered, the next run reads through it as usual
    assert result.returncode == 0, result.stderr  # 0: every user where predicted, on each shard too
    partitions = json.loads(result.stdout)["partitions"]
    assert sum(p["actual"] for p in partitions) == 5 and all(p["in_recovery"] for p in partitions)


# ------------------------------------------------------------------------------------------------
# Rebalancing: move tbl_users_p2 from shard-one to shard-two, with docs/move-partition.sql
# ------------------------------------------------------------------------------------------------


def test_moving_a_partition_loses_and_doubles_nothing(sharded: LocalCluster) -> None:
    assert run_demo(sharded, "--users", "2000").returncode == 0
    shard_one, shard_two = shard_of(sharded, "shard-one"), shard_of(sharded, "shard-two")
    through_coordinator = ids_on(sharded.primary)
    p2 = {user_id for user_id, name in ids_on(shard_one).items() if name == "tbl_users_p2"}
    assert p2

    # 1. The partition's new, empty table on shard-two, as init-shard.sh makes them.
    shard_two.execute("CREATE TABLE tbl_users_p2 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 4, REMAINDER 2)")
    shard_two.execute("GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON tbl_users_p2 TO coordinator")
    # 2. On the coordinator: copy and swap, in one transaction (the file the docs show).
    sharded.primary.run(
        "psql",
        "-v",
        "partition=tbl_users_p2",
        "-v",
        "target=shard_two",
        "--no-psqlrc",
        "-f",
        PROJECT_DIR / "docs" / "move-partition.sql",
    )
    # 3. The old copy on shard-one, once the counts agree.
    moved = {user_id for user_id, name in ids_on(shard_two).items() if name == "tbl_users_p2"}
    assert moved == p2
    shard_one.execute("DROP TABLE tbl_users_p2")

    assert ids_on(sharded.primary) == through_coordinator  # every row, once
    for replica in sharded.replicas:
        assert wait_until(lambda replica=replica: ids_on(replica) == through_coordinator, timeout=30)
    # The demo's next run finds p2 on shard-two, and its new users there.
    result = run_demo(sharded, "--json", "--users", "200")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    p2_report = next(p for p in report["partitions"] if p["name"] == "tbl_users_p2")
    assert p2_report["stored_on"] == "shard-two"
    assert report["on_shards"]["shard-two"].get("tbl_users_p2", 0) == p2_report["predicted"]
    assert "tbl_users_p2" not in report["on_shards"]["shard-one"]


def test_a_partition_kept_on_master_db_is_not_said_to_be_on_a_shard(sharded: LocalCluster) -> None:
    # Part way through a move, a partition may be a table of master-db's own again. The report must name the
    # partitions that the shards store, not say that all of them do.
    def in_one_transaction(*statements: str) -> None:
        with tcp(sharded.primary) as connection, connection.transaction():
            for statement in statements:
                connection.execute(statement)

    in_one_transaction(
        "ALTER TABLE tbl_users DETACH PARTITION tbl_users_p3",
        "ALTER FOREIGN TABLE tbl_users_p3 RENAME TO tbl_users_p3_on_a_shard",
        "CREATE TABLE tbl_users_p3 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 4, REMAINDER 3)",
    )
    try:
        result = run_demo(sharded)
    finally:
        in_one_transaction(
            "DROP TABLE tbl_users_p3",
            "ALTER FOREIGN TABLE tbl_users_p3_on_a_shard RENAME TO tbl_users_p3",
            "ALTER TABLE tbl_users ATTACH PARTITION tbl_users_p3 FOR VALUES WITH (MODULUS 4, REMAINDER 3)",
        )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    stored_where = "tbl_users_p0, tbl_users_p1, tbl_users_p2: foreign tables on the shards."
    assert lines[2] == f"whose hash(id) mod m = r. {stored_where}"
    [p3] = [line for line in lines if line.startswith("Partition tbl_users_p3: ")]
    assert re.fullmatch(r"Partition tbl_users_p3: \d+ records?", p3)  # no "on shard-..."
    assert "  as predicted, and on no other shard: yes" in lines


# ------------------------------------------------------------------------------------------------
# The compose profile
# ------------------------------------------------------------------------------------------------


def test_a_foreign_table_that_stores_its_rows_in_another_partition_s_table_is_refused(sharded: LocalCluster) -> None:
    # A copy and paste in a move: master-db's tbl_users_p1 made with OPTIONS (table_name 'tbl_users_p3'). Its rows
    # are refused on shard-two (p3's bound), and a read of p1 through master-db shows p3's rows: the report would
    # list them under p1, and count them twice. The demo refuses the layout before the write.
    before = {shard.name: len(ids_on(shard)) for shard in sharded.shards}
    sharded.primary.execute("ALTER FOREIGN TABLE tbl_users_p1 OPTIONS (SET table_name 'tbl_users_p3')")
    try:
        result = run_demo(sharded, "--users", "20")  # some are certainly for p1
    finally:
        sharded.primary.execute("ALTER FOREIGN TABLE tbl_users_p1 OPTIONS (SET table_name 'tbl_users_p1')")
    assert result.returncode == 5, result.stderr
    assert result.stderr.startswith(
        f"sharding_demo.py: error: {named(sharded.primary)} has public.tbl_users_p1, a foreign table stored on "
        "shard-two as public.tbl_users_p3, not under its own name; the demo predicts where rows land only in "
    ), result.stderr
    assert result.stderr.endswith("; nothing was written\n")
    assert {shard.name: len(ids_on(shard)) for shard in sharded.shards} == before


def test_a_partition_whose_name_needs_quoting_is_found_on_its_shard(sharded: LocalCluster) -> None:
    # "Tbl_Users_P1" on master-db and on shard-two. The check that shard-two stores it asks for it quoted, as
    # postgres_fdw does; unquoted, to_regclass() would fold it to tbl_users_p1, find nothing, and refuse the shard.
    shard_two = shard_of(sharded, "shard-two")
    shard_two.execute('ALTER TABLE tbl_users_p1 RENAME TO "Tbl_Users_P1"')
    sharded.primary.execute('ALTER FOREIGN TABLE tbl_users_p1 RENAME TO "Tbl_Users_P1"')
    sharded.primary.execute("""ALTER FOREIGN TABLE "Tbl_Users_P1" OPTIONS (SET table_name 'Tbl_Users_P1')""")
    try:
        result = run_demo(sharded, "--json", "--users", "40")
    finally:
        sharded.primary.execute("""ALTER FOREIGN TABLE "Tbl_Users_P1" OPTIONS (SET table_name 'tbl_users_p1')""")
        sharded.primary.execute('ALTER FOREIGN TABLE "Tbl_Users_P1" RENAME TO tbl_users_p1')
        shard_two.execute('ALTER TABLE "Tbl_Users_P1" RENAME TO tbl_users_p1')
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    p1 = next(p for p in report["partitions"] if p["name"] == "Tbl_Users_P1")
    assert p1["stored_on"] == "shard-two" and p1["predicted"] == p1["actual"] > 0
    assert report["on_shards"]["shard-two"]["Tbl_Users_P1"] == p1["predicted"]


def test_the_compose_profile_adds_two_shards_as_the_launcher_starts_them() -> None:
    import yaml

    from local_cluster import SHARD_INIT_FILES, SHARDS

    rendered = docker_compose("--profile", "sharded", "config")
    assert rendered.returncode == 0, rendered.stderr
    services = yaml.safe_load(rendered.stdout)["services"]
    for offset, (name, (server, partitions)) in enumerate(SHARDS.items()):
        service = services[name]
        assert service["profiles"] == ["sharded"]
        assert service["image"] == "postgres:17"
        assert service["ports"] == [f"127.0.0.1:{5435 + offset}:5432/tcp"]
        assert service["depends_on"] == {"master-db": {"condition": "service_healthy"}}
        assert service["environment"]["SHARD_SERVER"] == server
        assert service["environment"]["SHARD_PARTITIONS"] == partitions
        assert service["environment"]["SHARD_HOST"] == name
        assert service["environment"]["COORDINATOR_HOST"] == "master-db"
        mounted = {
            v.split(":")[1].removeprefix("/docker-entrypoint-initdb.d/"): Path(v.split(":")[0]).name
            for v in service["volumes"]
            if "/docker-entrypoint-initdb.d/" in v
        }
        assert mounted == SHARD_INIT_FILES
        assert "cluster_name=" + name in service["command"]
    # The default layout starts without them: compose leaves a service with a profile out.
    assert "profiles" not in services["master-db"]


def test_a_five_user_run_on_the_sharded_layout_stays_in_the_lesson(sharded: LocalCluster) -> None:
    # As on the default layout: the lesson and appendix A carry the whole run, the shards' proof included.
    assert functions_outside_the_lesson(sharded) == []
