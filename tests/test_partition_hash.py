"""sharding_demo's Python port of PostgreSQL's hash-partition routing, checked against the server.

Moduli include 3 and 10 (not powers of two) and 8 and 16: an error in a constant or a shift can
hide when only modulus 4 is tested, because `% 4` looks at the two lowest bits alone.
"""

from __future__ import annotations

import random
import uuid

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import connect
from local_cluster import LocalCluster
from sharding_demo import (
    HASH_COMBINE64_CONSTANT,
    HASH_PARTITION_SEED,
    Partition,
    partition_row_hash,
    predict_partition,
)

MODULI = (3, 4, 8, 10, 16)
UINT64 = 2**64

# Computed by PostgreSQL 15.18 (and checked on 18.6 by the live tests below):
#   uuid_hash_extended(id, HASH_PARTITION_SEED), and for each modulus the remainder r for which
#   satisfies_hash_partition('tbl_users'::regclass, modulus, r, id) is true.
SERVER_VECTORS = [
    ("00000000-0000-0000-0000-000000000000", 0xB6B5D3C4AA5D92C2, {3: 0, 4: 1, 8: 5, 10: 5, 16: 5}),
    ("ffffffff-ffff-ffff-ffff-ffffffffffff", 0xFDEEB1999C98549E, {3: 1, 4: 1, 8: 1, 10: 3, 16: 1}),
    ("01a2171d-8c34-7be5-b9c2-3fc613b131d7", 0x33338F94392725AB, {3: 0, 4: 2, 8: 6, 10: 0, 16: 14}),
    ("550e8400-e29b-41d4-a716-446655440000", 0xCFDF92EA773FFCE6, {3: 2, 4: 1, 8: 1, 10: 1, 16: 9}),
    ("6ba7b810-9dad-11d1-80b4-00c04fd430c8", 0xE2D8106B9773F303, {3: 1, 4: 2, 8: 6, 10: 4, 16: 6}),
]


@pytest.mark.parametrize(("user_id", "column_hash", "remainders"), SERVER_VECTORS)
def test_matches_vectors_computed_by_the_server(user_id: str, column_hash: int, remainders: dict[int, int]) -> None:
    key = uuid.UUID(user_id).bytes
    # The row hash is hash_combine64(0, column hash): the column hash plus a constant, mod 2**64.
    assert partition_row_hash(key) == (column_hash + HASH_COMBINE64_CONSTANT) % UINT64
    for modulus, remainder in remainders.items():
        assert partition_row_hash(key) % modulus == remainder, modulus


def server_remainders(connection: psycopg.Connection, user_id: uuid.UUID) -> dict[int, int]:
    rows = connection.execute(
        """
        SELECT m.modulus, r.remainder
        FROM unnest(%s::int[]) AS m(modulus)
        CROSS JOIN LATERAL generate_series(0, m.modulus - 1) AS r(remainder)
        WHERE satisfies_hash_partition('tbl_users'::regclass, m.modulus, r.remainder, %s::uuid)
        """,
        [list(MODULI), user_id],
    ).fetchall()
    return dict(rows)


def random_uuid7(draw_int: int) -> uuid.UUID:
    """A version-7 uuid with random timestamp and random bits, from one 128-bit integer."""
    value = draw_int & ~(0xF << 76) | (0x7 << 76)  # version 7
    value = value & ~(0x3 << 62) | (0x2 << 62)  # RFC 9562 variant
    return uuid.UUID(int=value)


uuids = st.one_of(
    st.uuids(version=4),
    st.integers(min_value=0, max_value=UINT64 * UINT64 - 1).map(random_uuid7),
    st.uuids(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user_id=uuids)
def test_matches_the_live_server_for_any_uuid(cluster: LocalCluster, user_id: uuid.UUID) -> None:
    with connect(cluster.primary) as connection:
        server_hash = connection.execute(
            "SELECT uuid_hash_extended(%s, %s::int8)", [user_id, HASH_PARTITION_SEED]
        ).fetchone()
        assert server_hash is not None
        assert partition_row_hash(user_id.bytes) == (server_hash[0] + HASH_COMBINE64_CONSTANT) % UINT64
        expected = server_remainders(connection, user_id)
    assert {modulus: partition_row_hash(user_id.bytes) % modulus for modulus in MODULI} == expected


@pytest.fixture
def mixed_moduli_table(cluster: LocalCluster) -> str:
    """A hash-partitioned table whose partitions have moduli 2, 4 and 8 (each divides the next),
    so routing must go through the greatest modulus."""
    with connect(cluster.primary) as connection:
        connection.execute("DROP TABLE IF EXISTS hash_mixed")
        connection.execute("CREATE TABLE hash_mixed (id uuid PRIMARY KEY) PARTITION BY HASH (id)")
        for name, modulus, remainder in [("even", 2, 0), ("m4_r1", 4, 1), ("m8_r3", 8, 3), ("m8_r7", 8, 7)]:
            connection.execute(
                f"CREATE TABLE hash_mixed_{name} PARTITION OF hash_mixed "
                f"FOR VALUES WITH (MODULUS {modulus}, REMAINDER {remainder})"
            )
    return "hash_mixed"


def catalog_partitions(connection: psycopg.Connection, parent: str) -> list[Partition]:
    """The partitions as the server's catalog has them, read here independently of the demo."""
    rows = connection.execute(
        """
        SELECT c.oid, c.relname, pg_get_expr(c.relpartbound, c.oid),
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'modulus (\\d+), remainder (\\d+)'))::int[]
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = %s::regclass
        """,
        [parent],
    ).fetchall()
    return [
        Partition(oid, "public", name, bound_numbers[0], bound_numbers[1], bound, None)
        for oid, name, bound, bound_numbers in rows
    ]


@pytest.mark.parametrize("parent", ["tbl_users", "hash_mixed"])
def test_twenty_thousand_random_uuids_land_where_predicted(
    cluster: LocalCluster, mixed_moduli_table: str, parent: str
) -> None:
    generated = [uuid.uuid4() for _ in range(10_000)]
    generated += [random_uuid7(random.getrandbits(128)) for _ in range(10_000)]
    columns = "(id)" if parent == "hash_mixed" else "(id, first_name)"
    with connect(cluster.primary) as connection:
        partitions = catalog_partitions(connection, parent)
        with connection.transaction():
            with connection.cursor().copy(f"COPY {parent} {columns} FROM STDIN") as copy:
                for user_id in generated:
                    copy.write_row((user_id,) if parent == "hash_mixed" else (user_id, "Property"))
            rows = connection.execute(
                f"SELECT id, tableoid::regclass::text FROM {parent} WHERE id = ANY(%s)", [generated]
            ).fetchall()
            connection.execute(f"DELETE FROM {parent} WHERE id = ANY(%s)", [generated])
    assert len(rows) == len(generated)
    wrong = [
        (user_id, actual) for user_id, actual in rows if predict_partition(user_id.bytes, partitions).name != actual
    ]
    assert wrong == []
    # Every partition got rows, so each bound was exercised.
    assert {actual for _, actual in rows} == {partition.name for partition in partitions}
