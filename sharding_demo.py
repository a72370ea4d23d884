"""sharding_demo.py: hash partitioning and read/write splitting with PostgreSQL, in one script.

One PostgreSQL server, the *primary* ("master-db"), takes the writes. Two *hot standbys*
("replica-one", "replica-two") receive the primary's write-ahead log (WAL) by streaming
replication, replay it, and answer read-only queries. So an application can send its writes to the
primary and spread its reads over the replicas: *read/write splitting*.

The table ``tbl_users`` is *hash partitioned* four ways: a parent table with four child tables,
``tbl_users_p0`` .. ``tbl_users_p3``. Each row goes to the partition whose remainder equals
hash(id) mod 4. The replicas replay the same WAL, so they hold the same partitions and rows.

This is not sharding: every server holds every row. Partitioning splits one server's table into
smaller tables; the replicas are full copies that add read capacity, not storage.

How to read this file: the settings, then ``run()`` (the story, in seven numbered steps) and
``main()``; then one section per step, in the order ``run()`` calls them; then an appendix that a
first read can skip (the Python port of PostgreSQL's hash, the COPY bulk path, JSON, the command
line, error messages). ``python sharding_demo.py --help`` lists the flags and variables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import random
import re
import struct
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import psycopg
import sqlalchemy.exc
from dotenv.parser import Binding, parse_stream
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import URL, Connection, Engine, String, Uuid, column, create_engine, func, select, table, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

APPLICATION_NAME = "sharding_demo"  # shows in the servers' logs and in pg_stat_activity
PARENT_TABLE = "tbl_users"
DEMO_NAMES = ["John", "Jane", "Bob", "Alice", "Charlie"]
ReadPolicy = Literal["random", "round-robin"]
MAX_CATCHUP_TIMEOUT = 3600.0


# ================================================================================================
# Settings: where the three servers are, read from the environment and .env
# ================================================================================================


def strip_spaces(value: object) -> object:
    """A validator for settings given as text: spaces around the value are not part of it."""
    return value.strip() if isinstance(value, str) else value


class DatabaseSettings(BaseSettings):
    """How to reach one server. Each subclass gives its environment prefix and default port.

    pydantic-settings fills each field from the variable named prefix + field (MASTER_DB_HOST,
    MASTER_DB_PORT, ...), else from a .env file in the current folder, else from the default here,
    and validates it: MASTER_DB_PORT=abc is an error at start, not a crash later.
    """

    host: str = Field(default="localhost", min_length=1)  # empty would silently mean a local socket
    port: int = Field(default=5432, ge=1, le=65535)
    user: str = Field(default="postgres", min_length=1)  # empty would silently mean your OS user
    password: SecretStr = SecretStr("postgres")  # prints as '**********', so it never leaks to a log
    name: str = Field(default="postgres", min_length=1)  # the database's name (MASTER_DB_NAME)

    service: ClassVar[str]  # the docker-compose.yml service this server is, e.g. "master-db"

    # "localhost " from a sloppy .env line is meant as "localhost" (passwords are kept as given).
    _strip_spaces = field_validator("host", "user", "name", mode="before")(strip_spaces)

    @field_validator("host", "user", "name", "password", mode="before")
    @classmethod
    def no_nul_byte(cls, value: object) -> object:
        # libpq's connection strings end at a NUL byte: what follows would be silently dropped.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("contains a NUL byte, which a PostgreSQL connection cannot carry")
        return value

    @property
    def env_prefix(self) -> str:
        return str(self.model_config.get("env_prefix", ""))


class MasterDBSettings(DatabaseSettings):
    model_config = SettingsConfigDict(env_prefix="MASTER_DB_", env_file=".env", extra="ignore")
    service = "master-db"


class ReplicaOneSettings(DatabaseSettings):
    model_config = SettingsConfigDict(env_prefix="REPLICA_ONE_", env_file=".env", extra="ignore")
    service = "replica-one"
    port: int = Field(default=5433, ge=1, le=65535)


class ReplicaTwoSettings(DatabaseSettings):
    model_config = SettingsConfigDict(env_prefix="REPLICA_TWO_", env_file=".env", extra="ignore")
    service = "replica-two"
    port: int = Field(default=5434, ge=1, le=65535)


class DemoSettings(BaseSettings):
    """How the demo behaves. Each one can also be given as a flag, which wins."""

    model_config = SettingsConfigDict(env_prefix="DEMO_", env_file=".env", extra="ignore")

    read_policy: ReadPolicy = "random"  # how to pick a replica for each read
    # Seconds to wait for the replicas to replay; a finite number, at most an hour.
    catchup_timeout: float = Field(default=5.0, ge=0, le=MAX_CATCHUP_TIMEOUT, allow_inf_nan=False)
    connect_timeout: int = Field(default=3, ge=1, le=600)  # seconds to wait for a connection (libpq's)

    _strip_spaces = field_validator("read_policy", mode="before")(strip_spaces)


# ================================================================================================
# The story: run() does the seven steps and returns what they made; main() shows it
# ================================================================================================


def run(flags: argparse.Namespace) -> Report:
    # 1. config: the three servers and the demo's own settings
    config = load_config(flags)

    # 2. engines: one SQLAlchemy Engine per server; check that each server is what it should be
    primary = make_server(config.primary, config.demo.connect_timeout)
    replicas = [make_server(settings, config.demo.connect_timeout) for settings in config.replicas]
    try:
        facts = check_primary(primary)
        bounds = read_partition_bounds(primary)

        # 3. routing: writes to the primary, reads to the replicas that are standbys of it
        router = ReadWriteRouter(primary, replicas, config.demo.read_policy)
        for replica, reason in check_replicas(replicas, facts.system_identifier):
            router.leave_out(replica, reason, when="checked before the write")

        # 4. write: make the ids in Python, predict each one's partition, insert, commit
        users = NewUsers.make(flags.users, progress_printer(flags.users, "made the ids of"))
        predicted = predict_partitions(
            users, bounds, progress_printer(users.count, "predicted the partitions of")
        )
        written = insert_users(router.for_write(), users, progress_printer(users.count, "loaded"))

        # From here on, this run's users are in the table: a failure must say so (appendix E).
        try:
            standbys = replication_status(primary)

            # 5. wait until the replicas have replayed the commit; read from the ones that did
            catchup = wait_for_replicas(
                router.replicas_in_use, written.commit_lsn, config.demo.catchup_timeout
            )
            for result in catchup:
                if not result.caught_up:
                    router.leave_out(result.replica, result.reason, when="waited for")

            # 6. read back from the replicas
            landing, checked_by = router.read(where_users_landed(users, shown=flags.show))
            partitions = [read_partition(router, bound, flags.show) for bound in bounds]
            first_user = read_first_user(router)
        except (KeyboardInterrupt, *DATABASE_ERRORS) as error:
            raise failure_after_commit(written, error) from None

        # 7. report: everything above, in one value
        return Report(
            server_version=facts.version,
            written=written,
            standbys_after_commit=standbys,
            catchup=catchup,
            new_users=new_user_reports(users, bounds, landing, flags.show),
            landing=landing_counts(bounds, predicted, landing),
            landing_checked_by=checked_by,
            partitions=partitions,
            first_user=first_user,
            skipped=list(router.skipped),
        )
    finally:
        for server in [primary, *replicas]:
            server.engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    flags = parse_flags(argv)
    quiet_library_loggers()
    for warning in settings_warnings():
        print(f"sharding_demo.py: warning: {warning}", file=sys.stderr)
    try:
        report = run(flags)
    except DemoError as error:
        print(f"sharding_demo.py: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        # run() turns an interruption during or after the insert into a DemoError that says so.
        print("sharding_demo.py: error: interrupted before the insert: nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DATABASE_ERRORS as error:
        # The primary failed between its checks and the insert (say, it was stopped).
        print(f"sharding_demo.py: error: {failure_before_insert(error)}", file=sys.stderr)
        return EXIT_PRIMARY_UNREACHABLE
    return print_report(report, as_json=flags.json)


def print_report(report: Report, as_json: bool) -> int:
    try:
        if as_json:
            print(render_json(report), flush=True)
            # The text report says which replicas were left out; JSON is for programs, so say it here too.
            for warning in report.warnings:
                print(f"sharding_demo.py: warning: {warning}", file=sys.stderr)
        else:
            print(render_text(report), flush=True)
    except BrokenPipeError:
        # The reader stopped reading (`python sharding_demo.py | head`). Point stdout at /dev/null so
        # that Python's own flush at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_STDOUT_CLOSED
    return EXIT_OK


# ================================================================================================
# Step 1. Config
# ================================================================================================


@dataclass(frozen=True)
class Config:
    primary: DatabaseSettings
    replicas: list[DatabaseSettings]
    demo: DemoSettings


def load_config(flags: argparse.Namespace) -> Config:
    demo = load_settings(DemoSettings)
    # Flags win over the environment.
    if flags.read_policy is not None:
        demo.read_policy = flags.read_policy
    if flags.catchup_timeout is not None:
        demo.catchup_timeout = flags.catchup_timeout
    return Config(
        primary=load_settings(MasterDBSettings),
        replicas=[load_settings(ReplicaOneSettings), load_settings(ReplicaTwoSettings)],
        demo=demo,
    )


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(settings_class: type[SettingsT]) -> SettingsT:
    """Read one group of settings, or fail with one line naming the bad variable."""
    try:
        return settings_class()
    except ValidationError as error:
        raise DemoError(describe_invalid_setting(settings_class, error), EXIT_CONFIG) from None
    except UnicodeDecodeError as error:
        raise DemoError(
            f".env is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}): "
            "save it as UTF-8",
            EXIT_CONFIG,
        ) from None


# ================================================================================================
# Step 2. Engines
# ================================================================================================


@dataclass(frozen=True)
class Server:
    """One PostgreSQL server: the compose service it is, where it is, and its engine."""

    service: str
    address: str
    engine: Engine
    env_prefix: str  # of the variables that configure it, e.g. "REPLICA_ONE_"


def make_server(settings: DatabaseSettings, connect_timeout: int) -> Server:
    # URL.create quotes every part itself, so a password with @ : / % or spaces works; building
    # "postgresql://user:password@host/db" with an f-string would not.
    url = URL.create(
        "postgresql+psycopg",
        username=settings.user,
        password=settings.password.get_secret_value(),
        host=settings.host,
        port=settings.port,
        database=settings.name,
    )
    engine = create_engine(
        url,
        # The demo uses no hstore columns; without this, SQLAlchemy looks the type up on every new
        # connection, which adds noise to the statement logs that you are invited to read.
        use_native_hstore=False,
        connect_args={
            "application_name": APPLICATION_NAME,
            # Fail fast when a server is down, rather than waiting for the OS's TCP timeout.
            "connect_timeout": connect_timeout,
        },
    )
    address = f"{settings.host}:{settings.port}"
    return Server(service=settings.service, address=address, engine=engine, env_prefix=settings.env_prefix)


@dataclass(frozen=True)
class PrimaryFacts:
    version: str
    system_identifier: int  # made by initdb; every standby cloned from this primary has the same


def check_primary(primary: Server) -> PrimaryFacts:
    """Before writing anything: is the primary reachable, and really a primary?

    Fails with one clear line otherwise, so that nothing is written.
    """
    try:
        with primary.engine.connect() as connection:
            version = str(connection.scalar(text("SHOW server_version")))
            in_recovery, system_identifier = recovery_and_identity(connection)
    except sqlalchemy.exc.OperationalError as error:
        raise primary_connection_error(primary, error) from None
    if in_recovery:
        raise DemoError(
            f"{primary.service} ({primary.address}) is a standby, not the primary: "
            f"check {primary.env_prefix}HOST and {primary.env_prefix}PORT",
            EXIT_CONFIG,
        )
    return PrimaryFacts(version, system_identifier)


def recovery_and_identity(connection: Connection) -> tuple[bool, int]:
    """Is this server a standby (in recovery), and which cluster is it? The system identifier is
    made by initdb, and every standby cloned from a primary shares the primary's."""
    in_recovery, system_identifier = connection.execute(
        text("SELECT pg_is_in_recovery(), system_identifier FROM pg_control_system()")
    ).one()
    return bool(in_recovery), int(system_identifier)


