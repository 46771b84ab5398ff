"""Windows and rows, driven directly (no Kafka): boundaries, emission, revisions, lateness."""

from __future__ import annotations

import math
import pickle
import random
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from fastdigest import TDigest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.aggregate import EXACT_UP_TO, VALUE_BITS, CallStats, ValueSums
from dataflows.dimensions import StaticPlan
from dataflows.join import Call, SourceRef
from dataflows.windows import WindowRow, WindowShard
from schemas.deadletter import DeadLetter
from schemas.dimensions import MAX_DIMENSIONS
from schemas.events import LLMRequest, LLMResponse
from schemas.rows import MetricsRow
from tests.support.expected import assert_between_neighbours, assert_row, expected_row, nearest_rank

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, a window boundary
NOW = 1_900_000_000.0
WINDOW, GRACE, LATENESS, TIMEOUT = 60, 10, 600, 300
SOURCE = SourceRef("llm.responses", 1, 5)
KEY = ("acme", "/chat", "gpt-4o")
Percentile = Literal["p50_latency_ms", "p95_latency_ms", "p99_latency_ms"]


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, UTC)


_serial = iter(range(10**9))


def answered(
    start: float,
    latency_ms: float | None = 100.0,
    *,
    key: tuple[str, str, str] = KEY,
    duration: float | None = None,
    cost: float | None = 0.001,
    prompt_tokens: int = 100,
    completion_tokens: int = 0,
    cache_read_tokens: int = 0,
    reasoning_tokens: int = 0,
    time_to_first_token_ms: float | None = None,
    error: str | None = None,
) -> Call:
    """An answered call whose request is at T0 + ``start``."""
    tenant_id, route, model = key
    rid = f"r{next(_serial)}"
    req = LLMRequest(
        request_id=rid,
        tenant_id=tenant_id,
        route=route,
        model=model,
        timestamp=at(start),
        prompt_tokens=prompt_tokens,
    )
    if duration is None:
        duration = (latency_ms or 0.0) / 1000
    resp = LLMResponse(
        request_id=rid,
        timestamp=at(start + duration),
        latency_ms=latency_ms,
        completion_tokens=completion_tokens,
        cache_read_tokens=cache_read_tokens,
        reasoning_tokens=reasoning_tokens,
        time_to_first_token_ms=time_to_first_token_ms,
        error=error,
    )
    return Call(
        request=req,
        response=resp,
        source=SOURCE,
        cost_usd=cost,
        completed_at=max(T0 + start, T0 + start + duration),
    )


def timed_out(start: float, *, key: tuple[str, str, str] = KEY) -> Call:
    tenant_id, route, model = key
    req = LLMRequest(
        request_id=f"t{next(_serial)}",
        tenant_id=tenant_id,
        route=route,
        model=model,
        timestamp=at(start),
        prompt_tokens=70,
    )
    return Call(request=req, response=None, source=SOURCE, cost_usd=0.0, completed_at=T0 + start + TIMEOUT)


def converted(
    timeout: Call, latency_ms: float, *, completion_tokens: int = 0, error: str | None = None
) -> Call:
    """The answered call that replaces ``timeout``: its response came late, in range."""
    request = timeout.request
    when = request.timestamp.timestamp() + latency_ms / 1000
    resp = LLMResponse(
        request_id=request.request_id,
        timestamp=datetime.fromtimestamp(when, UTC),
        latency_ms=latency_ms,
        completion_tokens=completion_tokens,
        error=error,
    )
    return Call(
        request=request, response=resp, source=SOURCE, cost_usd=None, completed_at=when, replaces_timeout=True
    )


def shard() -> WindowShard:
    return WindowShard(WINDOW, GRACE, LATENESS)


def advance(windows: WindowShard, event_seconds: float, now: float = NOW) -> list[WindowRow]:
    """Move event time to T0 + ``event_seconds`` with a call on an unrelated key, then
    collect the rows that are due (the clock call's own window never is)."""
    clock = answered(event_seconds + 10 * LATENESS, key=("clock", "/", "none"))
    clock.completed_at = T0 + event_seconds
    assert windows.on_call(clock, now) == []
    return [row for row in windows.on_time(now) if row.row.tenant_id != "clock"]


