"""The dimension rows' statistics computed with arrays equal what one CallStats per row gives:
digests byte for byte and percentiles as fastdigest computes them; and the packed rows'
arrays, sent in binary, read back from a real Postgres as they were."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import psycopg
import pytest
from fastdigest import TDigest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows import binary_arrays
from dataflows.aggregate import (
    EXACT_UP_TO,
    MAX_CENTROIDS,
    SUM_COLUMNS,
    CallStats,
    ValueSums,
    exact_digests,
    exact_quantiles,
    row_key,
)
from dataflows.sinks import _BinaryArray, _ByteaArray, _Float8Array, _Int8Array, _TextArray

QS = (0.5, 0.95, 0.99)

# Latencies with many repeats (a digest must not merge equal values) and wide ranges.
latency_lists = st.lists(
    st.one_of(
        st.sampled_from([0.0, -0.0, 1.0, 2.5, 100.0]), st.floats(min_value=0, max_value=1e9, allow_nan=False)
    ),
    max_size=EXACT_UP_TO,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(latency_lists, min_size=1, max_size=6))
def test_exact_digests_and_quantiles_are_fastdigests_own(runs: list[list[float]]) -> None:
    ascending = np.array([value for run in runs for value in sorted(run)], dtype=np.float64)
    sizes = np.array([len(run) for run in runs], dtype=np.int64)
    digests = exact_digests(ascending, sizes)
    quantiles = exact_quantiles(ascending, sizes, QS)
    for index, run in enumerate(runs):
        expected = TDigest(max_centroids=MAX_CENTROIDS)
        if run:
            expected.batch_update(run)
        assert digests[index] == expected.to_bytes()
        if run:
            for q, values in zip(QS, quantiles, strict=True):
                assert values[index] == expected.quantile(q), (q, run)


def test_the_largest_exact_digest_is_still_fastdigests_own() -> None:
    rng = random.Random(7)
    for size in (1, 2, 3, EXACT_UP_TO - 1, EXACT_UP_TO):
        run = [round(rng.lognormvariate(5, 2), rng.choice([0, 3])) for _ in range(size)]
        expected = TDigest(max_centroids=MAX_CENTROIDS)
        expected.batch_update(run)
        assert exact_digests(np.array(sorted(run)), np.array([size]))[0] == expected.to_bytes()
        quantiles = exact_quantiles(np.array(sorted(run)), np.array([size]), QS)
        assert [values[0] for values in quantiles] == [expected.quantile(q) for q in QS]


def _call_sums(rng: random.Random, answered: bool) -> list[int]:
    """What one call adds (SUM_COLUMNS order): a timeout, or an answered call."""
    if not answered:
        return [1, 1, 1] + [0] * (len(SUM_COLUMNS) - 3)
    ttft = rng.random() < 0.5
    prompt = rng.randrange(1000)
    return [
        1,
        int(rng.random() < 0.1),
        0,
        1,
        rng.randrange(10**10),
        rng.randrange(10**9) if ttft else 0,
        int(ttft),
        prompt,
        rng.randrange(500),
        rng.randrange(prompt + 1),
        rng.randrange(50),
        rng.randrange(10**10),
        int(rng.random() < 0.2),
    ]


@pytest.mark.parametrize("seed", range(4))
def test_statistics_equal_one_callstats_per_output(seed: int) -> None:
    """Random values per window and dimension, some rows past EXACT_UP_TO (kept in buckets),
    outputs of one row and of many (as "(other)" merges them), added in several batches: each
    output's fields, ttft count and digest equal those of a CallStats fed the same calls."""
    rng = random.Random(seed)
    table = ValueSums()
    calls: dict[int, list[tuple[list[int], float]]] = {}  # row key -> its calls
    for _ in range(5):
        keys, sums, latencies = [], [], []
        for _ in range(rng.randrange(1, 1500)):
            window = table.window_id(("t", "/r", f"m{rng.randrange(3)}"))
            place = rng.randrange(2)
            value = rng.choice([None, "a", "b", "big"] + [f"u{n}" for n in range(30)])
            count = 700 if value == "big" else 1
            for _ in range(count):
                answered = rng.random() < 0.9
                latency = rng.lognormvariate(5, 1) if answered else math.nan
                key = row_key(window, place, table.value_numbers([value])[0])
                keys.append(key)
                sums.append(_call_sums(rng, answered))
                latencies.append(latency)
                calls.setdefault(key, []).append((sums[-1], latency))
        table.add(np.array(keys, dtype=np.int64), np.array(sums, dtype=np.int64), np.array(latencies))
    assert table.buckets, "no row went past EXACT_UP_TO"
    rows = {key: table.rows[key] for key in calls}
    keys = list(calls)
    rng.shuffle(keys)
    outputs: list[list[int]] = []
    expected: list[CallStats] = []
    while keys:
        size = rng.choice([1, 1, 1, 3, 20])
        members, keys = keys[:size], keys[size:]
        outputs.append([rows[key] for key in members])
        one = CallStats()
        for key in members:
            for sums, latency in calls[key]:
                one.add_sums(sums, np.array([] if math.isnan(latency) else [latency]))
        expected.append(one)
    got = table.statistics(outputs)
    for index, one in enumerate(expected):
        digest = one.latency_digest()
        assert {name: values[index] for name, values in got.fields.items()} == one.row_fields(digest)
        assert got.ttft_count[index] == one.ttft_count
        assert got.digests[index] == digest.to_bytes()


@pytest.mark.parametrize(
    ("wrapper", "cast", "values"),
    [
        (_Int8Array, "bigint[]", [0, 1, -1, 2**63 - 1, -(2**63)]),
        (_Float8Array, "double precision[]", [0.0, -0.0, 1e-300, 1.7976931348623157e308, 0.1 + 0.2]),
        (_Float8Array, "double precision[]", [None, 1.5, None]),
        (
            _TextArray,
            "text[]",
            ["", None, 'quo"te', "back\\slash", "{braces,comma}", "NULL", "ünï ☃", "\ufffd"],
        ),
        (_ByteaArray, "bytea[]", [b"", b"\x00\x01\xff", b"FASTDIG~" * 20]),
    ],
)
def test_binary_arrays_read_back_as_sent(
    postgres_dsn: str, wrapper: type[_BinaryArray], cast: str, values: list[object]
) -> None:
    build: Callable[[list[Any], list[int]], list[bytes]] = {
        _Int8Array: binary_arrays.int8_arrays,
        _Float8Array: binary_arrays.float8_arrays,
        _TextArray: binary_arrays.text_arrays,
        _ByteaArray: binary_arrays.bytea_arrays,
    }[wrapper]
    # Several arrays at once: the values, an empty one, and the values reversed.
    arrays = build([*values, *reversed(values)], [len(values), 0, len(values)])
    read = []
    with psycopg.connect(postgres_dsn) as conn:
        for array in arrays:
            row = conn.execute(f"SELECT %b::{cast}", (wrapper(array),)).fetchone()
            assert row is not None
            read.append([bytes(item) if isinstance(item, memoryview) else item for item in row[0]])
    assert read == [values, [], list(reversed(values))]
