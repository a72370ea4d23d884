"""Configuration: defaults, environment overrides, .env files, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import DEMO_VARIABLE_PREFIXES, run_demo
from local_cluster import LocalCluster
from sharding_demo import (
    DemoSettings,
    MasterDBSettings,
    ReplicaOneSettings,
    ReplicaTwoSettings,
    dollar_warnings,
)


@pytest.fixture(autouse=True)
def isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No demo variables from the outer environment, and an empty folder for .env files."""
    import os

    for name in list(os.environ):
        if name.startswith(DEMO_VARIABLE_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_match_the_original_demo_and_compose() -> None:
    expected_ports = {MasterDBSettings: 5432, ReplicaOneSettings: 5433, ReplicaTwoSettings: 5434}
    for settings_class, port in expected_ports.items():
        settings = settings_class()
        assert (settings.host, settings.port, settings.user, settings.name) == (
            "localhost",
            port,
            "postgres",
            "postgres",
        )
        assert settings.password.get_secret_value() == "postgres"
    demo = DemoSettings()
    assert (demo.users, demo.show, demo.json_output, demo.read_policy) == (5, 10, False, "random")
    assert (demo.catchup_timeout, demo.connect_timeout, demo.stall_timeout) == (5.0, 3, 10.0)


def test_environment_overrides_each_server_separately(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_DB_HOST", "db.example")
    monkeypatch.setenv("MASTER_DB_PORT", "6000")
    monkeypatch.setenv("REPLICA_TWO_USER", "reader")
    monkeypatch.setenv("REPLICA_TWO_PASSWORD", "s3cret")
    monkeypatch.setenv("REPLICA_TWO_NAME", "app")
    monkeypatch.setenv("DEMO_READ_POLICY", "round-robin")
    master, one, two = MasterDBSettings(), ReplicaOneSettings(), ReplicaTwoSettings()
    assert (master.host, master.port) == ("db.example", 6000)
    assert (one.host, one.port, one.user) == ("localhost", 5433, "postgres")
    assert (two.user, two.password.get_secret_value(), two.name) == ("reader", "s3cret", "app")
    assert DemoSettings().read_policy == "round-robin"


def test_dotenv_file_is_read_and_environment_wins(monkeypatch: pytest.MonkeyPatch, isolated_settings: Path) -> None:
    (isolated_settings / ".env").write_text(
        "MASTER_DB_PORT=7000\nREPLICA_ONE_HOST=replica.example\nREPLICA_TWO_PORT=7002\nDEMO_CATCHUP_TIMEOUT=1.5\n"
    )
    monkeypatch.setenv("REPLICA_TWO_PORT", "8002")
    assert MasterDBSettings().port == 7000
    assert ReplicaOneSettings().host == "replica.example"
    assert ReplicaTwoSettings().port == 8002
    assert DemoSettings().catchup_timeout == 1.5


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("MASTER_DB_PORT", "abc", "invalid setting MASTER_DB_PORT=abc: Input should be a valid integer"),
        ("REPLICA_ONE_PORT", "70000", "invalid setting REPLICA_ONE_PORT=70000: Input should be less than"),
        ("REPLICA_TWO_PORT", "0", "invalid setting REPLICA_TWO_PORT=0: Input should be greater than"),
        ("DEMO_READ_POLICY", "fastest", "invalid setting DEMO_READ_POLICY=fastest: Input should be"),
        ("DEMO_CATCHUP_TIMEOUT", "-1", "invalid setting DEMO_CATCHUP_TIMEOUT=-1"),
        # A host and its port, or a URL, pasted whole: libpq would only say "failed to resolve host".
        (
            "MASTER_DB_HOST",
            "localhost:5432",
            "invalid setting MASTER_DB_HOST=localhost:5432: Value error, is not a host name or address: give the "
            "host alone, and the port as MASTER_DB_PORT",
        ),
        (
            "REPLICA_TWO_HOST",
            "postgresql://localhost:5434/postgres",
            "invalid setting REPLICA_TWO_HOST=postgresql://localhost:5434/postgres: Value error, is not a host name "
            "or address: give the host alone, and the port as REPLICA_TWO_PORT",
        ),
    ],
)
def test_invalid_value_is_one_line_naming_the_variable(variable: str, value: str, expected: str) -> None:
    # Settings are checked before any engine exists, so no server is needed: an invalid value
    # cannot have written anything.
    result = run_demo(None, env={variable: value})
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"sharding_demo.py: error: {expected}")


# One .env for docker compose and the demo: how each reads a '$' (README, "One .env for both").
@pytest.mark.parametrize(
    ("line", "demo_reads", "warned"),
    [
        # Single quotes: compose takes the value as it is, and so does python-dotenv.
        ("MASTER_DB_PASSWORD='pa$word'", "pa$word", False),
        # Unquoted or double-quoted: compose replaces $word (here with nothing); the demo does not.
        ("MASTER_DB_PASSWORD=pa$word", "pa$word", True),
        ('MASTER_DB_PASSWORD="pa$word"', "pa$word", True),
        ("MASTER_DB_PASSWORD=pa$$word", "pa$$word", True),
        # ${NAME}: python-dotenv replaces it even inside single quotes; compose does not there.
        ("MASTER_DB_PASSWORD='pa${NO_SUCH_VARIABLE}word'", "paword", True),
        # '$' before something that is not a name: both keep it.
        ("MASTER_DB_PASSWORD=pa$1word", "pa$1word", False),
    ],
)
def test_dollar_in_a_dotenv_password(isolated_settings: Path, line: str, demo_reads: str, warned: bool) -> None:
    (isolated_settings / ".env").write_text(line + "\n")
    assert MasterDBSettings().password.get_secret_value() == demo_reads
    warnings = dollar_warnings(Path(".env"))
    assert len(warnings) == int(warned)
    if warned:
        assert warnings[0].startswith("MASTER_DB_PASSWORD in .env has a '$'")


def test_unquoted_dollar_password_is_explained_before_the_login_fails(
    cluster: LocalCluster, isolated_settings: Path
) -> None:
    # The password comes from .env only, so the outer environment must not set it.
    environment = {name: value for name, value in cluster.demo_environment().items() if name != "MASTER_DB_PASSWORD"}
    (isolated_settings / ".env").write_text("MASTER_DB_PASSWORD=pa$word\n")
    result = run_demo(None, env=environment, cwd=isolated_settings)
    assert result.returncode == 4, result.stderr
    warning, error = result.stderr.splitlines()
    assert warning.startswith("sharding_demo.py: warning: MASTER_DB_PASSWORD in .env has a '$'")
    assert error.startswith("sharding_demo.py: error: master-db (127.0.0.1:")
    assert "refused the login" in error