def read_partition_bounds(primary: Server) -> list[HashBound]:
    """The partitions of tbl_users and their bounds, from the primary's system catalog.

    pg_partitioned_table says how the table is partitioned; pg_inherits links each partition to its
    parent, and pg_get_expr turns a partition's bound back into SQL, e.g. "FOR VALUES WITH (modulus
    4, remainder 2)". The demo predicts where rows land only for the layout it knows: hash on id
    alone, into plain tables that cover every remainder. It refuses any other, rather than guess.
    """
    with primary.engine.connect() as connection:
        if not connection.scalar(text("SELECT to_regclass(:name) IS NOT NULL"), {"name": PARENT_TABLE}):
            raise not_initialised(primary, f"has no table {PARENT_TABLE}")
        key = connection.scalar(
            text(
                "SELECT pg_get_partkeydef(partrelid) FROM pg_partitioned_table "
                "WHERE partrelid = CAST(:parent AS regclass)"
            ),
            {"parent": PARENT_TABLE},
        )
        rows = connection.execute(
            text(
                """
                SELECT child.oid, child.relname, child.relkind, pg_get_expr(child.relpartbound, child.oid)
                FROM pg_inherits
                JOIN pg_class AS child ON child.oid = pg_inherits.inhrelid
                WHERE pg_inherits.inhparent = CAST(:parent AS regclass)
                ORDER BY child.relname
                """
            ),
            {"parent": PARENT_TABLE},
        ).all()
    if key is None:
        raise unpredictable_layout(primary, f"has a table {PARENT_TABLE} that is not partitioned")
    if key != "HASH (id)":
        raise unpredictable_layout(primary, f"has {PARENT_TABLE} partitioned by {key}")
    if not rows:
        raise unpredictable_layout(primary, f"has a table {PARENT_TABLE} without partitions")
    for _, name, kind, _ in rows:
        if kind != "r":  # 'p' would be a partition that is partitioned again
            raise unpredictable_layout(
                primary, f"has {name}, a partition that is not a plain table (relkind {kind})"
            )
    bounds = [HashBound.parse(int(oid), str(name), str(bound)) for oid, name, _, bound in rows]
    uncovered = uncovered_remainders(bounds)
    if uncovered:
        raise unpredictable_layout(
            primary,
            f"has partitions of {PARENT_TABLE} that leave remainders {uncovered} of modulus "
            f"{max(bound.modulus for bound in bounds)} without a partition: rows there would be refused",
        )
    return bounds


def uncovered_remainders(bounds: Sequence[HashBound]) -> list[int]:
    """Remainders of the greatest modulus that no partition accepts (see predict_partition)."""
    greatest_modulus = max(bound.modulus for bound in bounds)
    return [
        remainder
        for remainder in range(greatest_modulus)
        if not any(remainder % bound.modulus == bound.remainder for bound in bounds)
    ]


# ================================================================================================
# Step 3. Routing
# ================================================================================================


@dataclass(frozen=True)
class ServedBy:
    """Which server ran a piece of work, and what that server said about itself."""

    service: str
    address: str
    in_recovery: bool  # true on a hot standby, false on the primary


@dataclass(frozen=True)
class Skipped:
    """A replica left out of this run's reads, when, and why."""

    replica: str
    address: str
    reason: str
    when: str  # "checked before the write", "waited for" or "during the reads"


T = TypeVar("T")  # what a unit of read work returns


class ReadWriteRouter:
    """Decides which server each unit of work goes to.

    Writes always go to the primary: a hot standby refuses them ("cannot execute INSERT in a
    read-only transaction"). Each read goes to one of the replicas still in use, chosen at random
    (as GORM's dbresolver RandomPolicy) or in turn (round-robin). A replica that fails is left out
    for the rest of the run and the read is retried on another one: the failover the original demo
    promised but did not do. With no replica left, reads fall back to the primary, which has the
    same rows.
    """

    def __init__(self, primary: Server, replicas: Sequence[Server], policy: ReadPolicy) -> None:
        self.primary = primary
        self.replicas_in_use = list(replicas)
        self.policy = policy
        self.skipped: list[Skipped] = []
        self._turn = itertools.count()

    def for_write(self) -> Server:
        return self.primary

    def for_read(self) -> Server:
        if not self.replicas_in_use:
            return self.primary
        if self.policy == "round-robin":
            return self.replicas_in_use[next(self._turn) % len(self.replicas_in_use)]
        return random.choice(self.replicas_in_use)

    def leave_out(self, replica: Server, reason: str, when: str) -> None:
        """Stop reading from `replica` for the rest of this run, and remember why."""
        if replica in self.replicas_in_use:
            self.replicas_in_use.remove(replica)
            self.skipped.append(Skipped(replica.service, replica.address, reason, when))

    def read(self, work: Callable[[Session], T]) -> tuple[T, ServedBy]:
        """Run `work` in a read-only transaction on a replica; return its result and who served it."""
        while True:
            server = self.for_read()
            try:
                return run_read_transaction(server, work)
            except sqlalchemy.exc.OperationalError as error:
                if server is self.primary:
                    raise
                self.leave_out(server, f"failed during a read: {one_line(error)}", when="during the reads")


def run_read_transaction(server: Server, work: Callable[[Session], T]) -> tuple[T, ServedBy]:
    # REPEATABLE READ: every statement of `work` sees one snapshot, so a partition's count and its
    # rows agree even while other clients write. Hot standbys allow it (not SERIALIZABLE).
    engine = server.engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    with Session(engine) as session:
        result = work(session)
        return result, who_served(session, server)


def who_served(session: Session, server: Server) -> ServedBy:
    # Asked inside the same transaction as the work, so it describes the server that did it.
    in_recovery = bool(session.scalar(text("SELECT pg_is_in_recovery()")))
    return ServedBy(service=server.service, address=server.address, in_recovery=in_recovery)


