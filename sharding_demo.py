"""sharding_demo.py: hash partitioning, read/write splitting and sharding with PostgreSQL, in one script.

A *primary* ("master-db") takes the writes. Two *hot standbys* ("replica-one", "replica-two")
receive its write-ahead log (WAL) by streaming replication, replay it and answer reads. The table
``tbl_users`` is *hash partitioned* four ways: the server puts each row in the partition
``tbl_users_p0`` .. ``tbl_users_p3`` whose remainder equals hash(id) mod 4, and a query that filters
on the id reads that one partition. In the default layout every server holds every row. In the
sharded one (docs/sharding.md), master-db is a *coordinator*: its partitions are foreign tables on
two *shards*, so each row is stored on one shard only. The same code runs on both.

The lesson: the settings and the model, ``run()`` (the story, in seven steps) and ``main()``, then
one section per step, down to "The lesson ends here". Below it are appendices: A, how the demo
predicts a row's partition, where the lesson sends you; then, for cases the default run never
meets, B the bulk path (--users above 100), C JSON, D failures and exit codes, E the command line.
"""

from __future__ import annotations

import signal
import sys


def stopped_while_loading(signal_number: int, frame: object) -> None:
    """Python takes a few tenths of a second to load the libraries imported below. A Ctrl-C meanwhile would print a
    traceback from inside one of them, and SIGTERM or SIGHUP would end the demo without a word. Nothing has been done
    yet, so that is what it says, as main() would (appendix D), which takes these signals over once it runs."""
    name = "Ctrl-C" if signal_number == signal.SIGINT else signal.Signals(signal_number).name
    print(f"sharding_demo.py: error: interrupted ({name}) before the insert: nothing was written", file=sys.stderr)
    raise SystemExit(128 + signal_number)


if __name__ == "__main__":  # run as the demo, not imported by a test or the bench
    for each in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(each, stopped_while_loading)

import argparse
import ipaddress
import json
import logging
import logging.handlers
import os
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, Literal, Self, TypeVar, get_args

import psycopg
import sqlalchemy.exc
import uuid6
from dotenv import dotenv_values
from psycopg.pq import TransactionStatus
from pydantic import BeforeValidator, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import URL, Engine, String, Uuid, column, create_engine, event, func, select, table, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

T = TypeVar("T")

# ======== Settings and the model ================================================================


