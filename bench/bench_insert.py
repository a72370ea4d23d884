"""bench_insert.py: how fast can the demo load users, next to a baseline, in one run.

Starts its own primary + two replicas with local_cluster.py (free ports on 127.0.0.1), then for
each N it loads N users into tbl_users three ways, each in a fresh process (so peak memory is that
method's alone) and on an emptied table:

  copy baseline   hand-written psycopg binary COPY that also generates the UUIDv7s;
  demo            sharding_demo's own bulk path, insert_many_users(): the ids made in one
                  buffer, each one's partition predicted, then COPY through the engine's
                  connection, in one transaction;
  naive ORM       the literal port of GORM's db.Create(&users): session.add_all + commit.

For each it prints rows/s, the ratio to the baseline, the process's peak RSS, and how long the
replicas took to replay the load after its commit. The demo's row includes its Python prediction
of each row's partition, which the other loads do not make.

Then, at the largest N, UUIDv7 against UUIDv4 with the baseline COPY: load time, WAL written and
the size of the primary-key indexes.

    python bench/bench_insert.py                    # N = 10^4, 10^5, 10^6; about 5 minutes
    python bench/bench_insert.py --sizes 10000      # quicker
    python bench/bench_insert.py --orm-max 100000   # skip the naive ORM at 10^6 (a minute, 3 GB)

Timings on a shared 2-core machine move by 10-20% from run to run; compare the columns of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

import sharding_demo  # noqa: E402
from local_cluster import LocalCluster, free_port_base  # noqa: E402

METHODS = ("server-ceiling", "copy-baseline", "demo", "naive-orm")


# ------------------------------------------------------------------------------------------------
# The three ways to load, each run in a child process
# ------------------------------------------------------------------------------------------------


def connect_primary(settings: sharding_demo.DatabaseSettings) -> psycopg.Connection[tuple[object, ...]]:
    """A plain psycopg connection to the primary, from the demo's own settings (no SQLAlchemy)."""
    return psycopg.connect(
        host=settings.host,
        port=settings.port,
        user=settings.user,
        password=settings.password.get_secret_value(),
        dbname=settings.name,
    )


def load_copy_baseline(
    settings: sharding_demo.DatabaseSettings,
    count: int,
    make_id: Callable[[], uuid.UUID] | None = None,
) -> None:
    """The fastest plain way: one psycopg connection, binary COPY, ids made row by row."""
    maker = sharding_demo.UUIDv7Maker()
    make_id = make_id or (lambda: uuid.UUID(bytes=maker.new()))
    statement = "COPY tbl_users (id, first_name) FROM STDIN (FORMAT BINARY)"
    connection = connect_primary(settings)
    with connection, connection.cursor() as cursor, cursor.copy(statement) as copy:
        copy.set_types(["uuid", "varchar"])
        for number in range(count):
            copy.write_row((make_id(), sharding_demo.user_name(number)))


def load_prepared_rows(settings: sharding_demo.DatabaseSettings, rows: list[tuple[bytes, str]]) -> None:
    """The server's own pace: binary COPY of rows made before the clock started."""
    statement = "COPY tbl_users (id, first_name) FROM STDIN (FORMAT BINARY)"
    connection = connect_primary(settings)
    with connection, connection.cursor() as cursor, cursor.copy(statement) as copy:
        copy.set_types(["bytea", "varchar"])
        for row in rows:
            copy.write_row(row)


def run_demo_end_to_end(count: int, environment: dict[str, str]) -> dict[str, float]:
    """The whole of `python sharding_demo.py --users N --show 2`, as a user waits for it."""
    started = time.perf_counter()
    demo = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "sharding_demo.py"), "--users", str(count), "--show", "2"],
        env=os.environ | environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seconds = time.perf_counter() - started
    if demo.returncode != 0:  # a figure for a failed run would mean nothing: say why it failed, and stop
        raise SystemExit(f"the demo failed (exit {demo.returncode}): {last_line(demo.stderr)}")
    # This process has run one child only, so the children's peak is the demo's.
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def load_demo(primary: sharding_demo.Server, count: int) -> None:
    """sharding_demo's bulk path: ids, predicted partitions, COPY, commit."""
    partitions = sharding_demo.check_primary(primary).partitions
    sharding_demo.insert_many_users(primary, count, partitions)