def check_replicas(replicas: Sequence[Server], primary_system_identifier: int) -> list[tuple[Server, str]]:
    """Which replicas must not be read from, and why: a replica must be a standby (in recovery) of
    THIS primary. A standby of another cluster would answer, with another cluster's rows, and its
    replay position would mean nothing next to this primary's. Every standby cloned from this
    primary shares its system identifier, which initdb made. A replica that fails the check is left
    out of the reads, and the report names the variables to fix; the run goes on with the others.
    """
    problems = []
    for replica in replicas:
        fix = f"check {replica.env_prefix}HOST and {replica.env_prefix}PORT"
        try:
            with replica.engine.connect() as connection:
                in_recovery, system_identifier = recovery_and_identity(connection)
        except sqlalchemy.exc.OperationalError as error:
            problems.append((replica, replica_connection_problem(replica, error)))
            continue
        if not in_recovery:
            problems.append((replica, f"is not a standby (pg_is_in_recovery() is false): {fix}"))
        elif system_identifier != primary_system_identifier:
            problems.append(
                (
                    replica,
                    f"is a standby of another cluster (system identifier {system_identifier}, the "
                    f"primary's is {primary_system_identifier}): {fix}",
                )
            )
    return problems


# ================================================================================================
# Step 4. Write: the model, UUIDv7 ids, the prediction, the insert
# ================================================================================================


class Base(DeclarativeBase):
    pass


class User(Base):
    """A row of tbl_users. The application never names a partition: the server routes each row."""

    __tablename__ = PARENT_TABLE

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    first_name: Mapped[str] = mapped_column(String(255))


class UUIDv7Generator:
    """UUIDv7 ids (RFC 9562) that carry the real time they were made, in strictly increasing order.

    A UUIDv7's 128 bits are: the Unix time in milliseconds (48 bits), the version, 7 (4 bits), 12
    bits, the variant, binary 10 (2 bits), and 62 bits. The RFC leaves the last 74 bits (all but
    version and variant) to the implementation, and section 6.2 says how to keep ids made in the same
    millisecond in order. This uses its method 1, as Python 3.14's uuid.uuid7() does: the first 42
    of those bits are a counter that starts at a random value each new millisecond and counts up for
    each further id in that millisecond; the last 32 bits are random.

    Why not uuid6.uuid7(), which this demo first used: it keeps ids in order by moving the
    timestamp 1 ms forward for each id made in the same millisecond. Five ids then carry times 1 ms
    apart although they were made together, and a million ids made in 3 s came out up to 16 minutes
    in the future (its issue #198). Here the timestamp only moves forward if the counter overflows,
    after 2^41 ids in one millisecond, which Python cannot make.
    """

    def __init__(self) -> None:
        self.last_millisecond = -1
        self.counter = 0

    def new_int(self) -> int:
        now = time.time_ns() // 1_000_000
        if now > self.last_millisecond:
            self.last_millisecond = now
            self.counter = random_bits(41)  # a 42-bit counter whose top bit starts at 0: room to count
        else:
            # The same millisecond (or the clock stepped back): keep the timestamp, count up.
            self.counter += 1
            if self.counter >= 1 << 42:
                self.last_millisecond += 1
                self.counter = random_bits(41)
        return (
            self.last_millisecond << 80
            | 0x7 << 76  # version 7
            | (self.counter >> 30) << 64  # the counter's top 12 bits
            | 0b10 << 62  # the variant defined by RFC 9562
            | (self.counter & 0x3FFF_FFFF) << 32  # the counter's low 30 bits
            | random_bits(32)
        )

    def new_bytes(self) -> bytes:
        return self.new_int().to_bytes(16, "big")


def random_bits(count: int) -> int:
    """`count` (up to 64) random bits: the top ones of 64 from os.urandom, the operating system's
    cryptographically secure source, which RFC 9562 recommends for the random parts."""
    return int.from_bytes(os.urandom(8)) >> (64 - count)


# One generator for the whole process, so that every id it makes sorts after the one before.
UUID7 = UUIDv7Generator()


def new_user_id() -> uuid.UUID:
    # The id is made here, in Python, before the row goes anywhere, like the Go demo's BeforeCreate
    # hook. Its first 48 bits are the time it was made, so ids sort by creation time and the time
    # can be read back out of the id (uuid7_created_at below).
    return uuid.UUID(bytes=UUID7.new_bytes())


def uuid7_created_at(user_id: uuid.UUID) -> datetime | None:
    """The creation time in a UUIDv7: its first 48 bits are milliseconds since 1970 (RFC 9562)."""
    if user_id.version != 7:
        return None
    milliseconds = user_id.int >> 80  # drop the 80 bits after the timestamp
    return datetime.fromtimestamp(milliseconds / 1000, tz=UTC)


def user_name(number: int) -> str:
    """The five names of the original demo, then generated ones for --users N."""
    if number < len(DEMO_NAMES):
        return DEMO_NAMES[number]
    return f"{DEMO_NAMES[number % len(DEMO_NAMES)]}-{number}"


@dataclass(frozen=True)
class NewUsers:
    """The users this run inserts: user number n is named user_name(n) and has id number n.

    The ids are all made before the insert and kept as 16 raw bytes each in one buffer: a million
    uuid.UUID objects would take about 110 MB and keep Python's garbage collector busy walking them;
    the buffer takes 16 MB and is one object.
    """

    count: int
    id_buffer: bytes

    @classmethod
    def make(cls, count: int, progress: Callable[[int], None]) -> NewUsers:
        buffer = bytearray()
        for number in range(1, count + 1):
            buffer += UUID7.new_bytes()
            progress(number)
        return cls(count, bytes(buffer))

    def id_bytes(self, number: int) -> bytes:
        return self.id_buffer[number * 16 : (number + 1) * 16]

    def user_id(self, number: int) -> uuid.UUID:
        return uuid.UUID(bytes=self.id_bytes(number))

    def rows(self) -> Iterator[tuple[uuid.UUID, str]]:
        for number in range(self.count):
            yield self.user_id(number), user_name(number)


def predict_partitions(
    users: NewUsers, bounds: Sequence[HashBound], progress: Callable[[int], None]
) -> Counter[str]:
    """How many of `users` each partition will get, computed in Python before anything is sent.

    predict_partition (in the appendix) does what the server does with each row: hash the id,
    take the remainder, pick the partition whose bound has that remainder. For many ids this uses
    the same hash written out for 16-byte keys (uuid_row_hashes, appendix A), which gives the same
    answers about four times faster.
    """
    greatest_modulus = max(bound.modulus for bound in bounds)
    partition_of_remainder = [
        predict_partition_of_remainder(remainder, bounds) for remainder in range(greatest_modulus)
    ]
    per_remainder = [0] * greatest_modulus
    for number, row_hash in enumerate(uuid_row_hashes(users.id_buffer), start=1):
        per_remainder[row_hash % greatest_modulus] += 1
        progress(number)
    counts: Counter[str] = Counter()
    for remainder, count in enumerate(per_remainder):
        counts[partition_of_remainder[remainder]] += count
    return counts


@dataclass(frozen=True)
class Written:
    """What the insert did: how many users, how, on which server, and where its commit is in the WAL."""

    users: int
    method: str  # "ORM" or "COPY"
    written_by: ServedBy
    commit_lsn: str  # the replicas must replay up to here to see these users


# Up to this many users, insert through the ORM; above it, with COPY (in the appendix).
#
# The ORM path is the one to read: User objects, session.add_all(), one transaction, SQLAlchemy
# writing the INSERTs. It is also slow for many rows: it builds a Python object per row, tracks
# it in the session, and sends one INSERT per row. COPY is PostgreSQL's bulk-load protocol: one
# statement, then rows streamed in a compact binary format. bench/bench_insert.py measures both.
ORM_INSERT_LIMIT = 1000


def insert_users(primary: Server, users: NewUsers, progress: Callable[[int], None]) -> Written:
    """Insert all users in one transaction on the primary, and commit it.

    Up to the COMMIT, a failure rolls the transaction back: nothing is written. After it, the users
    are in the table. A failure *during* it leaves the outcome unknown. Each failure says which.
    """
    method = "ORM" if users.count <= ORM_INSERT_LIMIT else "COPY"
    with Session(primary.engine) as session:
        try:
            session.begin()
            if method == "ORM":
                session.add_all(User(id=user_id, first_name=name) for user_id, name in users.rows())
                session.flush()  # send the INSERTs now, inside the transaction
            else:
                insert_with_copy(session, users, progress)
            written_by = who_served(session, primary)
        except (KeyboardInterrupt, *DATABASE_ERRORS) as error:
            # Close the connection without a ROLLBACK on it (it may be dead): the server rolls back
            # an open transaction whose connection goes away.
            session.invalidate()
            raise failure_before_commit(primary, error) from None
        try:
            session.commit()
        except (KeyboardInterrupt, *DATABASE_ERRORS) as error:
            session.invalidate()
            raise failure_during_commit(primary, users.count, error) from None
        try:
            # After COMMIT the commit record is in the WAL; pg_current_wal_lsn() is at or past it.
            commit_lsn = str(session.scalar(text("SELECT pg_current_wal_lsn()")))
        except (KeyboardInterrupt, *DATABASE_ERRORS) as error:
            session.invalidate()
            raise failure_after_commit(Written(users.count, method, written_by, "unknown"), error) from None
    return Written(users.count, method, written_by, commit_lsn)