# -- windows and emission ------------------------------------------------------


def test_a_window_is_emitted_once_event_time_reaches_end_plus_grace_with_the_right_row() -> None:
    windows = shard()
    calls = [
        answered(1, 120.0, completion_tokens=30, time_to_first_token_ms=40.0, cache_read_tokens=20),
        answered(2, 80.0, completion_tokens=10, reasoning_tokens=4, error="boom"),
        answered(3, 200.0, prompt_tokens=50, error="", cost=None),
        answered(4, None, duration=0.25, time_to_first_token_ms=60.0),
        answered(59.999, 10.0),
    ]
    for call in calls:
        assert windows.on_call(call, NOW) == []
    assert advance(windows, WINDOW + GRACE - 0.001) == []
    rows = advance(windows, WINDOW + GRACE)
    assert len(rows) == 1
    assert_row(rows[0].row, expected_row(calls, T0), calls)
    assert rows[0].row.revision == 10  # five answered calls, two each
    assert rows[0].row.errors == 1  # an empty error string is not a failure
    assert rows[0].row.avg_latency_ms == (120 + 80 + 200 + 250 + 10) / 5
    assert rows[0].ttft_count == 2
    assert TDigest.from_bytes(rows[0].digest).n_values == 5
    assert advance(windows, WINDOW + GRACE + 1) == []  # nothing new: no second row


def test_timestamps_on_a_boundary_open_the_next_window() -> None:
    windows = shard()
    windows.on_call(answered(WINDOW, 10.0), NOW)  # exactly T0 + 60
    windows.on_call(answered(WINDOW - 0.000001, 20.0), NOW)
    rows = advance(windows, 2 * WINDOW + GRACE)
    starts = [(row.row.window_start, row.row.requests, row.row.avg_latency_ms) for row in rows]
    assert starts == [(at(0), 1, 20.0), (at(WINDOW), 1, 10.0)]
    assert rows[1].row.window_end == at(2 * WINDOW)


def test_rows_come_by_window_start_then_key() -> None:
    windows = shard()
    keys = [("b", "/x", "m"), ("a", "/y", "m"), ("a", "/x", "n"), ("a", "/x", "m")]
    for key in keys:
        windows.on_call(answered(WINDOW + 1, key=key), NOW)
        windows.on_call(answered(1, key=key), NOW)
    rows = advance(windows, 2 * WINDOW + GRACE)
    order = [(row.row.window_start, row.row.tenant_id, row.row.route, row.row.model) for row in rows]
    assert order == sorted(order)
    assert len(order) == 8


def test_quiet_windows_close_as_the_wall_clock_advances() -> None:
    windows = shard()
    windows.on_call(answered(30, 10.0), NOW)  # event time T0 + 30.01
    wakeup = windows.next_wakeup()
    assert wakeup is not None
    # Due when event time reaches T0 + 70: about 40 s of wall clock later.
    assert math.isclose(wakeup, NOW + 70 - 30.01, abs_tol=0.01)
    assert windows.on_time(NOW + 39) == []
    rows = windows.on_time(NOW + 40)
    assert [(row.row.requests, row.row.revision) for row in rows] == [(1, 2)]
    # Then forgotten 600 s after its end, still without events.
    assert len(windows) == 1
    windows.on_time(NOW + 40 + LATENESS)
    assert len(windows) == 0
    assert windows.next_wakeup() is None


