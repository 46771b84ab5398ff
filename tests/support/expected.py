"""What the tests compare the code's output with, worked out independently and plainly: the
transitions docs/alerts.md predicts for a run of windows; a window's row from its calls
(:func:`expected_row`, checked with :func:`assert_row`); and a roll-up bucket's row from the raw
calls of its windows (:func:`check_bucket`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from statistics import fmean
from typing import Any

import pytest

from dataflows.join import Call
from schemas.rows import MetricsRow
from tests.support.metric_windows import Window

# -- alerts ----------------------------------------------------------------------


def expected_transitions(breaching: list[bool], for_windows: int) -> list[tuple[str, int]]:
    """(state, window index) of every transition: walk the windows in order, fire at the
    ``for_windows``-th consecutive breach, resolve at the first window that does not breach."""
    out: list[tuple[str, int]] = []
    firing, streak = False, 0
    for index, breach in enumerate(breaching):
        streak = streak + 1 if breach else 0
        if not firing and streak >= for_windows:
            out.append(("firing", index))
            firing = True
        elif firing and not breach:
            out.append(("resolved", index))
            firing = False
    return out


# -- a window's row (the one-minute windows of test_windows and test_order) ----------

# The window length expected_row assumes, in seconds.
WINDOW = 60


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def expected_row(calls: list[Call], start: int) -> MetricsRow:
    """The row, worked out from the calls with plain Python (percentiles aside).

    ``calls`` are the window's calls in their final state (a timeout replaced by
    its answered call is only the answered call); the revision is one per
    timed-out call and two per answered call."""
    tenant_id, route, model = (calls[0].request.tenant_id, calls[0].request.route, calls[0].request.model)
    done = [call for call in calls if call.response is not None]
    responses = [call.response for call in calls if call.response is not None]

    def latency(call: Call) -> float:
        assert call.response is not None
        if call.response.latency_ms is not None:
            return call.response.latency_ms
        gap = (call.response.timestamp - call.request.timestamp).total_seconds() * 1000
        return max(0.0, gap)

    ttfts = [r.time_to_first_token_ms for r in responses if r.time_to_first_token_ms is not None]
    latencies = [latency(call) for call in done]
    return MetricsRow(
        tenant_id=tenant_id,
        route=route,
        model=model,
        window_start=datetime.fromtimestamp(start, UTC),
        window_end=datetime.fromtimestamp(start + WINDOW, UTC),
        requests=len(calls),
        errors=sum(1 for c in calls if c.response is None or c.response.error),
        timeouts=sum(1 for c in calls if c.response is None),
        avg_latency_ms=sum(latencies) / len(latencies) if latencies else None,
        p50_latency_ms=nearest_rank(latencies, 0.5) if latencies else None,
        p95_latency_ms=nearest_rank(latencies, 0.95) if latencies else None,
        p99_latency_ms=nearest_rank(latencies, 0.99) if latencies else None,
        avg_time_to_first_token_ms=sum(ttfts) / len(ttfts) if ttfts else None,
        prompt_tokens=sum(c.request.prompt_tokens for c in done),
        completion_tokens=sum(r.completion_tokens for r in responses),
        cache_read_tokens=sum(r.cache_read_tokens for r in responses),
        reasoning_tokens=sum(r.reasoning_tokens for r in responses),
        avg_prompt_tokens=sum(c.request.prompt_tokens for c in done) / len(done) if done else None,
        avg_completion_tokens=sum(r.completion_tokens for r in responses) / len(done) if done else None,
        estimated_cost_usd=sum(c.cost_usd or 0.0 for c in done),
        unpriced_requests=sum(1 for c in done if c.cost_usd is None),
        revision=len(calls) + len(done),
    )


def assert_row(actual: MetricsRow, expected: MetricsRow, calls: list[Call]) -> None:
    """Equal field by field; averages and cost to float precision, percentiles
    between the nearest-rank neighbours of the calls' latencies."""
    latencies = [
        c.response.latency_ms
        if c.response.latency_ms is not None
        else max(0.0, (c.response.timestamp - c.request.timestamp).total_seconds() * 1000)
        for c in calls
        if c.response is not None
    ]
    for field in MetricsRow.__struct_fields__:
        got, want = getattr(actual, field), getattr(expected, field)
        if field.startswith("p") and field.endswith("_latency_ms"):
            assert (got is None) == (want is None), field
            if got is not None:
                q = {"p50": 0.5, "p95": 0.95, "p99": 0.99}[field[:3]]
                assert_between_neighbours(got, latencies, q)
            continue
        if isinstance(want, float):
            assert got == want or math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9), field
        else:
            assert got == want, field


def assert_between_neighbours(reported: float, values: list[float], q: float) -> None:
    ordered = sorted(values)
    n = len(ordered)
    # The interpolated position among the ordered values, and the values around it.
    position = q * (n - 1)
    low, high = ordered[math.floor(position)], ordered[math.ceil(position)]
    # Interpolating inside a centroid of equal values may land one ulp outside them.
    ulps = 4 * math.ulp(high)
    assert low - ulps <= reported <= high + ulps, (q, reported, low, high)
    # Hence also within one rank of the nearest-rank value.
    rank = max(0, math.ceil(q * n) - 1)
    assert ordered[max(0, rank - 1)] - ulps <= reported <= ordered[min(n - 1, rank + 1)] + ulps


# -- a roll-up bucket, from the raw calls of its windows --------------------------------


def nearest_rank_neighbours(values: Sequence[float], q: float) -> tuple[float, float]:
    """The values around the exact nearest-rank percentile: a merged digest lands between."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))  # 1-based
    return ordered[max(rank - 2, 0)], ordered[min(rank, len(ordered) - 1)]


def bucket_start(moment: datetime, seconds: int) -> datetime:
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % seconds, moment.tzinfo)


def check_bucket(row: dict[str, Any], windows: Sequence[Window], revision: int | None = None) -> None:
    """Every field of a merged row against the raw calls of its windows (and ``revision``, when
    the row's revision is not their highest)."""
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
    assert row["revision"] == (max(window.revision for window in windows) if revision is None else revision)
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
        low, high = nearest_rank_neighbours(latencies, q)
        assert low <= row[name] <= high, (name, low, row[name], high)