@dataclass(frozen=True)
class StandbyStatus:
    """One row of the primary's pg_stat_replication: a standby streaming from it."""

    application_name: str  # the standby's cluster_name here: replica-one, replica-two
    state: str  # "streaming" once it follows the primary live
    replay_lag_bytes: int  # WAL the primary has written that the standby has not replayed yet


def replication_status(primary: Server) -> list[StandbyStatus]:
    """The primary's view of its standbys, asked right after the commit: how much of the WAL each
    one has still to replay. A standby that is down has no row here at all."""
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


# ================================================================================================
# Step 5. Wait for the replicas (read-your-writes)
# ================================================================================================


@dataclass(frozen=True)
class CatchUp:
    """How one replica did at replaying the demo's commit before the reads."""

    replica: Server
    caught_up: bool
    seconds: float
    lag_bytes: int | None  # how far behind it still was when we stopped waiting; None if unknown
    reason: str = ""  # why it is left out of the reads, when it did not catch up


def wait_for_replicas(replicas: Sequence[Server], commit_lsn: str, timeout: float) -> list[CatchUp]:
    """Wait until every replica has replayed WAL up to `commit_lsn`, with one deadline for them all.

    Replication is asynchronous: COMMIT returns on the primary before any replica has the rows, so
    a read sent to a replica at once may not see them. The replicas are asked in turn, every 10 ms,
    how far they have replayed (pg_last_wal_replay_lsn), so they are waited on together: the whole
    wait lasts at most `timeout`, however many replicas there are, and each one's own time is kept.

    The demo asks each replica itself because the replica is where the reads will go: its own replay
    position decides what they see there. (PostgreSQL's test framework, Cluster::wait_for_catchup,
    looks from the other side, at the primary's pg_stat_replication.) A replica that cannot be
    reached counts as not caught up.
    """
    started = time.monotonic()
    results: dict[str, CatchUp] = {}
    connections: dict[str, Connection] = {}
    last_lag: dict[str, int] = {}
    try:
        for replica in replicas:
            try:
                connection = replica.engine.connect()
                connections[replica.service] = connection.execution_options(isolation_level="AUTOCOMMIT")
            except sqlalchemy.exc.OperationalError as error:
                results[replica.service] = unreachable(replica, error)
        while True:
            for replica in replicas:
                if replica.service in results:
                    continue
                try:
                    lag_bytes = replay_lag_bytes(connections[replica.service], commit_lsn)
                except sqlalchemy.exc.OperationalError as error:
                    results[replica.service] = unreachable(replica, error)
                    continue
                if lag_bytes <= 0:
                    results[replica.service] = CatchUp(replica, True, time.monotonic() - started, 0)
                last_lag[replica.service] = lag_bytes
            waiting = [replica for replica in replicas if replica.service not in results]
            elapsed = time.monotonic() - started
            if not waiting:
                break
            if elapsed >= timeout:
                for replica in waiting:
                    lag_bytes = last_lag[replica.service]
                    reason = f"still {lag_bytes:,} bytes of WAL behind after {elapsed:.1f}s"
                    results[replica.service] = CatchUp(replica, False, elapsed, lag_bytes, reason)
                break
            time.sleep(0.01)
    finally:
        for connection in connections.values():
            connection.close()
    return [results[replica.service] for replica in replicas]


def replay_lag_bytes(connection: Connection, target_lsn: str) -> int:
    """How many bytes of WAL this standby has still to replay to reach `target_lsn` (0 or less: none)."""
    lag_query = text("SELECT pg_wal_lsn_diff(CAST(:target AS pg_lsn), pg_last_wal_replay_lsn())")
    return int(connection.scalar(lag_query, {"target": target_lsn}) or 0)


def unreachable(replica: Server, error: sqlalchemy.exc.OperationalError) -> CatchUp:
    return CatchUp(replica, False, 0.0, None, reason=replica_connection_problem(replica, error))


# ================================================================================================
# Step 6. Read back from the replicas
# ================================================================================================


@dataclass(frozen=True)
class Landing:
    """Where the server put this run's users, as the server itself says (tableoid)."""

    counts: Counter[int]  # this run's users per partition, by the partition's oid
    partition_of: dict[uuid.UUID, int]  # the partition (oid) of each user that the report lists


def where_users_landed(users: NewUsers, shown: int) -> Callable[[Session], Landing]:
    """A read that asks the server which partition holds each of this run's users.

    tableoid is a system column: the OID of the table a row is physically stored in, so it names
    the partition. This run's ids all lie between its first and its last (one generator made them,
    in increasing order), so one short query lists every row in that range with its tableoid, in
    id order, and the demo walks that list beside its own ids (see count_landings). It sends no
    ids to the server, and the replica's statement log gets one line, however many users there are.
    """
    first, last = users.user_id(0), users.user_id(users.count - 1)
    # COPY takes no query parameters; these are uuid.UUID values, which print as plain hex.
    rows_in_range = (
        f"COPY (SELECT id, tableoid FROM {PARENT_TABLE} WHERE id BETWEEN '{first}' AND '{last}' "
        "ORDER BY id) TO STDOUT (FORMAT BINARY)"
    )
    # As in insert_with_copy: read each id as its 16 raw bytes ("bytea"), not as a uuid.UUID.

    def work(session: Session) -> Landing:
        with psycopg_connection(session).cursor() as cursor, cursor.copy(rows_in_range) as copy:
            copy.set_types(["bytea", "oid"])
            return count_landings(users, shown, copy.rows())

    return work


def count_landings(users: NewUsers, shown: int, server_rows: Iterator[tuple[Any, ...]]) -> Landing:
    """Walk the server's (id, tableoid) rows and this run's ids side by side, both in id order.

    A server row whose id is not one of ours (another run's, made meanwhile) is passed over; one of
    ours that the server does not have is simply not counted, so it shows as a MISMATCH.
    """
    counts: Counter[int] = Counter()
    partition_of: dict[uuid.UUID, int] = {}
    ours = 0  # the number of the next of this run's ids to look for
    wanted = users.id_bytes(0)  # that id (b"" once all have been found or passed)
    for server_id, partition_oid in server_rows:
        while wanted and wanted < server_id:  # one of ours that the server does not have
            ours += 1
            wanted = users.id_bytes(ours)
        if wanted == server_id:
            counts[partition_oid] += 1
            if ours < shown:
                partition_of[uuid.UUID(bytes=wanted)] = partition_oid
            ours += 1
            wanted = users.id_bytes(ours)
    return Landing(counts, partition_of)


@dataclass(frozen=True)
class UserRow:
    id: uuid.UUID
    first_name: str


@dataclass(frozen=True)
class PartitionReport:
    bound: HashBound
    count: int  # rows in the partition now, from every run so far
    rows: list[UserRow]  # its first --show rows by id
    served_by: ServedBy


def read_partition(router: ReadWriteRouter, bound: HashBound, show: int) -> PartitionReport:
    """Count one partition's rows and list its first `show`, querying it as the ordinary table it is."""

    def work(session: Session) -> tuple[int, list[UserRow]]:
        # A lightweight table() construct: the partition has tbl_users' columns, and SQLAlchemy
        # quotes its name for us.
        partition = table(bound.partition, column("id", Uuid()), column("first_name", String()))
        count = session.scalar(select(func.count()).select_from(partition)) or 0
        rows = session.execute(
            select(partition.c.id, partition.c.first_name).order_by(partition.c.id).limit(show)
        )
        return count, [UserRow(row.id, row.first_name) for row in rows]

    (count, rows), served_by = router.read(work)
    return PartitionReport(bound, count, rows, served_by)


@dataclass(frozen=True)
class FirstUser:
    user: UserRow
    created_at: datetime | None
    served_by: ServedBy


def read_first_user(router: ReadWriteRouter) -> FirstUser | None:
    """The user with the smallest id in the whole table. Ids are UUIDv7, so that is the oldest user
    of every run so far, not only of this one."""

    def work(session: Session) -> UserRow | None:
        # Through the parent table: PostgreSQL reads all the partitions and merges them.
        user = session.scalars(select(User).order_by(User.id).limit(1)).first()
        return UserRow(user.id, user.first_name) if user else None

    first, served_by = router.read(work)
    if first is None:
        return None
    return FirstUser(first, uuid7_created_at(first.id), served_by)


# ================================================================================================
# Step 7. Report: one value built from the steps' results, then shown as text or JSON
# ================================================================================================