def load_naive_orm(primary: sharding_demo.Server, count: int) -> None:
    """What a straight port of GORM's Create does: one ORM object per row, add_all, commit."""
    users = [sharding_demo.User(first_name=sharding_demo.user_name(n)) for n in range(count)]
    with sharding_demo.Session(primary.engine) as session:
        session.add_all(users)
        session.commit()


def child(method: str, count: int, environment: dict[str, str]) -> dict[str, float]:
    """Run one load in this process and measure it; the parent starts one process per load."""
    if method == "end-to-end":
        return run_demo_end_to_end(count, environment)
    os.environ.update(environment)
    watchdog = sharding_demo.Watchdog(stall_timeout=300)
    primary, *replicas = [
        sharding_demo.make_server(settings_class(), 3, watchdog)
        for settings_class in (
            sharding_demo.MasterDBSettings,
            sharding_demo.ReplicaOneSettings,
            sharding_demo.ReplicaTwoSettings,
        )
    ]
    maker = sharding_demo.UUIDv7Maker()
    prepared = [(maker.new(), sharding_demo.user_name(n)) for n in range(count)] if method == "server-ceiling" else []
    started = time.perf_counter()
    if method == "server-ceiling":
        load_prepared_rows(primary.settings, prepared)
    elif method == "copy-baseline":
        load_copy_baseline(primary.settings, count)
    elif method == "copy-baseline-uuid4":
        load_copy_baseline(primary.settings, count, make_id=uuid.uuid4)
    elif method == "demo":
        load_demo(primary, count)
    elif method == "naive-orm":
        load_naive_orm(primary, count)
    load_seconds = time.perf_counter() - started
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # How long the replicas take to replay everything the load wrote, counted from its commit,
    # with the demo's own wait.
    with primary.engine.connect() as connection:
        commit_lsn = str(connection.scalar(sharding_demo.text("SELECT pg_current_wal_lsn()")))
    facts = sharding_demo.check_primary(primary)
    router = sharding_demo.ReadWriteRouter(primary, replicas, "random", facts)
    caught_up = sharding_demo.wait_for_replicas(router, commit_lsn, timeout=300)
    return {"seconds": load_seconds, "peak_rss_mb": peak_rss_mb, "catchup_seconds": max(caught_up.values())}


# ------------------------------------------------------------------------------------------------
# The parent: cluster, table resets, one child per load, the table of figures
# ------------------------------------------------------------------------------------------------


def measure(cluster: LocalCluster, method: str, count: int) -> dict[str, float]:
    reset_table(cluster)
    wal_before = wal_position(cluster)
    result = run_child(method, count, cluster)
    result["wal_bytes"] = wal_written_since(cluster, wal_before)
    result["index_bytes"] = primary_key_index_bytes(cluster)
    result["spread"] = largest_deviation_from_even(cluster)
    rows = cluster.primary.query("SELECT count(*) FROM tbl_users")[0][0]
    if rows != count:
        raise SystemExit(f"{method} at {count}: expected {count} rows, found {rows}")
    return result


def reset_table(cluster: LocalCluster) -> None:
    # On the sharded layout the rows are on the shards (a TRUNCATE on master-db reaches them, through
    # postgres_fdw); each server checkpoints its own.
    cluster.primary.execute("TRUNCATE tbl_users")
    for node in [cluster.primary, *cluster.shards]:
        node.execute("CHECKPOINT")  # so each load starts with the same full-page-write state


def wal_position(cluster: LocalCluster) -> str:
    return str(cluster.primary.query("SELECT pg_current_wal_lsn()")[0][0])