class DatabaseSettings(BaseSettings):
    """How to reach one server. pydantic-settings reads each field from the variable prefix + name
    (MASTER_DB_PORT), else from .env, else takes the default, and checks it before anything runs."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")  # each server's class names its env_prefix
    host: str = Field(default="localhost", min_length=1)  # empty would silently mean a local socket
    port: int = Field(default=5432, ge=1, le=65535)
    user: str = Field(default="postgres", min_length=1)  # empty would silently mean your OS user
    password: SecretStr = SecretStr("postgres")  # prints as '**********', so it never leaks to a log
    name: str = Field(default="postgres", min_length=1)  # the database
    service: ClassVar[str]  # the docker-compose.yml service, e.g. "master-db"

    @field_validator("host", "user", "name", "password", mode="before")
    @classmethod
    def as_meant(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        if not value.isprintable():  # a NUL byte, or one that is not UTF-8, is refused (appendix E)
            refuse_if_unsendable(value)
        if info.field_name == "host" and ":" in value:  # "localhost:5432", or a URL, pasted whole (appendix E)
            refuse_if_not_a_host(value.strip(), variable_of(cls, "port"))
        # "localhost " from a sloppy .env line means "localhost"; a password is kept as it is.
        return value if info.field_name == "password" else value.strip()


class MasterDBSettings(DatabaseSettings, env_prefix="MASTER_DB_"):
    service = "master-db"


class ReplicaOneSettings(DatabaseSettings, env_prefix="REPLICA_ONE_"):
    service = "replica-one"
    port: int = Field(default=5433, ge=1, le=65535)


class ReplicaTwoSettings(DatabaseSettings, env_prefix="REPLICA_TWO_"):
    service = "replica-two"
    port: int = Field(default=5434, ge=1, le=65535)


class ShardOneSettings(DatabaseSettings, env_prefix="SHARD_ONE_"):  # read only if a partition is stored on shard-one
    service = "shard-one"
    port: int = Field(default=5435, ge=1, le=65535)


class ShardTwoSettings(DatabaseSettings, env_prefix="SHARD_TWO_"):
    service = "shard-two"
    port: int = Field(default=5436, ge=1, le=65535)


SHARD_SETTINGS = (ShardOneSettings, ShardTwoSettings)


class DemoSettings(BaseSettings, env_prefix="DEMO_", env_file=".env", extra="ignore"):
    """How the demo behaves. Each field is a variable (DEMO_CATCHUP_TIMEOUT) and a flag
    (--catchup-timeout, which wins): appendix E makes the flags from these fields."""

    users: int = Field(default=5, ge=1, le=10_000_000, description="how many users to insert")
    show: int = Field(default=10, ge=0, le=10_000, description="how many new users, and rows per partition, to print")
    json_output: bool = Field(default=False, description="print JSON", json_schema_extra={"flag": "--json"})
    read_policy: Annotated[Literal["random", "round-robin"], BeforeValidator(str.strip)] = Field(
        default="random", description="how to pick a replica"
    )
    catchup_timeout: float = Field(default=5.0, ge=0, le=3600, description="seconds to wait for the replicas")
    connect_timeout: int = Field(default=3, ge=1, le=600, description="seconds to wait for a connection")
    stall_timeout: float = Field(default=10.0, gt=0, le=3600, description="seconds a server may not answer")


def load_settings(settings_class: type[T], **flags: Any) -> T:
    try:
        return settings_class(**flags)
    except (ValidationError, UnicodeDecodeError) as error:
        raise invalid_setting(settings_class, error, flags) from None  # one line naming it (appendix E)


class Base(DeclarativeBase):
    pass


class User(Base):
    """A row of tbl_users. The application never names a partition, nor a shard: the server routes."""

    __tablename__ = "tbl_users"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    first_name: Mapped[str] = mapped_column(String(255))

    def __init__(self, first_name: str) -> None:
        # The id is made in Python, before the row goes anywhere, as the Go demo's BeforeCreate hook
        # made it with uuid.NewV7(). A UUIDv7 starts with the time it was made (48 bits of
        # milliseconds), so ids sort by creation time, and the time can be read back out of them.
        super().__init__(id=uuid6.uuid7(), first_name=first_name)


DEMO_NAMES = ["John", "Jane", "Bob", "Alice", "Charlie"]


def user_name(number: int) -> str:  # the original demo's five, then made-up names for --users N
    return DEMO_NAMES[number] if number < 5 else f"{DEMO_NAMES[number % 5]}-{number}"


# ======== The story: run() does the seven steps and returns what they made; main() shows it =====


def run(settings: DemoSettings) -> Report:
    # 1. config: where the servers are (the demo's own settings came from main)
    configs = [load_settings(each) for each in (MasterDBSettings, ReplicaOneSettings, ReplicaTwoSettings)]

    # 2. engines, with every connection watched, so that no wait lasts for ever; then, before
    #    anything is written, check the primary, read how tbl_users is partitioned, and check the
    #    shards that hold its partitions, if any (the sharded layout)
    watchdog = Watchdog(settings.stall_timeout)
    primary, *replicas = [make_server(each, settings.connect_timeout, watchdog) for each in configs]
    shards: list[Server] = []
    try:
        facts = check_primary(primary)
        shards = [
            check_shard(make_server(load_settings(each), settings.connect_timeout, watchdog), primary, facts)
            for each in SHARD_SETTINGS
            if any(partition.shard == each.service for partition in facts.partitions)
        ]

        # 3. routing: writes to the primary, reads to the replicas that really are its standbys
        router = ReadWriteRouter(primary, replicas, settings.read_policy, facts)

        # 4. write: make the users (ids made in Python), predict each one's partition (appendix
        #    A), insert them all in one transaction on the primary, and commit
        try:
            if settings.users <= 100:
                models = [User(first_name=user_name(number)) for number in range(settings.users)]
                ids = [model.id.bytes for model in models]
                predicted = Counter(predict_partition(id_bytes, facts.partitions).oid for id_bytes in ids)
                written = commit(
                    primary, ids, predicted, "ORM", lambda session: add_users(session, models), bool(shards)
                )
            else:  # the ORM is the path to read, and the wrong one for a million rows: appendix B
                written = insert_many_users(primary, settings.users, facts.partitions)
        except CommitRefused as refused:  # with shards, some may have committed: appendix D counts
            raise refused.explained(shards) from None

        # From here on, this run's users are in the table: a failure must say so (appendix D).
        try:
            # 5. wait until the replicas have replayed the commit; read from the ones that did
            catchup = wait_for_replicas(router, written.commit_lsn, settings.catchup_timeout)

            # 6. read back: where each user landed (through the replicas, and on each shard
            #    itself), each partition, the first user, and which partitions a query reads
            landing = router.read(lambda session: where_users_landed(session, written.ids, settings.show))
            on_shards = {shard.service: users_on_shard(shard, written.ids) for shard in shards}
            contents = [
                router.read(lambda session, p=p: partition_contents(session, p, settings.show))
                for p in facts.partitions
            ]
            first = router.read(lambda session: session.scalar(select(User).order_by(User.id).limit(1)))
            pruning = router.read(lambda session: tables_read_by_queries(session, written.ids[0]))

            # 7. report: everything above, in one value
            return Report(
                facts, written, catchup, landing, on_shards, contents, first, pruning, settings.show, router.skipped
            )
        except (KeyboardInterrupt, ReadFailed, *DATABASE_ERRORS) as error:
            raise failure_after_commit(written, error) from None
    finally:
        # The run is over, one way or the other: a Ctrl-C while the connections close must not hide how it ended.
        with suppress(KeyboardInterrupt):
            for server in [primary, *replicas, *shards]:
                server.engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # psycopg, SQLAlchemy and python-dotenv log some failures themselves; the demo tells each once, its own way.
    for library in ("psycopg", "sqlalchemy", "dotenv"):
        logging.getLogger(library).disabled = True
    # SIGTERM (from `timeout`, systemd, `docker stop`, CI) and SIGHUP (a terminal closing) stop the
    # run as Ctrl-C does, and are told as truly: was anything committed? (appendix D)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt, as Python's default
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    report = None  # until run() returns: then the users are committed, and a failure must say so
    try:
        if Path(".env").is_file() or any(name.upper().startswith("DEMO_") for name in os.environ):
            warn(settings_warnings())  # probable mistakes, such as DEMO_USER for DEMO_USERS (appendix E)
        settings = read_flags(argv) if argv else load_settings(DemoSettings)  # flags: appendix E
        report = run(settings)
        if settings.json_output:
            print_json(report)  # appendix C
        else:
            print(render_text(report), flush=True)
        if not report.as_predicted():  # the report says MISMATCH or "not found": so does the exit code
            raise not_as_predicted(report.written)  # appendix D
    except DemoError as error:
        print(f"sharding_demo.py: error: {error}", file=sys.stderr)
        return error.exit_code
    except (OSError, KeyboardInterrupt) as error:  # `| head`, a full disk, Ctrl-C, SIGTERM, SIGHUP
        return stopped(error, report)  # appendix D
    finally:  # how the run ended is told: a signal from now on, as Python exits, would only print a traceback
        for each in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(each, signal.SIG_IGN)
    return 0


# ======== Step 2. Engines, and the checks before anything is written ============================


@dataclass(frozen=True, eq=False)
class Server:
    service: str  # the docker-compose.yml service, e.g. "replica-one"
    address: str
    settings: DatabaseSettings
    engine: Engine
    watchdog: Watchdog  # which watches its connections, and knows if it had to cut one off

    def __str__(self) -> str:  # how a message names it: "replica-one (127.0.0.1:5433)"
        return f"{self.service} ({self.address})"


def make_server(settings: DatabaseSettings, connect_timeout: int, watchdog: Watchdog) -> Server:
    # URL.create quotes each part itself, so a password with @ : / % or spaces works; building
    # "postgresql://user:password@host/db" with an f-string would not.
    password = settings.password.get_secret_value()
    url = URL.create("postgresql+psycopg", settings.user, password, settings.host, settings.port, settings.name)
    engine = create_engine(
        url,
        # Without this, SQLAlchemy looks up the hstore type when an engine first connects: noise in
        # the statement logs you are invited to read.
        use_native_hstore=False,
        # Each transaction names its level, so that a default of 'serializable' (ALTER DATABASE ... SET
        # default_transaction_isolation, say), which a hot standby refuses, cannot fail the demo's questions.
        isolation_level="READ COMMITTED",
        connect_args={
            "application_name": "sharding_demo",  # shows in those logs, and in pg_stat_activity
            "connect_timeout": connect_timeout,
            # The demo asks each server what it is itself: a PGTARGETSESSIONATTRS in the environment must
            # not have libpq turn a replica away first ("session is read-only").
            "target_session_attrs": "any",
            # When the watchdog (below) cuts a connection off, its server process would go on with the statement,
            # waiting for a lock, say, until it next wrote to us. With this it checks every second that we are still
            # there, and ends the statement if not (PostgreSQL 14 and later). This would replace a PGOPTIONS of
            # yours, so that goes first.
            "options": f"{os.environ.get('PGOPTIONS', '')} -c client_connection_check_interval=1s",
        },
    )
    host = f"[{settings.host}]" if ":" in settings.host else settings.host  # an IPv6 address: [::1]:5432
    server = Server(settings.service, f"{host}:{settings.port}", settings, engine, watchdog)
    # insert=True: watched before SQLAlchemy's own first questions on an engine's first connection (show
    # standard_conforming_strings, and others), whose listener comes first otherwise: a server that stops just then
    # must not hang the demo either.
    event.listen(engine, "connect", lambda connection, _: watchdog.watch(connection, server), insert=True)
    event.listen(engine, "close", lambda connection, _: watchdog.forget(connection))
    return server


class Watchdog:
    """Gives up on a server that stops answering, so that no wait lasts for ever. A server paused with
    SIGSTOP keeps its connections open and its kernel acknowledges every packet, so TCP keepalives pass
    and libpq would wait for ever; TCP notices a hung host or a cut network only after about 15 minutes
    (retransmissions) or over two hours (keepalives), with Linux's defaults. So a thread looks at each
    connection ten times a second and shuts down (shutdown(2)) one that has had a statement in
    flight, with no progress, for stall_timeout seconds: that needs nothing from the other side, and
    the waiting call returns at once with an error. A long load notes its progress (appendix B), so it is not
    cut short."""

    def __init__(self, stall_timeout: float) -> None:
        self.stall_timeout, self.deadline = stall_timeout, float("inf")  # the catch-up wait sets a deadline
        self.watched: dict[Any, tuple[Server, float | None]] = {}  # psycopg connection: (server, busy since)
        self.gave_up_on: dict[str, str] = {}  # the services it cut off, and why
        self.servers: dict[str, Server] = {}  # every server it has watched, by service: each one the demo got into
        self.last_progress, self.lock = time.monotonic(), threading.Lock()
        threading.Thread(target=self.look, daemon=True).start()

    def watch(self, connection: psycopg.Connection[Any], server: Server) -> None:
        with self.lock:
            self.watched[connection] = (server, None)
            self.servers[server.service] = server

    def forget(self, connection: psycopg.Connection[Any]) -> None:
        with self.lock:  # SQLAlchemy calls this before it closes the connection
            self.watched.pop(connection, None)

    def look(self) -> None:
        last_look = time.monotonic()
        while True:
            time.sleep(0.1)
            with self.lock:
                now = time.monotonic()
                paused, last_look = now - last_look - 0.1, now
                if paused > 1:  # this process did not run for a while: Ctrl-Z, then `fg` (appendix D)
                    allow_for_a_pause(self, paused)
                for connection, (server, since) in list(self.watched.items()):
                    if connection.pgconn.transaction_status != TransactionStatus.ACTIVE:
                        self.watched[connection] = (server, None)
                    elif since is None:
                        self.watched[connection] = (server, now)
                    elif now > self.deadline or now - max(since, self.last_progress) > self.stall_timeout:
                        del self.watched[connection]
                        give_up(self, server, connection, now)  # say why, and cut it off: appendix D


@dataclass(frozen=True)
class Partition:
    """A partition of tbl_users: it takes the rows whose hash(id) % modulus == remainder."""

    oid: int  # what a row's tableoid names
    schema: str
    name: str
    modulus: int
    remainder: int
    bound: str  # as pg_get_expr writes it: "FOR VALUES WITH (modulus 4, remainder 0)"
    shard: str | None  # the shard that stores it, if it is a foreign table there, e.g. "shard-one"


@dataclass(frozen=True)
class PrimaryFacts:
    version: str
    identity: tuple[bool, int, datetime]  # its answer to IDENTITY
    partitions: list[Partition]


# Who a server is: a standby (in recovery) or not; of which cluster (initdb made the system
# identifier, and every clone of that server shares it); since when it runs.
IDENTITY = "SELECT pg_is_in_recovery(), system_identifier, pg_postmaster_start_time() FROM pg_control_system()"

# tbl_users' partitions: pg_inherits links each to it; pg_foreign_table says on which foreign server
# (postgres_fdw) a partition is stored, if it is a foreign table, and, in its options, as which table there
# (schema_name and table_name; each is the foreign table's own unless set).
PARTITIONS = """
    SELECT c.oid, n.nspname, c.relname, pg_get_expr(c.relpartbound, c.oid), replace(s.srvname, '_', '-'),
           c.relkind, pg_get_partkeydef(i.inhparent),
           has_table_privilege(c.oid, 'SELECT') AND has_schema_privilege(n.oid, 'USAGE'),
           coalesce(o.schema_name, n.nspname), coalesce(o.table_name, c.relname)
    FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid JOIN pg_namespace AS n ON n.oid = c.relnamespace
    LEFT JOIN pg_foreign_table AS f ON f.ftrelid = c.oid LEFT JOIN pg_foreign_server AS s ON s.oid = f.ftserver
    LEFT JOIN LATERAL (SELECT max(option_value) FILTER (WHERE option_name = 'schema_name') AS schema_name,
                              max(option_value) FILTER (WHERE option_name = 'table_name') AS table_name
                       FROM pg_options_to_table(f.ftoptions)) AS o ON true
    WHERE i.inhparent = to_regclass('tbl_users') ORDER BY c.relname"""


def check_primary(primary: Server) -> PrimaryFacts:
    """Is the primary reachable and a primary, and how is tbl_users partitioned? The demo predicts
    rows for hash on id into plain tables, or foreign tables on one of its shards, that it may read
    and that cover every remainder; it refuses any other layout (appendix D says why)."""
    try:
        with primary.engine.connect() as connection:
            version = connection.scalar(text("SHOW server_version"))
            identity = tuple(connection.execute(text(IDENTITY)).one())
            rows = connection.execute(text(PARTITIONS)).all()
    except DATABASE_ERRORS as error:
        raise primary_failed(primary, error) from None
    partitions = []
    for oid, schema, name, bound, shard, *kind_key_readable_remote in rows:
        match = re.fullmatch(r"FOR VALUES WITH \(modulus (\d+), remainder (\d+)\)", bound)
        # a plain table ("r"), or a foreign table ("f") on a shard; hashed on id; readable by us; stored there (a
        # foreign table) under its own schema and name, so that step 6 finds each row on the shard by its name
        expected = ["r" if shard is None else "f", "HASH (id)", True, schema, name]
        if kind_key_readable_remote != expected or match is None or shard not in (None, "shard-one", "shard-two"):
            raise unusable_partition(primary, f"{schema}.{name}", shard, *kind_key_readable_remote)
        partitions.append(Partition(oid, schema, name, int(match[1]), int(match[2]), bound, shard))
    facts = PrimaryFacts(str(version), identity, partitions)  # type: ignore[arg-type]
    if identity[0] or not partitions or uncovered_remainders(partitions):
        raise unusable_primary(primary, facts)
    return facts


# The partitions (:names, in :schemas) that a server does not store as tables of its own, each a partition with the
# bound (:bounds) that master-db gives it. master-db and its replicas have foreign tables of those names: not shards.
# format('%I.%I') quotes each name, as postgres_fdw does: to_regclass('Tbl_P0') alone would find tbl_p0.
NOT_STORED_HERE = text("""
    SELECT expected.name
    FROM unnest(CAST(:schemas AS text[]), CAST(:names AS text[]), CAST(:bounds AS text[]))
         AS expected (schema, name, bound)
    LEFT JOIN pg_class AS c ON c.oid = to_regclass(format('%I.%I', expected.schema, expected.name))
    WHERE c.relkind IS DISTINCT FROM 'r' OR pg_get_expr(c.relpartbound, c.oid) IS DISTINCT FROM expected.bound""")


# Who a shard is: its cluster, since when it runs, and which database. init-shard.sh makes the same
# question a view on each shard, shard_identity, that master-db reads with a foreign table of its own.
WHO_IS_THE_SHARD = "SELECT system_identifier, pg_postmaster_start_time(), current_database() FROM pg_control_system()"


def check_shard(shard: Server, primary: Server, facts: PrimaryFacts) -> Server:
    """Before the write: a shard that is down, does not store its partitions itself, or is not the very
    server that master-db stores them on (a setting that points at another server, or at a look-alike
    elsewhere), stops the run, and nothing is written on any shard."""
    stored_here = [partition for partition in facts.partitions if partition.shard == shard.service]
    names = [p.name for p in stored_here]
    expected = {"schemas": [p.schema for p in stored_here], "names": names, "bounds": [p.bound for p in stored_here]}
    try:
        with shard.engine.connect() as connection:
            missing = list(connection.scalars(NOT_STORED_HERE, expected))
            # Step 6 reads the shard's own tbl_users, to prove where each row is: may this user read it?
            readable = connection.scalar(text("SELECT has_table_privilege(to_regclass('tbl_users'), 'SELECT')"))
            itself = tuple(connection.execute(text(WHO_IS_THE_SHARD)).one())
    except DATABASE_ERRORS as error:
        raise shard_failed(shard, names, error) from None
    if missing:
        raise shard_failed(shard, missing, None)
    if not readable:
        raise shard_failed(shard, names, None, readable=False)
    # The same question, asked through master-db: its foreign table shard_one_identity reads shard-one's view.
    name = shard.service.replace("-", "_") + "_identity"
    identity = table(name, column("system_identifier"), column("started_at"), column("database"))
    try:
        with primary.engine.connect() as connection:
            seen_by_primary = tuple(connection.execute(select(identity)).one())
    except DATABASE_ERRORS as error:
        raise shard_unseen(shard, names, name, primary, error) from None  # appendix D
    if itself != seen_by_primary:
        raise not_that_shard(shard, names, itself, seen_by_primary)  # appendix D
    return shard


# ======== Step 3. Routing =======================================================================


@dataclass(frozen=True)
class Skipped:
    replica: Server
    reason: str
    when: str  # "waited for" (then, before any read) or "during the reads"


@dataclass(frozen=True)
class Answer(Generic[T]):
    value: T
    server: Server  # which server answered: a standby of the primary, or the primary itself


class ReadWriteRouter:
    """Writes go to the primary: a hot standby refuses them. Each read goes to a replica still in
    use, at random (as GORM's dbresolver RandomPolicy) or in turn, and its answer must come from a
    standby of this primary. A replica that fails, or answers as something else (promoted, say), is
    left out and the read tried on another: the failover the original demo promised. With no replica
    left, reads go to the primary."""

    def __init__(self, primary: Server, replicas: list[Server], policy: str, facts: PrimaryFacts) -> None:
        self.primary, self.replicas_in_use, self.policy, self.facts = primary, replicas, policy, facts
        self.skipped: list[Skipped] = []
        self.turn = 0
        # Each server by its system identifier and start time, as the first replica setting that reached it: two
        # settings (a port copied from one to the other, say) may point at the same server.
        self.first_seen_as: dict[tuple[int, datetime], Server] = {}

    def for_read(self) -> Server:
        if not self.replicas_in_use:
            return self.primary
        self.turn += 1
        if self.policy == "round-robin":
            return self.replicas_in_use[self.turn % len(self.replicas_in_use)]
        return random.choice(self.replicas_in_use)

    def not_a_standby(self, replica: Server, identity: Any) -> str | None:
        """None if the server is in recovery with the primary's system identifier, is asked for the primary's
        database, and is not a server that another replica setting reached first; else what it is. (A standby of
        another cluster, or another database, has other rows.)"""
        same_database = replica.settings.name == self.primary.settings.name
        itself = self.first_seen_as.setdefault((identity[1], identity[2]), replica) is replica
        if identity[0] and identity[1] == self.facts.identity[1] and same_database and itself:
            return None
        return what_it_is_instead(self, replica, tuple(identity))  # appendix D

    def read(self, work: Callable[[Session], T]) -> Answer[T]:
        """Run `work` in one read-only transaction on a replica (or on the primary, if none is left)."""
        while True:
            server = self.for_read()
            # REPEATABLE READ: all of `work` sees one snapshot, so a count and the rows listed agree,
            # even while others write. Hot standbys allow it. (Sharded, one snapshot per shard, each taken
            # when `work` first reaches it: a partition's count and rows still agree. docs/sharding.md)
            engine = server.engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            try:
                with Session(engine) as session:
                    result = work(session)
                    identity = session.execute(text(IDENTITY)).one()  # who answered, in the same transaction
            except DATABASE_ERRORS as error:
                fail_over(self, server, error)  # leave it out, or raise if no other would do better: appendix D
                continue
            problem = None if server is self.primary else self.not_a_standby(server, identity)
            if problem is None:
                return Answer(result, server)
            leave_out(self, server, f"{problem}; its answer was not used", when="during the reads")


# ======== Step 4. Write =========================================================================


@dataclass(frozen=True)
class Written:
    """What the write made: this run's users, and where their commit is in the WAL."""

    ids: Sequence[bytes]  # user number n's id is ids[n]
    predicted: Counter[int]  # this run's users per partition oid, as predicted in Python
    method: str  # "ORM" or "COPY"
    stored: int  # the rows that the server said its INSERTs (or COPYs) stored: see add_users
    primary: Server
    commit_lsn: str  # the replicas must replay the WAL up to here

    @property
    def users(self) -> int:
        return len(self.ids)


# The wait for the replicas needs to know where the commit is in the WAL once COMMIT returns. With
# synchronous_commit = off it does not: COMMIT returns before its record is written (the WAL writer writes it a
# moment later). So the write's transaction asks for 'local' then: written and flushed here, no standby waited for.
COMMIT_WRITTEN = text(
    "SELECT set_config('synchronous_commit', 'local', true) WHERE current_setting('synchronous_commit') = 'off'"
)

# Nor does it when the transaction wrote no WAL of its own: PostgreSQL then leaves its COMMIT record to the WAL writer
# too, and waits for no standby, whatever synchronous_commit says (RecordTransactionCommit, in
# src/backend/access/transam/xact.c). On the sharded layout that is master-db's transaction: its INSERTs go to the
# shards. A message in the WAL, which logical decoding would pass on and a replica replays as a no-op, is WAL of its
# own: COMMIT then writes its record first. 'local' keeps the rest as it was: master-db's standbys hold none of the
# rows, which the shards have committed before master-db does, so its COMMIT still waits for none of them. (And
# 'local' is what COMMIT_WRITTEN would ask for when the setting is 'off': one statement does for both.)
WAL_OF_ITS_OWN = text(
    "SELECT pg_logical_emit_message(true, 'sharding_demo', 'users sent to the shards'),"
    " set_config('synchronous_commit', 'local', true)"
)


def add_users(session: Session, models: list[User]) -> int:
    """The ORM's INSERTs, sent now (flush), inside the transaction; returns how many rows the server says they
    stored. A rule (DO INSTEAD NOTHING) or a trigger can keep a row out without an error: only each INSERT's own
    count, its command tag ("INSERT 0 4"), says so. The ORM does not return it, but each statement's cursor has it."""
    counts: list[int] = []

    def count(connection: Any, cursor: Any, *_: Any) -> None:
        counts.append(cursor.rowcount)

    event.listen(session.connection(), "after_cursor_execute", count)
    session.add_all(models)
    session.flush()
    event.remove(session.connection(), "after_cursor_execute", count)
    return sum(counts)


def commit(
    primary: Server,
    ids: Sequence[bytes],
    predicted: Counter[int],
    method: str,
    write: Callable[[Session], int],
    sharded: bool,
) -> Written:
    """Run `write` in one transaction on the primary, commit, and note where the commit is in the
    WAL. Until the COMMIT a failure rolls everything back; after it the users are in the table; a
    failure *during* it says what it knows (appendix D). PostgreSQL has no two-phase commit through
    postgres_fdw: if one shard refuses the COMMIT, another may have committed already."""
    stage, xid, commit_lsn, stored = "before", None, "unknown", 0
    with Session(primary.engine) as session:
        try:
            session.begin()
            session.execute(WAL_OF_ITS_OWN if sharded else COMMIT_WRITTEN)
            # The transaction's id. If no answer to the COMMIT comes back, a new connection can ask the
            # primary, with pg_xact_status(), whether it committed (appendix D).
            xid = session.scalar(text("SELECT CAST(pg_current_xact_id() AS text)"))
            stored = write(session)  # the INSERTs (or COPYs) are sent now, inside the transaction
            stage = "during"
            session.commit()
            stage = "after"
            # The commit record is written now: pg_current_wal_lsn(), the end of the WAL written so far, is at its end
            # or past it.
            commit_lsn = str(session.scalar(text("SELECT pg_current_wal_lsn()")))
            # Give the connection back here, still inside this try: a Ctrl-C meanwhile is told as after the commit.
            session.close()
            return Written(ids, predicted, method, stored, primary, commit_lsn)
        except (KeyboardInterrupt, *DATABASE_ERRORS) as error:
            # Close the connection without a ROLLBACK (it may be dead): the server rolls back an
            # open transaction whose connection goes away.
            session.invalidate()
            written = Written(ids, predicted, method, stored, primary, commit_lsn)
            raise failure_of_the_write(written, stage, error, xid) from None


# ======== Step 5. Wait for the replicas (read-your-writes) ======================================

# Who a replica is (as IDENTITY), and how many bytes of WAL it still has to replay to reach :lsn.
CAUGHT_UP = text(
    "SELECT pg_is_in_recovery(), system_identifier, pg_postmaster_start_time(),"
    " pg_wal_lsn_diff(CAST(:lsn AS pg_lsn), pg_last_wal_replay_lsn()) FROM pg_control_system()"
)


def wait_for_replicas(router: ReadWriteRouter, commit_lsn: str, timeout: float) -> dict[str, float]:
    """Wait until the replicas have replayed WAL up to `commit_lsn`, one deadline for all; return how
    long each took, and leave out the others, and any that is not a standby of the primary. Each is
    asked in turn, every 10 ms, who it is and how far it has replayed: it is where the reads will go.
    (PostgreSQL's own tests, Cluster::wait_for_catchup, ask the primary instead.)"""
    started, caught_up, waiting = time.monotonic(), {}, list(router.replicas_in_use)
    asked = list(waiting)
    router.primary.watchdog.deadline = started + timeout  # it cuts off a question unanswered by then
    try:
        while waiting:
            for replica in list(waiting):
                # A transaction per question: each sees the replica as it is now. (Not AUTOCOMMIT: that would
                # drop the engine's READ COMMITTED for the session's default isolation, which a hot standby
                # refuses if PGOPTIONS makes it 'serializable'; test_misuse.py.)
                try:
                    with replica.engine.connect() as connection:
                        *identity, lag = connection.execute(CAUGHT_UP, {"lsn": commit_lsn}).one()
                    problem = router.not_a_standby(replica, identity)
                except DATABASE_ERRORS as error:
                    problem = replica_failure(replica, error)
                elapsed = time.monotonic() - started
                if not problem and lag is not None and lag <= 0:
                    caught_up[replica.service] = elapsed
                    waiting.remove(replica)
                elif problem or elapsed >= timeout:
                    leave_out(router, replica, problem or still_behind(lag, elapsed), when="waited for")
                    waiting.remove(replica)
            time.sleep(0.01)
    finally:
        router.primary.watchdog.deadline = float("inf")
        # A connection takes its settings (ALTER DATABASE ... SET search_path, say) as the server has them when it
        # opens. The reads must not use one opened before the replica had replayed this far: close the wait's.
        for replica in asked:
            replica.engine.dispose()
    return caught_up


# ======== Step 6. Read back from the replicas, and from the shards ==============================


def where_users_landed(session: Session, ids: Sequence[bytes], show: int) -> tuple[Counter[int], dict[int, int]]:
    """Where the server put this run's users: how many in each partition (by oid), and the partition of each of the
    first `show`. tableoid is the system column that names the table a row is stored in."""
    if len(ids) > 100:
        return where_many_users_landed(session, ids, show)  # appendix B
    query = text("SELECT id, tableoid FROM tbl_users WHERE id = ANY(:ids)")
    rows = session.execute(query, {"ids": [uuid.UUID(bytes=id_bytes) for id_bytes in ids]})
    landed = {user_id.bytes: partition_oid for user_id, partition_oid in rows}  # one of ours may be missing
    shown = {number: landed[ids[number]] for number in range(min(show, len(ids))) if ids[number] in landed}
    return Counter(landed.values()), shown


def users_on_shard(shard: Server, ids: Sequence[bytes]) -> Counter[str]:
    """The proof of sharding: this run's users that the shard itself stores, per partition, read on
    the shard directly (not through master-db). The shard's own tbl_users holds its partitions."""
    try:
        with Session(shard.engine) as session:
            counts, _ = where_users_landed(session, ids, 0)
            query = text("SELECT oid, relname FROM pg_class WHERE oid = ANY(:oids)")
            names = dict(session.execute(query, {"oids": list(counts)}).all())
    except DATABASE_ERRORS as error:
        raise ReadFailed(shard, error) from error  # told as this shard's, by name (appendix D)
    return Counter({names[oid]: count for oid, count in counts.items()})


def partition_contents(session: Session, partition: Partition, show: int) -> tuple[int, list[Any]]:
    """One partition, read as the ordinary table it is: its count and first rows. It is named by the
    schema and name from the catalog (SQLAlchemy quotes them), not through the search_path, where
    another table of the same name could come first. The first user, below, is read through the
    parent, which reads every partition: ids are UUIDv7, so the smallest is the oldest user."""
    rows = table(partition.name, column("id", Uuid()), column("first_name", String()), schema=partition.schema)
    count = session.scalar(select(func.count()).select_from(rows)) or 0
    return count, list(session.execute(select(rows).order_by(rows.c.id).limit(show)))


def created_at(user_id: uuid.UUID) -> datetime | None:
    """A UUIDv7's creation time: uuid6's UUID type reads its first 48 bits, milliseconds since 1970."""
    if user_id.version != 7:
        return None
    return datetime.fromtimestamp(uuid6.UUID(int=user_id.int).time / 1000, tz=UTC)


def tables_read_by_queries(session: Session, id_bytes: bytes) -> tuple[list[str], list[str]]:
    """What partitioning buys: the planner drops each partition whose bound cannot match the
    condition on the key ("pruning"). EXPLAIN shows the server's plan without running it."""
    explain = "EXPLAIN (VERBOSE, FORMAT JSON) SELECT * FROM tbl_users WHERE "
    by_id = session.scalar(text(explain + "id = :id"), {"id": uuid.UUID(bytes=id_bytes)})
    by_name = session.scalar(text(explain + "first_name = :name"), {"name": DEMO_NAMES[0]})
    return scanned_tables(by_id[0]["Plan"]), scanned_tables(by_name[0]["Plan"])


def scanned_tables(plan: dict[str, Any]) -> list[str]:
    """The tables a plan reads: its nodes that name a relation (a Seq, Index or Foreign Scan)."""
    found = [f"{plan['Schema']}.{plan['Relation Name']}"] if "Relation Name" in plan else []
    return found + [name for child in plan.get("Plans", []) for name in scanned_tables(child)]


# ======== Step 7. Report: one value made of the steps' results, shown as text (or JSON, appendix C) ===


@dataclass(frozen=True)
class Report:
    primary: PrimaryFacts
    written: Written
    catchup: dict[str, float]  # seconds each replica took to replay the commit
    landing: Answer[tuple[Counter[int], dict[int, int]]]  # users per partition oid; those of the first `show`
    on_shards: dict[str, Counter[str]]  # this run's users that each shard stores, per partition
    contents: list[Answer[tuple[int, list[Any]]]]  # per partition: its count, and its first rows
    first_user: Answer[User | None]
    pruning: Answer[tuple[list[str], list[str]]]  # the tables read with, and without, the key
    show: int
    skipped: list[Skipped]

    def new_users(self) -> list[tuple[int, Partition, Partition | None]]:
        """The first `show` new users: number, predicted partition, actual one (None: not found)."""
        by_oid = {partition.oid: partition for partition in self.primary.partitions}
        ids, landed = self.written.ids, self.landing.value[1]
        return [
            (number, predict_partition(ids[number], self.primary.partitions), by_oid.get(landed.get(number, 0)))
            for number in range(min(self.show, len(ids)))
        ]

    def as_predicted(self) -> bool:
        """Is each of this run's users where it was predicted: each one listed, each partition's count, each shard?"""
        listed = all(actual == predicted for _, predicted, actual in self.new_users())
        landed, predicted = self.landing.value[0], self.written.predicted
        counted = all(landed[partition.oid] == predicted[partition.oid] for partition in self.primary.partitions)
        return listed and counted and self.shards_as_predicted() == "yes"

    def shards_as_predicted(self) -> str:
        """Does each shard store exactly the users predicted for its partitions, and no others?"""
        wrong = []
        for partition in self.primary.partitions:
            for shard, held in self.on_shards.items():
                expected = self.written.predicted[partition.oid] if shard == partition.shard else 0
                if held.get(partition.name, 0) != expected:
                    wrong.append(f"{shard} has {held.get(partition.name, 0):,} in {partition.name}, not {expected:,}")
        return "yes" if not wrong else "MISMATCH: " + "; ".join(wrong)


def render_text(report: Report) -> str:
    written, primary = report.written, report.written.primary

    def where(server: Server) -> str:  # "replica-one 127.0.0.1:5433, standby, in recovery"
        role = "primary, not in recovery" if server is primary else "standby, in recovery"
        return f"{server.service} {server.address}, {role}"

    def stored(partition: Partition) -> str:
        return f" on {partition.shard}" if partition.shard else ""

    def more(count: int, listed: int) -> list[str]:  # the line below a list that --show cut short
        if count <= listed:
            return []
        return [f"  ... and {count - listed:,} more" if listed else "  none listed (--show 0)"]

    # Which partitions the shards store: all of them on the sharded layout, some during a move (docs/sharding.md).
    foreign = [partition.name for partition in report.primary.partitions if partition.shard]
    if not foreign:
        stored_where = ""
    elif len(foreign) == len(report.primary.partitions):
        stored_where = " Its partitions are foreign tables on the shards."
    else:
        stored_where = f" {', '.join(foreign)}: foreign tables on the shards."
    inserted, kept_out = f"{written.users:,} users", []
    if written.stored != written.users:  # a rule or a trigger kept some out, without an error (add_users)
        inserted = f"{written.stored:,} of {written.users:,} users"
        kept_out = [f"By its own count, it kept {written.users - written.stored:,} out (a rule or a trigger, say)."]
    waits = [f"  {name}: caught up in {seconds * 1000:,.0f} ms" for name, seconds in report.catchup.items()]
    if report.skipped:  # replicas left out: by the wait, told here, and during the reads, at the end (appendix D)
        waits += left_out_by_the_wait(report)
    lines = [
        f"PostgreSQL {report.primary.version}",
        "tbl_users is hash partitioned: a partition FOR VALUES WITH (modulus m, remainder r) takes the rows",
        "whose hash(id) mod m = r." + stored_where,
        "",
        f"Inserted {inserted} ({written.method}) in one transaction on {where(primary)}.",
        *kept_out,
        # (Unless synchronous_commit = remote_apply and synchronous_standby_names say so: docs/read-your-writes.md.)
        f"Committed at WAL position {written.commit_lsn}. By default COMMIT does not wait for the replicas",
        "to replay it, so the demo waits for them, and then reads from those that did (read-your-writes):",
        *sorted(waits),
        "",
        "Each new user: the partition predicted in Python before the insert -> where the server put it",
        f"(tableoid, read from {where(report.landing.server)}):",
    ]
    for number, predicted, actual in report.new_users():
        found = actual.name + stored(actual) if actual else "not found"
        verdict = "ok" if actual == predicted else "MISMATCH"
        user_id = uuid.UUID(bytes=written.ids[number])
        lines.append(f"  {user_name(number):<12} {user_id}  {predicted.name}{stored(predicted)} -> {found}  {verdict}")
    if written.users > report.show:
        lines += [*more(written.users, report.show), *landing_table(report)]  # appendix B
    if report.on_shards:
        lines += ["", "Read on each shard itself (not through master-db): this run's users it stores, by partition:"]
        for shard, held in report.on_shards.items():
            counts = [f"{name} {count:,}" for name, count in sorted(held.items())]
            lines.append(f"  {shard}: {', '.join(counts) or 'none'}")
        lines.append(f"  as predicted, and on no other shard: {report.shards_as_predicted()}")

    by_id, by_name = report.pruning.value
    partition_named = {f"{partition.schema}.{partition.name}": partition for partition in report.primary.partitions}

    def reads(tables: list[str]) -> str:  # "public.tbl_users_p0 on shard-one": which shards a query reaches
        return ", ".join(name + stored(partition_named[name]) for name in tables)

    # This run's users that the reads found: all of them, unless a rule (DO INSTEAD NOTHING), a row-level security
    # policy or another session's DELETE kept some out of sight.
    found, users = sum(report.landing.value[0].values()), written.users
    ours = f"this run's {users:,} included"
    if found != users:
        ours = f"but only {found:,} of this run's {users:,} (the reads did not find the others)"
    lines += [
        "",
        f"Partition pruning, in the server's own plans (EXPLAIN, on {report.pruning.server.service}):",
        f"  WHERE id = <{user_name(0)}'s id> reads {reads(by_id)}",
        f"  WHERE first_name = '{user_name(0)}' reads {reads(by_name)}",
        "",
        f"The table now holds {sum(answer.value[0] for answer in report.contents):,} users: every run's, {ours}.",
        "(To start afresh: TRUNCATE tbl_users on the primary.)",
    ]
    for partition, answer in zip(report.primary.partitions, report.contents, strict=True):
        count, rows = answer.value
        lines += ["", f"Partition {partition.name}: {count:,} record{'' if count == 1 else 's'}{stored(partition)}"]
        lines.append(f"  {partition.bound}; read from {where(answer.server)}")
        lines += [f"  - {first_name} (ID: {user_id})" for user_id, first_name in rows]
        lines += more(count, len(rows))

    first = report.first_user.value
    if first is not None:
        created, server = created_at(first.id), where(report.first_user.server)
        if created is None:  # a row written some other way, with gen_random_uuid() say: its id says nothing of time
            lines += ["", f"User: {first.first_name} (ID: {first.id}, not a UUIDv7, so no creation time to read)"]
            lines.append(f"  the smallest id in the table, but not a time-ordered one; read from {server}")
        else:
            lines += ["", f"User: {first.first_name} (ID: {first.id}, CreatedDate: {created:%Y-%m-%d %H:%M:%S} UTC)"]
            lines.append("  the smallest id in the table: the oldest user of every run so far")
            lines.append(f"  its creation time is decoded from the UUIDv7 itself; read from {server}")
    if report.skipped:
        lines += left_out_during_the_reads(report)
    return "\n".join(lines)


# ================================================================================================
# The lesson ends here. Appendix A is the one place it sends you; B to E run only when their case
# arises: more than 100 users, --json, a failure, flags, a .env file. (A sharded run stays up here too.)
# ================================================================================================


# ======== Appendix A. Predicting the partition exactly as the server does =======================
#
# When a row arrives at a hash-partitioned table, PostgreSQL:
#   1. hashes each partition-key column with its type's *extended* hash function, seeded with
#      HASH_PARTITION_SEED (compute_partition_hash_value in src/backend/partitioning/partbounds.c).
#      For a uuid that is uuid_hash_extended (src/backend/utils/adt/uuid.c): hash_bytes_extended
#      (src/common/hashfn.c), Bob Jenkins' lookup3 hash, over its 16 bytes;
#   2. folds the column hashes into one 64-bit row hash with hash_combine64, from 0
#      (src/include/common/hashfn.h); for a single column that adds a constant;
#   3. takes the row hash modulo the greatest modulus among the partitions, and picks the partition
#      whose remainder matches (get_partition_for_tuple in src/backend/executor/execPartition.c).
#
# lookup3 keeps three 32-bit words, a, b and c. For a key of 16 bytes it starts them from a constant
# plus the length; adds the seed's two halves to a and b and mixes (the same for every key, so done
# once, below); adds the key's first 12 bytes, as three words, and mixes; adds the last 4 bytes to a
# and mixes a final time; and returns b and c as one 64-bit value. C's uint32 arithmetic wraps
# around and Python's ints do not: hence the `& M` (mod 2**32) throughout. `x << k | x >> 32 - k`
# is hashfn.c's rot(x, k). The mixing is written out, not called through a rot() function, because
# a million ids are hashed here in Python and each call would cost more than the arithmetic.
#
# Assumption: a little-endian server (x86-64, ARM64 as normally run). lookup3 reads the key as
# words in the machine's byte order, so a big-endian server hashes, and places rows, differently.

HASH_PARTITION_SEED = 0x7A5B22367996DCFD  # src/include/catalog/partition.h
HASH_COMBINE64_CONSTANT = 0x49A0F4DD15E5A8E3  # "64bit random data", src/include/common/hashfn.h
M = 0xFFFFFFFF  # 2**32 - 1


def lookup3_mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    """mix(a, b, c) in src/common/hashfn.c."""
    a = ((a - c) & M) ^ ((c << 4 | c >> 28) & M)
    c = (c + b) & M
    b = ((b - a) & M) ^ ((a << 6 | a >> 26) & M)
    a = (a + c) & M
    c = ((c - b) & M) ^ ((b << 8 | b >> 24) & M)
    b = (b + a) & M
    a = ((a - c) & M) ^ ((c << 16 | c >> 16) & M)
    c = (c + b) & M
    b = ((b - a) & M) ^ ((a << 19 | a >> 13) & M)
    a = (a + c) & M
    c = ((c - b) & M) ^ ((b << 4 | b >> 28) & M)
    b = (b + a) & M
    return a, b, c


def lookup3_final(a: int, b: int, c: int) -> tuple[int, int, int]:
    """final(a, b, c) in src/common/hashfn.c."""
    c = ((c ^ b) - (b << 14 | b >> 18)) & M
    a = ((a ^ c) - (c << 11 | c >> 21)) & M
    b = ((b ^ a) - (a << 25 | a >> 7)) & M
    c = ((c ^ b) - (b << 16 | b >> 16)) & M
    a = ((a ^ c) - (c << 4 | c >> 28)) & M
    b = ((b ^ a) - (a << 14 | a >> 18)) & M
    c = ((c ^ b) - (b << 24 | b >> 8)) & M
    return a, b, c


START = (0x9E3779B9 + 16 + 3923095) & M  # where a, b and c start for a 16-byte key
SEEDED = lookup3_mix((START + (HASH_PARTITION_SEED >> 32)) & M, (START + (HASH_PARTITION_SEED & M)) & M, START)


def partition_row_hash(id_bytes: bytes) -> int:
    """Steps 1 and 2 for tbl_users' key: a uuid's 16 bytes, in the order PostgreSQL stores them."""
    word0, word1, word2, word3 = struct.unpack("<4I", id_bytes)  # four little-endian 32-bit words
    a, b, c = lookup3_mix((SEEDED[0] + word0) & M, (SEEDED[1] + word1) & M, (SEEDED[2] + word2) & M)
    a, b, c = lookup3_final((a + word3) & M, b, c)
    return (b << 32 | c) + HASH_COMBINE64_CONSTANT & 0xFFFF_FFFF_FFFF_FFFF  # hash_combine64(0, hash)


def partition_of_remainder(remainder: int, partitions: Sequence[Partition]) -> Partition | None:
    """Step 3: the partition for a row hash with this remainder of the greatest modulus. Moduli may
    differ if each divides the greatest: a remainder 5 of 8 goes to modulus 4, remainder 1."""
    return next((p for p in partitions if remainder % p.modulus == p.remainder), None)


def predict_partition(id_bytes: bytes, partitions: Sequence[Partition]) -> Partition:
    """Where PostgreSQL will put this id, found in Python before anything is sent."""
    greatest_modulus = max(partition.modulus for partition in partitions)
    return partition_of_remainder(partition_row_hash(id_bytes) % greatest_modulus, partitions)  # type: ignore[return-value]


def uncovered_remainders(partitions: Sequence[Partition]) -> list[int]:
    """Remainders of the greatest modulus that no partition takes: rows there would be refused."""
    greatest_modulus = max(partition.modulus for partition in partitions)
    return [r for r in range(greatest_modulus) if partition_of_remainder(r, partitions) is None]


# ======== Appendix B. The bulk path: more than 100 users ========================================
#
# The lesson's path (User objects, session.add_all, an INSERT per row) is the one to read, and the
# wrong one for a million rows: an object and a statement per row. Here the ids go straight into
# one buffer of 16 bytes each (a million uuid.UUID objects would take 110 MB and keep the garbage
# collector busy; the buffer takes 16 MB), their partitions are counted, and the rows go to the
# server with COPY, PostgreSQL's bulk load: a statement, then the rows streamed in binary.
# bench/bench_insert.py measures both ways.


class IdBuffer(Sequence[bytes]):
    """Ids kept as one buffer of 16 bytes each: ids[n] is the n-th."""

    def __init__(self, buffer: bytes) -> None:
        self.buffer, self.count = buffer, len(buffer) // 16

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, number: int) -> bytes:  # type: ignore[override]
        if number < 0:  # as a list does: ids[-1] is the last
            number += self.count
        if not 0 <= number < self.count:  # which also ends a for loop over the ids
            raise IndexError(f"id {number} of {self.count}")
        return self.buffer[number * 16 : number * 16 + 16]