def test_late_calls_within_lateness_re_emit_the_whole_row_with_a_higher_revision() -> None:
    windows = shard()
    calls = [answered(1, 100.0), answered(2, 300.0)]
    for call in calls:
        windows.on_call(call, NOW)
    assert [row.row.revision for row in advance(windows, 100)] == [4]
    late = answered(3, 50.0, cost=0.5)
    late.completed_at = T0 + 200  # became known late, well within lateness
    assert windows.on_call(late, NOW) == []
    rows = windows.on_time(NOW)
    assert len(rows) == 1
    assert_row(rows[0].row, expected_row([*calls, late], T0), [*calls, late])
    assert rows[0].row.revision == 6
    # Two more late calls before the next emission: a timeout (+1), an answered call (+2).
    more = [timed_out(4), answered(5, 70.0)]
    for call in more:
        call.completed_at = T0 + 305
        windows.on_call(call, NOW)
    rows = windows.on_time(NOW)
    assert_row(rows[0].row, expected_row([*calls, late, *more], T0), [*calls, late, *more])
    assert rows[0].row.timeouts == 1 and rows[0].row.requests == 5
    assert rows[0].row.revision == 9


def test_a_call_beyond_lateness_is_a_too_late_dead_letter() -> None:
    windows = shard()
    windows.on_call(answered(1, 100.0), NOW)
    advance(windows, 100)
    # Event time now T0 + 661: the window [T0, T0 + 60) closed for good at T0 + 660.
    advance(windows, WINDOW + LATENESS + 1)
    straggler = answered(2, 100.0)
    straggler.completed_at = T0 + 3
    out = windows.on_call(straggler, NOW)
    assert len(out) == 1
    letter = out[0]
    assert isinstance(letter, DeadLetter)
    assert letter.reason == "too_late"
    assert (letter.source_topic, letter.partition, letter.offset) == tuple(SOURCE)
    assert "LATENESS_SECONDS 600" in letter.error
    assert letter.payload is not None
    payload = msgspec.json.decode(letter.payload)
    assert payload["request"]["request_id"] == straggler.request.request_id
    assert payload["response"]["latency_ms"] == 100.0
    assert windows.on_time(NOW) == []  # no row changed


def test_right_at_the_lateness_edge_the_call_still_counts() -> None:
    windows = shard()
    windows.on_call(answered(1, 100.0), NOW)
    advance(windows, WINDOW + LATENESS)  # end + lateness == event time: not past
    edge = answered(2, 100.0)
    edge.completed_at = T0 + 2
    assert windows.on_call(edge, NOW) == []
    rows = windows.on_time(NOW)
    assert [(row.row.requests, row.row.revision) for row in rows] == [(2, 4)]


def test_a_window_of_only_timeouts_has_no_latency_or_averages() -> None:
    windows = shard()
    windows.on_call(timed_out(1), NOW)
    windows.on_call(timed_out(2), NOW)
    rows = windows.on_time(NOW)  # event time is T0 + 302: due at once
    assert len(rows) == 1
    row = rows[0].row
    assert (row.requests, row.errors, row.timeouts) == (2, 2, 2)
    assert row.avg_latency_ms is row.p50_latency_ms is row.p99_latency_ms is None
    assert row.avg_prompt_tokens is None and row.avg_completion_tokens is None
    assert row.avg_time_to_first_token_ms is None
    assert row.prompt_tokens == 0 and row.estimated_cost_usd == 0.0
    assert TDigest.from_bytes(rows[0].digest).is_empty()


def test_cost_is_summed_exactly_and_unpriced_calls_counted() -> None:
    windows = shard()
    costs = [0.1, 0.2, 0.3, None, 1e-10]
    for cost in costs:
        windows.on_call(answered(1, cost=cost), NOW)
    (row,) = advance(windows, 100)
    assert row.row.estimated_cost_usd == 0.6  # 0.1 + 0.2 + 0.3 (1e-10 rounds away)
    assert row.row.unpriced_requests == 1


def test_the_row_does_not_depend_on_call_order() -> None:
    rng = random.Random(5)
    calls = [
        answered(
            rng.uniform(0, 59),
            rng.lognormvariate(5, 1),
            cost=rng.random() / 1000,
            time_to_first_token_ms=rng.random() * 100,
        )
        for _ in range(1500)
    ]
    results = []
    for _ in range(2):
        windows = shard()
        for call in calls:
            windows.on_call(call, NOW)
        results.append([row.row for row in advance(windows, 100)])
        rng.shuffle(calls)
    first, second = results
    for field in ("avg_latency_ms", "avg_time_to_first_token_ms", "estimated_cost_usd"):
        assert getattr(first[0], field) == getattr(second[0], field)
    # More calls than the digest holds exactly: the percentiles must not depend on order either.
    for field in ("p50_latency_ms", "p95_latency_ms", "p99_latency_ms"):
        assert getattr(first[0], field) == getattr(second[0], field), field


