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
4. write     make the users' UUIDv7 ids in Python, predict each one's partition with a Python
             port of PostgreSQL's hash routing, and insert them in one transaction on the primary
             (through the ORM for a few users, with COPY for many: --users N);
5. wait      until each replica has replayed the primary's WAL up to that commit, so the reads
             below see the rows just written (read-your-writes); a replica that does not catch up
             in time is left out of this run's reads;
6. read      from the replicas: where the server actually put this run's users (tableoid), each
             partition's count and first rows, and the first user;
7. report    all of it as a ``Report`` (data), then rendered as text or, with --json, as JSON.

Run ``python sharding_demo.py --help`` for the flags and environment variables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import struct
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import psycopg
import sqlalchemy.exc
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import URL, Connection, Engine, String, Uuid, column, create_engine, func, select, table, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from uuid6 import uuid7

APPLICATION_NAME = "sharding_demo"  # shows in the servers' logs and in pg_stat_activity
PARENT_TABLE = "tbl_users"
DEMO_NAMES = ["John", "Jane", "Bob", "Alice", "Charlie"]

T = TypeVar("T")  # what a unit of read work returns

# Exit codes, one per kind of expected failure (also listed in --help and the README).
EXIT_OK = 0
EXIT_CONFIG = 2  # an environment variable or flag is not valid (argparse also uses 2)
EXIT_PRIMARY_UNREACHABLE = 3  # no connection to the primary, or lost it during the run
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


# A line of a .env file: NAME=value, with an optional `export ` before it.
DOTENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")


def dotenv_dollar_warnings(path: Path = Path(".env")) -> list[str]:
    """Passwords in .env that docker compose and this demo would read differently.

    One .env configures both, but they treat `$` differently. Compose (v2) replaces $NAME, ${NAME}
    and $$ in a value that is unquoted or in double quotes, and takes a single-quoted value as
    it is. This demo reads .env with python-dotenv (through pydantic-settings), which replaces
    only ${NAME}, even inside single quotes. So MASTER_DB_PASSWORD=pa$word gives the server the
    password 'pa' and the demo 'pa$word', and the login fails. Written 'pa$word', both agree.
    """
    if not path.is_file():
        return []
    warnings = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = DOTENV_LINE.match(line)
        if match is None or not match.group(1).endswith("PASSWORD"):
            continue
        name, value = match.groups()
        compose_expands = not value.startswith("'") and re.search(r"\$[A-Za-z_{$]", value)
        if compose_expands or "${" in value:
            warnings.append(
                f"{name} in .env has a '$' that docker compose and this demo read differently; "
                f"write the value in single quotes, without '${{' ({name}='...')"
            )
    return warnings


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


def new_user_id() -> uuid.UUID:
    # The id is made here, in Python, before the row goes anywhere, like the Go demo's
    # BeforeCreate hook. UUIDv7 starts with a 48-bit Unix timestamp in milliseconds, so ids sort
    # by creation time and the time can be read back out of the id (uuid7_created_at below).
    return uuid7()


def user_name(number: int) -> str:
    """The five names of the original demo, then generated ones for --users N."""
    if number < len(DEMO_NAMES):
        return DEMO_NAMES[number]
    return f"{DEMO_NAMES[number % len(DEMO_NAMES)]}-{number}"


def uuid7_created_at(user_id: uuid.UUID) -> datetime | None:
    """The creation time in a UUIDv7: its first 48 bits are milliseconds since 1970 (RFC 9562)."""
    if user_id.version != 7:
        return None
    milliseconds = user_id.int >> 80  # drop the 80 bits after the timestamp
    return datetime.fromtimestamp(milliseconds / 1000, tz=UTC)


# ================================================================================================
# Predicting the partition, exactly as the server does
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


def hash_combine64(a: int, b: int) -> int:
    """hash_combine64() in src/include/common/hashfn.h, with uint64 wrap-around."""
    return a ^ ((b + HASH_COMBINE64_CONSTANT + (a << 54) + (a >> 7)) & UINT64)


def partition_row_hash(user_id_bytes: bytes) -> int:
    """compute_partition_hash_value() for our one-column key: the uuid's 16 bytes, in the order
    PostgreSQL stores them (network order, the same as uuid.UUID.bytes)."""
    column_hash = hash_bytes_extended(user_id_bytes, HASH_PARTITION_SEED)
    return hash_combine64(0, column_hash)


