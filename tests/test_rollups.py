"""Roll-ups: windows merged into buckets, checked against the raw calls behind them."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from statistics import fmean
from typing import Any

import pytest
from starlette.testclient import TestClient

from api.params import BUCKETS
from tests import test_metrics_api
from tests.test_metrics_api import (
    MINUTE,
    T0,
    RawCall,
    Window,
    get,
    insert_windows,
    random_calls,
    rfc3339,
)

# The app-starting fixture, shared with the query API tests.
client_for = test_metrics_api.client_for

ROUTES = ("/chat", "/search")
MODELS = ("gpt-4o", "claude-sonnet-4-5")
Key = Callable[[Window], tuple]


def nearest_rank(values: Sequence[float], q: float) -> tuple[float, float]:
    """The values around the exact nearest-rank percentile: a merged digest lands between."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))  # 1-based
    return ordered[max(rank - 2, 0)], ordered[min(rank, len(ordered) - 1)]


def exact_percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def bucket_start(moment: datetime, seconds: int) -> datetime:
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % seconds, moment.tzinfo)


def expected_buckets(
    windows: Sequence[Window], seconds: int, group_by: Sequence[str]
) -> dict[tuple, list[Window]]:
    groups: dict[tuple, list[Window]] = defaultdict(list)
    for window in windows:
        key = (
            rfc3339(bucket_start(window.start, seconds)),
            window.route if "route" in group_by else None,
            window.model if "model" in group_by else None,
        )
        groups[key].append(window)
    return groups


def check_bucket(row: dict[str, Any], windows: Sequence[Window]) -> None:
    """Every field of a merged row against the raw calls of its windows."""
    calls = [call for window in windows for call in window.calls]
    answered = [call for call in calls if call.latency_ms is not None]
    latencies = [call.latency_ms for call in answered]
    ttfts = [call.ttft_ms for call in answered if call.ttft_ms is not None]
    assert row["requests"] == len(calls)
    assert row["timeouts"] == len(calls) - len(answered)
    assert row["errors"] == sum(call.error or call.latency_ms is None for call in calls)
    for name in ("prompt_tokens", "completion_tokens", "cache_read_tokens", "reasoning_tokens"):
        assert row[name] == sum(getattr(call, name) for call in answered), name
    priced = [call.cost_usd for call in answered if call.cost_usd is not None]
    assert row["estimated_cost_usd"] == pytest.approx(sum(priced), rel=1e-9)
    assert row["unpriced_requests"] == len(answered) - len(priced)
    assert row["revision"] == max(window.revision for window in windows)
    if not answered:
        for name in (
            "avg_latency_ms",
            "p50_latency_ms",
            "p95_latency_ms",
            "p99_latency_ms",
            "avg_prompt_tokens",
            "avg_completion_tokens",
        ):
            assert row[name] is None, name
        return
    assert row["avg_latency_ms"] == pytest.approx(fmean(latencies), rel=1e-9)
    assert row["avg_prompt_tokens"] == pytest.approx(fmean(call.prompt_tokens for call in answered), rel=1e-9)
    assert row["avg_completion_tokens"] == pytest.approx(
        fmean(call.completion_tokens for call in answered), rel=1e-9
    )
    if ttfts:
        assert row["avg_time_to_first_token_ms"] == pytest.approx(fmean(ttfts), rel=1e-9)
    else:
        assert row["avg_time_to_first_token_ms"] is None
    for name, q in (("p50_latency_ms", 0.5), ("p95_latency_ms", 0.95), ("p99_latency_ms", 0.99)):
        low, high = nearest_rank(latencies, q)
        assert low <= row[name] <= high, (name, low, row[name], high)


@pytest.fixture
def windows() -> list[Window]:
    """12 minutes from 10:54 (buckets straddle the hour) for 2 routes x 2 models."""
    rnd = random.Random(11)
    start = T0 - 6 * MINUTE
    made = [
        Window(
            "acme",
            route,
            model,
            start + minute * MINUTE,
            random_calls(rnd, rnd.randint(0, 40), median_ms=rnd.choice((200, 900))),
            revision=rnd.randint(1, 3),
        )
        for minute in range(12)
        for route in ROUTES
        for model in MODELS
    ]
    # A window of timeouts only: it counts, but has no latency, digest or averages.
    made.append(
        Window("acme", "/chat", "gpt-4o", start + 12 * MINUTE, [RawCall(latency_ms=None, error=True)] * 3)
    )
    made.append(Window("other", "/chat", "gpt-4o", start, random_calls(rnd, 10)))
    return made


@pytest.fixture
def client(postgres_dsn: str, windows: list[Window], client_for: Any) -> TestClient:
    insert_windows(postgres_dsn, [w for w in windows if w.calls])
    return client_for(postgres_dsn)


@pytest.fixture
def acme(windows: list[Window]) -> list[Window]:
    return [w for w in windows if w.tenant_id == "acme" and w.calls]


def ordered(groups: dict[tuple, Any]) -> list[tuple]:
    return sorted(groups, key=lambda k: (-datetime.fromisoformat(k[0]).timestamp(), k[1] or "", k[2] or ""))