class UUIDv7Maker:
    """UUIDv7 ids that keep the time they were made, in strictly increasing order, at any rate.

    uuid6.uuid7(), which the lesson uses, keeps its ids in order by moving the timestamp 1 ms ahead
    for each id made within the same millisecond: 4 ms for the five users. But Python makes an id in
    about 2 µs: measured here, 1,000 ids came out up to 997 ms ahead of the clock, and a million up
    to 997,668 ms, 16 minutes (uuid6's issue #198), so the next run's ids would sort before them.
    This is RFC 9562's method 1, as Python 3.14's uuid.uuid7() is: after the 48-bit timestamp and
    the version, 42 bits are a counter that starts at a random value each new millisecond and counts
    up within it; the last 32 bits are random (os.urandom). The timestamp never runs ahead: it moves
    with the clock, or on counter overflow (2**41 ids in one millisecond, which Python cannot make);
    if the clock steps back, it keeps the last timestamp and counts on (docs/uuidv7.md).
    """

    def __init__(self) -> None:
        self.millisecond, self.counter = -1, 0

    def new(self) -> bytes:
        now = time.time_ns() // 1_000_000
        if now > self.millisecond:
            self.millisecond, self.counter = now, random_bits(41)  # a 42-bit counter, top bit 0
        else:  # the same millisecond (or the clock stepped back): keep the timestamp, count up
            self.counter += 1
            if self.counter >= 1 << 42:
                self.millisecond, self.counter = self.millisecond + 1, random_bits(41)
        value = (
            self.millisecond << 80
            | 0x7 << 76  # version 7
            | (self.counter >> 30) << 64  # the counter's top 12 bits
            | 0b10 << 62  # the variant of RFC 9562
            | (self.counter & 0x3FFF_FFFF) << 32  # its low 30 bits
            | random_bits(32)
        )
        return value.to_bytes(16, "big")