@dataclass(frozen=True)
class HashBound:
    """One hash partition and its bound: rows with row hash % modulus == remainder."""

    partition: str
    modulus: int
    remainder: int
    sql: str  # the bound as pg_get_expr writes it

    @classmethod
    def parse(cls, partition: str, bound: str) -> HashBound:
        """From pg_get_expr's text, e.g. 'FOR VALUES WITH (modulus 4, remainder 0)'."""
        match = re.fullmatch(r"FOR VALUES WITH \(modulus (\d+), remainder (\d+)\)", bound)
        if match is None:
            raise DemoError(f"{partition} is not a hash partition ({bound})", EXIT_NOT_INITIALISED)
        return cls(partition, int(match.group(1)), int(match.group(2)), bound)


def predict_partition(user_id_bytes: bytes, bounds: Sequence[HashBound]) -> str:
    """The partition PostgreSQL will put this uuid in.

    Partitions may have different moduli as long as each divides the greatest one, so the server
    reduces the row hash by the greatest modulus and looks up which partition covers that slot.
    """
    greatest_modulus = max(bound.modulus for bound in bounds)
    slot = partition_row_hash(user_id_bytes) % greatest_modulus
    for bound in bounds:
        if slot % bound.modulus == bound.remainder:
            return bound.partition
    raise DemoError(f"no partition of {PARENT_TABLE} accepts hash slot {slot}", EXIT_NOT_INITIALISED)


# ================================================================================================
# The report: plain data, filled in as the demo runs, rendered at the end
# ================================================================================================


@dataclass
class UserRow:
    id: uuid.UUID
    first_name: str


@dataclass
class InsertedUser:
    """A user this run inserted, with where we predicted it would go and where the server put it."""

    id: uuid.UUID
    first_name: str
    predicted_partition: str
    actual_partition: str | None = None  # filled in after reading it back from a replica


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
    bound: HashBound
    count: int  # rows in the partition now, from every run
    rows: list[UserRow]  # the first --show rows by id
    served_by: ServedBy
    predicted: int  # this run's users we predicted would land here
    actual: int  # this run's users the server says are here (tableoid)


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
    insert_method: str  # "ORM" or "COPY"
    users_inserted: int
    inserted_sample: list[InsertedUser]
    commit_lsn: str
    catchup: list[CatchUp]
    partitions: list[PartitionReport] = field(default_factory=list)
    landing_checked_by: ServedBy | None = None
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


@dataclass
class PrimaryFacts:
    version: str
    partitions: list[HashBound]


def check_primary(primary: Server) -> PrimaryFacts:
    """Before writing anything: is the primary reachable, writable and initialised?

    Also reads the partitions' bounds from its catalog: we need them before the insert, to predict
    where each row will go, and the primary is the authority on its own schema.
    Fails with one clear line otherwise, so nothing is half-written.
    """
    try:
        with primary.engine.connect() as connection:
            version = str(connection.scalar(text("SHOW server_version")))
            in_recovery = connection.scalar(text("SELECT pg_is_in_recovery()"))
            has_table = connection.scalar(
                text("SELECT to_regclass(:name) IS NOT NULL"), {"name": PARENT_TABLE}
            )
            partitions = list_partitions(connection) if has_table else []
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
    if not has_table or not partitions:
        raise DemoError(
            f"{primary.name} ({primary.address}) has no table {PARENT_TABLE}: the cluster is not initialised "
            "(start it with `docker compose up -d --wait` or `python local_cluster.py`)",
            EXIT_NOT_INITIALISED,
        )
    return PrimaryFacts(version, [HashBound.parse(name, bound) for name, bound in partitions])


