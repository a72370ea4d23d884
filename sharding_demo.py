"""sharding_demo.py: hash partitioning and read/write splitting with PostgreSQL, in one script.

The idea
--------
One PostgreSQL server, the *primary* ("master-db"), accepts writes. Two *hot standbys*
("replica-one", "replica-two") receive the primary's write-ahead log (WAL) over streaming
replication, replay it, and answer read-only queries. An application can therefore send its
writes to the primary and spread its reads over the replicas: *read/write splitting*.

On the primary, the table ``tbl_users`` is *hash partitioned*: it is a parent with four child
tables, ``tbl_users_p0`` .. ``tbl_users_p3``, and PostgreSQL stores each row in the child whose
remainder equals hash(id) modulo 4. The replicas replay the same WAL, so they hold the same
partitions with the same rows.

What this is not: sharding. Sharding splits data across servers, each holding a part. Here every
server holds every row; partitioning splits one server's table into smaller tables, and the
replicas are full copies that add read capacity, not storage capacity.

The script follows the data
---------------------------
1. config    read MASTER_DB_*, REPLICA_ONE_*, REPLICA_TWO_* (and DEMO_*) with pydantic-settings;
2. engines   one SQLAlchemy Engine per server;
3. routing   ``ReadWriteRouter``: writes to the primary, each read to one replica (random or
             round-robin), skipping replicas that cannot be reached;
4. write     five users with client-made UUIDv7 ids, in one transaction on the primary;
5. wait      until each replica has replayed the primary's WAL up to that commit, so the reads
             below see the rows just written (read-your-writes); a replica that does not catch up
             in time is left out of this run's reads;
6. read      the partitions (from the catalog), each one's count and rows, and the first user;
7. report    all of it as a ``Report`` (data), then rendered as text or, with --json, as JSON.

Run ``python sharding_demo.py --help`` for the flags and environment variables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, TypeVar

import sqlalchemy.exc
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import URL, Engine, String, Uuid, column, create_engine, func, select, table, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from uuid6 import uuid7

APPLICATION_NAME = "sharding_demo"  # shows in the servers' logs and in pg_stat_activity
PARENT_TABLE = "tbl_users"
DEMO_NAMES = ["John", "Jane", "Bob", "Alice", "Charlie"]

T = TypeVar("T")  # what a unit of read work returns

# Exit codes, one per kind of expected failure (also listed in --help and the README).
EXIT_OK = 0
EXIT_CONFIG = 2  # an environment variable or flag is not valid (argparse also uses 2)
EXIT_PRIMARY_UNREACHABLE = 3  # no connection to the primary
EXIT_AUTHENTICATION = 4  # the primary refused the user name or password
EXIT_NOT_INITIALISED = 5  # the primary has no tbl_users: the cluster was not initialised


class DemoError(Exception):
    """An expected failure: printed as one line on stderr, exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ================================================================================================
# 1. Config
# ================================================================================================