# -- timeouts replaced by their answered call --------------------------------------


def test_an_answered_call_replacing_its_timeout_re_emits_the_row_as_if_it_had_never_timed_out() -> None:
    windows = shard()
    ok = answered(1, 100.0, completion_tokens=5)
    lost = timed_out(2)
    for call in (ok, lost):
        assert windows.on_call(call, NOW) == []
    (before,) = windows.on_time(NOW)  # event time T0 + 302: due
    assert_row(before.row, expected_row([ok, lost], T0), [ok, lost])
    assert (before.row.requests, before.row.timeouts, before.row.errors, before.row.revision) == (2, 1, 1, 3)
    found = converted(lost, 250.0, completion_tokens=8, error="boom")
    assert windows.on_call(found, NOW) == []
    (after,) = windows.on_time(NOW)
    assert_row(after.row, expected_row([ok, found], T0), [ok, found])
    # Requests unchanged, the timeout gone, its error replaced by the response's.
    assert (after.row.requests, after.row.timeouts, after.row.errors, after.row.revision) == (2, 0, 1, 4)
    assert after.row.avg_latency_ms == (100 + 250) / 2
    assert after.row.completion_tokens == 13 and after.row.unpriced_requests == 1
    assert TDigest.from_bytes(after.digest).n_values == 2
    assert windows.on_time(NOW + 1) == []


def test_the_revision_is_the_content_not_the_number_of_emissions() -> None:
    first, second = timed_out(1), timed_out(3)
    calls = [first, answered(2, 40.0), second, converted(second, 90.0), answered(4, 10.0)]
    # Hand-counted: timeout +1, answered +2, timeout +1, its conversion +1, answered +2.
    expected_revisions = [1, 3, 4, 5, 7]

    every = shard()
    revisions = []
    for call in calls:
        assert every.on_call(call, NOW) == []
        (row,) = every.on_time(NOW)  # event time is past the window's end + grace
        revisions.append(row.row.revision)
    assert revisions == expected_revisions

    once = shard()
    for call in calls:
        assert once.on_call(call, NOW) == []
    (last,) = once.on_time(NOW)
    assert last.row == row.row and last.digest == row.digest
    assert_row(last.row, expected_row([first, calls[1], calls[3], calls[4]], T0), calls)

    # Emitted after the second and fourth calls only: the same revisions then, the same end.
    some = shard()
    seen = []
    for index, call in enumerate(calls):
        assert some.on_call(call, NOW) == []
        if index in (1, 3):
            seen += [item.row.revision for item in some.on_time(NOW)]
    seen += [item.row.revision for item in some.on_time(NOW)]
    assert seen == [3, 5, 7]


def test_a_replacement_overtaking_its_timeout_holds_the_row_until_the_timeout_comes() -> None:
    windows = shard()
    lost = timed_out(2)
    found = converted(lost, 30.0)
    ok = answered(1, 100.0)
    ok.completed_at = T0 + 400  # event time well past the window's end + grace
    assert windows.on_call(ok, NOW) == []
    assert windows.on_call(found, NOW) == []
    assert windows.on_time(NOW) == []  # timeouts would read -1
    assert windows.on_time(NOW + 1) == []
    assert windows.on_call(lost, NOW + 1) == []
    (row,) = windows.on_time(NOW + 1)
    assert_row(row.row, expected_row([ok, found], T0), [ok, found])
    assert (row.row.requests, row.row.timeouts, row.row.errors, row.row.revision) == (2, 0, 0, 4)