@dataclass(frozen=True)
class NewUserReport:
    """A user this run inserted: where we predicted it would go, and where the server put it."""

    id: uuid.UUID
    first_name: str
    predicted_partition: str
    actual_partition: str | None  # None if the read-back did not find it


@dataclass(frozen=True)
class LandingCount:
    """This run's users in one partition: as predicted in Python, and as the server counts them."""

    partition: str
    predicted: int
    actual: int


@dataclass(frozen=True)
class Report:
    server_version: str
    written: Written
    standbys_after_commit: list[StandbyStatus]
    catchup: list[CatchUp]
    new_users: list[NewUserReport]  # the first --show of this run's users
    landing: list[LandingCount]
    landing_checked_by: ServedBy
    partitions: list[PartitionReport]
    first_user: FirstUser | None
    skipped: list[Skipped]

    @property
    def modulus(self) -> int:
        return max(partition.bound.modulus for partition in self.partitions)

    @property
    def table_total(self) -> int:
        return sum(partition.count for partition in self.partitions)

    @property
    def reads_fell_back_to_primary(self) -> bool:
        reads = [self.landing_checked_by, *(partition.served_by for partition in self.partitions)]
        if self.first_user is not None:
            reads.append(self.first_user.served_by)
        return any(not served_by.in_recovery for served_by in reads)

    @property
    def warnings(self) -> list[str]:
        lines = [f"{skip.replica} ({skip.address}) skipped: {skip.reason}" for skip in self.skipped]
        if self.reads_fell_back_to_primary:
            lines.append(f"no replica left: reads went to the primary {self.written.written_by.service}")
        return lines


def new_user_reports(
    users: NewUsers, bounds: Sequence[HashBound], landing: Landing, show: int
) -> list[NewUserReport]:
    """The first `show` new users, each with its predicted and its actual partition."""
    names = {bound.oid: bound.partition for bound in bounds}
    reports = []
    for number in range(min(show, users.count)):
        user_id = users.user_id(number)
        actual_oid = landing.partition_of.get(user_id)
        reports.append(
            NewUserReport(
                id=user_id,
                first_name=user_name(number),
                predicted_partition=predict_partition(users.id_bytes(number), bounds),
                actual_partition=None if actual_oid is None else names.get(actual_oid, f"oid {actual_oid}"),
            )
        )
    return reports


def landing_counts(
    bounds: Sequence[HashBound], predicted: Counter[str], landing: Landing
) -> list[LandingCount]:
    return [
        LandingCount(bound.partition, predicted[bound.partition], landing.counts[bound.oid])
        for bound in bounds
    ]


def describe(served_by: ServedBy) -> str:
    role = "standby, in recovery" if served_by.in_recovery else "primary, not in recovery"
    return f"{served_by.service} {served_by.address}, {role}"


def records(count: int) -> str:
    return f"{count:,} record" if count == 1 else f"{count:,} records"


# Below this many new users, a partition's share of them says nothing about the hash's spread:
# 5 users over 4 partitions cannot split evenly, whatever the hash.
SPREAD_MIN_USERS = 1000


def render_text(report: Report) -> str:
    written = report.written
    lines = [
        f"PostgreSQL {report.server_version}",
        f"{PARENT_TABLE} is hash partitioned: each row goes to the partition whose remainder equals "
        f"hash(id) mod {report.modulus}.",
        "",
        f"Inserted {written.users:,} users ({written.method}) in one transaction on "
        f"{describe(written.written_by)}.",
        f"Committed at WAL position {written.commit_lsn}. Right after the commit, the primary's "
        "pg_stat_replication:",
    ]
    lines += [
        f"  {standby.application_name}: {standby.state}, {standby.replay_lag_bytes:,} bytes of WAL "
        "still to replay"
        for standby in report.standbys_after_commit
    ] or ["  no standby is streaming"]

    lines += ["", "Waiting for the replicas to replay up to the commit, so that reads see the new users:"]
    for skip in report.skipped:
        if skip.when == "checked before the write":
            lines.append(f"  {skip.replica} ({skip.address}): {skip.reason}: left out of the reads")
    for catchup in report.catchup:
        if catchup.caught_up:
            lines.append(f"  {catchup.replica.service}: caught up in {catchup.seconds * 1000:,.0f} ms")
        else:
            lines.append(f"  {catchup.replica.service}: {catchup.reason}: left out of the reads")

    lines += [
        "",
        "Each new user: the partition predicted in Python before the insert -> where the server put it",
        f"(tableoid, read from {describe(report.landing_checked_by)}):",
    ]
    for user in report.new_users:
        verdict = "ok" if user.actual_partition == user.predicted_partition else "MISMATCH"
        where = f"{user.predicted_partition} -> {user.actual_partition}"
        lines.append(f"  {user.first_name:<12} {user.id}  {where}  {verdict}")
    if written.users > len(report.new_users):
        lines.append(f"  ... and {written.users - len(report.new_users):,} more")
    lines += render_landing_table(report)

    lines += [
        "",
        f"The table now holds {report.table_total:,} users: every run's, "
        f"this run's {written.users:,} included.",
        f"(To start afresh: TRUNCATE {PARENT_TABLE} on the primary.)",
    ]
    for partition in report.partitions:
        lines += ["", f"Partition {partition.bound.partition}: {records(partition.count)}"]
        lines.append(f"  {partition.bound.sql}; read from {describe(partition.served_by)}")
        lines += [f"  - {row.first_name} (ID: {row.id})" for row in partition.rows]
        if partition.count > len(partition.rows):
            lines.append(f"  ... and {partition.count - len(partition.rows):,} more")

    if report.first_user is not None:
        first = report.first_user
        created = first.created_at.strftime("%Y-%m-%d %H:%M:%S") if first.created_at else "not a UUIDv7"
        lines += ["", f"User: {first.user.first_name} (ID: {first.user.id}, CreatedDate: {created} UTC)"]
        lines.append("  the smallest id in the table: the oldest user of every run so far")
        lines.append(
            f"  its creation time is decoded from the UUIDv7 itself; read from {describe(first.served_by)}"
        )

    # A replica left out before or by the wait is explained there; say here what happened after it.
    later = [skip for skip in report.skipped if skip.when == "during the reads"]
    if later or report.reads_fell_back_to_primary:
        lines += ["", "During the reads:"]
        lines += [f"  {skip.replica} ({skip.address}) left out: {skip.reason}" for skip in later]
        if report.reads_fell_back_to_primary:
            lines.append(
                f"  no replica left, so the reads went to the primary {report.written.written_by.service}"
            )
    return "\n".join(lines)


def render_landing_table(report: Report) -> list[str]:
    """This run's users per partition, predicted and actual; with enough users, also the spread."""
    show_spread = report.written.users >= SPREAD_MIN_USERS
    header = f"  {'partition':<14} {'predicted':>10} {'actual':>10}"
    if show_spread:
        header += f" {'share':>8} {'vs even':>8}"
    lines = ["", f"This run's {report.written.users:,} users by partition:", header]
    for count in report.landing:
        line = f"  {count.partition:<14} {count.predicted:>10,} {count.actual:>10,}"
        if show_spread:
            share, deviation = share_and_deviation(count.actual, report.written.users, report.modulus)
            line += f" {percent(share):>8} {signed_percent(deviation):>8}"
        lines.append(line)
    if show_spread:
        lines.append(f"  (vs even: how far the share is from 1/{report.modulus} of this run's users)")
    return lines


def share_and_deviation(actual: int, users: int, modulus: int) -> tuple[float, float]:
    """A partition's share of this run's users, and how far that is from an even 1/modulus."""
    if users == 0:
        return 0.0, 0.0
    share = actual / users
    even = 1 / modulus
    return share, (share - even) / even


def percent(value: float) -> str:
    return f"{round(value * 100, 1) + 0.0:.1f}%"  # + 0.0 turns -0.0 into 0.0


def signed_percent(value: float) -> str:
    return f"{round(value * 100, 1) + 0.0:+.1f}%"


# ================================================================================================
# Appendix A. Predicting the partition exactly as the server does
# ================================================================================================
#
# When a row arrives at a hash-partitioned table, PostgreSQL (src/backend/partitioning/partbounds.c):
#
#   1. hashes each partition-key column with that type's *extended* hash function and a fixed
#      seed, HASH_PARTITION_SEED (compute_partition_hash_value). For uuid the function is
#      uuid_hash_extended (src/backend/utils/adt/uuid.c): hash_any_extended over the 16 bytes,
#      i.e. hash_bytes_extended (src/common/hashfn.c), Bob Jenkins' lookup3 hash;
#   2. folds the column hashes into one 64-bit row hash with hash_combine64, starting from 0
#      (src/include/common/hashfn.h);
#   3. takes that row hash modulo the greatest modulus among the partitions and picks the
#      partition whose remainder matches (get_partition_for_tuple).
#
# The functions below do the same in Python, so the demo can say where each row will go before
# sending it. Assumption: the server is little-endian (x86-64, ARM64 as normally run), because
# lookup3 reads the key as 32-bit words in the machine's byte order; a big-endian server computes
# different hashes and so places rows differently.