class DatabaseSettings(BaseSettings):
    """How to reach one server. Each subclass gives its environment prefix and default port.

    pydantic-settings fills the fields from environment variables named prefix + field name
    (MASTER_DB_HOST, MASTER_DB_PORT, ...), then from a .env file in the current folder, then
    from the defaults here, and validates them: MASTER_DB_PORT=abc is an error, not a crash later.
    """

    host: str = "localhost"
    port: int = Field(default=5432, ge=1, le=65535)
    user: str = "postgres"
    # SecretStr prints as '**********', so the password cannot leak into a log line by accident.
    password: SecretStr = SecretStr("postgres")
    name: str = "postgres"

    # The compose service name this server plays, e.g. "master-db".
    server_name: ClassVar[str]

    def url(self) -> URL:
        # URL.create quotes every part itself, so a password with @ : / % or spaces works;
        # building "postgresql://user:password@host/db" with an f-string would not.
        return URL.create(
            "postgresql+psycopg",
            username=self.user,
            password=self.password.get_secret_value(),
            host=self.host,
            port=self.port,
            database=self.name,
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class MasterDBSettings(DatabaseSettings):
    model_config = SettingsConfigDict(env_prefix="MASTER_DB_", env_file=".env", extra="ignore")
    server_name = "master-db"


class ReplicaOneSettings(DatabaseSettings):
    model_config = SettingsConfigDict(env_prefix="REPLICA_ONE_", env_file=".env", extra="ignore")
    server_name = "replica-one"
    port: int = Field(default=5433, ge=1, le=65535)


class ReplicaTwoSettings(DatabaseSettings):
    model_config = SettingsConfigDict(env_prefix="REPLICA_TWO_", env_file=".env", extra="ignore")
    server_name = "replica-two"
    port: int = Field(default=5434, ge=1, le=65535)


ReadPolicy = Literal["random", "round-robin"]


class DemoSettings(BaseSettings):
    """How the demo behaves; each can also be given as a flag, which wins."""

    model_config = SettingsConfigDict(env_prefix="DEMO_", env_file=".env", extra="ignore")

    read_policy: ReadPolicy = "random"
    # How long to wait for each replica to replay the demo's write before reading from it.
    catchup_timeout: float = Field(default=5.0, ge=0)
    # How long to wait for a server to answer a new connection (libpq's connect_timeout).
    connect_timeout: int = Field(default=3, ge=1)


@dataclass
class Config:
    primary: DatabaseSettings
    replicas: list[DatabaseSettings]
    demo: DemoSettings


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(settings_class: type[SettingsT]) -> SettingsT:
    """Read one group of settings, or fail with one line naming the bad variable."""
    try:
        return settings_class()
    except ValidationError as error:
        raise DemoError(describe_invalid_setting(settings_class, error), EXIT_CONFIG) from None


def load_config(flags: argparse.Namespace) -> Config:
    config = Config(
        primary=load_settings(MasterDBSettings),
        replicas=[load_settings(ReplicaOneSettings), load_settings(ReplicaTwoSettings)],
        demo=load_settings(DemoSettings),
    )
    # Flags override the environment.
    if flags.policy is not None:
        config.demo.read_policy = flags.policy
    if flags.catchup_timeout is not None:
        config.demo.catchup_timeout = flags.catchup_timeout
    return config


def describe_invalid_setting(settings_class: type[BaseSettings], error: ValidationError) -> str:
    """'MASTER_DB_PORT=abc: Input should be a valid integer ...' from pydantic's error."""
    first = error.errors()[0]
    prefix = str(settings_class.model_config.get("env_prefix", ""))
    variable = prefix + "_".join(str(part) for part in first["loc"]).upper()
    value = "" if variable.endswith("PASSWORD") else f"={first.get('input')}"
    return f"invalid setting {variable}{value}: {first['msg']}"


# ================================================================================================
# 2. Engines
# ================================================================================================


@dataclass(frozen=True)
class Server:
    """One PostgreSQL server: the name it has in docker-compose.yml, where it is, its engine."""

    name: str
    address: str
    engine: Engine


def make_server(settings: DatabaseSettings, connect_timeout: int) -> Server:
    engine = create_engine(
        settings.url(),
        # The demo uses no hstore columns; without this, SQLAlchemy looks the type up on every new
        # connection, which adds noise to the servers' statement logs that you are invited to read.
        use_native_hstore=False,
        connect_args={
            "application_name": APPLICATION_NAME,
            # Fail fast when a server is down, rather than waiting for the OS's TCP timeout.
            "connect_timeout": connect_timeout,
        },
    )
    return Server(name=settings.server_name, address=settings.address, engine=engine)


# ================================================================================================
# 3. Routing
# ================================================================================================


class ReadWriteRouter:
    """Decides which server each unit of work goes to.

    Writes always go to the primary: a hot standby rejects them ("cannot execute INSERT in a
    read-only transaction"). Each read goes to one of the replicas that are still usable, chosen
    at random (as GORM's dbresolver RandomPolicy) or in turn (round-robin). A replica that fails
    is dropped for the rest of the run, and the read is retried on another one: this is the
    failover the original demo promised but did not do. With no replica left, reads fall back to
    the primary, which has the same rows.
    """

    def __init__(self, primary: Server, replicas: Sequence[Server], policy: ReadPolicy) -> None:
        self.primary = primary
        self.usable_replicas = list(replicas)
        self.policy = policy
        self.skipped: list[Skipped] = []
        self._turn = itertools.count()

    def for_write(self) -> Server:
        return self.primary

    def for_read(self) -> Server:
        if not self.usable_replicas:
            return self.primary
        if self.policy == "round-robin":
            return self.usable_replicas[next(self._turn) % len(self.usable_replicas)]
        return random.choice(self.usable_replicas)

    def drop_replica(self, replica: Server, reason: str) -> None:
        """Stop reading from `replica` for the rest of this run, and say why."""
        if replica in self.usable_replicas:
            self.usable_replicas.remove(replica)
            self.skipped.append(Skipped(replica=replica.name, address=replica.address, reason=reason))

    def read(self, work: Callable[[Session], T]) -> tuple[T, ServedBy]:
        """Run `work` in a read-only transaction on a replica; return its result and who served it."""
        while True:
            server = self.for_read()
            try:
                return run_read_transaction(server, work)
            except sqlalchemy.exc.OperationalError as error:
                if server is self.primary:
                    raise
                self.drop_replica(server, one_line(error))


@dataclass(frozen=True)
class Skipped:
    """A replica left out of this run's reads, and why."""

    replica: str
    address: str
    reason: str


@dataclass(frozen=True)
class ServedBy:
    """Which server ran a piece of work, and what that server said about itself."""

    server: str
    address: str
    in_recovery: bool  # true on a hot standby, false on the primary


def who_served(session: Session, server: Server) -> ServedBy:
    # Asked inside the same transaction as the work, so it describes the server that did it.
    in_recovery = bool(session.scalar(text("SELECT pg_is_in_recovery()")))
    return ServedBy(server=server.name, address=server.address, in_recovery=in_recovery)


def run_read_transaction(server: Server, work: Callable[[Session], T]) -> tuple[T, ServedBy]:
    # REPEATABLE READ: every statement of `work` sees one snapshot, so a partition's count and
    # its rows agree even while other clients write. Hot standbys allow it (not SERIALIZABLE).
    engine = server.engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    with Session(engine) as session:
        result = work(session)
        return result, who_served(session, server)


# ================================================================================================
# The model
# ================================================================================================


class Base(DeclarativeBase):
    pass


class User(Base):
    """A row of tbl_users. Which partition it lands in is decided by the server from `id`."""

    __tablename__ = PARENT_TABLE

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    first_name: Mapped[str] = mapped_column(String(255))


def new_user(first_name: str) -> User:
    # The id is made here, in Python, before the row goes anywhere, like the Go demo's
    # BeforeCreate hook. UUIDv7 starts with a 48-bit Unix timestamp in milliseconds, so ids sort
    # by creation time and the time can be read back out of the id (created_at below).
    return User(id=uuid7(), first_name=first_name)


def uuid7_created_at(user_id: uuid.UUID) -> datetime | None:
    """The creation time in a UUIDv7: its first 48 bits are milliseconds since 1970 (RFC 9562)."""
    if user_id.version != 7:
        return None
    milliseconds = user_id.int >> 80  # drop the 80 bits after the timestamp
    return datetime.fromtimestamp(milliseconds / 1000, tz=UTC)


# ================================================================================================
# The report: plain data, filled in as the demo runs, rendered at the end
# ================================================================================================


@dataclass
class UserRow:
    id: uuid.UUID
    first_name: str


@dataclass
class StandbyStatus:
    """One row of the primary's pg_stat_replication: a standby streaming from it."""

    application_name: str  # the standby's cluster_name here: replica-one, replica-two
    state: str  # "streaming" once it has caught up with the primary and follows it live
    replay_lag_bytes: int  # WAL the primary has written that the standby has not yet replayed


@dataclass
class CatchUp:
    """How a replica did at replaying the demo's write before the reads."""

    replica: str
    caught_up: bool
    seconds: float
    lag_bytes: int  # how far behind it still was when we stopped waiting (0 when caught up)


@dataclass
class PartitionReport:
    name: str
    bound: str  # e.g. "FOR VALUES WITH (modulus 4, remainder 0)"
    count: int
    rows: list[UserRow]
    served_by: ServedBy


@dataclass
class FirstUser:
    user: UserRow
    created_at: datetime | None
    served_by: ServedBy


@dataclass
class Report:
    server_version: str
    replication: list[StandbyStatus]
    written_by: ServedBy
    inserted: list[UserRow]
    commit_lsn: str
    catchup: list[CatchUp]
    partitions: list[PartitionReport] = field(default_factory=list)
    first_user: FirstUser | None = None
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        lines = [f"{skip.replica} ({skip.address}) skipped: {skip.reason}" for skip in self.skipped]
        if self.reads_fell_back_to_primary:
            lines.append(f"no replica left: reads went to the primary {self.written_by.server}")
        return lines

    @property
    def reads_fell_back_to_primary(self) -> bool:
        reads = [partition.served_by for partition in self.partitions]
        if self.first_user is not None:
            reads.append(self.first_user.served_by)
        return any(not served_by.in_recovery for served_by in reads)


# ================================================================================================
# 4. Write
# ================================================================================================


def check_primary(primary: Server) -> str:
    """Before writing anything: is the primary reachable, writable and initialised?

    Returns its version. Fails with one clear line otherwise, so nothing is half-written.
    """
    try:
        with primary.engine.connect() as connection:
            version = str(connection.scalar(text("SHOW server_version")))
            in_recovery = connection.scalar(text("SELECT pg_is_in_recovery()"))
            has_table = connection.scalar(
                text("SELECT to_regclass(:name) IS NOT NULL"), {"name": PARENT_TABLE}
            )
    except sqlalchemy.exc.OperationalError as error:
        message = one_line(error)
        if "authentication failed" in message or "no pg_hba.conf entry" in message:
            raise DemoError(
                f"{primary.name} ({primary.address}) refused the login: {message}", EXIT_AUTHENTICATION
            ) from None
        raise DemoError(
            f"cannot connect to {primary.name} ({primary.address}): {message}", EXIT_PRIMARY_UNREACHABLE
        ) from None
    if in_recovery:
        raise DemoError(
            f"{primary.name} ({primary.address}) is a standby, not the primary: "
            "check MASTER_DB_HOST and MASTER_DB_PORT",
            EXIT_CONFIG,
        )
    if not has_table:
        raise DemoError(
            f"{primary.name} ({primary.address}) has no table {PARENT_TABLE}: the cluster is not initialised "
            "(start it with `docker compose up -d --wait` or `python local_cluster.py`)",
            EXIT_NOT_INITIALISED,
        )
    return version


def replication_status(primary: Server) -> list[StandbyStatus]:
    """What the primary knows about its standbys, before we write: the view the original demo's
    README asks you to query by hand. A standby that is down has no row here at all."""
    with primary.engine.connect() as connection:
        rows = connection.execute(
            text(
                """
                SELECT application_name, state,
                       COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)
                FROM pg_stat_replication
                ORDER BY application_name
                """
            )
        )
        return [StandbyStatus(str(name), str(state), int(lag)) for name, state, lag in rows]


def insert_users(primary: Server, users: list[User]) -> tuple[ServedBy, str]:
    """Insert all users in one transaction on the primary; return who wrote them and the WAL
    position of the commit, which the replicas must reach before they can show these rows."""
    # expire_on_commit=False keeps the objects readable after the commit without reloading them.
    with Session(primary.engine, expire_on_commit=False) as session:
        with session.begin():
            session.add_all(users)
            session.flush()  # send the INSERT now, so the check below runs after it
            written_by = who_served(session, primary)
        # After COMMIT the commit record is in the WAL; pg_current_wal_lsn() is at or past it.
        commit_lsn = str(session.scalar(text("SELECT pg_current_wal_lsn()")))
    return written_by, commit_lsn


# ================================================================================================
# 5. Wait for the replicas (read-your-writes)
# ================================================================================================


def wait_for_catchup(replica: Server, target_lsn: str, timeout: float) -> CatchUp:
    """Poll until `replica` has replayed WAL up to `target_lsn`, for at most `timeout` seconds.

    Replication is asynchronous: COMMIT returns on the primary before any replica has the rows.
    A read sent to a replica right away may not see them. PostgreSQL's own test framework waits
    the same way (Cluster::wait_for_catchup): compare the standby's replay position with the
    primary's WAL position.
    """
    started = time.monotonic()
    lag_query = text("SELECT pg_wal_lsn_diff(CAST(:target AS pg_lsn), pg_last_wal_replay_lsn())")
    with replica.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        while True:
            lag_bytes = int(connection.scalar(lag_query, {"target": target_lsn}) or 0)
            elapsed = time.monotonic() - started
            if lag_bytes <= 0:
                return CatchUp(replica.name, caught_up=True, seconds=elapsed, lag_bytes=0)
            if elapsed >= timeout:
                return CatchUp(replica.name, caught_up=False, seconds=elapsed, lag_bytes=lag_bytes)
            time.sleep(0.01)


def wait_for_replicas(router: ReadWriteRouter, target_lsn: str, timeout: float) -> list[CatchUp]:
    """Wait for each replica; drop from the reads any that cannot be reached or is too far behind."""
    results = []
    for replica in list(router.usable_replicas):
        try:
            catchup = wait_for_catchup(replica, target_lsn, timeout)
        except sqlalchemy.exc.OperationalError as error:
            router.drop_replica(replica, f"unreachable: {one_line(error)}")
            continue
        if not catchup.caught_up:
            router.drop_replica(
                replica, f"still {catchup.lag_bytes} bytes of WAL behind after {catchup.seconds:.1f}s"
            )
        results.append(catchup)
    return results


# ================================================================================================
# 6. Read
# ================================================================================================


@dataclass(frozen=True)
class Partition:
    name: str
    bound: str


def list_partitions(session: Session) -> list[Partition]:
    """The children of tbl_users and their bounds, from the system catalog.

    pg_inherits links each partition to its parent; relpartbound holds the partition's bound,
    which pg_get_expr turns back into SQL, e.g. "FOR VALUES WITH (modulus 4, remainder 2)".
    """
    rows = session.execute(
        text(
            """
            SELECT child.relname, pg_get_expr(child.relpartbound, child.oid)
            FROM pg_inherits
            JOIN pg_class AS child ON child.oid = pg_inherits.inhrelid
            WHERE pg_inherits.inhparent = CAST(:parent AS regclass)
            ORDER BY child.relname
            """
        ),
        {"parent": PARENT_TABLE},
    )
    return [Partition(name=name, bound=bound) for name, bound in rows]


def read_partition(partition: Partition) -> Callable[[Session], tuple[int, list[UserRow]]]:
    """A read that counts and lists the rows of one partition, queried as the table it is."""

    def work(session: Session) -> tuple[int, list[UserRow]]:
        # A lightweight table() construct: the partition has tbl_users' columns, and SQLAlchemy
        # quotes its name for us. Querying it directly shows the partition is an ordinary table.
        partition_table = table(partition.name, column("id", Uuid()), column("first_name", String()))
        count = session.scalar(select(func.count()).select_from(partition_table)) or 0
        rows = session.execute(
            select(partition_table.c.id, partition_table.c.first_name).order_by(partition_table.c.id)
        )
        return count, [UserRow(id=row.id, first_name=row.first_name) for row in rows]

    return work


def read_first_user(session: Session) -> UserRow | None:
    # Through the parent table: PostgreSQL reads all four partitions and merges them.
    user = session.scalars(select(User).order_by(User.id).limit(1)).first()
    return UserRow(id=user.id, first_name=user.first_name) if user else None


def read_report(router: ReadWriteRouter, report: Report) -> None:
    partitions, _ = router.read(list_partitions)
    for partition in partitions:
        (count, rows), served_by = router.read(read_partition(partition))
        report.partitions.append(PartitionReport(partition.name, partition.bound, count, rows, served_by))
    first, served_by = router.read(read_first_user)
    if first is not None:
        report.first_user = FirstUser(user=first, created_at=uuid7_created_at(first.id), served_by=served_by)


# ================================================================================================
# 7. Report: render the data as text or JSON
# ================================================================================================


def describe(served_by: ServedBy) -> str:
    role = "standby, in recovery" if served_by.in_recovery else "primary, not in recovery"
    return f"{served_by.server} {served_by.address}, {role}"


def render_text(report: Report) -> str:
    lines = [f"PostgreSQL {report.server_version}", ""]
    lines.append("Standbys streaming from the primary (its pg_stat_replication):")
    lines += [
        f"  {standby.application_name}: {standby.state}, replay lag {standby.replay_lag_bytes} bytes"
        for standby in report.replication
    ] or ["  none"]
    lines.append("")
    lines.append(
        f"Inserted {len(report.inserted)} users in one transaction on {describe(report.written_by)}:"
    )
    lines += [f"  {user.first_name:<10} {user.id}" for user in report.inserted]
    lines += [
        "",
        f"Waiting for the replicas to replay the primary's WAL up to the commit ({report.commit_lsn}):",
    ]
    if not report.catchup:
        lines.append("  no replica to wait for")
    for catchup in report.catchup:
        if catchup.caught_up:
            lines.append(f"  {catchup.replica}: caught up in {catchup.seconds * 1000:.0f} ms")
        else:
            lines.append(
                f"  {catchup.replica}: NOT caught up after {catchup.seconds:.1f}s "
                f"({catchup.lag_bytes} bytes behind): left out of the reads"
            )
    for partition in report.partitions:
        lines += ["", f"Partition {partition.name}: {partition.count} records"]
        lines.append(f"  {partition.bound}; read from {describe(partition.served_by)}")
        lines += [f"  - {row.first_name} (ID: {row.id})" for row in partition.rows]
    if report.first_user is not None:
        first = report.first_user
        created = first.created_at.strftime("%Y-%m-%d %H:%M:%S") if first.created_at else "not a UUIDv7"
        lines += ["", f"User: {first.user.first_name} (ID: {first.user.id}, CreatedDate: {created} UTC)"]
        lines.append(f"  the first user by id; read from {describe(first.served_by)}")
    if report.skipped:
        lines += ["", "Skipped for this run's reads:"]
        lines += [f"  {skip.replica} ({skip.address}): {skip.reason}" for skip in report.skipped]
    if report.reads_fell_back_to_primary:
        lines.append(f"  no replica left, so the reads went to the primary {report.written_by.server}")
    # main() also prints the warnings on stderr, one line each.
    return "\n".join(lines)


def user_json(user: UserRow) -> dict[str, Any]:
    return {"id": str(user.id), "first_name": user.first_name}


def served_json(served_by: ServedBy, verb: str) -> dict[str, Any]:
    return {
        verb: served_by.server,
        f"{verb}_address": served_by.address,
        "in_recovery": served_by.in_recovery,
    }


def render_json(report: Report) -> str:
    first = report.first_user
    document = {
        "server_version": report.server_version,
        "replication": [
            {
                "application_name": standby.application_name,
                "state": standby.state,
                "replay_lag_bytes": standby.replay_lag_bytes,
            }
            for standby in report.replication
        ],
        **served_json(report.written_by, "written_to"),
        "inserted": [user_json(user) for user in report.inserted],
        "commit_lsn": report.commit_lsn,
        "catchup": [
            {
                "replica": catchup.replica,
                "caught_up": catchup.caught_up,
                "seconds": round(catchup.seconds, 4),
                "lag_bytes": catchup.lag_bytes,
            }
            for catchup in report.catchup
        ],
        "partitions": [
            {
                "name": partition.name,
                "bound": partition.bound,
                "count": partition.count,
                **served_json(partition.served_by, "read_from"),
                "rows": [user_json(row) for row in partition.rows],
            }
            for partition in report.partitions
        ],
        "first_user": None
        if first is None
        else {
            **user_json(first.user),
            "created_at": first.created_at.isoformat() if first.created_at else None,
            **served_json(first.served_by, "read_from"),
        },
        "skipped": [
            {"replica": skip.replica, "address": skip.address, "reason": skip.reason}
            for skip in report.skipped
        ],
        "warnings": report.warnings,
    }
    return json.dumps(document, indent=2)


# ================================================================================================
# Errors and the command line
# ================================================================================================


def one_line(error: BaseException) -> str:
    """The useful line of a driver error, without SQLAlchemy's SQL echo and background link."""
    original = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    message = lines[0] if lines else type(original).__name__
    return message.removeprefix("connection failed: ")


ENVIRONMENT_HELP = """\
environment variables (also read from a .env file in the current folder; flags win):
  MASTER_DB_HOST, MASTER_DB_PORT, MASTER_DB_USER, MASTER_DB_PASSWORD, MASTER_DB_NAME
      the primary (defaults: localhost, 5432, postgres, postgres, postgres)
  REPLICA_ONE_HOST, REPLICA_ONE_PORT, REPLICA_ONE_USER, REPLICA_ONE_PASSWORD, REPLICA_ONE_NAME
      replica-one (defaults: localhost, 5433, postgres, postgres, postgres)
  REPLICA_TWO_HOST, REPLICA_TWO_PORT, REPLICA_TWO_USER, REPLICA_TWO_PASSWORD, REPLICA_TWO_NAME
      replica-two (defaults: localhost, 5434, postgres, postgres, postgres)
  DEMO_READ_POLICY        random | round-robin (default random)
  DEMO_CATCHUP_TIMEOUT    seconds to wait for each replica to replay the write (default 5)
  DEMO_CONNECT_TIMEOUT    seconds to wait for a connection (default 3)

exit codes:
  0 success (also when a replica was skipped: the report says so)
  2 invalid setting or flag       3 cannot connect to the primary
  4 the primary refused the login 5 tbl_users missing: the cluster is not initialised
"""


def parse_flags(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sharding_demo.py",
        description="Insert five users into the hash-partitioned tbl_users on the primary, wait for the "
        "replicas to replay them, then read each partition and the first user from the replicas.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument(
        "--policy",
        choices=["random", "round-robin"],
        help="how to choose a replica for each read (default: $DEMO_READ_POLICY or random)",
    )
    parser.add_argument(
        "--catchup-timeout",
        type=float,
        metavar="SECONDS",
        help="how long to wait for each replica to replay the write (default: $DEMO_CATCHUP_TIMEOUT or 5)",
    )
    flags = parser.parse_args(argv)
    if flags.catchup_timeout is not None and flags.catchup_timeout < 0:
        parser.error("--catchup-timeout must be 0 or more")
    return flags


def run(flags: argparse.Namespace) -> Report:
    # 1. config
    config = load_config(flags)

    # 2. engines
    primary = make_server(config.primary, config.demo.connect_timeout)
    replicas = [make_server(settings, config.demo.connect_timeout) for settings in config.replicas]

    # 3. routing
    router = ReadWriteRouter(primary, replicas, config.demo.read_policy)
    try:
        server_version = check_primary(router.for_write())
        standbys = replication_status(router.for_write())

        # 4. write
        users = [new_user(name) for name in DEMO_NAMES]
        written_by, commit_lsn = insert_users(router.for_write(), users)
        report = Report(
            server_version=server_version,
            replication=standbys,
            written_by=written_by,
            inserted=[UserRow(id=user.id, first_name=user.first_name) for user in users],
            commit_lsn=commit_lsn,
            catchup=[],
        )

        # 5. wait until the replicas have the rows
        report.catchup = wait_for_replicas(router, commit_lsn, config.demo.catchup_timeout)

        # 6. read
        read_report(router, report)
        report.skipped = router.skipped
        return report
    finally:
        for server in [primary, *replicas]:
            server.engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    flags = parse_flags(argv)
    try:
        report = run(flags)
    except DemoError as error:
        print(f"sharding_demo.py: error: {error}", file=sys.stderr)
        return error.exit_code
    # 7. report
    print(render_json(report) if flags.json else render_text(report))
    for warning in report.warnings:
        print(f"sharding_demo.py: warning: {warning}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
