"""Faults and bad input, each one: a true message in one line, a documented exit code, no traceback,
and the rows on all three servers as the message says (written, or not).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    DEMO,
    EVERY_100TH_USER_SLEEPS_10_MS,
    a_login_role,
    clean_environment,
    connect,
    count_on,
    counts_everywhere,
    database_with,
    named,
    pause_replay,
    resume_replay,
    run_demo,
    slow_inserts,
    start_demo,
    wait_until,
)
from local_cluster import LocalCluster, free_port_base


def the_error(stderr: str) -> str:
    """The one line of an expected failure: no traceback, no second line."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("sharding_demo.py: error: "), stderr
    return lines[0]


# Every test here breaks the shared cluster on purpose; put it back after each one.
pytestmark = pytest.mark.usefixtures("healthy_cluster")


def wait_for_the_demo_s_copy(cluster: LocalCluster) -> int:
    """The process id of the demo's backend on the primary, once it is running its COPY."""
    found: list[int] = []

    def copying() -> bool:
        with connect(cluster.primary) as primary:
            row = primary.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'sharding_demo' "
                "AND query LIKE 'COPY tbl_users%' AND state = 'active'"
            ).fetchone()
        if row:
            found.append(int(row[0]))
        return bool(row)

    assert wait_until(copying, timeout=90, interval=0.02), "the demo's COPY never started"
    return found[0]


# ------------------------------------------------------------------------------------------------
# 1. Before the commit, nothing is written; after it, the message says what was
# ------------------------------------------------------------------------------------------------


def test_primary_lost_after_the_commit_says_what_was_committed(cluster: LocalCluster) -> None:
    before = counts_everywhere(cluster)[0]
    for replica in cluster.replicas:  # so that the demo is still waiting when the primary goes
        pause_replay(cluster, replica)
    demo = start_demo(cluster, "--catchup-timeout", "5")
    assert wait_until(lambda: count_on(cluster.primary) == before + 5, timeout=60)
    cluster.primary.stop()
    _, stderr = demo.communicate(timeout=120)

    assert demo.returncode == 6, stderr
    line = the_error(stderr)
    # the replicas, still behind at the deadline, were left out: the read that failed was the primary's
    assert line.startswith(
        f"sharding_demo.py: error: failed after the commit: a read from {named(cluster.primary)} failed: "
    )
    assert "5 users were committed on master-db (commit LSN " in line
    assert "do not run again" in line
    cluster.primary.start()
    for replica in cluster.replicas:
        resume_replay(replica)
    assert counts_everywhere(cluster) == [before + 5] * 3


def test_primary_lost_during_the_copy_wrote_nothing(cluster: LocalCluster) -> None:
    before = counts_everywhere(cluster)[0]
    demo = start_demo(cluster, "--users", "300000")
    backend = wait_for_the_demo_s_copy(cluster)
    with connect(cluster.primary) as primary:
        primary.execute("SELECT pg_terminate_backend(%s)", [backend])
    _, stderr = demo.communicate(timeout=120)

    assert demo.returncode == 3, stderr
    progress = [line for line in stderr.splitlines() if not line.startswith("sharding_demo.py: error: ")]
    assert all(" of 300,000 users" in line for line in progress), stderr  # and psycopg says nothing
    line = the_error("\n".join(line for line in stderr.splitlines() if line not in progress))
    assert line.startswith(f"sharding_demo.py: error: lost {named(cluster.primary)} during the insert: ")
    assert line.endswith("nothing was written")
    assert counts_everywhere(cluster) == [before] * 3


def test_ctrl_c_during_the_copy_says_nothing_was_written(cluster: LocalCluster) -> None:
    before = counts_everywhere(cluster)[0]
    demo = start_demo(cluster, "--users", "300000")
    wait_for_the_demo_s_copy(cluster)
    demo.send_signal(signal.SIGINT)
    _, stderr = demo.communicate(timeout=120)

    assert demo.returncode == 130, stderr
    assert (
        stderr.splitlines()[-1]
        == "sharding_demo.py: error: interrupted (Ctrl-C) before the commit: nothing was written"
    )
    assert "Traceback" not in stderr
    assert counts_everywhere(cluster) == [before] * 3


