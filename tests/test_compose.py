"""docker-compose.yml: valid, in agreement with the demo and local_cluster.py, and its healthchecks
work when run against real servers.

No Docker engine runs where these tests run, so the containers themselves are not started (the
README says which parts this leaves untested). docker-compose v1 validates and renders the file
offline; the rendered file is what these tests read.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from conftest import COMPOSE_FILE, PROJECT_DIR, clean_environment, connect, docker_compose, wait_until
from local_cluster import INIT_FILES, REPLICA_BOOTSTRAP, REPLICAS, LocalCluster, PostgresNode
from sharding_demo import MasterDBSettings, ReplicaOneSettings, ReplicaTwoSettings

INITDB_DIR = "/docker-entrypoint-initdb.d/"


def rendered(env: dict[str, str] | None = None) -> dict[str, Any]:
    result = docker_compose("config", env=env)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = yaml.safe_load(result.stdout)
    return document


def test_compose_file_is_valid() -> None:
    result = docker_compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_services_and_ports_agree_with_the_demo_defaults() -> None:
    services = rendered()["services"]
    defaults = {
        "master-db": MasterDBSettings.model_fields["port"].default,
        "replica-one": ReplicaOneSettings.model_fields["port"].default,
        "replica-two": ReplicaTwoSettings.model_fields["port"].default,
    }
    # The shards are there too, but only in the sharded profile (tests/test_sharding.py).
    assert {name for name, service in services.items() if "profiles" not in service} == set(defaults)
    for name, port in defaults.items():
        assert services[name]["image"] == "postgres:17"
        # Published on the host's loopback only, container port 5432.
        assert services[name]["ports"] == [f"127.0.0.1:{port}:5432/tcp"], name


def test_host_ports_follow_the_demo_s_own_variables() -> None:
    services = rendered({"MASTER_DB_PORT": "6000", "REPLICA_ONE_PORT": "6001", "REPLICA_TWO_PORT": "6002"})["services"]
    assert services["master-db"]["ports"] == ["127.0.0.1:6000:5432/tcp"]
    assert services["replica-one"]["ports"] == ["127.0.0.1:6001:5432/tcp"]
    assert services["replica-two"]["ports"] == ["127.0.0.1:6002:5432/tcp"]


def test_passwords_come_from_the_environment_with_demo_defaults() -> None:
    defaults = rendered()["services"]
    assert defaults["master-db"]["environment"]["POSTGRES_PASSWORD"] == "postgres"
    assert defaults["master-db"]["environment"]["REPLICATOR_PASSWORD"] == "replicator_password"
    changed = rendered({"MASTER_DB_PASSWORD": "pw1", "REPLICATOR_PASSWORD": "pw2"})["services"]
    assert changed["master-db"]["environment"]["POSTGRES_PASSWORD"] == "pw1"
    for name in ("master-db", "replica-one", "replica-two"):
        assert changed[name]["environment"]["REPLICATOR_PASSWORD"] == "pw2"


def test_primary_mounts_the_same_init_files_local_cluster_runs() -> None:
    volumes = rendered()["services"]["master-db"]["volumes"]
    mounted = {}
    for volume in volumes:
        source, target, *_ = volume.split(":")
        if target.startswith(INITDB_DIR):
            mounted[target.removeprefix(INITDB_DIR)] = Path(source).name
    assert mounted == INIT_FILES


def test_replicas_clone_with_the_shared_bootstrap_after_the_primary_is_healthy() -> None:
    services = rendered()["services"]
    for name, slot in REPLICAS.items():
        service = services[name]
        assert service["depends_on"] == {"master-db": {"condition": "service_healthy"}}
        assert service["user"] == "postgres"
        assert service["command"][:3] == ["bash", f"/usr/local/bin/{REPLICA_BOOTSTRAP}", "postgres"]
        assert f"cluster_name={name}" in service["command"]
        assert service["environment"]["REPLICA_SLOT"] == slot
        assert service["environment"]["PRIMARY_HOST"] == "master-db"
        assert any(v.split(":")[0].endswith(REPLICA_BOOTSTRAP) for v in service["volumes"])
    assert "cluster_name=master-db" in services["master-db"]["command"]


def test_no_service_is_open_to_the_world() -> None:
    text = COMPOSE_FILE.read_text()
    assert "0.0.0.0" not in text
    rules = [line.split() for line in (PROJECT_DIR / "pg_hba.conf").read_text().splitlines()]
    rules = [rule for rule in rules if rule and not rule[0].startswith("#")]
    assert rules, "pg_hba.conf has no rules"
    for rule in rules:
        method = rule[-1]
        if rule[0] == "local":
            assert method == "trust"
        else:
            assert method == "scram-sha-256", rule
            assert rule[3] not in ("0.0.0.0/0", "::/0", "all"), rule


def healthcheck_command(service: str) -> str:
    test = rendered()["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    return str(test[1])


def run_healthcheck(command: str, cluster: LocalCluster, node: PostgresNode) -> int:
    """Run a compose healthcheck on this machine against `node`, as it runs inside the container:
    psql and pg_isready on the server's own Unix socket and loopback, as the postgres user."""
    env = clean_environment() | {
        "PATH": f"{cluster.bindir}{os.pathsep}{os.environ['PATH']}",
        "PGHOST": str(cluster.socket_dir),
        "PGPORT": str(node.port),
        "PGPASSWORD": cluster.superuser_password,
    }
    return subprocess.run(["sh", "-c", command], env=env, capture_output=True, check=False).returncode