def list_partitions(connection: Connection) -> list[tuple[str, str]]:
    """The children of tbl_users and their bounds, from the system catalog.

    pg_inherits links each partition to its parent; relpartbound holds the partition's bound,
    which pg_get_expr turns back into SQL, e.g. "FOR VALUES WITH (modulus 4, remainder 2)".
    """
    rows = connection.execute(
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
    return [(str(name), str(bound)) for name, bound in rows]


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


class NewUsers:
    """The users this run inserts: (id, name) rows, made as the insert consumes them.

    The first `made_in_advance` ids (the `sample`) exist before the insert, so the demo can show
    where it predicts they will land before sending them. The rest are made while COPY streams:
    making a million ids first would keep the server idle while Python works, instead of both cores
    working at once (bench/bench_insert.py measures it).

    Every id is also kept, as 16 raw bytes in one buffer, for the checks after the insert. A list of
    a million uuid.UUID objects would take about 110 MB and keep Python's garbage collector busy
    walking them; the buffer takes 16 MB and is one object.
    """

    def __init__(self, count: int, made_in_advance: int) -> None:
        self.count = count
        self.sample = [new_user_id() for _ in range(min(made_in_advance, count))]
        self.id_buffer = bytearray(b"".join(user_id.bytes for user_id in self.sample))

    def rows(self) -> Iterator[tuple[uuid.UUID, str]]:
        for number in range(self.count):
            if number < len(self.sample):
                user_id = self.sample[number]
            else:
                user_id = new_user_id()
                self.id_buffer += user_id.bytes
            yield user_id, user_name(number)

    def id_bytes(self, number: int) -> bytes:
        return bytes(self.id_buffer[number * 16 : (number + 1) * 16])

    def ids(self, start: int, stop: int) -> list[uuid.UUID]:
        return [uuid.UUID(bytes=self.id_bytes(number)) for number in range(start, min(stop, self.count))]


# Up to this many users, insert through the ORM; above it, with COPY.
#
# The ORM path is the one to read: User objects, session.add_all(), one transaction, SQLAlchemy
# writing the INSERTs. It is also slow for many rows: it builds a Python object per row, tracks
# it in the session, and sends one INSERT per row. COPY is PostgreSQL's bulk-load protocol: one
# statement, then rows streamed in a compact binary format, parsed by the server in a tight loop.
# bench/bench_insert.py measures the difference (tens of times at 100,000 rows).
ORM_INSERT_LIMIT = 1000


def insert_method(count: int) -> str:
    return "ORM" if count <= ORM_INSERT_LIMIT else "COPY"


def insert_with_orm(session: Session, users: NewUsers) -> None:
    session.add_all(User(id=user_id, first_name=name) for user_id, name in users.rows())


def insert_with_copy(session: Session, users: NewUsers, progress: Callable[[int], None]) -> None:
    # session.connection() is the transaction's connection; .connection.driver_connection is
    # the psycopg connection underneath it, which has the COPY API. Same connection, same
    # transaction: the COPY commits or rolls back with the rest.
    psycopg_connection = session.connection().connection.driver_connection
    assert isinstance(psycopg_connection, psycopg.Connection)
    copy_statement = f"COPY {PARENT_TABLE} (id, first_name) FROM STDIN (FORMAT BINARY)"
    with psycopg_connection.cursor() as cursor, cursor.copy(copy_statement) as copy:
        copy.set_types(["uuid", "varchar"])
        for number, row in enumerate(users.rows(), start=1):
            copy.write_row(row)
            progress(number)


def insert_users(primary: Server, users: NewUsers, progress: Callable[[int], None]) -> tuple[ServedBy, str]:
    """Insert all users in one transaction on the primary; return who wrote them and the WAL
    position of the commit, which the replicas must reach before they can show these rows."""
    with Session(primary.engine) as session:
        with session.begin():
            if insert_method(users.count) == "ORM":
                insert_with_orm(session, users)
                session.flush()  # send the INSERTs now, so the check below runs after them
            else:
                insert_with_copy(session, users, progress)
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


def read_partition(partition: str, show: int) -> Callable[[Session], tuple[int, list[UserRow]]]:
    """A read that counts one partition's rows and lists the first `show`, querying the partition
    as the ordinary table it is."""

    def work(session: Session) -> tuple[int, list[UserRow]]:
        # A lightweight table() construct: the partition has tbl_users' columns, and SQLAlchemy
        # quotes its name for us.
        partition_table = table(partition, column("id", Uuid()), column("first_name", String()))
        count = session.scalar(select(func.count()).select_from(partition_table)) or 0
        rows = session.execute(
            select(partition_table.c.id, partition_table.c.first_name)
            .order_by(partition_table.c.id)
            .limit(show)
        )
        return count, [UserRow(id=row.id, first_name=row.first_name) for row in rows]

    return work


# How many ids to send in one `= ANY(:ids)` query when checking where a large load landed.
LANDING_CHECK_BATCH = 50_000


def where_users_landed(users: NewUsers) -> Callable[[Session], tuple[Counter[str], dict[str, str]]]:
    """A read that asks the server which partition holds each of this run's users.

    tableoid is a system column: the OID of the table a row is physically stored in, so
    tableoid::regclass names the partition. Returns the count per partition, and the partition of
    each user in `users.sample`.
    """
    by_partition = text(
        f"SELECT tableoid::regclass::text, count(*) FROM {PARENT_TABLE} WHERE id = ANY(:ids) GROUP BY 1"
    )
    each_row = text(f"SELECT id, tableoid::regclass::text FROM {PARENT_TABLE} WHERE id = ANY(:ids)")

    def work(session: Session) -> tuple[Counter[str], dict[str, str]]:
        counts: Counter[str] = Counter()
        for start in range(0, users.count, LANDING_CHECK_BATCH):
            batch = users.ids(start, start + LANDING_CHECK_BATCH)
            for partition, count in session.execute(by_partition, {"ids": batch}):
                counts[partition] += count
        rows = session.execute(each_row, {"ids": users.sample})
        return counts, {str(user_id): partition for user_id, partition in rows}

    return work


def read_first_user(session: Session) -> UserRow | None:
    # Through the parent table: PostgreSQL reads all the partitions and merges them.
    user = session.scalars(select(User).order_by(User.id).limit(1)).first()
    return UserRow(id=user.id, first_name=user.first_name) if user else None


def read_report(
    router: ReadWriteRouter,
    report: Report,
    partitions: list[HashBound],
    predicted: Counter[str],
    users: NewUsers,
    show: int,
) -> None:
    (actual, sample_partitions), report.landing_checked_by = router.read(where_users_landed(users))
    for user in report.inserted_sample:
        user.actual_partition = sample_partitions.get(str(user.id))

    for bound in partitions:
        (count, rows), served_by = router.read(read_partition(bound.partition, show))
        report.partitions.append(
            PartitionReport(
                bound=bound,
                count=count,
                rows=rows,
                served_by=served_by,
                predicted=predicted[bound.partition],
                actual=actual[bound.partition],
            )
        )

    first, served_by = router.read(read_first_user)
    if first is not None:
        report.first_user = FirstUser(user=first, created_at=uuid7_created_at(first.id), served_by=served_by)


# ================================================================================================
# 7. Report: render the data as text or JSON
# ================================================================================================


def describe(served_by: ServedBy) -> str:
    role = "standby, in recovery" if served_by.in_recovery else "primary, not in recovery"
    return f"{served_by.server} {served_by.address}, {role}"


def share_and_deviation(partition: PartitionReport, users_inserted: int) -> tuple[float, float]:
    """This run's share in the partition, and how far that is from an even split (1/modulus)."""
    if users_inserted == 0:
        return 0.0, 0.0
    share = partition.actual / users_inserted
    even = 1 / partition.bound.modulus
    return share, (share - even) / even


def render_text(report: Report) -> str:
    lines = [f"PostgreSQL {report.server_version}", ""]
    lines.append("Standbys streaming from the primary (its pg_stat_replication):")
    lines += [
        f"  {standby.application_name}: {standby.state}, replay lag {standby.replay_lag_bytes} bytes"
        for standby in report.replication
    ] or ["  none"]

    lines += [
        "",
        f"Inserted {report.users_inserted:,} users ({report.insert_method}) in one transaction "
        f"on {describe(report.written_by)}.",
        "Each new user: the partition predicted in Python before the insert -> where the server put it:",
    ]
    for user in report.inserted_sample:
        verdict = "ok" if user.actual_partition == user.predicted_partition else "MISMATCH"
        where = f"{user.predicted_partition} -> {user.actual_partition}"
        lines.append(f"  {user.first_name:<12} {user.id}  {where}  {verdict}")
    if report.users_inserted > len(report.inserted_sample):
        lines.append(f"  ... and {report.users_inserted - len(report.inserted_sample):,} more")

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

    lines += ["", f"This run's {report.users_inserted:,} users by partition:"]
    lines.append(f"  {'partition':<14} {'predicted':>10} {'actual':>10} {'share':>8} {'vs even':>8}")
    for partition in report.partitions:
        share, deviation = share_and_deviation(partition, report.users_inserted)
        lines.append(
            f"  {partition.bound.partition:<14} {partition.predicted:>10} {partition.actual:>10}"
            f" {share:>8.1%} {deviation:>+8.1%}"
        )
    if report.landing_checked_by is not None:
        lines.append(f"  (actual counts read from {describe(report.landing_checked_by)})")

    for partition in report.partitions:
        lines += ["", f"Partition {partition.bound.partition}: {partition.count} records"]
        lines.append(f"  {partition.bound.sql}; read from {describe(partition.served_by)}")
        lines += [f"  - {row.first_name} (ID: {row.id})" for row in partition.rows]
        if partition.count > len(partition.rows):
            lines.append(f"  ... and {partition.count - len(partition.rows):,} more")

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


def partition_json(partition: PartitionReport, users_inserted: int) -> dict[str, Any]:
    share, deviation = share_and_deviation(partition, users_inserted)
    return {
        "name": partition.bound.partition,
        "bound": partition.bound.sql,
        "modulus": partition.bound.modulus,
        "remainder": partition.bound.remainder,
        "count": partition.count,
        "predicted": partition.predicted,
        "actual": partition.actual,
        "share": round(share, 6),
        "deviation_from_even": round(deviation, 6),
        **served_json(partition.served_by, "read_from"),
        "rows": [user_json(row) for row in partition.rows],
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
        "insert_method": report.insert_method,
        "users_inserted": report.users_inserted,
        # A sample (the first --show users), so the output stays small for --users 1000000.
        "inserted": [
            {
                "id": str(user.id),
                "first_name": user.first_name,
                "predicted_partition": user.predicted_partition,
                "actual_partition": user.actual_partition,
            }
            for user in report.inserted_sample
        ],
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
        "partitions": [partition_json(partition, report.users_inserted) for partition in report.partitions],
        "landing_checked_by": None
        if report.landing_checked_by is None
        else served_json(report.landing_checked_by, "read_from"),
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
  2 invalid setting or flag       3 cannot connect to (or lost) the primary
  4 the primary refused the login 5 tbl_users missing: the cluster is not initialised
"""


def positive_int(text_value: str) -> int:
    value = int(text_value)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def parse_flags(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sharding_demo.py",
        description="Insert users into the hash-partitioned tbl_users on the primary (predicting in Python "
        "which partition each will land in), wait for the replicas to replay them, then read each partition, "
        "where the users landed and the first user from the replicas.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument(
        "--users",
        type=positive_int,
        default=len(DEMO_NAMES),
        metavar="N",
        help=f"how many users to insert (default {len(DEMO_NAMES)}: {', '.join(DEMO_NAMES)}); "
        f"more than {ORM_INSERT_LIMIT} are loaded with COPY",
    )
    parser.add_argument(
        "--show",
        type=int,
        default=10,
        metavar="K",
        help="rows to print per partition, and new users to print (default 10)",
    )
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
    if flags.show < 0:
        parser.error("--show must be 0 or more")
    return flags


def progress_printer(total: int) -> Callable[[int], None]:
    """Report a long load on stderr every 10%, so stdout stays the report."""
    step = max(total // 10, 1)

    def report_progress(done: int) -> None:
        if total >= 100_000 and (done % step == 0 or done == total):
            print(f"sharding_demo.py: loaded {done:,} of {total:,} users", file=sys.stderr, flush=True)

    return report_progress


def run(flags: argparse.Namespace) -> Report:
    # 1. config
    config = load_config(flags)

    # 2. engines
    primary = make_server(config.primary, config.demo.connect_timeout)
    replicas = [make_server(settings, config.demo.connect_timeout) for settings in config.replicas]

    # 3. routing
    router = ReadWriteRouter(primary, replicas, config.demo.read_policy)
    try:
        facts = check_primary(router.for_write())
        standbys = replication_status(router.for_write())

        # 4. write: make the first users and predict where they will land, then insert them all
        users = NewUsers(flags.users, made_in_advance=flags.show)
        sample = [
            InsertedUser(user_id, user_name(number), predict_partition(user_id.bytes, facts.partitions))
            for number, user_id in enumerate(users.sample)
        ]
        written_by, commit_lsn = insert_users(router.for_write(), users, progress_printer(users.count))
        # Every id exists now; predict where each went (in Python: the server is not asked).
        predicted = Counter(
            predict_partition(users.id_bytes(number), facts.partitions) for number in range(users.count)
        )
        report = Report(
            server_version=facts.version,
            replication=standbys,
            written_by=written_by,
            insert_method=insert_method(users.count),
            users_inserted=users.count,
            inserted_sample=sample,
            commit_lsn=commit_lsn,
            catchup=[],
        )

        # 5. wait until the replicas have the rows
        report.catchup = wait_for_replicas(router, commit_lsn, config.demo.catchup_timeout)

        # 6. read
        read_report(router, report, facts.partitions, predicted, users, flags.show)
        report.skipped = router.skipped
        return report
    finally:
        for server in [primary, *replicas]:
            server.engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    flags = parse_flags(argv)
    for warning in dotenv_dollar_warnings():
        print(f"sharding_demo.py: warning: {warning}", file=sys.stderr)
    try:
        report = run(flags)
    except DemoError as error:
        print(f"sharding_demo.py: error: {error}", file=sys.stderr)
        return error.exit_code
    except sqlalchemy.exc.OperationalError as error:
        # The router survives a replica failing; the primary failing after the checks (say, it is
        # stopped mid-run) ends the run. The transaction rolls back: nothing is half-written.
        print(f"sharding_demo.py: error: lost the primary during the run: {one_line(error)}", file=sys.stderr)
        return EXIT_PRIMARY_UNREACHABLE
    # 7. report
    print(render_json(report) if flags.json else render_text(report))
    for warning in report.warnings:
        print(f"sharding_demo.py: warning: {warning}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