def test_statement_timeout_cancels_the_copy_and_writes_nothing(cluster: LocalCluster) -> None:
    before = counts_everywhere(cluster)[0]
    # libpq passes PGOPTIONS to the server: every statement of the demo's may take 500 ms at most, which the
    # checks need a few of. The load goes in COPYs of 10,000 rows; a trigger that sleeps 10 ms at every 100th
    # user makes each take about 1 s, so the first is cancelled.
    with slow_inserts(cluster.primary, EVERY_100TH_USER_SLEEPS_10_MS):
        result = run_demo(cluster, "--users", "30000", env={"PGOPTIONS": "-c statement_timeout=500"})
    assert result.returncode == 7, result.stderr
    line = the_error(result.stderr)
    assert f"{named(cluster.primary)} cancelled the insert (a statement_timeout, or a cancel request)" in line
    assert line.endswith("nothing was written")
    assert counts_everywhere(cluster) == [before] * 3


def test_a_not_null_column_the_demo_does_not_fill_refuses_the_insert(cluster: LocalCluster) -> None:
    before = counts_everywhere(cluster)[0]
    with connect(cluster.primary) as primary:
        primary.execute("ALTER TABLE tbl_users ADD COLUMN email text NOT NULL DEFAULT ''")
        primary.execute("ALTER TABLE tbl_users ALTER COLUMN email DROP DEFAULT")
    try:
        result = run_demo(cluster)
    finally:
        with connect(cluster.primary) as primary:
            primary.execute("ALTER TABLE tbl_users DROP COLUMN email")
    assert result.returncode == 7, result.stderr
    line = the_error(result.stderr)
    assert f'{named(cluster.primary)} refused the insert: null value in column "email"' in line
    assert line.endswith("nothing was written")
    assert counts_everywhere(cluster) == [before] * 3


def test_stdout_closed_early_is_quiet(cluster: LocalCluster) -> None:
    demo = start_demo(cluster)
    assert demo.stdout is not None
    demo.stdout.close()  # as `| head -0` would: nobody reads the report
    demo.wait(timeout=120)
    assert demo.stderr is not None
    assert demo.returncode == 141
    assert demo.stderr.read() == ""


