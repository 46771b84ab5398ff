"""t-digest libraries for the latency percentiles: ``fastdigest`` (Rust) against
``tdigest`` (pure Python), on 100,000 log-normal latencies.

Per-value update cost (one at a time, and in chunks), merge and serialization
cost, and the error at p50/p95/p99 against the exact nearest-rank values.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable

import fastdigest
import tdigest

from dataflows.aggregate import MAX_CENTROIDS

VALUES = 100_000
# Values per batch_update in the chunked runs.
CHUNK = 256
QUANTILES = (0.5, 0.95, 0.99)


def _seconds(action: Callable[[], object], repeat: int = 1) -> float:
    """Best of three runs of ``repeat`` calls, per call."""
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeat):
            action()
        best = min(best, (time.perf_counter() - started) / repeat)
    return best


def _exact(ordered: list[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _fast_chunked(values: list[float]) -> fastdigest.TDigest:
    digest = fastdigest.TDigest(max_centroids=MAX_CENTROIDS)
    for first in range(0, len(values), CHUNK):
        digest.batch_update(sorted(values[first : first + CHUNK]))
    return digest


def _fast_one_by_one(values: list[float]) -> fastdigest.TDigest:
    digest = fastdigest.TDigest(max_centroids=MAX_CENTROIDS)
    for value in values:
        digest.update(value)
    return digest


def _slow_one_by_one(values: list[float]) -> tdigest.TDigest:
    digest = tdigest.TDigest()
    for value in values:
        digest.update(value)
    return digest


def _slow_chunked(values: list[float]) -> tdigest.TDigest:
    digest = tdigest.TDigest()
    for first in range(0, len(values), CHUNK):
        digest.batch_update(values[first : first + CHUNK])
    return digest


def main() -> None:
    rng = random.Random(2024)
    values = [rng.lognormvariate(6.0, 1.0) for _ in range(VALUES)]
    ordered = sorted(values)
    half = VALUES // 2
    slow_sample = values[:20_000]  # the pure-Python update is timed on a fifth

    fast = _fast_chunked(values)
    fast_a, fast_b = _fast_chunked(values[:half]), _fast_chunked(values[half:])
    fast_bytes = fast.to_bytes()
    slow = _slow_chunked(values)
    slow_a, slow_b = _slow_chunked(values[:half]), _slow_chunked(values[half:])
    slow_text = json.dumps(slow.to_dict())

    def slow_load() -> tdigest.TDigest:
        digest = tdigest.TDigest()
        digest.update_from_dict(json.loads(slow_text))
        return digest

    rows = [
        (
            "update, one value (µs/value)",
            _seconds(lambda: _fast_one_by_one(values)) / VALUES * 1e6,
            _seconds(lambda: _slow_one_by_one(slow_sample)) / len(slow_sample) * 1e6,
        ),
        (
            f"update, sorted chunks of {CHUNK} (µs/value)",
            _seconds(lambda: _fast_chunked(values)) / VALUES * 1e6,
            _seconds(lambda: _slow_chunked(slow_sample)) / len(slow_sample) * 1e6,
        ),
        (
            "merge two 50k digests (µs)",
            _seconds(lambda: fast_a.merge(fast_b), 200) * 1e6,
            _seconds(lambda: slow_a + slow_b, 3) * 1e6,
        ),
        (
            "serialize (µs)",
            _seconds(fast.to_bytes, 1000) * 1e6,
            _seconds(lambda: json.dumps(slow.to_dict()), 20) * 1e6,
        ),
        (
            "deserialize (µs)",
            _seconds(lambda: fastdigest.TDigest.from_bytes(fast_bytes), 1000) * 1e6,
            _seconds(slow_load, 20) * 1e6,
        ),
        ("serialized size (bytes)", float(len(fast_bytes)), float(len(slow_text))),
    ]
    for q in QUANTILES:
        exact = _exact(ordered, q)
        rows.append(
            (
                f"p{round(q * 100)} error vs exact (%)",
                abs(fast.quantile(q) - exact) / exact * 100,
                abs(slow.percentile(q * 100) - exact) / exact * 100,
            )
        )

    print(
        f"{VALUES:,} log-normal latencies (µ=6, σ=1); fastdigest max_centroids={MAX_CENTROIDS}, "
        f"tdigest defaults (δ=0.01, K=25); tdigest updates timed on {len(slow_sample):,}"
    )
    print(f"{'':44} {'fastdigest':>12} {'tdigest':>12} {'ratio':>8}")
    for name, fast_value, slow_value in rows:
        ratio = slow_value / fast_value if fast_value else math.inf
        print(f"{name:44} {fast_value:12.4g} {slow_value:12.4g} {ratio:8.1f}")
