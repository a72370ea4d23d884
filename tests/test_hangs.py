"""Never hangs, never silent, never fooled: a server that stops answering (its processes SIGSTOPped,
as a hung host or a dead network looks), SIGTERM and SIGHUP, a replica promoted mid-run, a decoy
on the search_path, settings that are not text, and random settings as a property.

Each case runs against the real cluster and checks the exit code, the one line, the time the run
took against its bound, and the rows on every server afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy.engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sharding_demo
from conftest import (
    DEMO,
    EVERY_100TH_USER_SLEEPS_10_MS,
    clean_environment,
    connect,
    count_on,
    counts_everywhere,
    database_with,
    database_with_a_commit_trigger,
    holding_a_lock,
    logged_in_as,
    named,
    pause_replay,
    resume_replay,
    run_demo,
    slow_inserts,
    start_demo,
    wait_until,
)
from local_cluster import LocalCluster, PostgresNode, free_port_base

pytestmark = pytest.mark.usefixtures("healthy_cluster")

STALL = "2"  # DEMO_STALL_TIMEOUT for these tests, in seconds: the bound is this plus a little


def stalling_demo(cluster: LocalCluster, *arguments: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return start_demo(cluster, *arguments, env={"DEMO_STALL_TIMEOUT": STALL} | (env or {}))


def errors_of(stderr: str) -> list[str]:
    """The error lines (progress lines are not errors); there must be at most one, and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("sharding_demo.py: error: ")]
    assert len(errors) <= 1, stderr
    return errors


def wait_for_statement(node: PostgresNode, like: str, state: str = "active") -> None:
    """Until a demo started from now on has a statement matching `like` running on `node`. (Only from
    now on: the backend of an earlier test's paused demo can still show its COPY for a moment.)"""
    [(since,)] = node.query("SELECT clock_timestamp()")

    def running() -> bool:
        with connect(node) as connection:
            return bool(
                connection.execute(
                    "SELECT FROM pg_stat_activity WHERE application_name = 'sharding_demo' "
                    "AND state LIKE %s AND query LIKE %s AND backend_start > %s",
                    [state, like, since],
                ).fetchall()
            )

    assert wait_until(running, timeout=90, interval=0.02), f"no demo statement like {like!r} on {node.name}"


def stop_until_the_demo_ends(node: PostgresNode, demo: subprocess.Popen[str]) -> tuple[str, str, float]:
    """SIGSTOP every process of `node` until the demo ends, then SIGCONT them: the demo's stdout and
    stderr, and the seconds from the stop to the end."""
    node.pause()
    paused_at = time.monotonic()
    try:
        stdout, stderr = demo.communicate(timeout=60)
    finally:
        node.resume()
    return stdout, stderr, time.monotonic() - paused_at


# ------------------------------------------------------------------------------------------------
# 1. A server that stops answering
# ------------------------------------------------------------------------------------------------