def random_bits(count: int) -> int:
    """`count` (up to 64) random bits from os.urandom, the OS's secure source that RFC 9562 advises."""
    return int.from_bytes(os.urandom(8)) >> (64 - count)


ROWS_PER_COPY = 10_000  # why: in copy_rows, below


def insert_many_users(primary: Server, count: int, partitions: Sequence[Partition]) -> Written:
    maker, buffer = UUIDv7Maker(), bytearray()
    made = progress_printer(count, "made the ids of")
    for number in range(count):
        buffer += maker.new()
        made(number + 1)
    ids = IdBuffer(bytes(buffer))

    # The same prediction as the lesson's, counted by remainder first: a million calls of
    # partition_of_remainder would cost more than the hashing.
    greatest_modulus = max(partition.modulus for partition in partitions)
    per_remainder = [0] * greatest_modulus
    predicted_progress = progress_printer(count, "predicted the partitions of")
    for number, offset in enumerate(range(0, len(ids.buffer), 16), start=1):
        per_remainder[partition_row_hash(ids.buffer[offset : offset + 16]) % greatest_modulus] += 1
        predicted_progress(number)
    predicted: Counter[int] = Counter()
    for remainder, users in enumerate(per_remainder):
        predicted[partition_of_remainder(remainder, partitions).oid] += users  # type: ignore[union-attr]

    loaded = progress_printer(count, "loaded")

    def copy_rows(session: Session) -> int:
        # COPY is psycopg's own API, which SQLAlchemy does not wrap: session.connection() is the
        # transaction's connection, and .connection.driver_connection the psycopg one under it.
        # Same connection, same transaction: the COPY commits or rolls back with the rest.
        connection = session.connection().connection.driver_connection
        statement = "COPY tbl_users (id, first_name) FROM STDIN (FORMAT BINARY)"
        stored = 0  # as the server counts them (COPY fires no rules, but a trigger may keep a row out)
        with connection.cursor() as cursor:
            # One COPY per ROWS_PER_COPY rows, all in this transaction. The server answers a COPY once it has
            # stored its rows; until then, what we have sent may sit unread in the kernel's socket buffers,
            # megabytes of it: measured on a sharded PostgreSQL 15, all 100,000 rows were sent in 1.1 s, and 10 s
            # later the server was still storing them. So each answer is the load's true progress: "loaded" means
            # stored, and the watchdog sees a load stand still only if the server takes a stall bound to store
            # ROWS_PER_COPY rows. (At 10^6 rows, 100 COPYs cost no time that the benchmark can see.)
            for first in range(0, count, ROWS_PER_COPY):
                last = min(first + ROWS_PER_COPY, count)
                with cursor.copy(statement) as copy:
                    # Binary COPY sends each field as its length and its bytes, which the server decodes with
                    # the column's type. A uuid's binary form is its 16 bytes, so the ids go as they are
                    # kept ("bytea" only tells psycopg to send bytes as they are).
                    copy.set_types(["bytea", "varchar"])
                    for number in range(first, last):
                        copy.write_row((ids[number], user_name(number)))
                stored += cursor.rowcount  # the COPY's command tag: "COPY 10000"
                primary.watchdog.last_progress = time.monotonic()  # a load that moves is not a server that stopped
                loaded(last)
        return stored

    return commit(primary, ids, predicted, "COPY", copy_rows, any(partition.shard for partition in partitions))