HASH_PARTITION_SEED = 0x7A5B22367996DCFD  # src/include/catalog/partition.h
HASH_COMBINE64_CONSTANT = 0x49A0F4DD15E5A8E3  # "64bit random data", src/include/common/hashfn.h
UINT32 = 0xFFFFFFFF
UINT64 = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class HashBound:
    """One hash partition and its bound: rows with row hash % modulus == remainder."""

    oid: int  # the partition's identity in the catalog; a row's tableoid names it
    partition: str
    modulus: int
    remainder: int
    sql: str  # the bound as pg_get_expr writes it

    @classmethod
    def parse(cls, oid: int, partition: str, bound: str) -> HashBound:
        """From pg_get_expr's text, e.g. 'FOR VALUES WITH (modulus 4, remainder 0)'."""
        match = re.fullmatch(r"FOR VALUES WITH \(modulus (\d+), remainder (\d+)\)", bound)
        if match is None:
            raise DemoError(f"{partition} is not a hash partition ({bound})", EXIT_NOT_INITIALISED)
        return cls(oid, partition, int(match.group(1)), int(match.group(2)), bound)


def predict_partition(user_id_bytes: bytes, bounds: Sequence[HashBound]) -> str:
    """The partition PostgreSQL will put this uuid in.

    Partitions may have different moduli as long as each divides the greatest one, so the server
    reduces the row hash by the greatest modulus and looks for the partition that accepts that
    remainder.
    """
    greatest_modulus = max(bound.modulus for bound in bounds)
    return predict_partition_of_remainder(partition_row_hash(user_id_bytes) % greatest_modulus, bounds)


def predict_partition_of_remainder(remainder: int, bounds: Sequence[HashBound]) -> str:
    """The partition that accepts a row hash with this remainder of the greatest modulus."""
    for bound in bounds:
        if remainder % bound.modulus == bound.remainder:
            return bound.partition
    greatest_modulus = max(bound.modulus for bound in bounds)
    raise DemoError(
        f"no partition of {PARENT_TABLE} accepts hash remainder {remainder} (modulus {greatest_modulus})",
        EXIT_NOT_INITIALISED,
    )


def partition_row_hash(user_id_bytes: bytes) -> int:
    """compute_partition_hash_value() for our one-column key: the uuid's 16 bytes, in the order
    PostgreSQL stores them (network order, the same as uuid.UUID.bytes)."""
    column_hash = hash_bytes_extended(user_id_bytes, HASH_PARTITION_SEED)
    return hash_combine64(0, column_hash)


def hash_combine64(a: int, b: int) -> int:
    """hash_combine64() in src/include/common/hashfn.h, with uint64 wrap-around."""
    return a ^ ((b + HASH_COMBINE64_CONSTANT + (a << 54) + (a >> 7)) & UINT64)


def hash_bytes_extended(key: bytes, seed: int) -> int:
    """hash_bytes_extended() in src/common/hashfn.c: a 64-bit hash of `key`, on a little-endian server."""
    length = len(key)
    a = b = c = (0x9E3779B9 + length + 3923095) & UINT32
    if seed != 0:
        # "the seed is treated as part of the data being hashed": high half into a, low into b.
        a = (a + (seed >> 32)) & UINT32
        b = (b + (seed & UINT32)) & UINT32
        a, b, c = lookup3_mix(a, b, c)

    # Whole 12-byte blocks, read as three little-endian 32-bit words.
    offset = 0
    while length - offset >= 12:
        word_a, word_b, word_c = struct.unpack_from("<3I", key, offset)
        a = (a + word_a) & UINT32
        b = (b + word_b) & UINT32
        c = (c + word_c) & UINT32
        a, b, c = lookup3_mix(a, b, c)
        offset += 12

    # The last 0..11 bytes, zero-padded. In C this is a switch that falls through; on a
    # little-endian machine it adds the same words, except that c's bytes start one byte up:
    # "the lowest byte of c is reserved for the length".
    tail = key[offset:] + bytes(12 - (length - offset))
    word_a, word_b, word_c = struct.unpack("<3I", tail)
    a = (a + word_a) & UINT32
    b = (b + word_b) & UINT32
    c = (c + (word_c << 8)) & UINT32
    a, b, c = lookup3_final(a, b, c)
    return (b << 32) | c


def rotate_left(value: int, bits: int) -> int:
    """rot(x, k) in hashfn.c, on a 32-bit unsigned value."""
    return ((value << bits) | (value >> (32 - bits))) & UINT32


def lookup3_mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    """mix(a, b, c) in hashfn.c. C's uint32 arithmetic wraps around; Python's ints do not,
    hence the `& UINT32` after every addition and subtraction."""
    a = (a - c) & UINT32
    a ^= rotate_left(c, 4)
    c = (c + b) & UINT32
    b = (b - a) & UINT32
    b ^= rotate_left(a, 6)
    a = (a + c) & UINT32
    c = (c - b) & UINT32
    c ^= rotate_left(b, 8)
    b = (b + a) & UINT32
    a = (a - c) & UINT32
    a ^= rotate_left(c, 16)
    c = (c + b) & UINT32
    b = (b - a) & UINT32
    b ^= rotate_left(a, 19)
    a = (a + c) & UINT32
    c = (c - b) & UINT32
    c ^= rotate_left(b, 4)
    b = (b + a) & UINT32
    return a, b, c


def lookup3_final(a: int, b: int, c: int) -> tuple[int, int, int]:
    """final(a, b, c) in hashfn.c."""
    c ^= b
    c = (c - rotate_left(b, 14)) & UINT32
    a ^= c
    a = (a - rotate_left(c, 11)) & UINT32
    b ^= a
    b = (b - rotate_left(a, 25)) & UINT32
    c ^= b
    c = (c - rotate_left(b, 16)) & UINT32
    a ^= c
    a = (a - rotate_left(c, 4)) & UINT32
    b ^= a
    b = (b - rotate_left(a, 14)) & UINT32
    c ^= b
    c = (c - rotate_left(b, 24)) & UINT32
    return a, b, c


# The same hash, written out for what this demo hashes: keys of exactly 16 bytes (a uuid), with
# HASH_PARTITION_SEED. hash_bytes_extended above is the reference and the lesson; this is the
# shortcut for a million ids. For 16 bytes, lookup3 mixes the seed (the same every time, so done
# once here), then one 12-byte block, then adds the last 4 bytes to `a` before its final mixing;
# the mixing is written inline, because a Python function call costs more than the arithmetic.
# Measured here: about 4-5 µs per id, against 9-11 µs for hash_bytes_extended and 15 µs for
# predict_partition: a million ids are predicted in 5 s instead of 15 s. tests/test_partition_hash.py
# checks it against the reference port and against the server.


def uuid_row_hashes(id_buffer: bytes) -> Iterator[int]:
    """partition_row_hash() of each 16-byte id in `id_buffer`, in order."""
    m = UINT32
    a0 = b0 = c0 = (0x9E3779B9 + 16 + 3923095) & m
    a0, b0, c0 = lookup3_mix((a0 + (HASH_PARTITION_SEED >> 32)) & m, (b0 + (HASH_PARTITION_SEED & m)) & m, c0)
    for w0, w1, w2, w3 in struct.iter_unpack("<4I", id_buffer):
        a, b, c = (a0 + w0) & m, (b0 + w1) & m, (c0 + w2) & m
        a = (a - c) & m ^ ((c << 4 | c >> 28) & m)
        c = (c + b) & m
        b = (b - a) & m ^ ((a << 6 | a >> 26) & m)
        a = (a + c) & m
        c = (c - b) & m ^ ((b << 8 | b >> 24) & m)
        b = (b + a) & m
        a = (a - c) & m ^ ((c << 16 | c >> 16) & m)
        c = (c + b) & m
        b = (b - a) & m ^ ((a << 19 | a >> 13) & m)
        a = (a + c) & m
        c = (c - b) & m ^ ((b << 4 | b >> 28) & m)
        b = (b + a) & m
        a = (a + w3) & m  # the last 4 bytes of the key
        c = ((c ^ b) - ((b << 14 | b >> 18) & m)) & m
        a = ((a ^ c) - ((c << 11 | c >> 21) & m)) & m
        b = ((b ^ a) - ((a << 25 | a >> 7) & m)) & m
        c = ((c ^ b) - ((b << 16 | b >> 16) & m)) & m
        a = ((a ^ c) - ((c << 4 | c >> 28) & m)) & m
        b = ((b ^ a) - ((a << 14 | a >> 18) & m)) & m
        c = ((c ^ b) - ((b << 24 | b >> 8) & m)) & m
        # hash_combine64(0, column hash): with a = 0 it only adds the constant.
        yield (((b << 32) | c) + HASH_COMBINE64_CONSTANT) & UINT64


# ================================================================================================
# Appendix B. The COPY bulk path, for --users above ORM_INSERT_LIMIT
# ================================================================================================