@pytest.mark.parametrize("arguments", [[], ["--json"]])
def test_a_report_that_stdout_cannot_take_says_the_users_are_committed(
    cluster: LocalCluster, arguments: list[str]
) -> None:
    # /dev/full: every write fails with "No space left on device", as on a full disk.
    before = counts_everywhere(cluster)[0]
    with open("/dev/full", "w") as full:
        demo = subprocess.run(
            [sys.executable, str(DEMO), *arguments],
            env=clean_environment() | cluster.demo_environment(),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    assert demo.returncode == 6, demo.stderr
    line = the_error(demo.stderr)
    assert line.startswith("sharding_demo.py: error: could not print the report ([Errno 28] No space left on device); ")
    assert "5 users were committed on master-db (commit LSN " in line
    assert counts_everywhere(cluster) == [before + 5] * 3


# ------------------------------------------------------------------------------------------------
# 2. A replica must be a standby of this primary
# ------------------------------------------------------------------------------------------------


def test_a_replica_setting_that_points_at_the_primary_is_left_out(cluster: LocalCluster) -> None:
    result = run_demo(cluster, "--json", env={"REPLICA_ONE_PORT": str(cluster.primary.port)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["skipped"] == [
        {
            "replica": "replica-one",
            "address": f"127.0.0.1:{cluster.primary.port}",
            "reason": "is the primary itself, not a standby (pg_is_in_recovery() is false): "
            "check REPLICA_ONE_HOST and REPLICA_ONE_PORT",
            "when": "waited for",
        }
    ]
    reads = [*report["partitions"], report["first_user"], report["landing_checked_by"]]
    assert {read["read_from"] for read in reads} == {"replica-two"}
    assert "no replica left" not in result.stderr  # replica-two served every read


def test_two_replica_settings_that_reach_one_server_count_it_once(cluster: LocalCluster) -> None:
    # REPLICA_ONE_PORT copied from REPLICA_TWO_PORT in a .env, say: both settings reach replica-two's server. The demo
    # cannot tell which setting is wrong, so it names both, and reads from that one server as replica-one.
    replica_two = cluster.replicas[1]
    result = run_demo(cluster, "--json", env={"REPLICA_ONE_PORT": str(replica_two.port)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["skipped"] == [
        {
            "replica": "replica-two",
            "address": f"127.0.0.1:{replica_two.port}",
            "reason": f"is the same server as replica-one (127.0.0.1:{replica_two.port}; the same system identifier "
            "and start time): check REPLICA_ONE_HOST, REPLICA_ONE_PORT, REPLICA_TWO_HOST and REPLICA_TWO_PORT",
            "when": "waited for",
        }
    ]
    assert [each["replica"] for each in report["catchup"]] == ["replica-one"]
    reads = [*report["partitions"], report["first_user"], report["landing_checked_by"]]
    assert {(read["read_from"], read["read_from_address"]) for read in reads} == {
        ("replica-one", f"127.0.0.1:{replica_two.port}")
    }


def test_a_read_only_role_for_the_replicas_that_may_not_read_the_partitions_is_left_out(cluster: LocalCluster) -> None:
    # A role of its own for the reads, as is good practice, granted SELECT on tbl_users only: enough to read through
    # the parent, not the partitions, which the demo reads by name. That replica is left out, the other answers; the
    # run does not fail after its commit. With both replicas so, the reads go to the primary.
    a_login_role(cluster, "parent_only", "GRANT SELECT ON tbl_users TO parent_only")
    as_reader = {"REPLICA_ONE_USER": "parent_only", "REPLICA_ONE_PASSWORD": "x"}
    why = "the demo reads tbl_users and each partition: its user needs SELECT on all of them"
    for env, left_out, served_by in (
        (as_reader, ["replica-one"], {"replica-two"}),
        (
            as_reader | {"REPLICA_TWO_USER": "parent_only", "REPLICA_TWO_PASSWORD": "x"},
            ["replica-one", "replica-two"],
            {"master-db"},
        ),
    ):
        before = counts_everywhere(cluster)[0]
        # In turn, so that replica-one is surely asked for a partition: at random, it might read only the parent.
        result = run_demo(cluster, "--json", "--read-policy", "round-robin", env=env)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert sorted(skip["replica"] for skip in report["skipped"]) == left_out
        for skip in report["skipped"]:
            variable = skip["replica"].upper().replace("-", "_") + "_USER"
            assert skip["when"] == "during the reads"
            assert skip["reason"].startswith("answered the demo's question with an error: permission denied for table ")
            assert skip["reason"].endswith(f" ({why}): check {variable}")
        assert {partition["read_from"] for partition in report["partitions"]} == served_by
        assert sum(partition["actual"] for partition in report["partitions"]) == 5
        assert counts_everywhere(cluster) == [before + 5] * 3


def test_a_replica_asked_for_another_database_is_left_out(cluster: LocalCluster) -> None:
    # The primary's own standby, but another database of it: its tbl_users, if it had one, would hold other rows.
    settings = database_with(cluster, "elsewhere", "CREATE TABLE unrelated (n int)")

    def replayed() -> bool:  # the database is on replica-one too
        with connect(cluster.replicas[0]) as replica:
            return bool(replica.execute("SELECT 1 FROM pg_database WHERE datname = 'elsewhere'").fetchone())

    assert wait_until(replayed)
    result = run_demo(cluster, "--json", env={"REPLICA_ONE_NAME": settings["MASTER_DB_NAME"]})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    [skip] = report["skipped"]
    assert (skip["replica"], skip["when"]) == ("replica-one", "waited for")
    assert skip["reason"] == "is asked for database elsewhere, not postgres as the primary is: check REPLICA_ONE_NAME"
    reads = [*report["partitions"], report["first_user"], report["landing_checked_by"]]
    assert {read["read_from"] for read in reads} == {"replica-two"}


def test_a_standby_of_another_cluster_is_left_out(cluster: LocalCluster) -> None:
    with LocalCluster(port_base=free_port_base()) as other:
        stranger = other.replicas[0]
        result = run_demo(cluster, "--json", env={"REPLICA_ONE_PORT": str(stranger.port)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    [skip] = report["skipped"]
    assert skip["replica"] == "replica-one"
    assert skip["reason"].startswith("is a standby of another cluster (system identifier ")
    assert skip["reason"].endswith("check REPLICA_ONE_HOST and REPLICA_ONE_PORT")
    partitions = report["partitions"]
    assert [p["predicted"] for p in partitions] == [p["actual"] for p in partitions]
    assert {p["read_from"] for p in partitions} == {"replica-two"}


def test_a_replica_that_refuses_the_login_is_named_as_such(cluster: LocalCluster) -> None:
    result = run_demo(cluster, "--json", env={"REPLICA_TWO_PASSWORD": "wrong"})
    assert result.returncode == 0, result.stderr
    [skip] = json.loads(result.stdout)["skipped"]
    assert skip["reason"].startswith("refused the login: ")
    assert skip["reason"].endswith("check REPLICA_TWO_USER and REPLICA_TWO_PASSWORD")


# ------------------------------------------------------------------------------------------------
# 4, 5. Tables the demo cannot predict are refused; a quoted partition name is fine
# ------------------------------------------------------------------------------------------------


HASH_PARENT = "CREATE TABLE tbl_users (id uuid PRIMARY KEY, first_name varchar(255)) PARTITION BY HASH (id)"


@pytest.mark.parametrize(
    ("statements", "message"),
    [
        (
            ["CREATE TABLE tbl_users (id uuid PRIMARY KEY, first_name varchar(255) NOT NULL)"],
            "has a table tbl_users that is not partitioned",
        ),
        (
            ["CREATE TABLE tbl_users (id uuid PRIMARY KEY, first_name varchar(255)) PARTITION BY HASH (id)"],
            "has a table tbl_users without partitions",
        ),
        (
            [
                "CREATE TABLE tbl_users (id uuid, first_name varchar(255), PRIMARY KEY (id, first_name))"
                " PARTITION BY HASH (first_name)",
                "CREATE TABLE p0 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 1, REMAINDER 0)",
            ],
            "has tbl_users partitioned by HASH (first_name); the demo predicts",
        ),
        (
            [
                HASH_PARENT,
                "CREATE TABLE p0 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 2, REMAINDER 0)"
                " PARTITION BY HASH (id)",
                "CREATE TABLE p0a PARTITION OF p0 FOR VALUES WITH (MODULUS 1, REMAINDER 0)",
                "CREATE TABLE p1 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 2, REMAINDER 1)",
            ],
            "has public.p0, a partition that is not a plain or a foreign table (relkind p)",
        ),
        (
            [
                HASH_PARENT,
                "CREATE TABLE p0 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 4, REMAINDER 0)",
                "CREATE TABLE p1 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 4, REMAINDER 1)",
                "CREATE TABLE p2 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 4, REMAINDER 2)",
            ],
            "leave remainders [3] of modulus 4 without a partition",
        ),
    ],
    ids=["not-partitioned", "no-partitions", "key-first_name", "sub-partitioned", "remainder-gap"],
)
def test_a_layout_the_demo_cannot_predict_is_refused_before_writing(
    cluster: LocalCluster, statements: list[str], message: str
) -> None:
    settings = database_with(cluster, "layout_test", *statements)
    result = run_demo(cluster, env=settings)
    assert result.returncode == 5, result.stderr
    assert message in the_error(result.stderr)
    assert count_on(cluster.primary, "layout_test") == 0


def test_partition_names_that_need_quoting_are_read_back_right(cluster: LocalCluster) -> None:
    settings = database_with(
        cluster,
        "quoted_names",
        HASH_PARENT,
        *(
            f'CREATE TABLE "Users P{n}" PARTITION OF tbl_users FOR VALUES WITH (MODULUS 2, REMAINDER {n})'
            for n in range(2)
        ),
    )
    result = run_demo(cluster, "--json", "--users", "40", env=settings)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [p["name"] for p in report["partitions"]] == ["Users P0", "Users P1"]
    assert [p["predicted"] for p in report["partitions"]] == [p["actual"] for p in report["partitions"]]
    assert sum(p["actual"] for p in report["partitions"]) == 40
    assert all(u["predicted_partition"] == u["actual_partition"] for u in report["inserted"])


# ------------------------------------------------------------------------------------------------
# 6, 7. Settings and sizes
# ------------------------------------------------------------------------------------------------


def test_empty_password_is_a_refused_login(cluster: LocalCluster) -> None:
    result = run_demo(cluster, env={"MASTER_DB_PASSWORD": ""})
    assert result.returncode == 4, result.stderr
    assert "refused the login" in the_error(result.stderr)


@pytest.mark.parametrize(
    ("arguments", "environment", "fragment"),
    [
        (["--catchup-timeout", "nan"], {}, "invalid setting --catchup-timeout nan: Input should be"),
        (
            ["--catchup-timeout", "inf"],
            {},
            "invalid setting --catchup-timeout inf: Input should be less than",
        ),
        (
            ["--catchup-timeout", "1e308"],
            {},
            "invalid setting --catchup-timeout 1e308: Input should be less than",
        ),
        (
            ["--show", "99999999999999999999"],
            {},
            "invalid setting --show 99999999999999999999: Input should be less",
        ),
        (
            ["--users", "100000000"],
            {},
            "invalid setting --users 100000000: Input should be less than or equal to 10000000",
        ),
        (["--users", "1e6"], {}, "invalid setting --users 1e6: Input should be a valid integer"),
        (["--bogus"], {}, "error: unrecognized arguments: --bogus"),
        ([], {"DEMO_CATCHUP_TIMEOUT": "inf"}, "invalid setting DEMO_CATCHUP_TIMEOUT=inf"),
        (
            [],
            {"MASTER_DB_HOST": ""},
            "invalid setting MASTER_DB_HOST=: String should have at least 1 character",
        ),
        (
            [],
            {"MASTER_DB_USER": " "},
            "invalid setting MASTER_DB_USER=: String should have at least 1 char",
        ),
    ],
)
def test_invalid_values_are_one_line(arguments: list[str], environment: dict[str, str], fragment: str) -> None:
    result = run_demo(None, *arguments, env=environment)
    assert result.returncode == 2
    assert fragment in the_error(result.stderr)  # one line, not argparse's usage first


def test_dotenv_problems_are_one_line_each(tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(
        b"MASTER_DB_PORT=1\nthis is not a setting\nDEMO_USER=100\nMASTER_DB_PASSWORD=a\x00b\n"
    )
    result = run_demo(None, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "sharding_demo.py: warning: .env line 2 was not NAME=value, and ignored",
        "sharding_demo.py: warning: DEMO_USER is not a setting of this demo, and is ignored "
        "(it has DEMO_CATCHUP_TIMEOUT, DEMO_CONNECT_TIMEOUT, DEMO_JSON_OUTPUT, DEMO_READ_POLICY, DEMO_SHOW, "
        "DEMO_STALL_TIMEOUT, DEMO_USERS)",
        "sharding_demo.py: error: invalid setting MASTER_DB_PASSWORD: Value error, contains a NUL byte, "
        "which a PostgreSQL connection cannot carry",
    ]

    (tmp_path / ".env").write_bytes(b"MASTER_DB_PASSWORD=\xff\xfe\n")
    result = run_demo(None, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "sharding_demo.py: error: .env is not UTF-8 text (byte 0xff at offset 19): save it as UTF-8"
    ]


def test_spaces_around_host_and_user_are_ignored(cluster: LocalCluster) -> None:
    result = run_demo(cluster, env={"MASTER_DB_HOST": " 127.0.0.1 ", "MASTER_DB_USER": "postgres "})
    assert result.returncode == 0, result.stderr


def test_a_large_run_keeps_the_replica_s_statement_log_short(cluster: LocalCluster) -> None:
    log_sizes = {node.name: node.log_file.stat().st_size for node in cluster.nodes}
    result = run_demo(cluster, "--json", "--users", "200000", "--show", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sum(p["actual"] for p in report["partitions"]) == 200_000
    for node in cluster.nodes:
        written = node.log_file.read_bytes()[log_sizes[node.name] :]
        longest = max(len(line) for line in written.splitlines())
        assert longest < 2000, (node.name, longest)
    # The progress starts with the first step, making the ids.
    assert result.stderr.splitlines()[0] == "sharding_demo.py: made the ids of 20,000 of 200,000 users"


@pytest.mark.parametrize(
    "environment",
    [
        # A hot standby refuses serializable transactions; the demo names its isolation level itself.
        {"PGOPTIONS": "-c default_transaction_isolation=serializable"},
        # libpq would turn a standby away ("session is read-only"); the demo asks each server itself.
        {"PGTARGETSESSIONATTRS": "read-write"},
    ],
)
def test_libpq_session_defaults_do_not_keep_the_replicas_out(
    cluster: LocalCluster, environment: dict[str, str]
) -> None:
    result = run_demo(cluster, "--json", env=environment)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["skipped"] == [] and len(report["catchup"]) == 2
    assert report["landing_checked_by"]["in_recovery"] is True
    assert [user["actual_partition"] for user in report["inserted"]] == [
        user["predicted_partition"] for user in report["inserted"]
    ]


def test_a_cancelled_orm_insert_is_named_as_such_not_as_a_lost_primary(cluster: LocalCluster) -> None:
    # A trigger that makes each INSERT take a second, and a statement_timeout shorter than that:
    # the five users' ORM INSERT is cancelled by the server, which is still up.
    settings = database_with(
        cluster,
        "slow_inserts",
        HASH_PARENT,
        *(
            f"CREATE TABLE tbl_users_p{n} PARTITION OF tbl_users FOR VALUES WITH (MODULUS 2, REMAINDER {n})"
            for n in range(2)
        ),
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$",
        "CREATE TRIGGER slow BEFORE INSERT ON tbl_users FOR EACH ROW EXECUTE FUNCTION slow()",
    )
    result = run_demo(cluster, env=settings | {"PGOPTIONS": "-c statement_timeout=300"})
    assert result.returncode == 7, result.stderr
    line = the_error(result.stderr)
    assert f"{named(cluster.primary)} cancelled the insert" in line
    assert line.endswith("nothing was written")
    assert count_on(cluster.primary, "slow_inserts") == 0


def test_spaces_around_the_read_policy_are_ignored(cluster: LocalCluster) -> None:
    result = run_demo(cluster, "--json", env={"DEMO_READ_POLICY": " round-robin "})
    assert result.returncode == 0, result.stderr