def where_many_users_landed(session: Session, ids: Sequence[bytes], show: int) -> tuple[Counter[int], dict[int, int]]:
    """where_users_landed for more than 100 users, where a list of every id in `id = ANY(...)` would be too big: a
    million uuid.UUID objects take 110 MB here. Our ids were made in increasing order, so one query lists the rows
    from our first id to our last, in id order, streamed (yield_per), and the demo walks it beside its own ids,
    passing over other runs' rows; one of ours that the server does not have is simply not found. Each id comes back
    as uuid_send(id), the uuid type's binary form: its 16 bytes, as the demo keeps its own ids, so no uuid.UUID object
    is made per row (at 10^6 rows: 1.15 s, not 1.9 s, on PostgreSQL 15)."""
    rows = session.execute(
        text("SELECT uuid_send(id), tableoid FROM tbl_users WHERE id BETWEEN :first AND :last ORDER BY id"),
        {"first": uuid.UUID(bytes=ids[0]), "last": uuid.UUID(bytes=ids[len(ids) - 1])},
        execution_options={"yield_per": 10_000},
    )
    counts, shown, ours, total = Counter[int](), {}, 0, len(ids)  # ours: the next of our ids to find
    for server_id, partition_oid in rows:
        while ours < total and ids[ours] < server_id:
            ours += 1  # one of ours that the server does not have
        if ours < total and ids[ours] == server_id:
            counts[partition_oid] += 1
            if ours < show:
                shown[ours] = partition_oid
            ours += 1
    return counts, shown