def psycopg_connection(session: Session) -> psycopg.Connection[Any]:
    """The psycopg connection under a session's, for its COPY API, which SQLAlchemy does not wrap.

    session.connection() is the transaction's connection; .connection.driver_connection is the
    psycopg connection underneath it. Same connection, same transaction: a COPY commits or rolls
    back with the rest.
    """
    connection = session.connection().connection.driver_connection
    assert isinstance(connection, psycopg.Connection)
    return connection


def insert_with_copy(session: Session, users: NewUsers, progress: Callable[[int], None]) -> None:
    copy_statement = f"COPY {PARENT_TABLE} (id, first_name) FROM STDIN (FORMAT BINARY)"
    with psycopg_connection(session).cursor() as cursor, cursor.copy(copy_statement) as copy:
        # Binary COPY sends each field as its length and its bytes, and the server decodes them
        # with the column's own type. A uuid's binary form is its 16 bytes, so the ids go as the
        # raw bytes they are kept in ("bytea" only tells psycopg to send bytes as they are); making
        # a uuid.UUID object of each first would cost about a second per million rows.
        copy.set_types(["bytea", "varchar"])
        for number in range(users.count):
            copy.write_row((users.id_bytes(number), user_name(number)))
            progress(number + 1)


def progress_printer(total: int, verb: str) -> Callable[[int], None]:
    """For a large run, say on stderr every 10% how far a step is ("loaded 300,000 of 1,000,000
    users"), so that a long wait is visibly moving and stdout stays the report."""
    step = max(total // 10, 1)

    def report_progress(done: int) -> None:
        if total >= PROGRESS_MIN_USERS and (done % step == 0 or done == total):
            print(f"sharding_demo.py: {verb} {done:,} of {total:,} users", file=sys.stderr, flush=True)

    return report_progress


PROGRESS_MIN_USERS = 100_000


# ================================================================================================
# Appendix C. JSON
# ================================================================================================


def render_json(report: Report) -> str:
    written, first = report.written, report.first_user
    document = {
        "server_version": report.server_version,
        **served_json(written.written_by, "written_to"),
        "insert_method": written.method,
        "users_inserted": written.users,
        "commit_lsn": written.commit_lsn,
        # The primary's pg_stat_replication, right after the commit.
        "replication": [
            {
                "application_name": standby.application_name,
                "state": standby.state,
                "replay_lag_bytes": standby.replay_lag_bytes,
            }
            for standby in report.standbys_after_commit
        ],
        "catchup": [
            {
                "replica": catchup.replica.service,
                "caught_up": catchup.caught_up,
                "seconds": round(catchup.seconds, 4),
                "lag_bytes": catchup.lag_bytes,
                "reason": catchup.reason or None,
            }
            for catchup in report.catchup
        ],
        # The first --show new users only, so the output stays small for --users 1000000.
        "inserted": [
            {
                "id": str(user.id),
                "first_name": user.first_name,
                "predicted_partition": user.predicted_partition,
                "actual_partition": user.actual_partition,
            }
            for user in report.new_users
        ],
        "landing_checked_by": served_json(report.landing_checked_by, "read_from"),
        "table_total": report.table_total,
        "partitions": [
            partition_json(partition, count, report)
            for partition, count in zip(report.partitions, report.landing, strict=True)
        ],
        "first_user": None
        if first is None
        else {
            **user_json(first.user),
            "created_at": first.created_at.isoformat() if first.created_at else None,
            **served_json(first.served_by, "read_from"),
        },
        "skipped": [
            {"replica": skip.replica, "address": skip.address, "reason": skip.reason, "when": skip.when}
            for skip in report.skipped
        ],
        "warnings": report.warnings,
    }
    return json.dumps(document, indent=2)


def partition_json(partition: PartitionReport, count: LandingCount, report: Report) -> dict[str, Any]:
    share, deviation = share_and_deviation(count.actual, report.written.users, report.modulus)
    return {
        "name": partition.bound.partition,
        "bound": partition.bound.sql,
        "modulus": partition.bound.modulus,
        "remainder": partition.bound.remainder,
        "count": partition.count,
        "predicted": count.predicted,
        "actual": count.actual,
        "share": round(share, 6),
        "deviation_from_even": round(deviation, 6),
        **served_json(partition.served_by, "read_from"),
        "rows": [user_json(row) for row in partition.rows],
    }


def user_json(user: UserRow) -> dict[str, Any]:
    return {"id": str(user.id), "first_name": user.first_name}


def served_json(served_by: ServedBy, verb: str) -> dict[str, Any]:
    return {
        verb: served_by.service,
        f"{verb}_address": served_by.address,
        "in_recovery": served_by.in_recovery,
    }


# ================================================================================================
# Appendix D. The command line
# ================================================================================================

ENVIRONMENT_HELP = """\
environment variables (also read from a .env file in the current folder; flags win):
  MASTER_DB_HOST, MASTER_DB_PORT, MASTER_DB_USER, MASTER_DB_PASSWORD, MASTER_DB_NAME
      the primary (defaults: localhost, 5432, postgres, postgres, postgres)
  REPLICA_ONE_HOST, REPLICA_ONE_PORT, REPLICA_ONE_USER, REPLICA_ONE_PASSWORD, REPLICA_ONE_NAME
      replica-one (defaults: localhost, 5433, postgres, postgres, postgres)
  REPLICA_TWO_HOST, REPLICA_TWO_PORT, REPLICA_TWO_USER, REPLICA_TWO_PASSWORD, REPLICA_TWO_NAME
      replica-two (defaults: localhost, 5434, postgres, postgres, postgres)
  DEMO_READ_POLICY        random | round-robin (default random)
  DEMO_CATCHUP_TIMEOUT    seconds to wait for the replicas to replay the write (default 5)
  DEMO_CONNECT_TIMEOUT    seconds to wait for a connection (default 3)

exit codes:
  0   success (also when a replica was left out: the report says which, and why)
  2   an invalid setting or flag            3   cannot reach (or lost) the primary before the commit
  4   the primary refused the login          5   tbl_users missing, or partitioned in a way not predictable
  6   failed after the commit: the users are in the table (the message says how many, and the LSN)
  7   the primary refused or cancelled the insert: nothing was written
  8   lost the primary during the COMMIT: whether the users were written is unknown
  130 interrupted (Ctrl-C; the message says whether anything was committed)
  141 stdout was closed before the report was printed (as with `| head`)
"""


def parse_flags(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sharding_demo.py",
        description="Insert users into the hash-partitioned tbl_users on the primary (predicting in Python "
        "which partition each will land in), wait for the replicas to replay them, then read back from the "
        "replicas where the users landed, each partition and the first user.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument(
        "--users",
        type=bounded_int(1, MAX_USERS),
        default=len(DEMO_NAMES),
        metavar="N",
        help=f"how many users to insert (default {len(DEMO_NAMES)}: {', '.join(DEMO_NAMES)}); "
        f"more than {ORM_INSERT_LIMIT:,} are loaded with COPY",
    )
    parser.add_argument(
        "--show",
        type=bounded_int(0, MAX_SHOW),
        default=10,
        metavar="K",
        help="how many new users, and rows per partition, to print (default 10)",
    )
    parser.add_argument(
        "--read-policy",
        choices=["random", "round-robin"],
        help="how to choose a replica for each read (default: $DEMO_READ_POLICY or random)",
    )
    parser.add_argument(
        "--catchup-timeout",
        type=seconds,
        metavar="SECONDS",
        help="how long to wait for the replicas to replay the write, all together "
        "(default: $DEMO_CATCHUP_TIMEOUT or 5)",
    )
    return parser.parse_args(argv)


# Every id is kept in memory (16 bytes) and its partition predicted in pure Python (about 10 µs):
# ten million users take 160 MB and a few minutes, and a teaching demo is not a bulk loader.
MAX_USERS = 10_000_000
MAX_SHOW = 10_000  # rows to print per partition: more is no longer something to read


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text_value: str) -> int:
        value = int(text_value)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low:,} to {high:,}, not {value:,}")
        return value

    return parse


def seconds(text_value: str) -> float:
    value = float(text_value)
    if not (math.isfinite(value) and 0 <= value <= MAX_CATCHUP_TIMEOUT):
        raise argparse.ArgumentTypeError(
            f"must be from 0 to {MAX_CATCHUP_TIMEOUT:.0f} seconds, not {text_value}"
        )
    return value


# ================================================================================================
# Appendix E. Errors: one line each, and an exit code per kind
# ================================================================================================

EXIT_OK = 0
EXIT_CONFIG = 2  # an environment variable or flag is not valid (argparse also uses 2)
EXIT_PRIMARY_UNREACHABLE = 3  # no connection to the primary, or lost it before the commit
EXIT_AUTHENTICATION = 4  # the primary refused the user name or password
EXIT_NOT_INITIALISED = 5  # tbl_users is missing, or not partitioned in a way the demo can predict
EXIT_AFTER_COMMIT = 6  # a failure after this run's users were committed: they are in the table
EXIT_INSERT_REFUSED = 7  # the primary refused or cancelled the insert: nothing was written
EXIT_COMMIT_UNKNOWN = 8  # the connection was lost during COMMIT: the users may or may not be in
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)
EXIT_STDOUT_CLOSED = 141  # the reader of stdout went away, as with `| head` (128 + SIGPIPE)