def test_master_healthcheck_passes_on_the_initialised_primary(cluster: LocalCluster) -> None:
    assert run_healthcheck(healthcheck_command("master-db"), cluster, cluster.primary) == 0


def test_master_healthcheck_takes_any_number_of_partitions_but_none(cluster: LocalCluster) -> None:
    # A learner who gives init-master.sql 8 partitions, say: the demo follows the catalog, and compose must not call
    # master-db unhealthy for it (the check wanted exactly 4). Here, for a moment: 3 partitions, then no tbl_users.
    command = healthcheck_command("master-db")
    with connect(cluster.primary) as primary:
        primary.execute("ALTER TABLE tbl_users DETACH PARTITION tbl_users_p3")
        try:
            assert run_healthcheck(command, cluster, cluster.primary) == 0
            primary.execute("ALTER TABLE tbl_users RENAME TO tbl_users_away")
            try:
                assert run_healthcheck(command, cluster, cluster.primary) != 0  # init-master.sql did not run
            finally:
                primary.execute("ALTER TABLE tbl_users_away RENAME TO tbl_users")
        finally:
            primary.execute(
                "ALTER TABLE tbl_users ATTACH PARTITION tbl_users_p3 FOR VALUES WITH (MODULUS 4, REMAINDER 3)"
            )


def test_replica_healthcheck_passes_on_streaming_standbys_only(cluster: LocalCluster) -> None:
    for name in REPLICAS:
        command = healthcheck_command(name)
        for replica in cluster.replicas:
            assert run_healthcheck(command, cluster, replica) == 0, replica.name
        # The primary answers pg_isready too, but it is not a standby: unhealthy as a replica.
        assert run_healthcheck(command, cluster, cluster.primary) != 0


def statement_lines(node: PostgresNode, after: int) -> list[str]:
    """The log_statement lines the server wrote after byte `after` of its log."""
    text = node.log_file.read_bytes()[after:].decode(errors="replace")
    return [line for line in text.splitlines() if " statement: " in line]


def test_healthcheck_probes_stay_out_of_the_statement_log(cluster: LocalCluster) -> None:
    for name, node in (("master-db", cluster.primary), *zip(REPLICAS, cluster.replicas, strict=True)):
        command = healthcheck_command(name)
        log_size = node.log_file.stat().st_size
        for _ in range(10):
            assert run_healthcheck(command, cluster, node) == 0, name
        assert statement_lines(node, after=log_size) == [], name

        # ... while a client's statements still are: log_statement = 'all' is what shows the
        # demo's SELECTs in `docker compose logs`.
        with connect(node) as connection:
            connection.execute("SELECT 'a client statement'")

        def client_statement_logged(node: PostgresNode = node, log_size: int = log_size) -> bool:
            return any("SELECT 'a client statement'" in line for line in statement_lines(node, log_size))

        assert wait_until(client_statement_logged), name