def test_a_replica_stopped_during_the_read_back_is_left_out_and_the_read_retried(
    cluster: LocalCluster, run_in_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = counts_everywhere(cluster)[0]
    original = sharding_demo.where_users_landed
    paused: list[PostgresNode] = []

    def pause_the_replica_then_read(session: Any, ids: Any, show: int) -> Any:
        # Deterministic: the replica that this read went to stops answering once the read's connection is open
        # (session.connection() opens it), before the query is sent.
        if not paused:
            session.connection()
            port = session.get_bind().url.port
            paused.append(next(node for node in cluster.replicas if node.port == port))
            paused[0].pause()
        return original(session, ids, show)

    monkeypatch.setattr(sharding_demo, "where_users_landed", pause_the_replica_then_read)
    started = time.monotonic()
    try:
        report = run_in_process(stall_timeout=float(STALL))
    finally:
        for node in paused:
            node.resume()
    seconds = time.monotonic() - started

    [skip] = report.skipped
    assert (skip.replica.service, skip.when) == (paused[0].name, "during the reads")
    assert skip.reason == f"did not answer for {STALL} s (DEMO_STALL_TIMEOUT)"
    other = next(replica.name for replica in cluster.replicas if replica is not paused[0])
    assert report.landing.server.service == other  # the read was retried there, and answered
    assert sum(report.landing.value[0].values()) == 5
    assert seconds < float(STALL) + 3, seconds
    assert counts_everywhere(cluster) == [before + 5] * 3


# The demo, with a hook that acts on the server HOOKED_SERVICE the moment the demo's first connection to it is open:
# before SQLAlchemy's own first questions on it, which engine.connect() asks before it returns. With POSTMASTER_PID
# it stops the server (its postmaster, and the server process of the demo's connection); with TERMINATOR (a
# superuser's connection string) it has the server end the session, with pg_terminate_backend().
ON_FIRST_CONNECT = """
import os, signal, sys
import psycopg
from sqlalchemy import event
import sharding_demo
make_server = sharding_demo.make_server
acted = []
def make_and_hook(settings, connect_timeout, watchdog):
    server = make_server(settings, connect_timeout, watchdog)
    def act(connection, record):
        if not acted:
            acted.append(connection.info.backend_pid)
            if "POSTMASTER_PID" in os.environ:
                for pid in (int(os.environ["POSTMASTER_PID"]), connection.info.backend_pid):
                    os.kill(pid, signal.SIGSTOP)
            else:
                with psycopg.connect(os.environ["TERMINATOR"], autocommit=True) as other:
                    other.execute("SELECT pg_terminate_backend(%s, 10000)", acted)
    if server.service == os.environ["HOOKED_SERVICE"]:
        event.listen(server.engine, "connect", act, insert=True)
    return server
sharding_demo.make_server = make_and_hook
sys.exit(sharding_demo.main(sys.argv[1:]))
"""


def test_a_replica_that_stops_as_the_first_connection_opens_is_cut_off_too(cluster: LocalCluster) -> None:
    # SQLAlchemy asks a few questions of an engine's first connection (show standard_conforming_strings, and others)
    # before the demo's own; a server that stopped just then hung the demo, unwatched, for ever.
    before = counts_everywhere(cluster)[0]
    replica = cluster.replicas[0]
    environment = clean_environment() | cluster.demo_environment() | {"PYTHONPATH": str(DEMO.parent)}
    environment |= {"DEMO_STALL_TIMEOUT": STALL, "POSTMASTER_PID": str(replica.postmaster_pid())}
    environment["HOOKED_SERVICE"] = "replica-one"
    try:
        result = subprocess.run(
            [sys.executable, "-c", ON_FIRST_CONNECT, "--json"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        for pid in replica.processes():
            os.kill(pid, signal.SIGCONT)
    assert result.returncode == 0, result.stderr
    [skip] = json.loads(result.stdout)["skipped"]
    assert (skip["replica"], skip["when"]) == (replica.name, "waited for")
    assert skip["reason"] == f"did not answer for {STALL} s (DEMO_STALL_TIMEOUT)"
    assert counts_everywhere(cluster) == [before + 5] * 3


def test_a_replica_stopped_during_the_catch_up_wait_is_cut_off_at_the_stall_bound(
    cluster: LocalCluster,
) -> None:
    before = counts_everywhere(cluster)[0]
    lagging = cluster.replicas[0]
    pause_replay(cluster, lagging)  # so that the demo keeps asking it
    demo = stalling_demo(cluster, "--json", "--catchup-timeout", "30")
    wait_for_statement(lagging, "%", state="%")  # the demo's wait has connected to it, to ask it
    stdout, stderr, seconds = stop_until_the_demo_ends(lagging, demo)

    assert demo.returncode == 0, stderr
    assert errors_of(stderr) == []
    report = sharding_demo.json.loads(stdout)
    [skip] = report["skipped"]
    assert (skip["replica"], skip["when"]) == (lagging.name, "waited for")
    assert skip["reason"] == f"did not answer for {STALL} s (DEMO_STALL_TIMEOUT)"
    assert seconds < float(STALL) + 3, seconds  # the stall bound, not the 30 s of the catch-up
    assert {partition["read_from"] for partition in report["partitions"]} == {cluster.replicas[1].name}
    resume_replay(lagging)
    assert counts_everywhere(cluster) == [before + 5] * 3


def test_a_replica_stopped_during_the_wait_is_cut_off_at_the_catch_up_deadline(cluster: LocalCluster) -> None:
    before = counts_everywhere(cluster)[0]
    lagging = cluster.replicas[1]
    pause_replay(cluster, lagging)
    demo = stalling_demo(cluster, "--catchup-timeout", "2", env={"DEMO_STALL_TIMEOUT": "60"})
    started = time.monotonic()
    # Once the demo's wait has connected to this replica, to ask it, the replica stops answering. (Any statement:
    # between two questions the connection shows the ROLLBACK that ended the last one.)
    wait_for_statement(lagging, "%", state="%")
    stdout, stderr, _ = stop_until_the_demo_ends(lagging, demo)
    seconds = time.monotonic() - started

    assert demo.returncode == 0, stderr
    assert f"{lagging.name} ({'127.0.0.1'}:{lagging.port}): did not answer by the catch-up deadline" in stdout
    assert seconds < 2 + 4, seconds  # the catch-up deadline (2 s), not the stall bound (60 s)
    resume_replay(lagging)
    assert counts_everywhere(cluster) == [before + 5] * 3


def test_a_load_that_the_server_stores_slowly_is_not_cut_off(cluster: LocalCluster) -> None:
    # The server takes about 0.1 s per 1,000 rows to store them (a trigger sleeps 10 ms at every 100th user), so
    # 50,000 users take it about 5 s, while the demo sends them in well under a second: most of them wait, unread,
    # in the kernel's socket buffers. With a stall bound of 2.5 s, a run that counted what it sent as progress was
    # cut off (measured on the old code: "did not answer for 2.5 s", exit 3); the server's answer to each COPY of
    # 10,000 rows, about 1 s apart, is the progress that counts.
    before = counts_everywhere(cluster)[0]
    with slow_inserts(cluster.primary, EVERY_100TH_USER_SLEEPS_10_MS):
        result = run_demo(cluster, "--users", "50000", "--show", "0", env={"DEMO_STALL_TIMEOUT": "2.5"})
    assert result.returncode == 0, result.stderr
    assert counts_everywhere(cluster) == [before + 50_000] * 3


def test_the_primary_stopped_during_the_copy_wrote_nothing(cluster: LocalCluster) -> None:
    before = counts_everywhere(cluster)[0]
    demo = stalling_demo(cluster, "--users", "500000")
    wait_for_statement(cluster.primary, "COPY tbl_users%")  # its backend starts after this call begins
    _, stderr, seconds = stop_until_the_demo_ends(cluster.primary, demo)

    assert demo.returncode == 3, stderr
    [line] = errors_of(stderr)
    assert line == (
        f"sharding_demo.py: error: {named(cluster.primary)} "
        f"did not answer for {STALL} s (DEMO_STALL_TIMEOUT) during the insert; nothing was written"
    )
    assert seconds < float(STALL) + 3, seconds
    assert counts_everywhere(cluster) == [before] * 3  # after SIGCONT the server rolled the COPY back


def the_demo_s_sessions_end(node: PostgresNode) -> bool:
    """Within 5 s, no server process of the demo's is left on `node` (client_connection_check_interval is 1 s)."""
    demo_sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sharding_demo'"
    return wait_until(lambda: node.query(demo_sessions) == [(0,)], timeout=5)


@pytest.mark.parametrize(("mode", "stage"), [("ACCESS EXCLUSIVE", "the checks"), ("SHARE", "the insert")])
def test_a_primary_that_waits_for_a_lock_is_told_as_not_answering_and_its_statement_ends(
    cluster: LocalCluster, mode: str, stage: str
) -> None:
    # A learner's open transaction in psql holds a lock on tbl_users. ACCESS EXCLUSIVE (TRUNCATE, ALTER TABLE) keeps
    # even the demo's catalog questions waiting; SHARE (CREATE INDEX) keeps only its INSERT waiting. The demo says
    # what it saw, not that the primary stopped; and with client_connection_check_interval its server process ends
    # its statement once the watchdog has cut the connection, instead of waiting on for the lock.
    before = counts_everywhere(cluster)[0]
    with holding_a_lock(cluster.primary, f"LOCK TABLE tbl_users IN {mode} MODE"):
        result = run_demo(cluster, env={"DEMO_STALL_TIMEOUT": STALL})
        assert result.returncode == 3, result.stderr
        [line] = errors_of(result.stderr)
        assert line == (
            f"sharding_demo.py: error: {named(cluster.primary)} did not answer for {STALL} s "
            f"(DEMO_STALL_TIMEOUT) during {stage}; nothing was written"
        )
        assert the_demo_s_sessions_end(cluster.primary)
    assert counts_everywhere(cluster) == [before] * 3


def test_a_primary_that_ends_the_demo_s_session_during_the_checks_is_told_as_lost(cluster: LocalCluster) -> None:
    # The demo got in, and its checks wait for a lock; then the server ends its session (pg_terminate_backend(), as a
    # learner in psql might). That is the primary lost during the checks, not one the demo "cannot connect to".
    before = counts_everywhere(cluster)[0]
    waiting = "SELECT pid FROM pg_stat_activity WHERE application_name = 'sharding_demo' AND wait_event_type = 'Lock'"
    with holding_a_lock(cluster.primary, "LOCK TABLE tbl_users IN ACCESS EXCLUSIVE MODE"):
        demo = start_demo(cluster, env={"DEMO_STALL_TIMEOUT": "60"})
        assert wait_until(lambda: cluster.primary.query(waiting) != [], timeout=10)
        [[pid]] = cluster.primary.query(waiting)
        cluster.primary.query("SELECT pg_terminate_backend(%s)", [pid])
        _, stderr = demo.communicate(timeout=30)
    assert demo.returncode == 3, stderr
    assert errors_of(stderr) == [
        f"sharding_demo.py: error: lost {named(cluster.primary)} during the checks: terminating connection due to "
        "administrator command; nothing was written"
    ]
    assert counts_everywhere(cluster) == [before] * 3


def test_a_primary_that_ends_the_session_as_the_first_connection_opens_is_told_as_lost(cluster: LocalCluster) -> None:
    # The demo got in, and master-db ended the session before engine.connect() returned (an
    # idle_in_transaction_session_timeout of 1 ms does it too, at random). Lost during the checks, not "cannot connect".
    before = counts_everywhere(cluster)[0]
    environment = clean_environment() | cluster.demo_environment() | {"PYTHONPATH": str(DEMO.parent)}
    primary = cluster.primary
    environment["TERMINATOR"] = f"host={primary.socket_dir} port={primary.port} user=postgres dbname=postgres"
    environment["HOOKED_SERVICE"] = "master-db"
    command = [sys.executable, "-c", ON_FIRST_CONNECT]  # master-db ends the session: pg_terminate_backend()
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 3, result.stderr
    [line] = errors_of(result.stderr)
    assert line == (
        f"sharding_demo.py: error: lost {named(primary)} during the checks: terminating connection due to "
        "administrator command; nothing was written"
    )
    assert counts_everywhere(cluster) == [before] * 3


def test_a_primary_still_running_the_insert_ends_it_when_the_demo_gives_up(cluster: LocalCluster) -> None:
    # A trigger that a learner added, and that takes its time: the demo gives up at the stall bound, and the server,
    # which checks every second that its client is still there, ends the statement (not the trigger's 60 s later).
    before = counts_everywhere(cluster)[0]
    with slow_inserts(cluster.primary, "PERFORM pg_sleep(60);"):
        started = time.monotonic()
        result = run_demo(cluster, env={"DEMO_STALL_TIMEOUT": STALL})
        seconds = time.monotonic() - started
        assert result.returncode == 3, result.stderr
        [line] = errors_of(result.stderr)
        assert line == (
            f"sharding_demo.py: error: {named(cluster.primary)} did not answer for {STALL} s "
            "(DEMO_STALL_TIMEOUT) during the insert; nothing was written"
        )
        assert seconds < float(STALL) + 5, seconds
        assert the_demo_s_sessions_end(cluster.primary)
    assert counts_everywhere(cluster) == [before] * 3


# ------------------------------------------------------------------------------------------------
# 2. SIGTERM and SIGHUP, told as truly as Ctrl-C
# ------------------------------------------------------------------------------------------------


def test_a_commit_that_waits_for_a_synchronous_standby_is_told_as_committed() -> None:
    # synchronous_standby_names makes COMMIT wait, once the commit is written and flushed on the primary, until a
    # standby confirms it. With both replicas stopped none does: the watchdog cuts the wait off, and the primary,
    # which still answers, shows its server process waiting for a standby (wait event SyncRep), not stopped. The
    # users are committed: once the wait is over, every session sees them. (A cluster of its own: the setting needs
    # a reload, which the shared cluster's log should not show.)
    with LocalCluster(port_base=free_port_base()) as cluster:
        with connect(cluster.primary) as primary:
            primary.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            primary.execute("SELECT pg_reload_conf()")
        for replica in cluster.replicas:
            replica.stop()
        started = time.monotonic()
        result = run_demo(cluster, env={"DEMO_STALL_TIMEOUT": STALL})
        seconds = time.monotonic() - started
        assert result.returncode == 6, result.stderr
        [line] = errors_of(result.stderr)
        assert re.fullmatch(
            rf"sharding_demo.py: error: {re.escape(named(cluster.primary))} wrote the COMMIT of transaction "
            r"\d+, and still waits for a synchronous standby \(synchronous_standby_names = '\*'\) to confirm it: the 5 "
            "users are committed there, and other sessions see them once a standby confirms or the wait is "
            "cancelled; do not run again to retry them",
            line,
        ), line
        assert seconds < float(STALL) + 5, seconds
        assert count_on(cluster.primary) == 0  # committed, but not seen by others while the wait lasts
        with connect(cluster.primary) as primary:
            primary.execute("ALTER SYSTEM RESET synchronous_standby_names")  # which ends the wait
            primary.execute("SELECT pg_reload_conf()")
        assert wait_until(lambda: count_on(cluster.primary) == 5)


def demo_backend_waiting_in(node: PostgresNode, wait_event: str) -> int:
    """The pid of the demo's server process on `node` once it waits in `wait_event` (SyncRep, PgSleep)."""
    found: list[int] = []

    def waiting() -> bool:
        with connect(node) as connection:
            found[:] = [
                pid
                for (pid,) in connection.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'sharding_demo' AND wait_event = %s",
                    [wait_event],
                )
            ]
        return bool(found)

    assert wait_until(waiting, timeout=60, interval=0.02), f"no demo process waiting in {wait_event}"
    return found[0]


OUTCOME = (
    r"sharding_demo.py: error: (?P<what>.*), "
    r"but master-db says its transaction \d+ is '(?P<status>\w+)' \(pg_xact_status\): (?P<rest>.*)"
)


def test_a_commit_whose_answer_never_came_is_told_by_pg_xact_status() -> None:
    # While COMMIT waits for a synchronous standby it has already committed on the primary. Ctrl-C (psycopg
    # cancels the wait) and a terminated server process each take the answer away; the demo asks the primary,
    # on a new connection, what became of its transaction. (A cluster of its own, as above.)
    committed = "the 5 users were committed and stay in the table; do not run again to retry them"
    with LocalCluster(port_base=free_port_base()) as cluster:
        with connect(cluster.primary) as primary:
            primary.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            primary.execute("SELECT pg_reload_conf()")
        for replica in cluster.replicas:
            replica.stop()

        demo = start_demo(cluster, env={"DEMO_STALL_TIMEOUT": "60"})
        demo_backend_waiting_in(cluster.primary, "SyncRep")
        demo.send_signal(signal.SIGINT)
        _, stderr = demo.communicate(timeout=60)
        assert demo.returncode == 130, stderr
        [line] = errors_of(stderr)
        told = re.fullmatch(OUTCOME, line)
        assert told, line
        assert (told["what"], told["status"], told["rest"]) == (
            f"interrupted (Ctrl-C) during the COMMIT on {named(cluster.primary)}",
            "committed",
            committed,
        )
        assert count_on(cluster.primary) == 5  # the cancel ended the wait: every session sees them

        demo = start_demo(cluster, env={"DEMO_STALL_TIMEOUT": "60"})
        pid = demo_backend_waiting_in(cluster.primary, "SyncRep")
        with connect(cluster.primary) as primary:
            primary.execute("SELECT pg_terminate_backend(%s)", [pid])
        _, stderr = demo.communicate(timeout=60)
        assert demo.returncode == 6, stderr
        [line] = errors_of(stderr)
        told = re.fullmatch(OUTCOME, line)
        assert told, line
        lost = f"lost {named(cluster.primary)} during the COMMIT ("
        assert told["what"].startswith(lost) and told["status"] == "committed"
        assert told["rest"] == committed
        assert count_on(cluster.primary) == 10


@pytest.mark.parametrize("how", ["Ctrl-C", "terminated"])
def test_a_commit_rolled_back_without_an_answer_is_told_as_nothing_written(cluster: LocalCluster, how: str) -> None:
    # A deferred constraint trigger runs inside COMMIT, before the commit is written; this one sleeps. The demo's
    # COMMIT is cancelled there by Ctrl-C, or its server process terminated: the transaction is rolled back, and the
    # primary says so when asked.
    settings = database_with_a_commit_trigger(cluster, "slow_commit", "PERFORM pg_sleep(60); RETURN NULL;")
    demo = start_demo(cluster, env=settings | {"DEMO_STALL_TIMEOUT": "120"})
    pid = demo_backend_waiting_in(cluster.primary, "PgSleep")
    if how == "Ctrl-C":
        demo.send_signal(signal.SIGINT)
    else:
        with connect(cluster.primary) as primary:
            primary.execute("SELECT pg_terminate_backend(%s)", [pid])
    _, stderr = demo.communicate(timeout=60)
    [line] = errors_of(stderr)
    told = re.fullmatch(OUTCOME, line)
    assert told, line
    assert (told["status"], told["rest"]) == ("aborted", "nothing was written")
    primary = named(cluster.primary)
    if how == "Ctrl-C":
        assert demo.returncode == 130 and told["what"] == f"interrupted (Ctrl-C) during the COMMIT on {primary}", stderr
    else:
        assert demo.returncode == 3 and told["what"].startswith(f"lost {primary} during the COMMIT ("), stderr
    assert count_on(cluster.primary, "slow_commit") == 0


@pytest.mark.parametrize(
    ("signal_number", "told", "exit_code"), [(signal.SIGINT, "Ctrl-C", 130), (signal.SIGTERM, "SIGTERM", 143)]
)
def test_a_signal_while_the_libraries_load_is_one_line_too(
    cluster: LocalCluster, signal_number: int, told: str, exit_code: int
) -> None:
    # Python loads SQLAlchemy, psycopg and pydantic for about 0.4 s before the demo's own code runs: a Ctrl-C then
    # printed a traceback from inside SQLAlchemy, and SIGTERM ended the demo without a word. The signal is sent once
    # psycopg's C library is loaded, the first of those imports: others remain.
    before = counts_everywhere(cluster)[0]
    demo = start_demo(cluster)
    maps = Path(f"/proc/{demo.pid}/maps")
    assert wait_until(lambda: "psycopg_binary" in maps.read_text(), timeout=10, interval=0.001)
    demo.send_signal(signal_number)
    stdout, stderr = demo.communicate(timeout=60)
    assert (demo.returncode, stdout) == (exit_code, ""), stderr
    assert stderr.splitlines() == [
        f"sharding_demo.py: error: interrupted ({told}) before the insert: nothing was written"
    ]
    assert counts_everywhere(cluster) == [before] * 3


def test_sigterm_before_the_commit_says_nothing_was_written(cluster: LocalCluster) -> None:
    before = counts_everywhere(cluster)[0]
    demo = stalling_demo(cluster, "--users", "300000")
    wait_for_statement(cluster.primary, "COPY tbl_users%")
    demo.send_signal(signal.SIGTERM)
    _, stderr = demo.communicate(timeout=60)
    assert demo.returncode == 143, stderr
    assert errors_of(stderr) == [
        "sharding_demo.py: error: interrupted (SIGTERM) before the commit: nothing was written"
    ]
    assert counts_everywhere(cluster) == [before] * 3


def test_a_demo_stopped_with_ctrl_z_and_resumed_does_not_blame_the_primary(cluster: LocalCluster) -> None:
    # Ctrl-Z stops the demo (SIGTSTP; SIGSTOP here) while its INSERT is in flight, for longer than the stall bound
    # (4 s, and 3 s); `fg` resumes it (SIGCONT). The primary went on meanwhile: the run goes on, and ends as usual.
    # A trigger makes the first user's INSERT take 5 s, so that it is still in flight when the demo resumes; only
    # 1 s of them counts against the primary, since the demo was stopped for the other 4.
    before = counts_everywhere(cluster)[0]
    with slow_inserts(cluster.primary, "IF NEW.first_name = 'John' THEN PERFORM pg_sleep(5); END IF;"):
        demo = start_demo(cluster, env={"DEMO_STALL_TIMEOUT": "3"})
        wait_for_statement(cluster.primary, "INSERT INTO tbl_users%")
        time.sleep(0.5)  # the watchdog, which looks ten times a second, has seen the INSERT in flight
        demo.send_signal(signal.SIGSTOP)
        time.sleep(4)
        demo.send_signal(signal.SIGCONT)
        _, stderr = demo.communicate(timeout=60)
    assert demo.returncode == 0, stderr
    assert errors_of(stderr) == []
    assert counts_everywhere(cluster) == [before + 5] * 3


def test_sighup_after_the_commit_says_how_many_users_were_committed(cluster: LocalCluster) -> None:
    before = counts_everywhere(cluster)[0]
    for replica in cluster.replicas:  # the demo waits for them, after its commit
        pause_replay(cluster, replica)
    demo = stalling_demo(cluster, "--catchup-timeout", "30")
    # The demo connects to a replica first in its wait, after the commit. (Waiting until the primary shows the rows
    # is not enough: they show a moment before the COMMIT's answer reaches the demo.)
    wait_for_statement(cluster.replicas[0], "%", state="%")
    demo.send_signal(signal.SIGHUP)
    _, stderr = demo.communicate(timeout=60)
    assert demo.returncode == 129, stderr
    [line] = errors_of(stderr)
    assert line.startswith("sharding_demo.py: error: interrupted (SIGHUP) after the commit: 5 users were committed")
    for replica in cluster.replicas:
        resume_replay(replica)
    assert counts_everywhere(cluster) == [before + 5] * 3


def test_a_ctrl_c_as_the_connections_close_does_not_hide_a_finished_run(
    cluster: LocalCluster, run_in_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The last thing run() does is close its engines' connections, the primary's first (the wait closes only the
    # replicas'). A Ctrl-C then (a real SIGINT, sent to this process as the primary's engine is disposed) must not
    # turn a finished run into "interrupted before the insert".
    before = count_on(cluster.primary)
    dispose = sqlalchemy.engine.Engine.dispose
    sent: list[bool] = []

    def ctrl_c_then_dispose(engine: Any, *arguments: Any, **options: Any) -> None:
        if engine.url.port == cluster.primary.port and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        dispose(engine, *arguments, **options)

    monkeypatch.setattr(sqlalchemy.engine.Engine, "dispose", ctrl_c_then_dispose)
    try:
        report = run_in_process()
    except KeyboardInterrupt:  # told by main() as "before the insert: nothing was written"
        pytest.fail("the Ctrl-C escaped run(), with this run's 5 users committed")
    assert sent
    assert report.written.users == 5 and count_on(cluster.primary) == before + 5


# ------------------------------------------------------------------------------------------------
# 3. Every answer checked: a replica promoted between two reads
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def a_third_standby(cluster: LocalCluster, name: str) -> Iterator[PostgresNode]:
    """One more standby of the shared cluster, with a slot of its own, for REPLICA_ONE_* to point at, so that the
    shared cluster stays whole; stopped, and its slot dropped, afterwards."""
    slot = name.replace("-", "_")
    extra = cluster.add_standby(name, free_port_base(1), slot)
    try:
        yield extra
    finally:
        extra.stop()
        cluster.nodes.remove(extra)
        with connect(cluster.primary) as primary:
            primary.execute("SELECT pg_drop_replication_slot(%s)", [slot])


def test_a_replica_promoted_mid_run_is_refused_and_named(
    cluster: LocalCluster, run_in_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A third standby of the primary, which REPLICA_ONE_* points at, is promoted between two reads.
    original = sharding_demo.partition_contents
    promoted: list[bool] = []

    def promote_before_the_second_partition(session: Any, partition: Any, show: int) -> Any:
        if partition.name == "tbl_users_p1" and not promoted:
            extra.execute("SELECT pg_promote(wait => true)")
            promoted.append(True)
        return original(session, partition, show)

    monkeypatch.setattr(sharding_demo, "partition_contents", promote_before_the_second_partition)
    with a_third_standby(cluster, "replica-extra") as extra:
        report = run_in_process(env={"REPLICA_ONE_PORT": str(extra.port)}, read_policy="round-robin")

    assert promoted
    [skip] = report.skipped
    assert (skip.replica.service, skip.when) == ("replica-one", "during the reads")
    assert skip.reason.startswith("was promoted: it is a primary now")
    assert skip.reason.endswith("its answer was not used")
    # Every answer used came from a standby: replica-two, or replica-one before its promotion.
    answers = [report.landing, *report.contents, report.first_user, report.pruning]
    assert all(answer.server.service in {"replica-one", "replica-two"} for answer in answers)
    assert all(answer.server.service == "replica-two" for answer in report.contents[1:])
    assert not sharding_demo.primary_served_reads(report)
    assert "no replica left" not in sharding_demo.render_text(report)


def test_a_read_cancelled_by_a_recovery_conflict_is_tried_on_the_other_replica(
    cluster: LocalCluster, run_in_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hot standby cancels a read that holds up its replay: here a lock on tbl_users_p0, held by a long read on a
    # third standby (which REPLICA_ONE_* points at) that replays an ACCESS EXCLUSIVE lock from the primary at once
    # (max_standby_streaming_delay = 0). The read is this standby's problem, not the data's: replica-two answers it.
    original = sharding_demo.partition_contents
    conflicted: list[str] = []

    def lock_on_the_primary() -> None:
        time.sleep(0.5)  # while the read below sleeps, holding its lock on tbl_users_p0
        with connect(cluster.primary) as primary, primary.transaction():
            primary.execute("LOCK TABLE tbl_users_p0 IN ACCESS EXCLUSIVE MODE")

    def a_long_read_of_the_first_partition(session: Any, partition: Any, show: int) -> Any:
        result = original(session, partition, show)
        if partition.name == "tbl_users_p0" and session.get_bind().url.port == extra.port and not conflicted:
            conflicted.append("asked")
            locker = threading.Thread(target=lock_on_the_primary)
            locker.start()
            try:
                session.execute(sharding_demo.text("SELECT pg_sleep(5)"))
            finally:
                locker.join()
        return result

    monkeypatch.setattr(sharding_demo, "partition_contents", a_long_read_of_the_first_partition)
    with a_third_standby(cluster, "replica-conflict") as extra:
        extra.execute("ALTER SYSTEM SET max_standby_streaming_delay = 0")
        extra.execute("SELECT pg_reload_conf()")
        report = run_in_process(env={"REPLICA_ONE_PORT": str(extra.port)}, read_policy="round-robin")

    assert conflicted
    [skip] = report.skipped
    assert (skip.replica.service, skip.when) == ("replica-one", "during the reads")
    # Usually the replayed lock is what cancels the read ("User was holding a relation lock for too long."). But with
    # max_standby_streaming_delay = 0 any conflict cancels it at once, and the primary's other work (a vacuum, a HOT
    # prune) can replay a cleanup record first ("User query might have needed to see row versions that must be
    # removed."), as CI once saw. Either one is a recovery conflict, and either one sends the read to replica-two.
    assert skip.reason.startswith(
        "answered the demo's question with an error: canceling statement due to conflict with recovery ("
    )
    assert report.contents[0].server.service == "replica-two"
    assert not sharding_demo.primary_served_reads(report)


# ------------------------------------------------------------------------------------------------
# 4. Partitions named as the catalog names them
# ------------------------------------------------------------------------------------------------


def test_a_decoy_on_the_search_path_changes_nothing(cluster: LocalCluster, run_in_process: Any) -> None:
    # tbl_users lives in schema adv, its partitions in public and in hidden (not on the search_path),
    # and adv.tbl_users_p1, a plain table full of other rows, comes first on the search_path.
    settings = database_with(
        cluster,
        "decoy",
        "CREATE SCHEMA adv",
        "CREATE SCHEMA hidden",
        "CREATE TABLE adv.tbl_users (id uuid PRIMARY KEY, first_name varchar(255)) PARTITION BY HASH (id)",
        *(
            f"CREATE TABLE {'hidden' if n == 2 else 'public'}.tbl_users_p{n} PARTITION OF adv.tbl_users "
            f"FOR VALUES WITH (MODULUS 4, REMAINDER {n})"
            for n in range(4)
        ),
        "CREATE TABLE adv.tbl_users_p1 (id uuid, first_name varchar(255))",
        "INSERT INTO adv.tbl_users_p1 SELECT gen_random_uuid(), 'Decoy' FROM generate_series(1, 1000)",
        "ALTER DATABASE decoy SET search_path = adv, public",
    )
    report = run_in_process(env=settings, users=40)
    with connect(cluster.primary, dbname="decoy") as primary:
        real = dict(
            primary.execute("SELECT tableoid::regclass::text, count(*) FROM adv.tbl_users GROUP BY 1").fetchall()
        )
    assert {f"{p.schema}.{p.name}" for p in report.primary.partitions} >= {
        "hidden.tbl_users_p2",
        "public.tbl_users_p1",
    }
    counted = {p.name: answer.value[0] for p, answer in zip(report.primary.partitions, report.contents, strict=True)}
    assert sum(counted.values()) == sum(real.values()) == 40  # not a single decoy row
    assert all(name != "Decoy" for answer in report.contents for _, name in answer.value[1])
    assert report.written.predicted == report.landing.value[0]


def test_the_reads_use_connections_opened_after_the_replicas_caught_up(cluster: LocalCluster) -> None:
    # A connection takes its settings (here the database's search_path) when it opens. The replicas are paused
    # before the search_path is set, so the wait's first connections are opened with the old one; reads on those
    # would not find tbl_users, which lives in schema adv.
    settings = database_with(
        cluster,
        "late",
        "CREATE SCHEMA adv",
        "CREATE TABLE adv.tbl_users (id uuid PRIMARY KEY, first_name varchar(255)) PARTITION BY HASH (id)",
        *(
            f"CREATE TABLE adv.tbl_users_p{n} PARTITION OF adv.tbl_users FOR VALUES WITH (MODULUS 4, REMAINDER {n})"
            for n in range(4)
        ),
    )

    def has_the_table(replica: PostgresNode) -> bool:
        try:
            with connect(replica, dbname="late") as connection:
                return connection.execute("SELECT to_regclass('adv.tbl_users')").fetchone() != (None,)
        except psycopg.OperationalError:  # the database is not there yet
            return False

    for replica in cluster.replicas:
        assert wait_until(lambda replica=replica: has_the_table(replica))
        pause_replay(cluster, replica)
    with connect(cluster.primary) as primary:
        primary.execute("ALTER DATABASE late SET search_path = adv, public")
    demo = start_demo(cluster, "--json", env=settings | {"DEMO_CATCHUP_TIMEOUT": "20"})
    time.sleep(2)  # the demo has committed, and is waiting for the paused replicas
    for replica in cluster.replicas:
        resume_replay(replica)
    out, err = demo.communicate(timeout=60)
    assert demo.returncode == 0, err
    report = json.loads(out)
    assert report["skipped"] == [], report["skipped"]
    assert {partition["read_from"] for partition in report["partitions"]} <= {"replica-one", "replica-two"}
    assert report["table_total"] == 5


def test_a_partition_the_user_may_not_read_is_refused_before_the_insert(cluster: LocalCluster) -> None:
    settings = database_with(
        cluster,
        "unreadable",
        "CREATE SCHEMA hidden",
        "CREATE TABLE tbl_users (id uuid PRIMARY KEY, first_name varchar(255)) PARTITION BY HASH (id)",
        "CREATE TABLE tbl_users_p0 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 2, REMAINDER 0)",
        "CREATE TABLE hidden.tbl_users_p1 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 2, REMAINDER 1)",
        "DROP ROLE IF EXISTS writer",
        "CREATE ROLE writer LOGIN PASSWORD 'writer'",
        "GRANT INSERT, SELECT ON tbl_users, tbl_users_p0 TO writer",
    )
    result = run_demo(cluster, env=settings | logged_in_as("writer", "writer"))
    assert result.returncode == 5, result.stderr
    [line] = errors_of(result.stderr)
    assert "has hidden.tbl_users_p1, a partition that this user may not read" in line
    assert line.endswith("nothing was written")
    assert count_on(cluster.primary, "unreadable") == 0


# ------------------------------------------------------------------------------------------------
# 5. Bytes that are not text
# ------------------------------------------------------------------------------------------------


def run_with_bytes(cluster: LocalCluster, name: bytes, value: bytes) -> subprocess.CompletedProcess[str]:
    environment = {
        key.encode(): item.encode() for key, item in (clean_environment() | cluster.demo_environment()).items()
    }
    environment[name] = value
    return subprocess.run(
        [sys.executable, str(DEMO), "--json"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        check=False,
    )


@pytest.mark.parametrize(
    "name, value, shown",
    [
        (b"MASTER_DB_PASSWORD", b"p\xe4ss", "MASTER_DB_PASSWORD: Value error, is not UTF-8 text (byte 0xe4)"),
        (
            b"REPLICA_ONE_HOST",
            b"127.0.0.\xff",
            "REPLICA_ONE_HOST=127.0.0.\\udcff: Value error, is not UTF-8 text (byte 0xff)",
        ),
    ],
)
def test_a_setting_that_is_not_utf8_is_one_line_and_exit_2(
    cluster: LocalCluster, name: bytes, value: bytes, shown: str
) -> None:
    # A value that can never be sent is bad input, as a port of "abc" is: exit 2 before anything is written, for a
    # replica as for the primary (a replica that refuses a valid login is left out of the reads instead).
    before = count_on(cluster.primary)
    result = run_with_bytes(cluster, name, value)
    assert result.returncode == 2, result.stderr
    assert errors_of(result.stderr) == [
        f"sharding_demo.py: error: invalid setting {shown}, so it cannot be sent to the server"
    ]
    assert count_on(cluster.primary) == before


# ------------------------------------------------------------------------------------------------
# 6. Wording
# ------------------------------------------------------------------------------------------------


def test_mixed_moduli_are_told_per_partition(cluster: LocalCluster) -> None:
    settings = database_with(
        cluster,
        "mixed",
        "CREATE TABLE tbl_users (id uuid PRIMARY KEY, first_name varchar(255)) PARTITION BY HASH (id)",
        *(
            f"CREATE TABLE tbl_users_{name} PARTITION OF tbl_users FOR VALUES WITH (MODULUS {m}, REMAINDER {r})"
            for name, m, r in [("even", 2, 0), ("m4_r1", 4, 1), ("m8_r3", 8, 3), ("m8_r7", 8, 7)]
        ),
    )
    result = run_demo(cluster, "--users", "20000", "--show", "0", env=settings)
    assert result.returncode == 0, result.stderr
    assert (
        "a partition FOR VALUES WITH (modulus m, remainder r) takes the rows\nwhose hash(id) mod m = r."
        in result.stdout
    )
    assert "(vs even: how far the share is from the partition's even share, 1/modulus)" in result.stdout
    table = [line.split() for line in result.stdout.splitlines() if line.startswith("  tbl_users_")]
    shares = {row[0]: float(row[3].rstrip("%")) for row in table}
    # Evenly filled, each by its own modulus: 1/2, 1/4, 1/8, 1/8 of the rows, give or take.
    assert abs(shares["tbl_users_even"] - 50) < 2 and abs(shares["tbl_users_m4_r1"] - 25) < 2
    assert all(abs(float(row[4].rstrip("%"))) < 8 for row in table), table


def test_a_cancelled_catalog_query_is_named_as_a_cancel(cluster: LocalCluster) -> None:
    # A thousand partitions make the check's catalog query take longer than a 1 ms statement_timeout.
    settings = database_with(
        cluster,
        "many",
        "CREATE TABLE tbl_users (id uuid PRIMARY KEY, first_name varchar(255)) PARTITION BY HASH (id)",
        "DO $$BEGIN FOR r IN 0..999 LOOP EXECUTE format('CREATE TABLE p%s PARTITION OF tbl_users "
        "FOR VALUES WITH (MODULUS 1000, REMAINDER %s)', r, r); END LOOP; END$$",
    )
    result = run_demo(cluster, env=settings | {"PGOPTIONS": "-c statement_timeout=1"})
    assert result.returncode == 7, result.stderr
    [line] = errors_of(result.stderr)
    assert "cancelled a query of the demo's checks" in line and line.endswith("nothing was written")


# ------------------------------------------------------------------------------------------------
# 7. Properties: any settings and flags, one line at most, a documented code, nothing half-said
# ------------------------------------------------------------------------------------------------

DOCUMENTED = {code.value for code in sharding_demo.ExitCode}
text_values = st.one_of(
    st.sampled_from(["", " ", "0", "-1", "1e6", "nan", "inf", "99999999999999999999", "round-robin", "5", "127.0.0.1"]),
    st.text(max_size=12),  # non-ASCII too
    st.binary(max_size=6).map(lambda raw: raw.decode("utf-8", errors="surrogateescape")),  # not UTF-8
)
VARIABLES = [
    "MASTER_DB_PORT",
    "MASTER_DB_USER",
    "MASTER_DB_PASSWORD",
    "MASTER_DB_NAME",
    "REPLICA_ONE_PORT",
    "REPLICA_TWO_PASSWORD",
    "DEMO_CATCHUP_TIMEOUT",
    "DEMO_CONNECT_TIMEOUT",
    "DEMO_STALL_TIMEOUT",
    "DEMO_READ_POLICY",
    "DEMO_USERS",
    "DEMO_SHOW",
    "DEMO_JSON_OUTPUT",
]
FLAGS = ["--users", "--show", "--read-policy", "--catchup-timeout", "--connect-timeout", "--stall-timeout"]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    variables=st.dictionaries(st.sampled_from(VARIABLES), text_values, max_size=3),
    flags=st.lists(st.tuples(st.sampled_from(FLAGS), text_values), max_size=2),
    dotenv=st.one_of(st.none(), st.tuples(st.sampled_from(VARIABLES), text_values.map(lambda v: v + "\x00x"))),
)
def test_any_settings_give_one_true_line_and_a_documented_exit(
    cluster: LocalCluster,
    tmp_path_factory: pytest.TempPathFactory,
    variables: dict[str, str],
    flags: Any,
    dotenv: Any,
) -> None:
    # Keep the runs short: a valid --users or DEMO_USERS above 50 becomes 50.
    def small(name: str, value: str) -> str:
        return "50" if name in ("--users", "DEMO_USERS") and value.strip().isdigit() and int(value) > 50 else value

    folder = tmp_path_factory.mktemp("property")
    if dotenv is not None:
        (folder / ".env").write_bytes(f"{dotenv[0]}={dotenv[1]}\n".encode(errors="surrogateescape"))
    arguments = [part for flag, value in flags for part in (flag, small(flag, value)) if "\x00" not in value]
    environment = clean_environment() | cluster.demo_environment() | {"DEMO_STALL_TIMEOUT": "5"}
    environment |= {name: small(name, value) for name, value in variables.items() if "\x00" not in value}
    encoded = {k.encode(errors="surrogateescape"): v.encode(errors="surrogateescape") for k, v in environment.items()}
    before = count_on(cluster.primary)
    result = subprocess.run(
        [sys.executable, str(DEMO), *arguments],
        env=encoded,
        cwd=folder,
        capture_output=True,
        timeout=120,
        check=False,
        errors="surrogateescape",
    )

    assert result.returncode in DOCUMENTED, result.stderr
    errors = errors_of(result.stderr)
    assert bool(errors) == (result.returncode != 0), result.stderr
    committed = result.returncode == 0 or any("were committed" in line for line in errors)
    if not committed:
        assert count_on(cluster.primary) == before, result.stderr
    for replica in cluster.replicas:  # a run may have paused nothing, but keep the cluster whole
        assert wait_until(lambda replica=replica: count_on(replica) == count_on(cluster.primary), timeout=30)