def progress_printer(total: int, verb: str) -> Callable[[int], None]:
    """For 100,000 users or more, say on stderr every 10% how far a step is ("loaded 300,000 of
    1,000,000 users"), so that a long wait visibly moves and stdout stays the report. A step may say
    how far it is after each user, or after each 10,000 (the load): each 10% passed is said once."""
    step = max(total // 10, 1)
    next_at = step if total >= 100_000 else total + 1  # below 100,000 users, nothing is said

    def progress(done: int) -> None:
        nonlocal next_at
        if done >= next_at:  # one comparison a call: the ids' steps call this a million times
            print(f"sharding_demo.py: {verb} {done:,} of {total:,} users", file=sys.stderr, flush=True)
            next_at = min((done // step + 1) * step, total)  # the next 10%, and the end at the latest

    return progress


def landing_table(report: Report) -> list[str]:
    """This run's users per partition, predicted and actual; from 1,000 users, also the spread (below
    that, 5 users over 4 partitions cannot split evenly, whatever the hash)."""
    landed, users = report.landing.value[0], report.written.users
    spread = users >= 1000
    header = f"  {'partition':<14} {'predicted':>10} {'actual':>10}" + (
        f" {'share':>8} {'vs even':>8}" if spread else ""
    )
    lines = ["", f"This run's {users:,} users by partition:", header]
    for partition in report.primary.partitions:
        line = f"  {partition.name:<14} {report.written.predicted[partition.oid]:>10,} {landed[partition.oid]:>10,}"
        if spread:
            share, deviation = share_and_deviation(landed[partition.oid], users, partition)
            # round, then + 0.0, so that -0.04 shows as 0.0, not -0.0
            line += f" {round(share * 100, 1) + 0.0:>7.1f}% {round(deviation * 100, 1) + 0.0:>+7.1f}%"
        lines.append(line)
    if spread:
        lines.append("  (vs even: how far the share is from the partition's even share, 1/modulus)")
    return lines


def share_and_deviation(actual: int, users: int, partition: Partition) -> tuple[float, float]:
    """A partition's share of this run's users, and how far that is from its even share, 1/modulus."""
    share = actual / users
    return share, share * partition.modulus - 1


# ======== Appendix C. JSON ======================================================================


def print_json(report: Report) -> None:
    """The report as one JSON object on stdout; the warnings also on stderr, one line each, since the
    text report names the replicas left out and a program reading JSON may not look for them."""
    written, landed, first = report.written, report.landing.value[0], report.first_user.value
    warnings = [f"{skip.replica} skipped: {skip.reason}" for skip in report.skipped]
    if primary_served_reads(report):
        warnings.append(f"no replica left: reads went to the primary {written.primary.service}")
    document = {
        "server_version": report.primary.version,
        **served_json(written.primary, report, "written_to"),
        "insert_method": written.method,
        "users_inserted": written.stored,  # by the server's count: fewer than users_sent if it kept some out
        "users_sent": written.users,
        "commit_lsn": written.commit_lsn,
        "catchup": [{"replica": name, "seconds": round(seconds, 4)} for name, seconds in report.catchup.items()],
        "inserted": [
            {
                "id": str(uuid.UUID(bytes=written.ids[number])),
                "first_name": user_name(number),
                "predicted_partition": predicted.name,
                "actual_partition": actual.name if actual else None,
            }
            for number, predicted, actual in report.new_users()
        ],
        "landing_checked_by": served_json(report.landing.server, report, "read_from"),
        "table_total": sum(answer.value[0] for answer in report.contents),
        "partitions": [
            partition_json(partition, answer, landed[partition.oid], report)
            for partition, answer in zip(report.primary.partitions, report.contents, strict=True)
        ],
        # Read on each shard directly: this run's users it stores, per partition (sharded layout only).
        "on_shards": {shard: dict(sorted(held.items())) for shard, held in report.on_shards.items()},
        "pruning": {
            "by_id": report.pruning.value[0],
            "without_key": report.pruning.value[1],
            **served_json(report.pruning.server, report, "read_from"),
        },
        "first_user": None
        if first is None
        else {
            "id": str(first.id),
            "first_name": first.first_name,
            "created_at": created.isoformat() if (created := created_at(first.id)) else None,
            **served_json(report.first_user.server, report, "read_from"),
        },
        "skipped": [
            {"replica": skip.replica.service, "address": skip.replica.address, "reason": skip.reason, "when": skip.when}
            for skip in report.skipped
        ],
        "warnings": warnings,
    }
    print(json.dumps(document, indent=2), flush=True)
    warn(warnings)


def partition_json(partition: Partition, answer: Answer[Any], landed: int, report: Report) -> dict[str, Any]:
    share, deviation = share_and_deviation(landed, report.written.users, partition)
    return {
        "name": partition.name,
        "schema": partition.schema,
        "stored_on": partition.shard,  # the shard of a foreign-table partition; None: on master-db itself
        "bound": partition.bound,
        "modulus": partition.modulus,
        "remainder": partition.remainder,
        "count": answer.value[0],
        "predicted": report.written.predicted[partition.oid],
        "actual": landed,
        "share": round(share, 6),
        "deviation_from_even": round(deviation, 6),
        **served_json(answer.server, report, "read_from"),
        "rows": [{"id": str(user_id), "first_name": name} for user_id, name in answer.value[1]],
    }


def served_json(server: Server, report: Report, verb: str) -> dict[str, Any]:
    return {
        verb: server.service,
        f"{verb}_address": server.address,
        "in_recovery": server is not report.written.primary,
    }


def warn(warnings: Sequence[str]) -> None:
    for warning in warnings:
        print(f"sharding_demo.py: warning: {warning}", file=sys.stderr)


# ======== Appendix D. Failures: one true line each, and an exit code per kind ===================


class ExitCode(IntEnum):
    """The demo's exit codes, each with what it means (--help lists them, and so does docs/failures.md)."""

    def __new__(cls, value: int, meaning: str) -> Self:
        member = int.__new__(cls, value)
        member._value_, member.meaning = value, meaning
        return member

    meaning: str
    OK = 0, "success, also when a replica was left out (the report says which, and why)"
    CONFIG = 2, "an invalid setting or flag (the message names it), or a .env that cannot be read"
    PRIMARY_LOST = 3, "the primary is unreachable, was lost, or did not answer in time: nothing was written"
    LOGIN_REFUSED = 4, "the primary refused the login"
    LAYOUT = 5, "tbl_users is missing, out of reach, or partitioned so the demo cannot predict it: nothing was written"
    AFTER_COMMIT = 6, "a failure after the commit: the users are committed (the message says how many, and where)"
    REFUSED = 7, "the primary refused or cancelled a statement, or the COMMIT itself: nothing was written"
    COMMIT_UNKNOWN = 8, "outcome unknown: COMMIT unanswered and the primary unable to say, or a shard not counted"
    SHARD_DOWN = 9, "a shard was unreachable, failed its checks, or stopped before the commit: nothing was written"
    PARTLY_COMMITTED = 10, "a shard refused the COMMIT after another had committed: the message says who kept what"
    NOT_AS_PREDICTED = 11, "the report was printed, but a user is not where predicted (MISMATCH) or not found"
    SIGHUP = 129, "SIGHUP (a closed terminal): the message says whether anything was committed"
    SIGINT = 130, "Ctrl-C (SIGINT): the message says whether anything was committed"
    STDOUT_CLOSED = 141, "stdout was closed before the report was printed, as with `| head`"
    SIGTERM = 143, "SIGTERM (timeout, systemd, docker stop): the message says whether anything was committed"


class DemoError(Exception):
    """An expected failure: printed as one line on stderr, exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# What a server's failure looks like here: SQLAlchemy wraps psycopg's errors in DBAPIError; the COPY
# uses psycopg directly and raises its own.
DATABASE_ERRORS = (sqlalchemy.exc.DBAPIError, psycopg.Error)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the run is, as Ctrl-C raises KeyboardInterrupt. (psycopg then
    cancels the statement in flight, as it does for Ctrl-C.)"""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


class ReadFailed(Exception):
    """A read that failed where no other server would have done better (step 3), or on a shard itself (step 6), and
    the server that was asked. It keeps the driver's error as `orig`, as SQLAlchemy's own errors do, so that
    one_line(), sqlstate() and from_a_shard() read it as they read those."""

    def __init__(self, server: Server, error: BaseException) -> None:
        super().__init__(str(error))
        self.server, self.orig = server, getattr(error, "orig", error)


def interrupt(signal_number: int, frame: object) -> None:
    raise Interrupted(signal_number)


def interrupted(interruption: KeyboardInterrupt, when: str) -> DemoError:
    """'interrupted (SIGTERM) {when}', with the exit code shells give a signal: 128 + its number."""
    if isinstance(interruption, Interrupted):
        return DemoError(f"interrupted ({interruption.args[0]}) {when}", 128 + interruption.signal_number)
    return DemoError(f"interrupted (Ctrl-C) {when}", ExitCode.SIGINT)


def stopped(error: BaseException, report: Report | None) -> int:
    """Ctrl-C, SIGTERM or SIGHUP before the write (run() tells one during or after it), or while the
    report was printed; or stdout closed before it was (`| head`), or unable to take it (a full disk)."""
    if isinstance(error, KeyboardInterrupt):
        when = "before the insert: nothing was written"
        if report is not None:
            when = f"while printing the report; {committed(report.written)}"
        failure = interrupted(error, when)
        print(f"sharding_demo.py: error: {failure}", file=sys.stderr)
        return failure.exit_code
    if isinstance(error, BrokenPipeError) or report is not None:
        # Point stdout at /dev/null, so that Python's own flush at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if isinstance(error, BrokenPipeError):  # the reader has gone and wants nothing more: no message
        return ExitCode.STDOUT_CLOSED
    if report is None:
        raise error  # not from printing the report: unexpected
    message = f"could not print the report ({error}); {committed(report.written)}"
    print(f"sharding_demo.py: error: {message}", file=sys.stderr)
    return ExitCode.AFTER_COMMIT


def give_up(watchdog: Watchdog, server: Server, connection: psycopg.Connection[Any], now: float) -> None:
    """Note why the watchdog gives up on a server (silent for too long, or past the catch-up wait's deadline), then
    shutdown(2) the connection's socket, through a duplicate of its file descriptor: the call waiting on it returns
    at once with an error. (suppress: libpq may have closed it.) What it saw is all it says: a server that has
    stopped and one whose statement waits, for a lock say, look the same from here (docs/failures.md tells them
    apart)."""
    if now <= watchdog.deadline:
        why = f"did not answer for {watchdog.stall_timeout:g} s (DEMO_STALL_TIMEOUT)"
    else:
        why = "did not answer by the catch-up deadline (DEMO_CATCHUP_TIMEOUT)"
    watchdog.gave_up_on[server.service] = why
    # nothing may stop the watchdog's thread
    with suppress(OSError, psycopg.Error), socket.socket(fileno=os.dup(connection.fileno())) as duplicate:
        duplicate.shutdown(socket.SHUT_RDWR)


def allow_for_a_pause(watchdog: Watchdog, paused: float) -> None:
    """A look that comes a second late means that this process did not run meanwhile: stopped with Ctrl-Z (then
    `fg`), say. The servers answered all the while, so that time does not count against them."""
    watchdog.deadline, watchdog.last_progress = watchdog.deadline + paused, watchdog.last_progress + paused
    for connection, (server, since) in list(watchdog.watched.items()):
        watchdog.watched[connection] = (server, None if since is None else since + paused)


def fail_over(router: ReadWriteRouter, server: Server, error: BaseException) -> None:
    """A read failed on `server`. An error it answered, or a shard that stopped while this replica waited on it: no
    other replica would do better, so the read fails, naming who was asked (ReadFailed). A recovery conflict is this
    replica's, though, and so is a permission refused to its own settings' user (a read-only role, say); not one that
    a shard refused to master-db's role. Otherwise the replica is left out, and the router tries another."""
    its_own = sqlstate(error) in (RECOVERY_CONFLICT, PERMISSION_DENIED) and not from_a_shard(error)
    elsewhere_too = answered(error) and not its_own
    if server is router.primary or elsewhere_too or shard_that_stopped(server):
        raise ReadFailed(server, error) from error
    leave_out(router, server, replica_failure(server, error), when="during the reads")


def shard_that_stopped(server: Server) -> Server | None:
    """The shard that stopped answering, if that is why the watchdog cut `server` off: a coordinator, or its standby,
    waits on a shard through postgres_fdw, and looks stopped itself. A server that stopped cannot answer a new
    question; one that only waits can. So if `server` answers now, the shard that does not is the one that stopped
    (asking a stopped one takes up to the stall bound)."""
    shards = watched_shards(server.watchdog)
    if not shards or server in shards:  # the default layout, or a shard itself
        return None
    known = [shard for shard in shards if shard.service in shard.watchdog.gave_up_on]
    if known:  # found already, by an earlier question
        return known[0]
    if server.service not in server.watchdog.gave_up_on or not answers(server):
        return None
    return next((shard for shard in shards if not answers(shard)), None)


def watched_shards(watchdog: Watchdog) -> list[Server]:
    """The shards this run has connected to (none on the default layout)."""
    return [each for each in watchdog.servers.values() if isinstance(each.settings, SHARD_SETTINGS)]


def answers(server: Server) -> bool:
    try:
        with server.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except DATABASE_ERRORS:
        return False
    return True


def answered(error: BaseException) -> bool:
    """Did the server answer with an error and stay connected (not: it went away, we cut it off, or it ended the
    session)? An error from a shard, passed on by master-db, is such an answer. (A new connection that a server
    refuses is no answer either: psycopg has only libpq's text for it, and no SQLSTATE.)"""
    invalidated = isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated
    return sqlstate(error) is not None and not invalidated and not ended_the_session(error)


def ended_the_session(error: BaseException) -> bool:
    """An error of severity FATAL ends the session it is sent on: pg_terminate_backend(), a shutdown, or a timeout
    of the server's own (idle_in_transaction_session_timeout; transaction_timeout, PostgreSQL 17 and later)."""
    diagnostic = getattr(getattr(error, "orig", error), "diag", None)
    return getattr(diagnostic, "severity_nonlocalized", None) in ("FATAL", "PANIC")


def from_a_shard(error: BaseException) -> bool:
    """An error that a shard answered master-db (or its standby) with, which postgres_fdw passes on: its CONTEXT line
    is the remote SQL command, "CONTEXT:  remote SQL command: SELECT NULL FROM public.tbl_users_p0"."""
    return "remote SQL command:" in str(getattr(error, "orig", error))


def lost_a_shard(error: BaseException) -> bool:
    """postgres_fdw lost its connection to a shard (a shard that crashed, say): it reports that with SQLSTATE class
    08, connection_exception, and the remote command it was running; the shard said nothing."""
    return from_a_shard(error) and (sqlstate(error) or "").startswith("08")


def in_words(error: BaseException) -> str:
    """one_line(error), and whose words they are where they came through postgres_fdw: a shard's answer (a shard
    that ended master-db's session there says FATAL, which is not master-db's), or a connection to a shard lost."""
    if lost_a_shard(error):
        return f"{one_line(error)} (a connection to a shard, lost: postgres_fdw's words)"
    if from_a_shard(error):
        return f"{one_line(error)} (a shard's answer, which postgres_fdw passed on)"
    return one_line(error)


# A hot standby cancels a read that holds up its replay of the WAL (a lock or a snapshot that a replayed change
# conflicts with) once max_standby_streaming_delay has passed: a "recovery conflict". Another replica may answer.
RECOVERY_CONFLICT = "40001"  # serialization_failure, "canceling statement due to conflict with recovery"
PERMISSION_DENIED = "42501"  # insufficient_privilege: "permission denied for table tbl_users_p0"


def sqlstate(error: BaseException) -> str | None:
    return getattr(getattr(error, "orig", error), "sqlstate", None)


def one_line(error: BaseException) -> str:
    """The useful line of a driver error, without SQLAlchemy's SQL echo and background link. Where the server says why
    in a DETAIL (psycopg puts it on a line of its own), that is added, in brackets: 'the database system is not
    accepting connections (Hot standby mode is disabled.)', say."""
    original = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    first = (lines[0] if lines else type(original).__name__).removeprefix("connection failed: ")
    details = [line.removeprefix("DETAIL:").strip() for line in lines if line.startswith("DETAIL:")]
    return f"{first} ({details[0]})" if details else first


def cause(server: Server, error: BaseException) -> str:
    """What went wrong with a server, in words: why the watchdog cut it off, or the driver's error."""
    if server.service not in server.watchdog.gave_up_on:
        return one_line(error)
    return server.watchdog.gave_up_on[server.service]


def refused_login(error: BaseException) -> bool:
    # libpq's words: a wrong password, a user without a pg_hba.conf rule, or no password at all
    words = ("authentication failed", "no pg_hba.conf entry", "no password supplied")
    return any(phrase in one_line(error) for phrase in words)


def no_such_database(server: Server, error: BaseException) -> str | None:
    """'has no database app: check REPLICA_ONE_NAME', if the server answered the login so (libpq's words)."""
    if f'database "{server.settings.name}" does not exist' not in one_line(error):
        return None
    return f"has no database {server.settings.name}: {to_check(server.settings, 'name')}"


def primary_failed(primary: Server, error: BaseException) -> DemoError:
    """The primary failed its check, before anything was written."""
    if refused_login(error):
        return DemoError(f"{primary} refused the login: {one_line(error)}", ExitCode.LOGIN_REFUSED)
    if missing := no_such_database(primary, error):
        return DemoError(f"{primary} {missing}", ExitCode.CONFIG)
    if sqlstate(error) == "57014":  # query_canceled: a statement_timeout, or a cancel request
        message = f"{primary} cancelled a query of the demo's checks: {one_line(error)}; nothing was written"
        return DemoError(message, ExitCode.REFUSED)
    if primary.service in primary.watchdog.gave_up_on:
        message = f"{primary} {cause(primary, error)} during the checks; nothing was written"
        return DemoError(message, ExitCode.PRIMARY_LOST)
    if answered(error):  # it let the demo in, and answered a question of the checks with an error
        message = f"{primary} answered the demo's checks with an error: {one_line(error)}; nothing was written"
        return DemoError(message, ExitCode.REFUSED)
    # It let the demo in (the watchdog watches each connection from the moment it is made, before SQLAlchemy's own
    # first questions), then ended the session: pg_terminate_backend(), a shutdown, a timeout of its own.
    if primary.service in primary.watchdog.servers:
        return DemoError(
            f"lost {primary} during the checks: {one_line(error)}; nothing was written", ExitCode.PRIMARY_LOST
        )
    return DemoError(f"cannot connect to {primary}: {one_line(error)}", ExitCode.PRIMARY_LOST)


LAYOUT_THE_DEMO_KNOWS = (
    "the demo predicts where rows land only in tbl_users PARTITION BY HASH (id), split into plain tables "
    "(or foreign tables on shard-one and shard-two) that cover every remainder, as init-master.sql makes it"
)


def unusable_partition(
    primary: Server,
    name: str,
    shard: str | None,
    kind: str,
    key: str,
    readable: bool,
    remote_schema: str,
    remote_table: str,
) -> DemoError:
    remote = f"{remote_schema}.{remote_table}"  # the table postgres_fdw reads and writes, if a foreign table
    if key != "HASH (id)":
        what = f"has tbl_users partitioned by {key}"
    elif kind not in ("r", "f"):
        what = f"has {name}, a partition that is not a plain or a foreign table (relkind {kind})"
    elif kind == "f" and shard not in ("shard-one", "shard-two"):
        what = f"has {name}, a foreign table on a server that is not one of the demo's shards ({shard})"
    elif not readable:
        what = f"has {name}, a partition that this user may not read (SELECT on it, USAGE on its schema)"
    elif remote != name:  # OPTIONS (table_name 'tbl_users_p3') on tbl_users_p1, say: a copy and paste
        what = f"has {name}, a foreign table stored on {shard} as {remote}, not under its own name"
    else:
        what = f"has {name}, which is not a hash partition"
    message = f"{primary} {what}; {LAYOUT_THE_DEMO_KNOWS}; nothing was written"
    return DemoError(message, ExitCode.LAYOUT)


TBL_USERS = text("SELECT to_regclass('tbl_users') IS NOT NULL, pg_get_partkeydef(to_regclass('tbl_users'))")


def unusable_primary(primary: Server, facts: PrimaryFacts) -> DemoError:
    settings = primary.settings
    if facts.identity[0]:
        fix = to_check(settings, "host", "port")
        return DemoError(f"{primary} is a standby, not the primary: {fix}", ExitCode.CONFIG)
    if facts.partitions:
        greatest, uncovered = max(p.modulus for p in facts.partitions), uncovered_remainders(facts.partitions)
        what = f"partitions of tbl_users that leave remainders {uncovered} of modulus {greatest} without a partition"
        return DemoError(f"{primary} has {what}: rows there would be refused; {LAYOUT_THE_DEMO_KNOWS}", ExitCode.LAYOUT)
    try:
        with primary.engine.connect() as connection:
            found, key = connection.execute(TBL_USERS).one()
    except DATABASE_ERRORS as error:
        return primary_failed(primary, error)
    if not found:  # to_regclass() looks as the application's queries do: the search_path's schemas that it may use
        what = f"no table tbl_users that user {settings.user} finds by name in database {settings.name}"
        made = "(on its search_path, in a schema it may use); init-master.sql makes it in public, in database postgres"
        return DemoError(f"{primary} has {what} {made}: {to_check(settings, 'port', 'name')}", ExitCode.LAYOUT)
    what = "that is not partitioned" if key is None else "without partitions"
    return DemoError(f"{primary} has a table tbl_users {what}; {LAYOUT_THE_DEMO_KNOWS}", ExitCode.LAYOUT)


def shard_failed(shard: Server, names: list[str], error: BaseException | None, readable: bool = True) -> DemoError:
    stores = ", ".join(names)
    if error is None and not readable:  # SHARD_ONE_USER=coordinator, say: it may read the partitions, not the parent
        what = f"{shard} stores {stores} for master-db, but user {shard.settings.user} may not read its tbl_users"
        what += f" (SELECT), which the demo reads to prove where each row is: {to_check(shard.settings, 'user')}"
    elif error is None:
        fix = to_check(shard.settings, "host", "port", "name")
        what = f"{shard} does not hold {stores} as tables of its own, bound as on master-db: {fix}"
    else:
        failure = replica_failure(shard, error)  # "refused the login: ...", "did not answer ...", "unreachable: ..."
        if failure.startswith("unreachable"):  # a state, where the others say what the shard did
            failure = "is " + failure
        what = f"{shard}, which stores {stores} for master-db, {failure}"
    return DemoError(f"{what}; nothing was written on any shard", ExitCode.SHARD_DOWN)


def shard_unseen(shard: Server, names: list[str], asked: str, primary: Server, error: BaseException) -> DemoError:
    """master-db could not say who the shard is: it cannot log in there, say, or its layout is older than the view."""
    what = f"{primary} could not say who stores {', '.join(names)} for it, to compare with {shard}"
    shard_said_it = from_a_shard(error)  # the shard's answer to master-db (its view gone, say), passed on
    if sqlstate(error) == "42P01" and not shard_said_it:  # undefined_table, on master-db itself
        what += f": it has no {asked} (an older init-shard.sh made this layout; make it afresh with "
        what += "docker compose --profile sharded down -v, then up)"
    elif sqlstate(error) == PERMISSION_DENIED and not shard_said_it:  # refused to the demo's own user
        user, fix = primary.settings.user, to_check(primary.settings, "user")
        what += f": user {user} may not read its {asked} (the check needs SELECT on it): {fix}"
    elif primary.service in primary.watchdog.gave_up_on:  # it waited on the shard, for a lock say
        what += f": it {cause(primary, error)}"
    else:
        what += f": {one_line(error)}"
        if shard_said_it:
            what += " (the shard's answer, which postgres_fdw passed on)"
    return DemoError(f"{what}; nothing was written on any shard", ExitCode.SHARD_DOWN)


def not_that_shard(shard: Server, names: list[str], itself: tuple[Any, ...], seen: tuple[Any, ...]) -> DemoError:
    """The shard's settings reach a server that holds the same tables, but is not the one master-db stores on. Which
    side is wrong, the demo cannot tell: the shard's settings, or master-db's foreign server (ALTER SERVER shard_one
    OPTIONS (SET port ...), say). Their addresses differ anyway under compose (localhost:5435 and shard-one:5432)."""
    (identifier, started_at, database), (their_identifier, their_start, their_database) = itself, seen
    theirs, fix, options = f"master-db's {shard.service}", to_check(shard.settings, "host", "port"), "host and port"
    if identifier != their_identifier:
        what = f"another cluster (system identifier {identifier}; {theirs} has {their_identifier})"
    elif started_at != their_start:
        what = f"another server of its cluster, a copy (started at {started_at}; {theirs} at {their_start})"
    else:
        what = f"another database ({database}; {theirs} is database {their_database})"
        fix, options = to_check(shard.settings, "name"), "dbname"
    fix += f", or the {options} of master-db's foreign server {shard.service.replace('-', '_')}"
    message = f"{shard} is not the server that master-db stores {', '.join(names)} on: {what}: {fix}"
    return DemoError(f"{message}; nothing was written on any shard", ExitCode.SHARD_DOWN)


def replica_failure(replica: Server, error: BaseException) -> str:
    if refused_login(error):
        return f"refused the login: {one_line(error)}: {to_check(replica.settings, 'user', 'password')}"
    if missing := no_such_database(replica, error):
        return missing
    if replica.service in replica.watchdog.gave_up_on:
        return cause(replica, error)
    if "FATAL:" in one_line(error):  # it answered, and said no: starting up, shutting down, too many connections
        return f"refused the connection: {one_line(error)}"
    if ended_the_session(error):  # it ended a session it had let in: shut down, pg_terminate_backend, a timeout
        return f"ended the connection: {one_line(error)}"
    answer = f"answered the demo's question with an error: {one_line(error)}"
    if sqlstate(error) == PERMISSION_DENIED:  # to its settings' user: a read-only role without every grant, say
        if re.search("for (foreign )?table", answer):  # SELECT on tbl_users does not reach its partitions
            answer += " (the demo reads tbl_users and each partition: its user needs SELECT on all of them)"
        return f"{answer}: {to_check(replica.settings, 'user')}"
    if answered(error):  # connected, and an error in answer to a statement: a statement_timeout, say
        return answer
    # SQLAlchemy keeps the statement that was sent when the error came back: the replica had let the demo in, and
    # the connection went without a word from it (a server process that crashed, say).
    if getattr(error, "statement", None) is not None:
        return f"lost the connection: {one_line(error)}"
    return f"unreachable: {one_line(error)}"


def what_it_is_instead(router: ReadWriteRouter, replica: Server, identity: tuple[Any, ...]) -> str:
    """Why a server is not a standby of the primary: a promoted copy, the primary, another cluster's, or the
    primary's standby asked for another database."""
    in_recovery, system_identifier, started_at = identity
    primary = router.facts.identity
    fix = to_check(replica.settings, "host", "port")
    if system_identifier != primary[1]:
        what = "a standby of another cluster" if in_recovery else "the primary of another cluster"
        return f"is {what} (system identifier {system_identifier}, the primary's is {primary[1]}): {fix}"
    if started_at == primary[2]:
        return f"is the primary itself, not a standby (pg_is_in_recovery() is false): {fix}"
    twin = router.first_seen_as[(system_identifier, started_at)]
    if twin is not replica:  # which of the two settings is wrong, only you can tell
        fix = to_check([twin.settings, replica.settings], "host", "port")
        same = "the same system identifier and start time"
        return f"is the same server as {twin.service} ({twin.address}; {same}): {fix}"
    if in_recovery:  # the primary's standby, asked for another database
        asked, expected = replica.settings.name, router.primary.settings.name
        fix = to_check(replica.settings, "name")
        return f"is asked for database {asked}, not {expected} as the primary is: {fix}"
    return "was promoted: it is a primary now (pg_is_in_recovery() is false), a copy of this primary gone its own way"


def leave_out(router: ReadWriteRouter, replica: Server, reason: str, when: str) -> None:
    """A replica that failed, fell behind or is not a standby of this primary: no more reads go to it."""
    if replica in router.replicas_in_use:
        router.replicas_in_use.remove(replica)
        router.skipped.append(Skipped(replica, reason, when))


def left_out_by_the_wait(report: Report) -> list[str]:
    waited = [skip for skip in report.skipped if skip.when == "waited for"]
    return [f"  {skip.replica}: {skip.reason}: left out of the reads" for skip in waited]


def left_out_during_the_reads(report: Report) -> list[str]:
    """The text report's last lines, when a replica was left out after the wait, or none was left."""
    later = [
        f"  {skip.replica.service} left out: {skip.reason}" for skip in report.skipped if skip.when != "waited for"
    ]
    if primary_served_reads(report):
        later.append(f"  no replica left, so reads went to the primary {report.written.primary.service}")
    return ["", "During the reads:", *later] if later else []


def primary_served_reads(report: Report) -> bool:
    answers = [report.landing, *report.contents, report.first_user, report.pruning]
    return any(answer.server is report.written.primary for answer in answers)


def still_behind(lag: int | None, elapsed: float) -> str:
    if lag is None:
        return f"its replay position is unknown after {elapsed:.1f}s"
    return f"still {lag:,} bytes of WAL behind after {elapsed:.1f}s"


def committed(written: Written) -> str:
    where = f"{written.primary.service} (commit LSN {written.commit_lsn})"
    return f"{written.stored:,} users were committed on {where} and stay in the table; do not run again to retry them"


class CommitRefused(DemoError):
    """The primary rolled its transaction back at the COMMIT: it answered the COMMIT with an error, or, asked after
    the answer was lost, said so (`what` tells which). On one server nothing is then written. A coordinator commits
    on each shard first (postgres_fdw has no two-phase commit), so one shard may have committed before another
    refused, or before the coordinator was lost: then the shards say who kept what."""

    def __init__(self, primary: Server, ids: Sequence[bytes], what: str, exit_code: int = ExitCode.REFUSED) -> None:
        self.primary, self.ids, self.what = primary, ids, what
        super().__init__(f"{what}; the transaction was rolled back: nothing was written", exit_code)

    def explained(self, shards: Sequence[Server]) -> DemoError:
        """Read on each shard how many of this run's users it kept: none (nothing was written), some (partly
        committed), or none that can be counted for sure (the outcome is unknown). Interrupted meanwhile, it says
        what it counted so far, with the signal's exit code."""
        if not shards:
            return self
        kept_some, all_known, told, interruption = False, True, [], None
        for number, shard in enumerate(shards):
            try:
                # New connections: a shard that crashed and restarted meanwhile has closed the pooled ones.
                shard.engine.dispose()
                once_it_lets_in(shard)
                settled = wait_for_commits_in_flight(shard)
                count = sum(users_on_shard(shard, self.ids).values())
            except KeyboardInterrupt as error:  # Ctrl-C, SIGTERM or SIGHUP: ask no more shards
                interruption, all_known = error, False
                told += [f"{each} was not counted (interrupted)" for each in shards[number:]]
                break
            except (ReadFailed, *DATABASE_ERRORS) as error:
                all_known = False
                told.append(f"{shard} kept an unknown number of this run's users ({cause(shard, error)})")
                continue
            kept_some, all_known = kept_some or count > 0, all_known and settled
            note = "" if settled else " so far (a transaction was still open there)"
            told.append(f"{shard} kept {count:,} of this run's {len(self.ids):,} users{note}")
        refused, each = self.what, ", ".join(told)
        if kept_some:  # what a shard has committed stays, whatever the others did
            outcome = DemoError(
                f"{refused}; partly committed, as read on each shard: {each}; those stay (postgres_fdw has no "
                "two-phase commit), and tbl_users shows them",
                ExitCode.PARTLY_COMMITTED,
            )
        elif all_known:
            outcome = DemoError(f"{self}; read on each shard: none kept any of this run's users", self.exit_code)
        else:
            message = f"{refused}; as read on each shard: {each}; whether any of them is kept is unknown"
            outcome = DemoError(f"{message}: count the rows of tbl_users before running again", ExitCode.COMMIT_UNKNOWN)
        if interruption is not None:
            return interrupted(interruption, f"while the shards were counted: {outcome}")
        return outcome


def once_it_lets_in(shard: Server) -> None:
    """Wait, for up to stall_timeout seconds, while the shard turns connections away for now: when one of its server
    processes crashes (the one that was committing, say), its postmaster ends the others and replays the WAL first
    (crash recovery), and meanwhile says "the database system is in recovery mode". Its count then says what its
    recovery kept. (That is SQLSTATE 57P03, cannot_connect_now, which psycopg cannot give for a new connection: its
    words are all there is.) A shard that is down, or refuses for another reason, is counted at once, and fails."""
    deadline = time.monotonic() + shard.watchdog.stall_timeout
    while time.monotonic() < deadline:
        try:
            with shard.engine.connect():
                return
        except DATABASE_ERRORS as error:
            if "the database system is" not in one_line(error):
                return
        time.sleep(0.1)


# The transactions that hold an xid on a server now, as pg_stat_activity shows them to any user; and how many of
# those are still there.
IN_PROGRESS = text("SELECT CAST(backend_xid AS text) FROM pg_stat_activity WHERE backend_xid IS NOT NULL")
STILL_IN_PROGRESS = text("SELECT count(*) FROM pg_stat_activity WHERE CAST(backend_xid AS text) = ANY(:xids)")


def wait_for_commits_in_flight(shard: Server) -> bool:
    """Wait until the transactions in progress on the shard now have ended, for up to stall_timeout seconds; say if
    they did. Once one shard refuses its COMMIT, postgres_fdw does not wait for the others' answers: a shard may still
    be committing this run's users when the coordinator's error comes back, so counting at once could say none."""
    deadline = time.monotonic() + shard.watchdog.stall_timeout
    with shard.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        xids = connection.scalars(IN_PROGRESS).all()  # each statement reads pg_stat_activity afresh
        while xids and connection.scalar(STILL_IN_PROGRESS, {"xids": xids}):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
    return True


def failure_of_the_write(written: Written, stage: str, error: BaseException, xid: str | None) -> DemoError:
    """Before the COMMIT nothing was written; during it, ask the primary what became of it; after it, say what was."""
    primary = written.primary
    if stage == "after":
        return failure_after_commit(written, error)
    shard = None
    if not isinstance(error, KeyboardInterrupt):
        try:  # who stopped answering: a shard that master-db waited on?
            shard = shard_that_stopped(primary)
        except KeyboardInterrupt as interruption:  # while it asks: told below, as an interruption at this stage
            error = interruption
    if shard:
        where = f"{shard} {cause(shard, error)}"
        if stage == "during":
            message = f"{where} during the COMMIT: whether the {written.stored:,} users were committed is unknown"
            return DemoError(f"{message}; count the rows of tbl_users before running again", ExitCode.COMMIT_UNKNOWN)
        return DemoError(
            f"{where} during the insert (master-db was waiting on it); nothing was written", ExitCode.SHARD_DOWN
        )
    if stage == "during" and lost_a_shard(error):  # a shard that crashed at its COMMIT, say: the others may have
        what = f"{primary} lost its connection to a shard during the COMMIT: {one_line(error)} (postgres_fdw's words)"
        return CommitRefused(primary, written.ids, what)
    if stage == "during" and answered(error):  # the server said no to the COMMIT itself
        return CommitRefused(primary, written.ids, f"{primary} refused the COMMIT: {in_words(error)}")
    if stage == "during":
        return outcome_of_the_commit(written, error, xid)
    if isinstance(error, KeyboardInterrupt):
        return interrupted(error, "before the commit: nothing was written")
    if sqlstate(error) == "57014" and not from_a_shard(error):  # a shard's cancel is its answer: told below
        what = f"cancelled the insert (a statement_timeout, or a cancel request): {one_line(error)}"
        return DemoError(f"{primary} {what}; nothing was written", ExitCode.REFUSED)
    if primary.service in primary.watchdog.gave_up_on:
        what = f"{primary} {cause(primary, error)} during the insert"
        return DemoError(f"{what}; nothing was written", ExitCode.PRIMARY_LOST)
    if not answered(error):
        return DemoError(
            f"lost {primary} during the insert: {one_line(error)}; nothing was written", ExitCode.PRIMARY_LOST
        )
    if lost_a_shard(error):  # each shard rolls back the uncommitted part it holds once its connection goes
        what = f"{primary} lost its connection to a shard during the insert: {one_line(error)} (postgres_fdw's words)"
        return DemoError(f"{what}; nothing was written", ExitCode.SHARD_DOWN)
    # A constraint on a shard's own table, say, is told as the shard's answer: not to be looked for on master-db.
    return DemoError(f"{primary} refused the insert: {in_words(error)}; nothing was written", ExitCode.REFUSED)


# What became of a transaction, by its id: 'committed', 'aborted' or 'in progress' (from the commit log, pg_xact);
# and the synchronous standbys its server process still waits for, if it does. A COMMIT waits for them only once it
# is written and flushed on the primary (RecordTransactionCommit, in src/backend/access/transam/xact.c); until the
# wait is over, other sessions do not see the transaction, and pg_xact_status() says 'in progress'.
XACT_STATUS = text("""
    SELECT pg_xact_status(CAST(:xid AS xid8)), (
        SELECT current_setting('synchronous_standby_names') FROM pg_stat_activity
        WHERE backend_xid = xid(CAST(:xid AS xid8)) AND wait_event = 'SyncRep')""")


def outcome_of_the_commit(written: Written, error: BaseException, xid: str | None) -> DemoError:
    """The COMMIT was sent, and its answer never came: the connection was lost, or the run interrupted (psycopg then
    cancels the statement, and the COMMIT may still complete). PostgreSQL's answer to this case is pg_xact_status():
    ask the primary, on a new connection, what became of the transaction. A coordinator commits on its shards before
    itself, and only if all of them did; so if its own part was rolled back, a shard may still have kept some, and
    the shards are counted (CommitRefused)."""
    primary = written.primary
    if isinstance(error, KeyboardInterrupt):  # told with the signal's exit code, if the outcome is known
        interruption = interrupted(error, f"during the COMMIT on {primary}")
        what, exit_code = str(interruption), interruption.exit_code
    else:
        what, exit_code = f"lost {primary} during the COMMIT ({cause(primary, error)})", None
    status, standbys = None, None
    try:
        with primary.engine.connect() as connection:
            status, standbys = connection.execute(XACT_STATUS, {"xid": xid}).one()
    except (KeyboardInterrupt, *DATABASE_ERRORS):  # a primary that does not answer: the outcome stays unknown
        pass
    if standbys is not None:
        waits = (
            f"wrote the COMMIT of transaction {xid}, and still waits for a synchronous standby "
            f"(synchronous_standby_names = '{standbys}') to confirm it: the {written.stored:,} users are committed "
            "there, and other sessions see them once a standby confirms or the wait is cancelled; do not run again "
            "to retry them"
        )
        if exit_code is None:  # the connection was cut off (by the watchdog, say): master-db did not stop, it waits
            return DemoError(f"{primary} {waits}", ExitCode.AFTER_COMMIT)
        return DemoError(f"{what}; {primary.service} {waits}", exit_code)  # `what` gave its address already
    sharded = bool(watched_shards(primary.watchdog))
    said = f"{primary.service} says its transaction {xid} is '{status}' (pg_xact_status)"
    if status == "committed":
        kept = f"the {written.stored:,} users were committed and stay in the table; do not run again to retry them"
        return DemoError(f"{what}, but {said}: {kept}", exit_code or ExitCode.AFTER_COMMIT)
    if status == "aborted" and not sharded:
        return DemoError(f"{what}, but {said}: nothing was written", exit_code or ExitCode.PRIMARY_LOST)
    if status == "aborted":  # but a shard may have committed its part before: run() has them counted
        return CommitRefused(primary, written.ids, f"{what}, but {said}", exit_code or ExitCode.PRIMARY_LOST)
    why = f"{primary.service} could not be asked" if status is None else said  # 'in progress'
    message = f"{what}: whether the {written.stored:,} users were committed is unknown ({why})"
    return DemoError(f"{message}; count the rows of tbl_users before running again", ExitCode.COMMIT_UNKNOWN)


def not_as_predicted(written: Written) -> DemoError:
    """The report was printed, and it shows a user that the reads did not find where the demo predicted it: a
    different hash (a big-endian server, appendix A), or a rule or policy that keeps rows out of sight. Whatever
    the reads found, master-db committed the transaction: the users that it stored stay."""
    what = "not every one of this run's users is where the demo predicted it (the report says which)"
    return DemoError(f"{what}; {written.primary} committed the transaction", ExitCode.NOT_AS_PREDICTED)


def failure_after_commit(written: Written, error: BaseException) -> DemoError:
    """Anything that goes wrong once the users are committed: they stay in the table. Say so, so that
    nobody runs again to retry users who are already there."""
    if isinstance(error, KeyboardInterrupt):
        return interrupted(error, f"after the commit: {committed(written)}")
    asked = error.server if isinstance(error, ReadFailed) else None
    primary = written.primary
    try:
        shard = shard_that_stopped(primary)
    except KeyboardInterrupt as interruption:  # while it asks who stopped answering
        return interrupted(interruption, f"after the commit: {committed(written)}")
    if shard:
        what = f"{shard} {cause(shard, error)}, and the reads need it"
    elif primary.service in primary.watchdog.gave_up_on:
        what = f"{primary} {cause(primary, error)}"
    else:
        what = in_words(error)
        if asked is not None:
            what = f"a read from {asked} failed: {what}"
    return DemoError(f"failed after the commit: {what}; {committed(written)}", ExitCode.AFTER_COMMIT)


# ======== Appendix E. The command line, and settings that are probably mistakes =================

SERVER_SETTINGS = (MasterDBSettings, ReplicaOneSettings, ReplicaTwoSettings, *SHARD_SETTINGS)


class FlagParser(argparse.ArgumentParser):
    """argparse, with its errors as one line (not usage first), and --help that lists the variables
    and the exit codes, all from the definitions above."""

    def error(self, message: str) -> Any:
        raise DemoError(message, ExitCode.CONFIG)

    def format_help(self) -> str:
        lines = ["", "environment variables (also read from .env in this folder; a flag wins):"]
        for settings_class in SERVER_SETTINGS:
            fields = settings_class.model_fields
            defaults = [field.default for field in fields.values()]
            shown = [value.get_secret_value() if isinstance(value, SecretStr) else value for value in defaults]
            lines.append(f"  {', '.join(variable_of(settings_class, name) for name in fields)}")
            lines.append(f"      {settings_class.service} (defaults: {', '.join(map(str, shown))})")
        lines += [
            "  and DEMO_<FLAG> for each flag above, e.g. DEMO_CATCHUP_TIMEOUT (DEMO_JSON_OUTPUT for --json)",
            "",
            "exit codes:",
            *[f"  {code.value:<4}{code.meaning}" for code in ExitCode],
        ]
        return super().format_help() + "\n".join(lines) + "\n"


def read_flags(argv: Sequence[str]) -> DemoSettings:
    """The flags, made from DemoSettings' fields, over the DEMO_* variables; pydantic checks both."""
    parser = FlagParser(prog="sharding_demo.py", description=__doc__.splitlines()[0])
    for name, field in DemoSettings.model_fields.items():
        help_text = f"{field.description} (default: ${variable_of(DemoSettings, name)} or {field.default})"
        if field.annotation is bool:
            parser.add_argument(flag_of(name), dest=name, action="store_const", const=True, help=help_text)
        else:
            choices = get_args(field.annotation)  # ("random", "round-robin") for a Literal
            metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
            parser.add_argument(flag_of(name), dest=name, metavar=metavar, help=help_text)
    flags = {name: value for name, value in vars(parser.parse_args(argv)).items() if value is not None}
    return load_settings(DemoSettings, **flags)


def flag_of(name: str) -> str:
    extra = DemoSettings.model_fields[name].json_schema_extra
    return str(extra["flag"]) if isinstance(extra, dict) else "--" + name.replace("_", "-")


def variable_of(settings: BaseSettings | type[BaseSettings], name: str) -> str:
    """A setting's environment variable: its class's prefix and its name, e.g. REPLICA_ONE_HOST."""
    return f"{settings.model_config.get('env_prefix')}{name.upper()}"


def to_check(settings: DatabaseSettings | Sequence[DatabaseSettings], *names: str) -> str:
    """'check SHARD_ONE_HOST, SHARD_ONE_PORT and SHARD_ONE_NAME': the variables a failure message sends you to (of
    one server, or of each of several)."""
    servers = [settings] if isinstance(settings, DatabaseSettings) else settings
    variables = [variable_of(server, name) for server in servers for name in names]
    if len(variables) == 1:
        return f"check {variables[0]}"
    return f"check {', '.join(variables[:-1])} and {variables[-1]}"


def refuse_if_unsendable(value: str) -> None:
    """A setting that cannot reach the server as it is written: with a NUL byte, or with a byte that is not UTF-8."""
    if "\x00" in value:  # libpq's strings end there: the rest would be lost
        raise ValueError("contains a NUL byte, which a PostgreSQL connection cannot carry")
    try:
        value.encode()
    except UnicodeEncodeError as error:  # a byte that is not UTF-8 reaches Python as U+DC80..U+DCFF
        code = ord(value[error.start])
        byte = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else repr(value[error.start])
        raise ValueError(f"is not UTF-8 text ({byte}), so it cannot be sent to the server") from None


def refuse_if_not_a_host(host: str, port_variable: str) -> None:
    """A host with a ':' that is not an IPv6 address (such as ::1) is most often a host and its port, or a URL, pasted
    whole: libpq would look it all up as one name, and say only 'failed to resolve host'. (A host that starts with '/'
    is the folder of a Unix socket, which libpq takes too.)"""
    if host.startswith("/"):
        return
    try:
        ipaddress.ip_address(host)
    except ValueError:
        fix = f"give the host alone, and the port as {port_variable}"
        raise ValueError(f"is not a host name or address: {fix}") from None


def invalid_setting(settings_class: type[Any], error: Exception, flags: dict[str, Any]) -> DemoError:
    """'invalid setting MASTER_DB_PORT=abc: Input should be a valid integer ...' from pydantic's error."""
    if isinstance(error, UnicodeDecodeError):
        where = f"byte {error.object[error.start]:#04x} at offset {error.start}"
        return DemoError(f".env is not UTF-8 text ({where}): save it as UTF-8", ExitCode.CONFIG)
    first = error.errors()[0]  # type: ignore[attr-defined]
    name = str(first["loc"][0])
    if name in flags:
        variable = f"{flag_of(name)} {flags[name]}"
    else:
        variable = variable_of(settings_class, name)
        variable += "" if variable.endswith("PASSWORD") else f"={first.get('input')}"
    return DemoError(f"invalid setting {variable}: {first['msg']}", ExitCode.CONFIG)


def settings_warnings() -> list[str]:
    """Things in .env or the environment that are probably mistakes, one line each."""
    warnings, values, path = [], {}, Path(".env")
    if path.is_file():
        logger, log = logging.getLogger("dotenv.main"), logging.handlers.BufferingHandler(capacity=10_000)
        logger.disabled = False  # python-dotenv logs each line it cannot parse: keep those records
        logger.addHandler(log)
        try:
            values = dotenv_values(path, encoding="utf-8")
        except UnicodeDecodeError:
            pass  # loading the settings says so, in one line
        except OSError as error:  # not readable by this user, say
            raise DemoError(f".env cannot be read: {error.strerror}", ExitCode.CONFIG) from None
        finally:
            logger.removeHandler(log)
            logger.disabled = True
        unparsed = [str(record.args[0]) for record in log.buffer if record.args]  # type: ignore[index]
        if unparsed:
            lines = f"lines {', '.join(unparsed)} were" if len(unparsed) > 1 else f"line {unparsed[0]} was"
            warnings.append(f".env {lines} not NAME=value, and ignored")
        warnings += dollar_warnings(path)
    known = {variable_of(DemoSettings, name) for name in DemoSettings.model_fields}
    names = {name.upper() for name in [*os.environ, *values] if name.upper().startswith("DEMO_")}
    return warnings + [
        f"{name} is not a setting of this demo, and is ignored (it has {', '.join(sorted(known))})"
        for name in sorted(names - known)
    ]


def dollar_warnings(path: Path) -> list[str]:
    """Passwords in .env that docker compose and this demo would read differently.

    One .env configures both, but they treat `$` differently. Compose (v2) replaces $NAME, ${NAME}
    and $$ in a value that is unquoted or in double quotes, and takes a single-quoted value as it is.
    python-dotenv (under pydantic-settings) replaces only ${NAME}, even inside single quotes. So
    MASTER_DB_PASSWORD=pa$word gives the server 'pa' and the demo 'pa$word'; 'pa$word' agrees.
    """
    warnings = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = re.match(r"\s*(?:export\s+)?(\w*PASSWORD)\s*=\s*(.*)", line)
        if match is None:
            continue
        name, value = match[1], match[2]
        compose_replaces = not value.startswith("'") and re.search(r"\$[A-Za-z_{$]", value)
        if compose_replaces or "${" in value:
            warnings.append(
                f"{name} in .env has a '$' that docker compose and this demo read differently; "
                f"write the value in single quotes, without '${{' ({name}='...')"
            )
    return warnings


if __name__ == "__main__":
    sys.exit(main())
