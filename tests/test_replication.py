"""The cluster itself: streaming replication, slots, partitions, read-only standbys."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from conftest import connect, wait_until
from local_cluster import LocalCluster


def test_row_written_on_primary_is_read_back_from_both_replicas(cluster: LocalCluster) -> None:
    user_id = uuid.uuid4()
    with connect(cluster.primary) as primary:
        primary.execute("INSERT INTO tbl_users (id, first_name) VALUES (%s, %s)", [user_id, "Replicated"])

    for replica in cluster.replicas:
        with connect(replica) as connection:

            def replica_has_row(connection: psycopg.Connection = connection) -> bool:
                row = connection.execute("SELECT first_name FROM tbl_users WHERE id = %s", [user_id]).fetchone()
                return row == ("Replicated",)

            assert wait_until(replica_has_row), f"{replica.name} never showed the row written on the primary"


def test_primary_streams_to_two_replicas_each_on_its_own_slot(cluster: LocalCluster) -> None:
    with connect(cluster.primary) as primary:
        rows = primary.execute(
            """
            SELECT r.application_name, r.state, s.slot_name, s.slot_type
            FROM pg_stat_replication AS r
            JOIN pg_replication_slots AS s ON s.active_pid = r.pid
            ORDER BY r.application_name
            """
        ).fetchall()
    assert rows == [
        ("replica-one", "streaming", "replica_one", "physical"),
        ("replica-two", "streaming", "replica_two", "physical"),
    ]


def test_replicas_are_hot_standbys_and_primary_is_not(cluster: LocalCluster) -> None:
    with connect(cluster.primary) as primary:
        assert primary.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
    for replica in cluster.replicas:
        with connect(replica) as connection:
            status = connection.execute("SELECT pg_is_in_recovery(), status FROM pg_stat_wal_receiver").fetchone()
            assert status == (True, "streaming"), replica.name


@pytest.mark.parametrize("node_index", [0, 1, 2], ids=["master-db", "replica-one", "replica-two"])
def test_four_hash_partitions_exist_on_every_server(cluster: LocalCluster, node_index: int) -> None:
    node = cluster.nodes[node_index]
    with connect(node) as connection:
        partitions = connection.execute(
            """
            SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'tbl_users'::regclass ORDER BY c.relname
            """
        ).fetchall()
        strategy = connection.execute(
            "SELECT partstrat FROM pg_partitioned_table WHERE partrelid = 'tbl_users'::regclass"
        ).fetchone()
    assert strategy == ("h",)  # h = hash
    assert partitions == [
        (f"tbl_users_p{remainder}", f"FOR VALUES WITH (modulus 4, remainder {remainder})") for remainder in range(4)
    ]


def test_a_write_to_a_replica_is_refused(cluster: LocalCluster) -> None:
    user_id = uuid.uuid4()
    for replica in cluster.replicas:
        with connect(replica) as connection, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            connection.execute("INSERT INTO tbl_users (id, first_name) VALUES (%s, 'Nope')", [user_id])
    with connect(cluster.primary) as primary:
        assert primary.execute("SELECT count(*) FROM tbl_users WHERE id = %s", [user_id]).fetchone() == (0,)


def test_replicator_role_can_replicate_but_not_read_tables(cluster: LocalCluster) -> None:
    with connect(cluster.primary) as primary:
        role = primary.execute(
            "SELECT rolreplication, rolcanlogin, rolconnlimit, rolsuper FROM pg_roles WHERE rolname = 'replicator'"
        ).fetchone()
        password = primary.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'replicator'").fetchone()
    assert role == (True, True, 5, False)
    assert password is not None and str(password[0]).startswith("SCRAM-SHA-256$")


def test_logins_need_the_right_password(cluster: LocalCluster) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host="127.0.0.1", port=cluster.primary.port, user="postgres", password="wrong", dbname="postgres"
        )