# What a server's failure looks like here: SQLAlchemy wraps psycopg's errors in DBAPIError, and the
# COPY paths, which use psycopg directly, raise psycopg's own.
DATABASE_ERRORS = (sqlalchemy.exc.DBAPIError, psycopg.Error)


class DemoError(Exception):
    """An expected failure: printed as one line on stderr, exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def primary_connection_error(primary: Server, error: sqlalchemy.exc.OperationalError) -> DemoError:
    message = one_line(error)
    if refused_login(message):
        return DemoError(
            f"{primary.service} ({primary.address}) refused the login: {message}", EXIT_AUTHENTICATION
        )
    return DemoError(
        f"cannot connect to {primary.service} ({primary.address}): {message}", EXIT_PRIMARY_UNREACHABLE
    )


def replica_connection_problem(replica: Server, error: sqlalchemy.exc.OperationalError) -> str:
    message = one_line(error)
    if refused_login(message):
        return (
            f"refused the login: {message}: check {replica.env_prefix}USER and {replica.env_prefix}PASSWORD"
        )
    return f"unreachable: {message}"


def refused_login(message: str) -> bool:
    # libpq's words: a wrong password, a user without a pg_hba.conf rule, or no password at all.
    return any(
        words in message
        for words in ("authentication failed", "no pg_hba.conf entry", "no password supplied")
    )


def driver_error(error: BaseException) -> BaseException:
    """The psycopg error under SQLAlchemy's wrapper (the COPY path raises psycopg's own)."""
    return getattr(error, "orig", None) or error


def connection_lost(error: BaseException) -> bool:
    """The server went away (no SQLSTATE, or class 57P: shut down, terminated) or the link did (08)."""
    sqlstate = getattr(driver_error(error), "sqlstate", None)
    return sqlstate is None or sqlstate.startswith(("57P", "08"))


def failure_before_insert(error: BaseException) -> str:
    return f"the primary failed before the insert: {one_line(error)}; nothing was written"


def failure_before_commit(primary: Server, error: BaseException) -> DemoError:
    """The insert's transaction did not commit, so the server rolled it back: nothing was written."""
    if isinstance(error, KeyboardInterrupt):
        return DemoError("interrupted before the commit: nothing was written", EXIT_INTERRUPTED)
    message = one_line(error)
    if getattr(driver_error(error), "sqlstate", None) == "57014":  # query_canceled
        return DemoError(
            f"{primary.service} cancelled the insert (a statement_timeout, or a cancel request): "
            f"{message}; nothing was written",
            EXIT_INSERT_REFUSED,
        )
    if connection_lost(error):
        return DemoError(
            f"lost {primary.service} during the insert: {message}; nothing was written",
            EXIT_PRIMARY_UNREACHABLE,
        )
    return DemoError(
        f"{primary.service} refused the insert: {message}; nothing was written", EXIT_INSERT_REFUSED
    )


def failure_during_commit(primary: Server, users: int, error: BaseException) -> DemoError:
    what = "interrupted" if isinstance(error, KeyboardInterrupt) else f"lost {primary.service}"
    return DemoError(
        f"{what} during the COMMIT of {users:,} users: whether they were committed is unknown; count "
        f"the rows of {PARENT_TABLE} on the primary before running again",
        EXIT_COMMIT_UNKNOWN,
    )


def failure_after_commit(written: Written, error: BaseException) -> DemoError:
    """Anything that goes wrong once the users are committed: they stay in the table. Say so, so
    that nobody retries a run whose users are already there."""
    committed = (
        f"{written.users:,} users were committed on {written.written_by.service} "
        f"(commit LSN {written.commit_lsn}) and stay in the table; do not run again to retry them"
    )
    if isinstance(error, KeyboardInterrupt):
        return DemoError(f"interrupted after the commit: {committed}", EXIT_INTERRUPTED)
    return DemoError(f"failed after the commit: {one_line(error)}; {committed}", EXIT_AFTER_COMMIT)


def not_initialised(primary: Server, what_is_wrong: str) -> DemoError:
    return DemoError(
        f"{primary.service} ({primary.address}) {what_is_wrong}: the cluster is not initialised "
        "(start it with `docker compose up -d --wait` or `python local_cluster.py`)",
        EXIT_NOT_INITIALISED,
    )


def unpredictable_layout(primary: Server, what_is_wrong: str) -> DemoError:
    return DemoError(
        f"{primary.service} ({primary.address}) {what_is_wrong}; the demo predicts where rows land only "
        f"in {PARENT_TABLE} PARTITION BY HASH (id), split into plain tables that cover every remainder, "
        "as init-master.sql makes it",
        EXIT_NOT_INITIALISED,
    )


def one_line(error: BaseException) -> str:
    """The useful line of a driver error, without SQLAlchemy's SQL echo and background link."""
    original = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    message = lines[0] if lines else type(original).__name__
    return message.removeprefix("connection failed: ")


def describe_invalid_setting(settings_class: type[BaseSettings], error: ValidationError) -> str:
    """'invalid setting MASTER_DB_PORT=abc: Input should be a valid integer ...' from pydantic's error."""
    first = error.errors()[0]
    prefix = str(settings_class.model_config.get("env_prefix", ""))
    variable = prefix + "_".join(str(part) for part in first["loc"]).upper()
    value = "" if variable.endswith("PASSWORD") else f"={first.get('input')}"
    return f"invalid setting {variable}{value}: {first['msg']}"


def settings_warnings(path: Path = Path(".env")) -> list[str]:
    """Things in the environment or .env that are probably mistakes, one line each."""
    bindings = dotenv_bindings(path)
    return [
        *dotenv_unreadable_lines(bindings),
        *dotenv_dollar_warnings(bindings),
        *unknown_demo_variables(bindings),
    ]


def dotenv_bindings(path: Path) -> list[Binding]:
    """The lines of .env as python-dotenv parses them (the parser pydantic-settings uses): each with
    its name, its value, the text it was written as, and whether it could be parsed at all."""
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", errors="replace") as stream:
        return list(parse_stream(stream))


def dotenv_unreadable_lines(bindings: Sequence[Binding]) -> list[str]:
    """Lines of .env that python-dotenv cannot parse (it would skip them, and say so four times)."""
    bad = [str(binding.original.line) for binding in bindings if binding.error]
    if not bad:
        return []
    lines = f"lines {', '.join(bad)} were" if len(bad) > 1 else f"line {bad[0]} was"
    return [f".env {lines} not NAME=value, and ignored"]


def dotenv_dollar_warnings(bindings: Sequence[Binding]) -> list[str]:
    """Passwords in .env that docker compose and this demo would read differently.

    One .env configures both, but they treat `$` differently. Compose (v2) replaces $NAME, ${NAME}
    and $$ in a value that is unquoted or in double quotes, and takes a single-quoted value as
    it is. This demo reads .env with python-dotenv (through pydantic-settings), which replaces
    only ${NAME}, even inside single quotes. So MASTER_DB_PASSWORD=pa$word gives the server the
    password 'pa' and the demo 'pa$word', and the login fails. Written 'pa$word', both agree.
    """
    warnings = []
    for binding in bindings:
        name = binding.key
        if name is None or not name.endswith("PASSWORD"):
            continue
        written = binding.original.string.split("=", 1)[1].strip()  # as typed, quotes included
        compose_expands = not written.startswith("'") and re.search(r"\$[A-Za-z_{$]", written)
        if compose_expands or "${" in written:
            warnings.append(
                f"{name} in .env has a '$' that docker compose and this demo read differently; "
                f"write the value in single quotes, without '${{' ({name}='...')"
            )
    return warnings


def unknown_demo_variables(bindings: Sequence[Binding]) -> list[str]:
    """DEMO_* names this demo does not know, such as DEMO_USER=100 for --users: ignored, so say so."""
    known = {"DEMO_" + name.upper() for name in DemoSettings.model_fields}
    names = {name.upper() for name in os.environ if name.upper().startswith("DEMO_")}
    names |= {
        binding.key.upper() for binding in bindings if binding.key and binding.key.upper().startswith("DEMO_")
    }
    return [
        f"{name} is not a setting of this demo, and is ignored (it has {', '.join(sorted(known))})"
        for name in sorted(names - known)
    ]


def quiet_library_loggers() -> None:
    """Keep two libraries' log lines off the terminal: this demo says what happened in its own words.

    psycopg logs "error ignored terminating <psycopg.Copy ...>" when a COPY ends with the connection
    already lost; python-dotenv logs each .env line it cannot parse, once per settings class.
    Without a handler of their own, Python prints such warnings on stderr.
    """
    for name in ("psycopg", "dotenv"):
        logging.getLogger(name).addHandler(logging.NullHandler())
        logging.getLogger(name).propagate = False


if __name__ == "__main__":
    sys.exit(main())