def test_a_held_row_does_not_ask_to_be_woken_at_once_over_and_over() -> None:
    windows = shard()
    lost = timed_out(2)
    ok = answered(1, 100.0)
    ok.completed_at = T0 + 400
    windows.on_call(ok, NOW)
    windows.on_call(converted(lost, 30.0), NOW)
    assert windows.on_time(NOW) == []  # held: nothing is due until the timeout arrives
    wakeup = windows.next_wakeup()
    assert wakeup is None or wakeup > NOW


def test_only_the_whole_window_reaches_the_highest_revision() -> None:
    # Equal revisions of rows holding part of a window's calls may differ (one
    # answered call, or two timeouts, both read 2: a replay can emit either), but
    # the row holding every call has a revision no partial row reaches, so the
    # highest revision is the final content.
    calls = [answered(1, 100.0), timed_out(2), timed_out(3)]
    revisions: dict[tuple[int, ...], int] = {}
    for mask in range(1, 2 ** len(calls)):
        chosen = tuple(i for i in range(len(calls)) if mask >> i & 1)
        windows = shard()
        for i in chosen:
            windows.on_call(calls[i], NOW)
        (row,) = windows.on_time(NOW + 1000)
        revisions[chosen] = row.row.revision
    whole = revisions.pop((0, 1, 2))
    assert whole == 4
    assert revisions[(0,)] == revisions[(1, 2)] == 2
    assert max(revisions.values()) < whole


# -- snapshots -----------------------------------------------------------------


def test_pickling_mid_stream_gives_the_same_outputs() -> None:
    rng = random.Random(11)
    steps: list[tuple[Call | None, float]] = []
    for index in range(300):
        start = index * 2.0
        call = answered(start, rng.lognormvariate(5, 1), key=("t", f"/r{index % 3}", "m"))
        if index % 17 == 0:
            call = timed_out(start, key=("t", "/r0", "m"))
        if index % 29 == 28:
            # A request from long ago: once the timeouts moved event time ahead, too late.
            call = answered(start - 400, 90.0)
            call.completed_at = T0 + start
        steps.append((call, NOW + start))
        steps.append((None, NOW + start + 0.5))
    steps.append((None, NOW + 5000))

    def run(snapshot_every: int | None) -> list[object]:
        windows = shard()
        out: list[object] = []
        for position, (call, now) in enumerate(steps):
            if call is None:
                out += [msgspec.structs.asdict(row) for row in windows.on_time(now)]
                continue
            out += windows.on_call(call, now)
            if snapshot_every and position % snapshot_every == 0:
                # Only event time is snapshotted: resume at the instant of the
                # snapshot, as a restart resumes from the end of an epoch.
                windows = pickle.loads(pickle.dumps(windows))
                out += [msgspec.structs.asdict(row) for row in windows.on_time(now)]
        return out

    uninterrupted = run(None)
    assert any(isinstance(item, DeadLetter) for item in uninterrupted)
    assert any(isinstance(item, dict) and item["row"].revision > 1 for item in uninterrupted)
    assert run(snapshot_every=5) == uninterrupted
    assert run(snapshot_every=2) == uninterrupted


def test_state_pickles_compactly() -> None:
    windows = shard()
    for index in range(1000):
        windows.on_call(answered(index % 60, 100.0 + index, key=("t", f"/r{index % 100}", "m")), NOW)
    size = len(pickle.dumps(windows))
    assert size < 1000 * 40, size  # latencies as 8-byte floats, a few hundred bytes per window


# -- percentiles -----------------------------------------------------------------


def stats_of(latencies: list[float]) -> CallStats:
    stats = CallStats()
    for latency in latencies:
        stats.add(answered(0, latency))
    return stats


PERCENTILES: tuple[tuple[float, Percentile], ...] = (
    (0.5, "p50_latency_ms"),
    (0.95, "p95_latency_ms"),
    (0.99, "p99_latency_ms"),
)


