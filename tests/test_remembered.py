"""Counted request ids, remembered compactly: exactly until their expiry, across seals and snapshots."""

from __future__ import annotations

import pickle
import random
import tracemalloc

import numpy as np

from dataflows.remembered import COMPACT_TENANTS_AT, SEAL_SECONDS, Remembered, Segment, merge_sorted


def test_an_id_is_remembered_until_its_expiry_whether_sealed_or_not() -> None:
    ids = Remembered()
    ids.add("a", 100.0, "acme")
    assert ids.get("a", 100.0) == (100.0, "acme")  # at its expiry: still remembered
    assert ids.get("a", 100.5) is None
    ids.maintain(50.0)  # sealed into the arrays
    assert ids.get("a", 99.0) == (100.0, "acme")
    assert ids.get("a", 100.5) is None
    assert ids.get("b", 0.0) is None


def test_sealing_drops_what_expired_and_keeps_the_rest_with_their_tenants() -> None:
    rng = random.Random(3)
    ids = Remembered()
    expected: dict[str, tuple[float, str]] = {}
    watermark = 0.0
    for step in range(20):
        for n in range(500):
            rid = f"{step}-{n}-{rng.getrandbits(32)}"
            value = (watermark + rng.uniform(1, 600), rng.choice(["acme", "globex", "initech"]))
            ids.add(rid, *value)
            expected[rid] = value
        watermark += SEAL_SECONDS
        ids.maintain(watermark)
        alive = {rid: value for rid, value in expected.items() if value[0] >= watermark}
        # The expired leave the arrays once they are an eighth of them (of each of the two).
        assert len(alive) <= len(ids) and (len(ids) - len(alive)) * 8 < 2 * len(ids)
        for rid, value in rng.sample(sorted(expected.items()), 300):
            assert ids.get(rid, watermark) == (value if value[0] >= watermark else None), rid


def test_tenants_no_id_names_any_more_are_forgotten() -> None:
    """A tenant of its own for nearly every id (a call directory's key and user, say): the
    list of tenants stays a few times what the live ids name, and every answer stays right."""
    rng = random.Random(8)
    ids = Remembered()
    expected: dict[str, tuple[float, str]] = {}
    watermark = 0.0
    for step in range(60):
        for n in range(1_000):
            value = (watermark + rng.uniform(1, 2 * SEAL_SECONDS), f"user-{step}-{n % 900}")
            ids.add(f"{step}-{n}", *value)
            expected[f"{step}-{n}"] = value
        watermark += SEAL_SECONDS
        ids.maintain(watermark)
        assert len(ids._tenants) <= max(COMPACT_TENANTS_AT, 2 * len(ids)), step
        for rid in rng.sample(sorted(expected), 200):
            value = expected[rid]
            assert ids.get(rid, watermark) == (value if value[0] >= watermark else None), rid
    assert ids._tenants_kept and len(ids._tenants) < 60 * 900 / 4  # 54,000 seen


def test_a_snapshot_gives_the_same_answers() -> None:
    ids = Remembered()
    for n in range(1000):
        ids.add(f"id-{n}", 1000.0 + n, "acme" if n % 2 else "globex")
    ids.maintain(0.0)
    ids.add("late", 5000.0, "acme")
    restored = pickle.loads(pickle.dumps(ids))
    assert restored == ids
    assert [restored.get(f"id-{n}", 1500.0) for n in (0, 499, 500, 999)] == [
        None,
        None,
        (1500.0, "globex"),
        (1999.0, "acme"),
    ]
    assert restored.get("late", 4000.0) == (5000.0, "acme")


def test_a_remembered_id_costs_a_few_dozen_bytes() -> None:
    ids = Remembered()
    count = 200_000
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for n in range(count):
        ids.add(f"9b1deb4d-3b7d-4bad-9bdd-{n:012d}", 10_000.0 + n, f"tenant-{n % 50}")
        if n % 40_000 == 39_999:
            ids.maintain(0.0)
    ids.maintain(0.0)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_id = (after - before) / count
    print(f"{per_id:.1f} bytes per remembered id")
    assert per_id <= 64


def test_merging_two_segments_is_a_stable_sort_of_both() -> None:
    rng = np.random.default_rng(7)
    for size_a, size_b in ((0, 5), (5, 0), (1, 1), (1000, 37), (37, 1000), (5000, 5000)):
        # Few distinct digests: many equal ones, within and across the two.
        a = Segment(
            np.sort(rng.integers(-50, 50, size_a)).astype(np.int64),
            rng.random(size_a),
            rng.integers(0, 3, size_a).astype(np.uint32),
            ["x", "y", "z"],
        )
        b = Segment(
            np.sort(rng.integers(-50, 50, size_b)).astype(np.int64),
            rng.random(size_b),
            rng.integers(0, 3, size_b).astype(np.uint32),
            ["x", "y", "z"],
        )
        merged = merge_sorted(a, b)
        digests = np.concatenate([a.digests, b.digests])
        order = np.argsort(digests, kind="stable")
        assert merged.digests.tolist() == digests[order].tolist()
        assert merged.expiry.tolist() == np.concatenate([a.expiry, b.expiry])[order].tolist()
        assert merged.tenant.tolist() == np.concatenate([a.tenant, b.tenant])[order].tolist()
