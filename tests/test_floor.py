"""The floor benchmark's columnar engine folds the same windows as its per-event one
(``tests/bench/bench_floor.py``): pure logic, no Kafka or Bytewax."""

from __future__ import annotations

import math
import random
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows import sources
from schemas.topics import REQUESTS, RESPONSES
from tests.bench.bench_floor import ColumnarLogic, LeanLogic
from tests.bench.dataset import generate

CALLS = 3_000
PAYLOADS = generate(CALLS, 40, 7)


def activations(seed: int) -> list[list[list]]:
    """The data set as a source would hand it over: polls of random sizes, both topics
    interleaved at random, grouped into activations of random sizes."""
    rng = random.Random(seed)
    requests, responses = PAYLOADS
    positions = {REQUESTS: 0, RESPONSES: 0}
    payloads = {REQUESTS: requests, RESPONSES: responses}
    polls: list[sources.Poll] = []
    now = time.time()
    while any(positions[topic] < len(payloads[topic]) for topic in positions):
        topic = rng.choice([topic for topic in positions if positions[topic] < len(payloads[topic])])
        first = positions[topic]
        last = min(len(payloads[topic]), first + rng.randint(1, 700))
        positions[topic] = last
        offsets = list(range(first, last))
        items, times = sources.decode_values(topic, 0, offsets, payloads[topic][first:last], now)
        polls.append(sources.poll_of(topic, 0, offsets, items, times))
    out = []
    while polls:
        take = rng.randint(1, 8)
        out.append([runs for _, runs in sources.route_polls(polls[:take])])
        polls = polls[take:]
    return out


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_the_columnar_engine_folds_the_windows_of_the_per_event_one(seed: int) -> None:
    lean, columnar = LeanLogic(None), ColumnarLogic(None)
    for values in activations(seed):
        lean.on_batch(values)
        columnar.on_batch(values)

    assert lean.windows.keys() == columnar.windows.keys()
    assert sum(window.requests for window in lean.windows.values()) > CALLS * 0.9
    for key, expected in lean.windows.items():
        got = columnar.windows[key]
        for name in (
            "requests",
            "errors",
            "prompt_tokens",
            "completion_tokens",
            "cache_read_tokens",
            "reasoning_tokens",
            "ttft_count",
            "unpriced",
        ):
            assert getattr(got, name) == getattr(expected, name), (key, name)
        for name in ("latency_ms", "ttft_ms", "cost_usd"):
            assert math.isclose(getattr(got, name), getattr(expected, name), rel_tol=1e-9, abs_tol=1e-9)
        assert got.digest.n_values == expected.digest.n_values
        assert math.isclose(got.digest.quantile(0.5), expected.digest.quantile(0.5), rel_tol=1e-6)