def wal_written_since(cluster: LocalCluster, start: str) -> float:
    return float(cluster.primary.query(f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{start}')")[0][0])  # type: ignore[arg-type]


def primary_key_index_bytes(cluster: LocalCluster) -> float:
    """The primary-key indexes of all partitions (each partition has its own B-tree)."""
    rows = cluster.primary.query(
        """
        SELECT coalesce(sum(pg_relation_size(i.indexrelid)), 0)
        FROM pg_index i JOIN pg_inherits h ON h.inhrelid = i.indrelid
        WHERE h.inhparent = 'tbl_users'::regclass AND i.indisprimary
        """
    )
    return float(rows[0][0])  # type: ignore[arg-type]


def largest_deviation_from_even(cluster: LocalCluster) -> float:
    """How far the fullest or emptiest partition is from an even 1/4 share, as a fraction."""
    counts = [
        int(count)
        for (count,) in cluster.primary.query(  # type: ignore[call-overload]
            "SELECT count(*) FROM tbl_users GROUP BY tableoid"
        )
    ]
    even = sum(counts) / 4
    return max(abs(count - even) / even for count in counts)


def print_load_table(results: dict[tuple[str, int], dict[str, float]], sizes: list[int]) -> None:
    header = f"{'N':>9}  {'method':<14} {'rows/s':>10} {'vs baseline':>12} {'peak RSS':>9} {'replicas caught up':>19}"
    print(header)
    print("-" * len(header))
    for count in sizes:
        baseline = results[("copy-baseline", count)]
        baseline_rate = count / baseline["seconds"]
        for method in METHODS:
            result = results.get((method, count))
            if result is None:
                print(f"{count:>9,}  {method:<14} {'not run (see --orm-max)':>34}")
                continue
            rate = count / result["seconds"]
            catchup_ms = result["catchup_seconds"] * 1000
            print(
                f"{count:>9,}  {method:<14} {rate:>10,.0f} {rate / baseline_rate:>11.2f}x"
                f" {result['peak_rss_mb']:>6.0f} MB {catchup_ms:>16.0f} ms"
            )
    print()
    if ("naive-orm", 100_000) in results and ("demo", 100_000) in results:
        demo = results[("demo", 100_000)]["seconds"]
        orm = results[("naive-orm", 100_000)]["seconds"]
        print(f"At 100,000 rows the demo's path is {orm / demo:.1f}x the naive ORM's speed.")


def print_end_to_end_table(results: dict[tuple[str, int], dict[str, float]], sizes: list[int]) -> None:
    print("End to end: `python sharding_demo.py --users N --show 2`, from process start to exit, on an emptied")
    print("table (ratios: its time over the copy-baseline's load and over the server-ceiling's, above)")
    header = f"{'N':>9}  {'end to end':>11} {'vs baseline':>12} {'vs ceiling':>11} {'peak RSS':>9}"
    print(header)
    print("-" * len(header))
    for count in sizes:
        whole = results[("end-to-end", count)]
        baseline = results[("copy-baseline", count)]["seconds"]
        ceiling = results[("server-ceiling", count)]["seconds"]
        print(
            f"{count:>9,}  {whole['seconds']:>9.2f} s {whole['seconds'] / baseline:>11.2f}x"
            f" {whole['seconds'] / ceiling:>10.2f}x {whole['peak_rss_mb']:>6.0f} MB"
        )


def generation_seconds(make_id: Callable[[], uuid.UUID], count: int) -> float:
    """How long Python takes just to make the ids, to separate it from the database's work."""
    started = time.perf_counter()
    for _ in range(count):
        make_id()
    return time.perf_counter() - started


def print_uuid_table(v7: dict[str, float], v4: dict[str, float], count: int) -> None:
    print(f"UUIDv7 against UUIDv4, {count:,} rows, baseline COPY into the hash-partitioned tbl_users")
    print("(spread: the partition furthest from an even quarter of the rows)")
    print(
        f"{'':<8} {'load':>8} {'of which ids':>13} {'rows/s':>9} {'WAL written':>12}"
        f" {'PK indexes':>11} {'index pages':>12} {'spread':>8}"
    )
    maker = sharding_demo.UUIDv7Maker()
    generators = {"UUIDv7": lambda: uuid.UUID(bytes=maker.new()), "UUIDv4": uuid.uuid4}
    for name, result in (("UUIDv7", v7), ("UUIDv4", v4)):
        ids = generation_seconds(generators[name], count)
        print(
            f"{name:<8} {result['seconds']:>6.2f} s {ids:>11.2f} s {count / result['seconds']:>9,.0f}"
            f" {result['wal_bytes'] / 2**20:>9.1f} MB {result['index_bytes'] / 2**20:>8.1f} MB"
            f" {result['index_bytes'] / 8192:>12,.0f} {result['spread']:>7.2%}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument(
        "--orm-max", type=int, default=1_000_000, help="largest N to run the naive ORM at (default: all)"
    )
    parser.add_argument(
        "--sharded-users",
        type=int,
        default=100_000,
        metavar="N",
        help="N for the sharded row: the demo end to end on the sharded layout and on the default one "
        "(default 100,000; 0 skips it)",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    arguments = parser.parse_args()

    if arguments.child:
        method, count, environment = arguments.child
        print(json.dumps(child(method, int(count), json.loads(environment))))
        return 0

    with LocalCluster(port_base=free_port_base()) as cluster:
        python = sys.version.split()[0]
        print(f"PostgreSQL {cluster.version} ({cluster.bindir}), {os.cpu_count()} CPUs, Python {python}")
        print("Each load: a fresh process, an emptied table, one transaction; times are wall clock.\n")
        results: dict[tuple[str, int], dict[str, float]] = {}
        for count in arguments.sizes:
            for method in METHODS:
                if method == "naive-orm" and count > arguments.orm_max:
                    continue
                results[(method, count)] = measure(cluster, method, count)
                print(f"  measured {method} at {count:,}", file=sys.stderr, flush=True)
        print_load_table(results, arguments.sizes)

        for count in arguments.sizes:
            results[("end-to-end", count)] = end_to_end(cluster, count)
            print(f"  measured end-to-end at {count:,}", file=sys.stderr, flush=True)
        print()
        print_end_to_end_table(results, arguments.sizes)

        largest = max(arguments.sizes)
        v4 = measure(cluster, "copy-baseline-uuid4", largest)
        print()
        print_uuid_table(results[("copy-baseline", largest)], v4, largest)

        if arguments.sharded_users:
            count = arguments.sharded_users
            unsharded = end_to_end(cluster, count)
            with LocalCluster(port_base=free_port_base(), sharded=True) as sharded:
                sharded_result = end_to_end(sharded, count)
            print()
            print_sharded_row(count, sharded_result, unsharded)
    return 0


def end_to_end(cluster: LocalCluster, count: int) -> dict[str, float]:
    """The demo's whole run on an emptied table, in a child process of its own."""
    reset_table(cluster)
    return run_child("end-to-end", count, cluster)


def run_child(method: str, count: int, cluster: LocalCluster) -> dict[str, float]:
    """One load in a fresh process; its figures, or, if it failed, its last line of stderr as this run's end."""
    command = [sys.executable, __file__, "--child", method, str(count), json.dumps(cluster.demo_environment())]
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"bench_insert.py: {method} at {count:,} failed: {last_line(child.stderr)}")
    return json.loads(child.stdout)  # type: ignore[no-any-return]


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "(nothing on stderr)"


def print_sharded_row(count: int, sharded: dict[str, float], unsharded: dict[str, float]) -> None:
    print(f"Sharded against unsharded: `python sharding_demo.py --users {count:,} --show 2`, end to end")
    print("(sharded: master-db routes every row through postgres_fdw to shard-one and shard-two)")
    header = f"{'layout':<10} {'end to end':>11} {'ratio':>7} {'peak RSS':>9}"
    print(header)
    print("-" * len(header))
    for name, result in (("unsharded", unsharded), ("sharded", sharded)):
        ratio = result["seconds"] / unsharded["seconds"]
        print(f"{name:<10} {result['seconds']:>9.2f} s {ratio:>6.2f}x {result['peak_rss_mb']:>6.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