def percentile(fields: dict[str, Any], field: Percentile) -> float:
    """A percentile of ``fields``, which a window with answered calls has."""
    value = fields[field]
    assert isinstance(value, float), field
    return value


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=EXACT_UP_TO))
def test_few_latencies_percentiles_lie_between_nearest_rank_neighbours(values: list[float]) -> None:
    stats = stats_of(values)
    digest = stats.latency_digest()
    assert digest.n_centroids == len(set(values)) or digest.n_centroids == len(values)
    fields = stats.row_fields(digest)
    for q, field in PERCENTILES:
        assert_between_neighbours(percentile(fields, field), values, q)


def test_a_digest_of_exactly_the_exact_limit_still_holds_every_value() -> None:
    rng = random.Random(3)
    values = [rng.lognormvariate(5, 1) for _ in range(EXACT_UP_TO)]
    stats = stats_of(values)
    digest = stats.latency_digest()
    assert digest.n_values == len(values)
    assert digest.n_centroids == len(values)
    for q in (0.5, 0.95, 0.99):
        assert_between_neighbours(digest.quantile(q), values, q)


def test_many_latencies_percentiles_within_one_percent() -> None:
    rng = random.Random(42)
    values = [rng.lognormvariate(6, 1) for _ in range(100_000)]
    stats = stats_of(values)
    fields = stats.row_fields(stats.latency_digest())
    for q, field in PERCENTILES:
        exact = nearest_rank(values, q)
        reported = percentile(fields, field)
        assert abs(reported - exact) / exact < 0.01, (field, reported, exact)


def final_rows(calls: list[Call], order: list[int]) -> dict[tuple[object, ...], MetricsRow]:
    """The last row of every window, by (window_start, key)."""
    windows = shard()
    last: dict[tuple[object, ...], MetricsRow] = {}
    emitted: list[WindowRow] = []
    for step, index in enumerate(order):
        assert windows.on_call(calls[index], NOW + step) == []
        emitted += windows.on_time(NOW + step)
    emitted += windows.on_time(NOW + 10 * LATENESS)
    for item in emitted:
        last[(item.row.window_start, item.row.tenant_id, item.row.route, item.row.model)] = item.row
    return last


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False), st.permutations(range(24)))
def test_final_rows_do_not_depend_on_call_order(rng: random.Random, order: list[int]) -> None:
    keys = [("acme", "/a", "m1"), ("acme", "/b", "m1"), ("beta", "/a", "m2")]
    calls = [
        answered(
            rng.uniform(0, 170),
            rng.choice([None, rng.uniform(0, 5000)]),
            key=keys[index % 3],
            duration=rng.uniform(0, 30),
            cost=rng.choice([None, rng.random() / 100]),
            time_to_first_token_ms=rng.choice([None, rng.random() * 50]),
            completion_tokens=rng.randrange(500),
            error=rng.choice([None, "", "boom"]),
        )
        if index % 7
        else timed_out(rng.uniform(0, 170), key=keys[index % 3])
        for index in range(24)
    ]
    in_order = final_rows(calls, list(range(24)))
    assert final_rows(calls, order) == in_order
    assert sum(row.requests for row in in_order.values()) == 24
    # Revisions too: one per timeout (indexes 0, 7, 14, 21), two per answered call.
    assert sum(row.revision for row in in_order.values()) == 4 + 2 * 20


def test_the_largest_valid_latencies_do_not_overflow_the_sums() -> None:
    windows = shard()
    huge = 1.7e308  # the largest float JSON gives; msgspec rejects anything beyond
    windows.on_call(answered(1, huge, duration=1.0, time_to_first_token_ms=huge), NOW)
    windows.on_call(answered(2, 1.5), NOW)
    (row,) = advance(windows, 100)
    assert row.row.avg_latency_ms == huge / 2
    assert row.row.avg_time_to_first_token_ms == huge
    assert row.row.p99_latency_ms is not None and row.row.p99_latency_ms <= huge


