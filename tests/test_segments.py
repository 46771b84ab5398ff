"""Remembered request ids kept in Postgres segments: snapshots that name them, resumes that
read them back, and rows that go once nothing can resume into them (a real Postgres)."""

from __future__ import annotations

import pickle
import random

import psycopg
import pytest

from dataflows.remembered import KEEP_SNAPSHOTS, Remembered
from dataflows.segments import MissingSegments, PostgresSegments
from dataflows.shards import DEFAULT
from schemas.network import free_port

TENANTS = ("acme", "globex", "initech")


def _ids_of_one_shard(count: int, seed: int) -> list[str]:
    """Request ids that all route to one join shard, as in the dataflow."""
    rng = random.Random(seed)
    ids: list[str] = []
    while len(ids) < count:
        rid = f"req-{rng.getrandbits(64):016x}"
        if DEFAULT.join_key(rid) == "7":
            ids.append(rid)
    return ids


def _rows(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [row[0] for row in conn.execute("SELECT number FROM join_segments ORDER BY number")]


def test_a_snapshot_names_its_segments_and_a_resume_reads_them_back(postgres_dsn: str) -> None:
    rng = random.Random(5)
    ids = _ids_of_one_shard(6_000, seed=1)
    remembered = Remembered()
    remembered.attach(PostgresSegments(postgres_dsn), DEFAULT.join_key)
    expected: dict[str, tuple[float, str]] = {}
    sizes: list[int] = []
    watermark = 0.0
    for epoch in range(12):
        for rid in ids[epoch * 500 : (epoch + 1) * 500]:
            value = (watermark + rng.uniform(500, 5_000), rng.choice(TENANTS))
            remembered.add(rid, *value)
            expected[rid] = value
        watermark += 10.0
        remembered.seal(watermark, snapshot=True)
        sizes.append(len(pickle.dumps(remembered)))
    # Each snapshot holds what changed since the last, not all that is remembered.
    assert len(remembered) == 6_000 == len(expected)
    assert max(sizes) < 2 * min(sizes), sizes
    assert max(sizes) < 6_000 * 2  # far below 6,000 ids at even 8 bytes of digest each

    restored = pickle.loads(pickle.dumps(remembered))
    assert restored.needs_store()
    restored.attach(PostgresSegments(postgres_dsn), DEFAULT.join_key)
    assert not restored.needs_store()
    assert restored == remembered
    for rid, value in rng.sample(sorted(expected.items()), 1_000):
        assert restored.get(rid, watermark) == value
    for rid in _ids_of_one_shard(200, seed=2):
        assert restored.get(rid, watermark) is None


def test_segments_written_after_the_snapshot_a_resume_starts_from_are_forgotten(postgres_dsn: str) -> None:
    """A crash after a seal but before its snapshot was committed: the resumed state
    does not know those ids (the replay counts them again) and their rows go."""
    ids = _ids_of_one_shard(300, seed=3)
    remembered = Remembered()
    remembered.attach(PostgresSegments(postgres_dsn), DEFAULT.join_key)
    for rid in ids[:100]:
        remembered.add(rid, 1_000.0, "acme")
    remembered.seal(10.0, snapshot=True)
    committed = pickle.dumps(remembered)
    for rid in ids[100:]:
        remembered.add(rid, 1_000.0, "acme")
    remembered.seal(20.0, snapshot=True)
    assert _rows(postgres_dsn) == [0, 1]

    resumed: Remembered = pickle.loads(committed)
    resumed.attach(PostgresSegments(postgres_dsn), DEFAULT.join_key)
    assert _rows(postgres_dsn) == [0]
    assert all(resumed.get(rid, 20.0) == (1_000.0, "acme") for rid in ids[:100])
    assert all(resumed.get(rid, 20.0) is None for rid in ids[100:])
    # The replay seals its own segment 1 again.
    for rid in ids[100:200]:
        resumed.add(rid, 1_000.0, "globex")
    resumed.seal(20.0, snapshot=True)
    again: Remembered = pickle.loads(pickle.dumps(resumed))
    again.attach(PostgresSegments(postgres_dsn), DEFAULT.join_key)
    assert [again.get(rid, 30.0) for rid in (ids[0], ids[150], ids[250])] == [
        (1_000.0, "acme"),
        (1_000.0, "globex"),
        None,
    ]


def test_a_segment_is_deleted_some_snapshots_after_its_ids_expired(postgres_dsn: str) -> None:
    ids = _ids_of_one_shard(40, seed=4)
    remembered = Remembered()
    remembered.attach(PostgresSegments(postgres_dsn), DEFAULT.join_key)
    for number in range(4):
        for rid in ids[number * 10 : (number + 1) * 10]:
            remembered.add(rid, 100.0 * (number + 1), "acme")
        remembered.seal(0.0, snapshot=True)
    assert _rows(postgres_dsn) == [0, 1, 2, 3] and remembered.segments() == 4
    remembered.seal(150.0, snapshot=True)  # segment 0 (expiry 100) expired
    assert remembered.segments() == 3 and len(remembered) == 30
    for _ in range(KEEP_SNAPSHOTS - 1):
        remembered.seal(150.0, snapshot=True)
        assert _rows(postgres_dsn) == [0, 1, 2, 3]  # a resume may still need it
    remembered.seal(150.0, snapshot=True)
    assert _rows(postgres_dsn) == [1, 2, 3]


def test_a_resume_against_a_database_without_its_segments_says_so(postgres_dsn: str) -> None:
    remembered = Remembered()
    remembered.attach(PostgresSegments(postgres_dsn), DEFAULT.join_key)
    for rid in _ids_of_one_shard(10, seed=5):
        remembered.add(rid, 100.0, "acme")
    remembered.seal(0.0, snapshot=True)
    state = pickle.dumps(remembered)
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("DELETE FROM join_segments")
    with pytest.raises(MissingSegments, match=r"join shard 7: segments \[0\].*--reset"):
        pickle.loads(state).attach(PostgresSegments(postgres_dsn), DEFAULT.join_key)


def test_ids_wait_in_the_snapshot_while_postgres_is_unreachable(postgres_dsn: str) -> None:
    store = PostgresSegments(f"postgresql://127.0.0.1:{free_port()}/none")
    remembered = Remembered()
    remembered.attach(store, DEFAULT.join_key)
    ids = _ids_of_one_shard(50, seed=6)
    for rid in ids:
        remembered.add(rid, 100.0, "acme")
    remembered.seal(0.0, snapshot=True)
    assert remembered.segments() == 0
    # Not lost: the snapshot holds them as recent ids.
    held: Remembered = pickle.loads(pickle.dumps(remembered))
    assert all(held.get(rid, 0.0) == (100.0, "acme") for rid in ids)
    store.dsn = postgres_dsn  # Postgres is back
    remembered.seal(0.0, snapshot=True)
    assert remembered.segments() == 1 and _rows(postgres_dsn) == [0]
    resumed: Remembered = pickle.loads(pickle.dumps(remembered))
    resumed.attach(PostgresSegments(postgres_dsn), DEFAULT.join_key)
    assert all(resumed.get(rid, 0.0) == (100.0, "acme") for rid in ids)
