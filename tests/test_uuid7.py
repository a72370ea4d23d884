"""The bulk path's UUIDv7 ids: the real time they were made, in strict order, with RFC 9562's bit fields;
and the lesson's (uuid6), decoded with uuid6's own type."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest

from conftest import connect
from local_cluster import LocalCluster
from sharding_demo import IdBuffer, UUIDv7Maker, created_at


def test_a_million_ids_carry_the_time_they_were_made_in_order() -> None:
    generator = UUIDv7Maker()
    previous = -1
    worst_skew_ms = 0
    for _ in range(1_000_000):
        before_ms = time.time_ns() // 1_000_000
        value = int.from_bytes(generator.new())
        after_ms = time.time_ns() // 1_000_000
        timestamp_ms = value >> 80  # the first 48 bits
        # The clock read inside new_int lies between the two read here; so must the timestamp.
        worst_skew_ms = max(worst_skew_ms, before_ms - timestamp_ms, timestamp_ms - after_ms)
        assert value > previous
        previous = value
        assert (value >> 76) & 0xF == 7  # version
        assert (value >> 62) & 0b11 == 0b10  # variant
    assert worst_skew_ms <= 0


def test_ids_made_in_one_millisecond_keep_its_time_and_their_order(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = UUIDv7Maker()
    frozen_ns = 1_767_225_600_123_456_789  # 2026-01-01 00:00:00.123 UTC
    monkeypatch.setattr(time, "time_ns", lambda: frozen_ns)
    same_millisecond = [int.from_bytes(generator.new()) for _ in range(10_000)]
    assert {value >> 80 for value in same_millisecond} == {frozen_ns // 1_000_000}
    assert same_millisecond == sorted(set(same_millisecond))

    # A clock that steps back does not make an id that sorts earlier.
    monkeypatch.setattr(time, "time_ns", lambda: frozen_ns - 5_000_000)
    assert int.from_bytes(generator.new()) > same_millisecond[-1]


def test_postgresql_18_reads_the_same_time_and_version(cluster: LocalCluster) -> None:
    with connect(cluster.primary) as primary:
        version_number = int(primary.execute("SHOW server_version_num").fetchone()[0])  # type: ignore[index]
        if version_number < 180000:
            pytest.skip(f"uuid_extract_timestamp() is new in PostgreSQL 18; this is {version_number}")
        generator = UUIDv7Maker()
        ids = [uuid.UUID(bytes=generator.new()) for _ in range(1000)]
        rows = primary.execute(
            "SELECT id, uuid_extract_timestamp(id), uuid_extract_version(id) FROM unnest(%s::uuid[]) AS id",
            [ids],
        ).fetchall()
    assert len(rows) == len(ids)
    for user_id, server_time, server_version in rows:
        assert server_version == 7
        assert server_time == created_at(user_id)
        assert server_time.tzinfo is not None and server_time.astimezone(UTC) <= datetime.now(UTC)


def test_the_bulk_path_s_id_buffer_behaves_as_a_list_of_its_ids() -> None:
    # It is a Sequence: a loop over it, `in` and ids[-1] must work as on a list (and end).
    made = [UUIDv7Maker().new() for _ in range(3)]
    ids = IdBuffer(b"".join(made))
    assert list(ids) == made and len(ids) == 3
    assert ids[-1] == made[2] and made[1] in ids and bytes(16) not in ids
    with pytest.raises(IndexError):
        ids[3]