def test_a_window_beyond_the_year_9999_is_an_invalid_dead_letter_not_a_crash() -> None:
    windows = shard()
    last = LLMRequest(
        request_id="y10k",
        tenant_id="acme",
        route="/chat",
        model="gpt-4o",
        timestamp=datetime(9999, 12, 31, 23, 59, 30, tzinfo=UTC),
    )
    call = Call(request=last, response=None, source=SOURCE, completed_at=253402300770.0 + TIMEOUT)
    out = windows.on_call(call, NOW)
    assert [letter.reason for letter in out] == ["invalid"]
    assert "9999-12-31T23:59:30" in out[0].error
    # It moved nothing: an ordinary call still lands and is emitted normally.
    windows.on_call(answered(1, 10.0), NOW)
    assert [row.row.requests for row in advance(windows, 100)] == [1]
    # The first minute of year 1 is fine (a fresh shard: here it would be too late).
    early = shard()
    assert early.on_call(answered(-62135596800 - T0 + 5, 10.0), NOW) == []
    rows = early.on_time(NOW + 100)
    assert [row.row.window_start for row in rows] == [datetime(1, 1, 1, tzinfo=UTC)]


def _legacy_values(table: ValueSums, dimensions: dict[object, tuple[str, ...]]) -> ValueSums:
    """``table`` as a release before integer row keys pickled it: rows keyed by (window key,
    dimension name, value), ``by_dimension`` and a value per row; the same row numbers."""
    keys_of_windows = {number: key for key, number in table.window_ids.items()}
    rows: dict[tuple[object, str, object], int] = {}
    by_dimension: dict[tuple[object, str], list[int]] = {}
    values: list[object] = [None] * len(table.row_keys)
    for row, found in enumerate(table.row_keys):
        place, value_number = divmod(found, 1 << VALUE_BITS)
        window, position = divmod(place, MAX_DIMENSIONS)
        key = keys_of_windows[window]
        name = dimensions[key][position]
        value = table.values[value_number]
        rows[key, name, value] = row
        by_dimension.setdefault((key, name), []).append(row)
        values[row] = value
    state = {
        "_changes": table._changes,
        "_sorted": None,
        "buckets": table.buckets,
        "by_dimension": by_dimension,
        "exact": table.exact,
        "latencies": table.latencies,
        "latency_rows": table.latency_rows,
        "magnitude": table.magnitude,
        "rows": rows,
        "sums": table.sums,
        "values": values,
    }
    legacy = ValueSums.__new__(ValueSums)
    legacy.__setstate__(pickle.loads(pickle.dumps(state)))
    return legacy


def test_a_snapshot_from_before_integer_row_keys_resumes_with_the_same_rows() -> None:
    rng = random.Random(5)
    names = ("user", "metadata.team")
    keys = [KEY, ("acme", "/search", "gpt-4o")]

    def call(start: float) -> Call:
        one = answered(start, rng.lognormvariate(5, 1), key=rng.choice(keys))
        request = msgspec.structs.replace(
            one.request, user_id_hash=f"u{rng.randrange(30)}", metadata={"team": rng.choice(["a", "b", None])}
        )
        return msgspec.structs.replace(one, request=request)

    first = [call(rng.uniform(0, 110)) for _ in range(400)]
    later = [call(rng.uniform(0, 110)) for _ in range(300)] + [answered(400)]
    shard = WindowShard(WINDOW, GRACE, LATENESS, StaticPlan(names), value_limit=7)
    for one in first:
        assert shard.on_call(one, NOW) == []
    state = pickle.loads(pickle.dumps(shard)).__getstate__()
    for start, table in state["_values"].items():
        dimensions = {key: window.dimensions for key, window in state["_windows"][start].items()}
        state["_values"][start] = _legacy_values(table, dimensions)
    resumed = WindowShard.__new__(WindowShard)
    resumed.__setstate__(state)
    resumed.attach(StaticPlan(names))
    outputs = []
    for run in (shard, resumed):
        for one in later:
            run.on_call(one, NOW)
        rows = run.on_time(NOW + 10_000)
        assert rows and all(row.dimensions for row in rows[:-1])
        outputs.append(msgspec.msgpack.encode([[row.row, row.digest, row.dimensions] for row in rows]))
    assert outputs[0] == outputs[1]
