"""sharding_demo.py run as a subprocess against the real cluster; assertions on what the servers hold."""

from __future__ import annotations

import itertools
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import sharding_demo
from conftest import connect, counts_everywhere, database_with, functions_outside_the_lesson, named, run_demo
from local_cluster import LocalCluster


@pytest.fixture(scope="module")
def demo_run(cluster: LocalCluster) -> dict[str, Any]:
    """One run of the demo with --json; the tests below each check one part of its promise."""
    started = datetime.now(UTC)
    log_sizes = {node.name: len(node.log_text()) for node in cluster.nodes}
    result = run_demo(cluster, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warnings on a healthy cluster
    report: dict[str, Any] = json.loads(result.stdout)
    report["_started"] = started
    # Nothing else writes while the tests run one by one, so this is the table the demo read.
    with connect(cluster.primary) as primary:
        report["_table_count"] = primary.execute("SELECT count(*) FROM tbl_users").fetchone()[0]  # type: ignore[index]
    # What each server logged during this run alone (earlier tests' runs logged too).
    report["_logs"] = {node.name: node.log_text()[log_sizes[node.name] :] for node in cluster.nodes}
    return report


def unix_milliseconds_of(user_id: str) -> datetime:
    """A UUIDv7's time, decoded here on its own: the first 12 hex digits are the 48-bit Unix time
    in milliseconds (RFC 9562, section 5.7)."""
    milliseconds = int(user_id.replace("-", "")[:12], 16)
    return datetime.fromtimestamp(milliseconds / 1000, tz=UTC)


def rows_by_partition_on_primary(cluster: LocalCluster) -> dict[str, str]:
    """Where the server says each row is: tableoid is the partition that physically holds it."""
    with connect(cluster.primary) as primary:
        rows = primary.execute("SELECT id::text, tableoid::regclass::text FROM tbl_users").fetchall()
    return {str(user_id): str(partition) for user_id, partition in rows}


def test_inserts_the_five_demo_users(cluster: LocalCluster, demo_run: dict[str, Any]) -> None:
    inserted = demo_run["inserted"]
    assert [user["first_name"] for user in inserted] == ["John", "Jane", "Bob", "Alice", "Charlie"]
    ids = [uuid.UUID(user["id"]) for user in inserted]
    assert all(user_id.version == 7 for user_id in ids)
    assert ids == sorted(ids)  # UUIDv7 sort by creation time
    on_primary = rows_by_partition_on_primary(cluster)
    assert {str(user_id) for user_id in ids} <= on_primary.keys()


def test_insert_was_written_by_the_primary(demo_run: dict[str, Any]) -> None:
    assert demo_run["written_to"] == "master-db"
    assert demo_run["in_recovery"] is False


def test_partitions_come_from_the_catalog_and_counts_sum_to_the_table(
    cluster: LocalCluster, demo_run: dict[str, Any]
) -> None:
    partitions = demo_run["partitions"]
    assert [p["name"] for p in partitions] == [f"tbl_users_p{n}" for n in range(4)]
    assert [p["bound"] for p in partitions] == [f"FOR VALUES WITH (modulus 4, remainder {n})" for n in range(4)]
    for partition in partitions:
        assert len(partition["rows"]) == min(partition["count"], 10)  # --show defaults to 10
    assert sum(p["count"] for p in partitions) == demo_run["table_total"] == demo_run["_table_count"]


def test_every_row_is_reported_in_the_partition_the_server_put_it_in(
    cluster: LocalCluster, demo_run: dict[str, Any]
) -> None:
    on_primary = rows_by_partition_on_primary(cluster)
    reported = {row["id"]: p["name"] for p in demo_run["partitions"] for row in p["rows"]}
    assert reported, "the demo reported no rows"
    for user_id, partition in reported.items():
        assert on_primary[user_id] == partition, user_id


def test_reads_were_served_by_replicas_in_recovery(demo_run: dict[str, Any]) -> None:
    reads = [*demo_run["partitions"], demo_run["first_user"]]
    for read in reads:
        assert read["read_from"] in {"replica-one", "replica-two"}
        assert read["in_recovery"] is True


def test_replicas_caught_up_before_the_reads(demo_run: dict[str, Any]) -> None:
    catchup = {entry["replica"]: entry for entry in demo_run["catchup"]}
    assert catchup.keys() == {"replica-one", "replica-two"}
    assert all(0 <= entry["seconds"] < 5 for entry in catchup.values())
    assert demo_run["skipped"] == [] and demo_run["warnings"] == []


def test_first_user_and_its_creation_time_from_the_uuid7(cluster: LocalCluster, demo_run: dict[str, Any]) -> None:
    first = demo_run["first_user"]
    with connect(cluster.primary) as primary:
        smallest = primary.execute("SELECT id::text, first_name FROM tbl_users ORDER BY id LIMIT 1").fetchone()
    assert (first["id"], first["first_name"]) == smallest
    created_at = datetime.fromisoformat(first["created_at"])
    assert created_at.tzinfo is not None and created_at.utcoffset() == timedelta(0)
    assert created_at == unix_milliseconds_of(first["id"])


def test_the_demo_s_own_users_carry_their_creation_time(demo_run: dict[str, Any]) -> None:
    # Truncated to the millisecond, as a UUIDv7's timestamp is.
    started = demo_run["_started"].replace(microsecond=demo_run["_started"].microsecond // 1000 * 1000)
    times = [unix_milliseconds_of(user["id"]) for user in demo_run["inserted"]]
    assert all(started <= created_at <= datetime.now(UTC) for created_at in times)
    # Made one after the other in a few milliseconds, not spread out to keep them in order.
    assert times == sorted(times)
    assert times[-1] - times[0] < timedelta(milliseconds=50)


def test_server_logs_show_selects_on_replicas_and_the_insert_only_on_the_primary(
    cluster: LocalCluster, demo_run: dict[str, Any]
) -> None:
    # log_statement = 'all' and log_line_prefix with app=%a make each server's log the proof.
    inserts = re.compile(r"app=sharding_demo .*INSERT INTO tbl_users")
    selects = re.compile(r"app=sharding_demo .*SELECT count\(\*\)")
    primary_log = demo_run["_logs"]["master-db"]
    assert inserts.search(primary_log)
    assert not selects.search(primary_log)
    replicas_used = {p["read_from"] for p in demo_run["partitions"]}
    for replica in cluster.replicas:
        log = demo_run["_logs"][replica.name]
        assert not inserts.search(log), replica.name
        assert bool(selects.search(log)) == (replica.name in replicas_used), replica.name


def test_text_output_names_partitions_and_servers(cluster: LocalCluster) -> None:
    result = run_demo(cluster)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    partition_lines = [line for line in lines if line.startswith("Partition tbl_users_")]
    assert [line.split(":")[0] for line in partition_lines] == [f"Partition tbl_users_p{n}" for n in range(4)]
    assert all(re.fullmatch(r"Partition tbl_users_p\d: [\d,]+ records?", line) for line in partition_lines)
    assert sum(int(line.split()[2].replace(",", "")) for line in partition_lines) >= 5
    assert re.search(r"read from replica-(one|two) 127\.0\.0\.1:\d+, standby, in recovery", result.stdout)
    assert re.search(
        r"^User: \w+ \(ID: [0-9a-f-]{36}, CreatedDate: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)$",
        result.stdout,
        re.MULTILINE,
    )
    assert "Inserted 5 users (ORM) in one transaction on master-db" in result.stdout
    predictions = re.findall(r"(tbl_users_p\d) -> (tbl_users_p\d)  (ok|MISMATCH)$", result.stdout, re.MULTILINE)
    assert len(predictions) == 5
    assert all(predicted == actual and verdict == "ok" for predicted, actual, verdict in predictions)


def test_round_robin_alternates_between_the_replicas(cluster: LocalCluster) -> None:
    result = run_demo(cluster, "--json", "--read-policy", "round-robin")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    order = [p["read_from"] for p in report["partitions"]] + [report["first_user"]["read_from"]]
    assert all(a != b for a, b in itertools.pairwise(order)), order
    assert set(order) == {"replica-one", "replica-two"}


def test_each_new_user_lands_in_the_predicted_partition(cluster: LocalCluster, demo_run: dict[str, Any]) -> None:
    on_primary = rows_by_partition_on_primary(cluster)
    assert demo_run["users_inserted"] == 5 and demo_run["insert_method"] == "ORM"
    for user in demo_run["inserted"]:
        assert user["predicted_partition"] == on_primary[user["id"]]
        assert user["actual_partition"] == on_primary[user["id"]]
    for partition in demo_run["partitions"]:
        assert partition["predicted"] == partition["actual"]
        assert (partition["modulus"], partition["remainder"]) == (4, int(partition["name"][-1]))
    assert sum(partition["actual"] for partition in demo_run["partitions"]) == 5
    assert demo_run["landing_checked_by"]["in_recovery"] is True


def test_many_users_go_through_copy_and_land_where_predicted(cluster: LocalCluster) -> None:
    result = run_demo(cluster, "--json", "--users", "3000", "--show", "3")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["insert_method"] == "COPY" and report["users_inserted"] == 3000
    # Bounded output: a sample of 3 new users, at most 3 rows per partition.
    assert len(report["inserted"]) == 3
    assert all(len(partition["rows"]) <= 3 for partition in report["partitions"])
    partitions = report["partitions"]
    assert [p["predicted"] for p in partitions] == [p["actual"] for p in partitions]
    assert sum(p["actual"] for p in partitions) == 3000
    # 3000 rows over 4 partitions: each gets a fair share (a spread this wide is a bug, not luck).
    assert all(0.20 < p["share"] < 0.30 for p in partitions)
    # JSON rounds both to 6 decimals.
    assert all(abs(p["deviation_from_even"] - (p["share"] * 4 - 1)) < 1e-5 for p in partitions)
    on_primary = rows_by_partition_on_primary(cluster)
    for user in report["inserted"]:
        assert user["predicted_partition"] == user["actual_partition"] == on_primary[user["id"]]
    with connect(cluster.primary) as primary:
        names = primary.execute(
            "SELECT first_name FROM tbl_users WHERE id = ANY(%s::uuid[])",
            [[u["id"] for u in report["inserted"]]],
        ).fetchall()
    assert sorted(name for (name,) in names) == sorted(u["first_name"] for u in report["inserted"])


def test_progress_says_each_10_percent_once_whether_told_per_user_or_per_copy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The load says how far it is after each COPY of 10,000 rows, the other steps after each user. 123,456 users:
    # 12,345 is 10%, which no COPY ends on; each 10% passed must still be said, once, and the end.
    total = 123_456
    per_copy = sharding_demo.progress_printer(total, "loaded")
    for first in range(0, total, sharding_demo.ROWS_PER_COPY):
        per_copy(min(first + sharding_demo.ROWS_PER_COPY, total))
    per_user = sharding_demo.progress_printer(total, "made the ids of")
    for done in range(1, total + 1):
        per_user(done)
    lines = capsys.readouterr().err.splitlines()
    loaded = [line for line in lines if " loaded " in line]
    assert loaded[:2] == [
        "sharding_demo.py: loaded 20,000 of 123,456 users",
        "sharding_demo.py: loaded 30,000 of 123,456 users",
    ]
    assert len(loaded) == 10 and loaded[-1] == "sharding_demo.py: loaded 123,456 of 123,456 users"
    made = [line for line in lines if " made the ids of " in line]
    assert made[0] == "sharding_demo.py: made the ids of 12,345 of 123,456 users"
    assert len(made) == 11 and made[-1] == "sharding_demo.py: made the ids of 123,456 of 123,456 users"


def test_progress_goes_to_stderr_for_large_loads(cluster: LocalCluster) -> None:
    result = run_demo(cluster, "--json", "--users", "100000", "--show", "0")
    assert result.returncode == 0, result.stderr
    progress = result.stderr.splitlines()
    # Each long step says how far it is, every 10%: making the ids, predicting, loading.
    for verb in ("made the ids of", "predicted the partitions of", "loaded"):
        lines = [line for line in progress if line.startswith(f"sharding_demo.py: {verb} ")]
        assert len(lines) == 10, progress
        assert lines[-1] == f"sharding_demo.py: {verb} 100,000 of 100,000 users"
    assert len(progress) == 30
    report = json.loads(result.stdout)
    assert report["inserted"] == [] and all(p["rows"] == [] for p in report["partitions"])
    assert sum(p["actual"] for p in report["partitions"]) == 100_000
    assert [p["predicted"] for p in report["partitions"]] == [p["actual"] for p in report["partitions"]]


def test_a_lookup_by_id_reads_only_the_predicted_partition(cluster: LocalCluster, run_in_process) -> None:  # type: ignore[no-untyped-def]
    report = run_in_process()
    by_id, without_key = report.pruning.value
    # Where the server really put the first new user, asked here on the primary, by tableoid.
    first_id = uuid.UUID(bytes=report.written.ids[0])
    with connect(cluster.primary) as primary:
        [(holder,)] = primary.execute(
            "SELECT c.relnamespace::regnamespace || '.' || c.relname FROM tbl_users u JOIN pg_class c "
            "ON c.oid = u.tableoid WHERE u.id = %s",
            [first_id],
        ).fetchall()
        every_partition = {
            str(name)
            for (name,) in primary.execute(
                "SELECT 'public.' || relname FROM pg_inherits JOIN pg_class ON oid = inhrelid "
                "WHERE inhparent = 'tbl_users'::regclass"
            ).fetchall()
        }
    assert by_id == [holder]  # the plan reads that partition, and no other
    assert sorted(without_key) == sorted(every_partition)  # without the key, every partition
    assert report.pruning.server.service in {"replica-one", "replica-two"}


def test_the_lesson_s_ids_come_from_uuid6_and_carry_the_time(run_in_process) -> None:  # type: ignore[no-untyped-def]
    started = datetime.now(UTC)
    report = run_in_process()
    finished = datetime.now(UTC)
    ids = [uuid.UUID(bytes=id_bytes) for id_bytes in report.written.ids]
    assert all(user_id.version == 7 for user_id in ids) and ids == sorted(ids)
    times = [unix_milliseconds_of(str(user_id)) for user_id in ids]
    # uuid6 moves each id made in the same millisecond 1 ms ahead: five ids, at most 4 ms.
    assert started - timedelta(milliseconds=1) <= times[0] <= times[-1] <= finished + timedelta(milliseconds=5)
    assert times[-1] - times[0] <= timedelta(milliseconds=10)


def database_with_tbl_users(cluster: LocalCluster, name: str, *statements: str) -> dict[str, str]:
    """A fresh database with a tbl_users as init-master.sql makes it (four hash partitions), then `statements`."""
    return database_with(
        cluster,
        name,
        "CREATE TABLE tbl_users (id uuid PRIMARY KEY, first_name varchar(255)) PARTITION BY HASH (id)",
        *(
            f"CREATE TABLE tbl_users_p{n} PARTITION OF tbl_users FOR VALUES WITH (MODULUS 4, REMAINDER {n})"
            for n in range(4)
        ),
        *statements,
    )


def test_a_first_user_whose_id_is_not_a_uuidv7_is_not_given_a_time(cluster: LocalCluster, run_in_process) -> None:  # type: ignore[no-untyped-def]
    # A row written some other way (gen_random_uuid(), say) can hold the smallest id: it is no time, and not the
    # oldest user. A database of its own, so the shared table's first user stays the demo's.
    settings = database_with_tbl_users(
        cluster, "hand_written", "INSERT INTO tbl_users VALUES ('00000000-0000-4000-8000-000000000000', 'Hand')"
    )
    report = run_in_process(env=settings)
    assert report.first_user.value.first_name == "Hand"
    text = sharding_demo.render_text(report)
    assert "User: Hand (ID: 00000000-0000-4000-8000-000000000000, not a UUIDv7, so no creation time to read)" in text
    assert "the oldest user" not in text and "decoded from the UUIDv7" not in text


def test_users_that_the_reads_do_not_find_are_not_told_as_in_the_table(cluster: LocalCluster, run_in_process) -> None:  # type: ignore[no-untyped-def]
    # A rule that drops one user's INSERT: the COMMIT succeeds, and Bob is stored nowhere. The report must not say
    # that this run's 5 users are among the table's.
    no_bob = "CREATE RULE no_bob AS ON INSERT TO tbl_users WHERE NEW.first_name = 'Bob' DO INSTEAD NOTHING"
    settings = database_with_tbl_users(cluster, "without_bob", no_bob)
    report = run_in_process(env=settings)
    lines = sharding_demo.render_text(report).splitlines()
    with connect(cluster.primary, dbname="without_bob") as primary:
        stored = [name for (name,) in primary.execute("SELECT first_name FROM tbl_users ORDER BY id")]
    assert stored == ["John", "Jane", "Alice", "Charlie"]
    assert report.written.stored == 4  # the INSERT's own count: "INSERT 0 4"
    inserted = next(line for line in lines if line.startswith("Inserted "))
    assert inserted.startswith("Inserted 4 of 5 users (ORM) in one transaction on master-db ")
    assert lines[lines.index(inserted) + 1] == "By its own count, it kept 1 out (a rule or a trigger, say)."
    users = {line.split()[0]: line for line in lines if re.match(r"  \w+ +[0-9a-f-]{36} ", line)}
    assert list(users) == ["John", "Jane", "Bob", "Alice", "Charlie"]
    assert users["Bob"].endswith(" -> not found  MISMATCH")
    assert all(line.endswith("  ok") for name, line in users.items() if name != "Bob")
    total = "The table now holds 4 users: every run's, but only 4 of this run's 5 (the reads did not find the others)."
    assert total in lines


def test_a_user_that_the_reads_do_not_find_fails_the_run_after_the_report(cluster: LocalCluster) -> None:
    # The report is the proof that each user is where it was predicted; a run whose proof fails exits non-zero.
    no_bob = "CREATE RULE no_bob AS ON INSERT TO tbl_users WHERE NEW.first_name = 'Bob' DO INSTEAD NOTHING"
    settings = database_with_tbl_users(cluster, "still_without_bob", no_bob)
    result = run_demo(cluster, env=settings)
    assert result.returncode == 11, result.stderr
    assert result.stderr.splitlines() == [
        "sharding_demo.py: error: not every one of this run's users is where the demo predicted it (the report says "
        f"which); {named(cluster.primary)} committed the transaction"
    ]
    assert " -> not found  MISMATCH" in result.stdout
    assert counts_everywhere(cluster, "still_without_bob") == [4, 4, 4]


@pytest.mark.parametrize("users", [5, 200], ids=["ORM", "COPY"])
def test_rows_that_a_trigger_keeps_out_are_not_told_as_inserted(cluster: LocalCluster, users: int) -> None:
    # A BEFORE trigger that returns NULL drops a row without an error, for an INSERT and a COPY alike (a rule would
    # not see a COPY). The demo says how many the server stored, by its own count, and the run exits 11.
    settings = database_with_tbl_users(
        cluster,
        f"no_bobs_{users}",
        "CREATE FUNCTION no_bobs() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN IF NEW.first_name LIKE 'Bob%' THEN RETURN NULL; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER no_bobs BEFORE INSERT ON tbl_users FOR EACH ROW EXECUTE FUNCTION no_bobs()",
    )
    result = run_demo(cluster, "--users", str(users), "--json", env=settings)
    assert result.returncode == 11, result.stderr
    report = json.loads(result.stdout)
    bobs = users // 5  # user_name(): Bob, then Bob-7, Bob-12, ...
    assert (report["users_sent"], report["users_inserted"]) == (users, users - bobs)
    assert counts_everywhere(cluster, f"no_bobs_{users}") == [users - bobs] * 3


def test_show_0_lists_no_rows_and_says_so(run_in_process) -> None:  # type: ignore[no-untyped-def]
    # --show 0 (or DEMO_SHOW=0) keeps the report to its counts: no "... and 5 more" below a list of nothing.
    report = run_in_process(show=0)
    lines = sharding_demo.render_text(report).splitlines()
    assert not any(re.match(r"  (- |\w+ +[0-9a-f-]{36} )", line) for line in lines)  # no user, no row listed
    assert not any("more" in line for line in lines)
    for number, partition in enumerate(report.primary.partitions):
        count = report.contents[number].value[0]
        header = lines.index(f"Partition {partition.name}: {count:,} record{'' if count == 1 else 's'}")
        assert lines[header + 2 : header + 3] == (["  none listed (--show 0)"] if count else [])
    new_users = lines.index("  none listed (--show 0)")
    assert lines[new_users - 1].startswith("(tableoid, read from replica-")
    assert "This run's 5 users by partition:" in lines  # the counts still say where they landed


def test_the_default_run_executes_only_the_lesson_and_the_hash_appendix(cluster: LocalCluster) -> None:
    # The file's promise to a reader: following the default run, you never leave the lesson, except for
    # appendix A. Error handling, the bulk path, JSON and the flags run only when their case arises.
    assert functions_outside_the_lesson(cluster) == []