@pytest.mark.parametrize("bucket", ["1m", "5m", "15m", "1h", "1d"])
def test_buckets_sum_and_weight_exactly(client: TestClient, acme: list[Window], bucket: str):
    seconds = BUCKETS[bucket]
    groups = expected_buckets(acme, seconds, ("route", "model"))
    body = get(client, tenant_id="acme", bucket=bucket, limit=1000)
    assert [(r["window_start"], r["route"], r["model"]) for r in body["metrics"]] == (ordered(groups))
    for row in body["metrics"]:
        members = groups[(row["window_start"], row["route"], row["model"])]
        check_bucket(row, members)
        start = datetime.fromisoformat(row["window_start"])
        assert row["window_end"] == rfc3339(start + timedelta(seconds=seconds))


@pytest.mark.parametrize("group_by", ["route", "model", "", "route,model", "model,route"])
def test_group_by_merges_across_the_dimension_left_out(client: TestClient, acme: list[Window], group_by: str):
    kept = [name for name in group_by.split(",") if name]
    groups = expected_buckets(acme, 300, kept)
    body = get(client, tenant_id="acme", bucket="5m", group_by=group_by, limit=1000)
    assert [(r["window_start"], r["route"], r["model"]) for r in body["metrics"]] == (ordered(groups))
    for row in body["metrics"]:
        assert (row["route"] is None) == ("route" not in kept)
        assert (row["model"] is None) == ("model" not in kept)
        check_bucket(row, groups[(row["window_start"], row["route"], row["model"])])


def test_group_by_without_bucket_merges_per_window(client: TestClient, acme: list[Window]):
    groups = expected_buckets(acme, 60, ["model"])
    body = get(client, tenant_id="acme", group_by="model", limit=1000)
    assert len(body["metrics"]) == len(groups)
    for row in body["metrics"]:
        assert row["route"] is None
        check_bucket(row, groups[(row["window_start"], None, row["model"])])


def test_a_bucket_of_timeouts_only_has_null_latencies(client: TestClient, acme: list[Window]):
    body = get(client, tenant_id="acme", bucket="1m", route="/chat", model="gpt-4o", limit=1)
    row = body["metrics"][0]
    assert row["window_start"] == rfc3339(T0 + 6 * MINUTE)
    assert row["requests"] == row["timeouts"] == row["errors"] == 3
    assert row["p95_latency_ms"] is None
    assert row["avg_latency_ms"] is None


def test_filters_and_limit_apply_to_rollups(client: TestClient, acme: list[Window]):
    chosen = [w for w in acme if w.model == "gpt-4o" and T0 - 5 * MINUTE <= w.start < T0 + MINUTE]
    groups = expected_buckets(chosen, 3600, ["route"])
    body = get(
        client,
        tenant_id="acme",
        model="gpt-4o",
        bucket="1h",
        group_by="route",
        **{"from": rfc3339(T0 - 5 * MINUTE), "to": rfc3339(T0 + MINUTE)},
    )
    assert [(r["window_start"], r["route"], r["model"]) for r in body["metrics"]] == (ordered(groups))
    for row in body["metrics"]:
        check_bucket(row, groups[(row["window_start"], row["route"], None)])
    # limit counts buckets, newest first.
    limited = get(client, tenant_id="acme", bucket="5m", limit=3)
    every = get(client, tenant_id="acme", bucket="5m", limit=1000)
    assert limited["metrics"] == every["metrics"][:3]
    assert get(client, tenant_id="nobody", bucket="1h") == {"metrics": [], "count": 0}


def test_percentiles_come_from_merged_digests_not_averaged(postgres_dsn: str, client_for: Any):
    # One fast window and one slow one: averaging their p95s would land in the gap.
    fast = [RawCall(latency_ms=10.0 + i * 0.01) for i in range(90)]
    slow = [RawCall(latency_ms=1000.0 + i) for i in range(10)]
    insert_windows(
        postgres_dsn,
        [Window("acme", "/chat", "gpt-4o", T0, fast), Window("acme", "/chat", "gpt-4o", T0 + MINUTE, slow)],
    )
    row = get(client_for(postgres_dsn), tenant_id="acme", bucket="5m")["metrics"][0]
    latencies = [c.latency_ms for c in fast + slow]
    for name, q in (("p50_latency_ms", 0.5), ("p95_latency_ms", 0.95)):
        low, high = nearest_rank(latencies, q)
        assert low <= row[name] <= high
    assert row["p50_latency_ms"] < 11.0
    assert row["p95_latency_ms"] > 1000.0


def test_many_calls_merge_within_one_percent(postgres_dsn: str, client_for: Any):
    # 60 windows of 200 calls: more values than a digest keeps, so the merge compresses.
    rnd = random.Random(3)
    windows = [
        Window(
            "acme",
            "/chat",
            "gpt-4o",
            T0 + i * MINUTE,
            random_calls(rnd, 200, median_ms=rnd.choice((300, 700)), timeout_share=0),
        )
        for i in range(60)
    ]
    insert_windows(postgres_dsn, windows)
    row = get(client_for(postgres_dsn), tenant_id="acme", bucket="1h")["metrics"][0]
    latencies = [c.latency_ms for w in windows for c in w.calls]
    assert row["requests"] == 12_000
    for name, q in (("p50_latency_ms", 0.5), ("p95_latency_ms", 0.95), ("p99_latency_ms", 0.99)):
        assert row[name] == pytest.approx(exact_percentile(latencies, q), rel=0.01), name
