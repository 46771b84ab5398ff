"""The join and the windows together, driven directly (no Kafka): the final rows
depend on the events only, not on their arrival order, batching or lateness."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime
from typing import NamedTuple

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.batches import CallBatch, EventRun, SourceRef
from dataflows.join import Call, JoinShard, call_into
from dataflows.operators import route_to_windows
from dataflows.windows import WindowRow, WindowShard
from schemas.deadletter import DeadLetter
from schemas.events import LLMRequest, LLMResponse
from tests.support.expected import assert_row, expected_row

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, a window boundary
NOW = 1_900_000_000.0  # wall clock, independent of event time
WINDOW, GRACE, LATENESS = 60, 10, 600
REQUESTS, RESPONSES = "llm.requests", "llm.responses"
KEYS = [("acme", "/chat", "gpt-4o"), ("acme", "/search", "gpt-4o"), ("beta", "/chat", "claude")]

Event = LLMRequest | LLMResponse
Outcome = Call | DeadLetter


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, UTC)


class Flow:
    """A join shard feeding window shards, as the dataflow wires them: a batch's events
    as runs into the join, its calls priced (left unpriced here) and grouped by window
    shard, each window shard folding its batch."""

    def __init__(self, timeout: float, dedupe: float = 3600) -> None:
        self.join = JoinShard(timeout, dedupe, WINDOW, LATENESS)
        self.windows: dict[str, WindowShard] = {}
        self.route = route_to_windows(_unpriced)
        self.rows: list[WindowRow] = []
        self.letters: list[DeadLetter] = []
        self.offset = 0

    def batch(self, events: list[Event], now: float) -> list[WindowRow]:
        """One batch through the join, then the windows; the rows it emits."""
        runs: list[EventRun] = []
        for event in events:
            # Events in arrival order: each stretch of one topic is a run (a partition's poll).
            kind = type(event)
            if not runs or runs[-1].kind is not kind:
                runs.append(EventRun(REQUESTS if kind is LLMRequest else RESPONSES, 0, kind, [], [], []))
            run = runs[-1]
            run.offsets.append(self.offset)
            run.events.append(event)
            run.times.append(event.timestamp.timestamp())
            self.offset += 1
        calls = CallBatch()
        letters = self.join.on_runs(runs, now, calls)
        for found in self.join.on_time(now):
            if isinstance(found, Call):
                call_into(calls, found)
            else:
                letters.append(found)
        for item in self.route([("join", (calls, letters))]):
            if isinstance(item, DeadLetter):
                self.letters.append(item)
                continue
            name, batch = item
            windows = self.windows.get(name)
            if windows is None:
                windows = self.windows[name] = WindowShard(WINDOW, GRACE, LATENESS)
            self.letters += windows.on_calls(batch, now)
        rows = [row for windows in self.windows.values() for row in windows.on_time(now)]
        self.rows += rows
        return rows

    def final_rows(self) -> dict[tuple[object, ...], WindowRow]:
        """The last emission of every window and key."""
        return {
            (item.row.window_start, item.row.tenant_id, item.row.route, item.row.model): item
            for item in self.rows
        }


def _unpriced(calls: CallBatch) -> None:
    calls.costs = [None] * len(calls)


def letters_by_request(letters: list[DeadLetter]) -> list[tuple[str, str]]:
    """(reason, request_id) of each dead letter, sorted."""
    found = []
    for letter in letters:
        assert letter.payload is not None
        found.append((letter.reason, msgspec.json.decode(letter.payload)["request_id"]))
    return sorted(found)


def chat_request(rid: str, seconds: float, prompt_tokens: int = 0) -> LLMRequest:
    return LLMRequest(
        request_id=rid,
        tenant_id="acme",
        route="/chat",
        model="gpt-4o",
        timestamp=at(seconds),
        prompt_tokens=prompt_tokens,
    )


# -- a provisional timeout, through to the row ----------------------------------


def test_a_converted_timeout_re_emits_the_row_answered_with_one_more_revision() -> None:
    flow = Flow(timeout=300)
    quick = [
        chat_request("quick", 2, prompt_tokens=50),
        LLMResponse(request_id="quick", timestamp=at(2.5), latency_ms=500.0, completion_tokens=10),
    ]
    slow = chat_request("slow", 1, prompt_tokens=70)
    assert flow.batch([*quick, slow], NOW) == []  # event time 2.5: the window is open
    # Another call moves event time to 305: "slow" times out (provisionally), the
    # window [0, 60) is due.
    clock = chat_request("clock", 305)
    (before,) = flow.batch([clock], NOW)
    row = before.row
    assert row.window_start == at(0)
    assert (row.requests, row.timeouts, row.errors, row.revision) == (2, 1, 1, 1 + 2)
    assert (row.prompt_tokens, row.completion_tokens, row.avg_latency_ms) == (50, 10, 500.0)
    assert row.unpriced_requests == 1

    # Its response comes late, 30 s after the request: within the timeout, and the
    # window still takes late calls (until 660).
    late = LLMResponse(
        request_id="slow", timestamp=at(31), latency_ms=30_000.0, completion_tokens=4, error="boom"
    )
    (after,) = flow.batch([late], NOW)
    row = after.row
    assert (row.requests, row.timeouts, row.errors, row.revision) == (2, 0, 1, 2 + 2)
    assert (row.prompt_tokens, row.completion_tokens) == (50 + 70, 10 + 4)
    assert row.avg_latency_ms == (500 + 30_000) / 2
    assert row.unpriced_requests == 2
    assert flow.letters == []
    # Nothing more for that window, ever: no orphan, no other row. (The clock
    # request times out at 605, as the wall clock idles event time there.)
    flow.batch([], NOW + 301)
    flow.batch([], NOW + 10_000)
    assert [item.row.window_start for item in flow.rows] == [at(0), at(0), at(300)]
    assert flow.letters == []


# -- any order -----------------------------------------------------------------

TIMEOUT = 5  # far shorter than the disorder below


class Spec(NamedTuple):
    """One request_id and what is sent for it, timestamps on a 1/8 s grid (exact floats)."""

    kind: str  # "answered", "timeout" (no response), "far" (response beyond the timeout), "orphan"
    key: int
    request_eighths: int
    gap_eighths: int  # response timestamp - request timestamp
    latency_ms: float | None
    completion_tokens: int
    cache_read_tokens: int
    error: str | None
    ttft_ms: float | None
    own_tenant: bool  # the response stamped with the request's tenant (else unstamped)
    copies: int  # each event sent this many times
    stranger: bool  # a response of another tenant too
    delays: tuple[int, int]  # in eighths of a second: how late the request and the response arrive


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    kind = draw(st.sampled_from(["answered", "answered", "answered", "timeout", "far", "orphan"]))
    if kind == "far":
        gap = draw(st.integers(TIMEOUT * 8 + 1, TIMEOUT * 8 * 5))
    else:
        gap = draw(st.integers(-16, TIMEOUT * 8))  # a response stamped before its request still pairs
    return Spec(
        kind=kind,
        key=draw(st.integers(0, len(KEYS) - 1)),
        request_eighths=draw(st.integers(0, 120 * 8)),
        gap_eighths=gap,
        latency_ms=draw(st.one_of(st.none(), st.integers(0, 80_000).map(lambda n: n / 8))),
        completion_tokens=draw(st.integers(0, 500)),
        cache_read_tokens=draw(st.integers(0, 100)),
        error=draw(st.sampled_from([None, "", "rate limited"])),
        ttft_ms=draw(st.one_of(st.none(), st.integers(0, 800).map(lambda n: n / 8))),
        own_tenant=draw(st.booleans()),
        copies=draw(st.integers(1, 2)),
        stranger=draw(st.booleans()),
        # Up to 100 s late: well past the timeout, well within the lateness.
        delays=(draw(st.integers(0, 800)), draw(st.integers(0, 800))),
    )


def request_of(rid: str, spec: Spec) -> LLMRequest:
    tenant_id, route, model = KEYS[spec.key]
    return LLMRequest(
        request_id=rid,
        tenant_id=tenant_id,
        route=route,
        model=model,
        timestamp=at(spec.request_eighths / 8),
        prompt_tokens=100 + spec.key,
    )


def response_of(rid: str, spec: Spec, tenant_id: str | None = None) -> LLMResponse:
    own = KEYS[spec.key][0] if spec.own_tenant else None
    return LLMResponse(
        request_id=rid,
        tenant_id=own if tenant_id is None else tenant_id,
        timestamp=at((spec.request_eighths + spec.gap_eighths) / 8),
        latency_ms=spec.latency_ms,
        completion_tokens=spec.completion_tokens,
        cache_read_tokens=spec.cache_read_tokens,
        error=spec.error,
        time_to_first_token_ms=spec.ttft_ms,
    )


def events_of(all_specs: list[Spec]) -> list[tuple[Event, float]]:
    """Every event sent, with the time (event seconds) at which it arrives."""
    out: list[tuple[Event, float]] = []
    for index, spec in enumerate(all_specs):
        rid = f"r{index}"
        request_delay, response_delay = (delay / 8 for delay in spec.delays)
        response_at = (spec.request_eighths + spec.gap_eighths) / 8
        for _ in range(spec.copies):
            if spec.kind != "orphan":
                out.append((request_of(rid, spec), spec.request_eighths / 8 + request_delay))
            if spec.kind != "timeout":
                out.append((response_of(rid, spec), response_at + response_delay))
        if spec.stranger:
            out.append((response_of(rid, spec, tenant_id="intruder"), response_at))
    return out


def expected_calls(all_specs: list[Spec]) -> dict[tuple[object, ...], list[Call]]:
    """The calls each window and key must end with, from the rules alone."""
    source = SourceRef(RESPONSES, 0, 0)
    windows: dict[tuple[object, ...], list[Call]] = {}
    for index, spec in enumerate(all_specs):
        if spec.kind == "orphan":
            continue
        rid = f"r{index}"
        request = request_of(rid, spec)
        response = response_of(rid, spec) if spec.kind == "answered" else None
        start = spec.request_eighths // (8 * WINDOW) * WINDOW
        windows.setdefault((at(start), *KEYS[spec.key]), []).append(
            Call(request=request, response=response, source=source)
        )
    return windows


def expected_letters(all_specs: list[Spec]) -> list[tuple[str, str]]:
    """One orphan_response per response that cannot be counted: too far from its
    request, without a request, or of another tenant."""
    letters = []
    for index, spec in enumerate(all_specs):
        if spec.kind in ("far", "orphan"):
            letters.append(("orphan_response", f"r{index}"))
        if spec.stranger:
            letters.append(("orphan_response", f"r{index}"))
    return sorted(letters)


def spec_window(window_key: tuple[object, ...]) -> int:
    """The window start, in Unix seconds, of an ``expected_calls`` key."""
    start = window_key[0]
    assert isinstance(start, datetime)
    return int(start.timestamp())


def run(events: list[Event], batches: list[tuple[int, float]]) -> Flow:
    """Feed ``events`` in batches of (size, wall-clock seconds before it), then let
    every deadline pass."""
    flow = Flow(TIMEOUT)
    now, position = NOW, 0
    for size, pause in batches:
        now += pause
        flow.batch(events[position : position + size], now)
        position += size
    flow.batch(events[position:], now)
    # Every timeout is due (requests are stamped up to 120 s, the clock idles 50 s
    # past the last one), and the windows still take them: event time stays far
    # below the first window's end + lateness (660).
    flow.batch([], now + 50)
    flow.batch([], now + 100_000)  # every window emitted, every deadline passed
    return flow


@settings(max_examples=80, deadline=None)
@given(st.lists(specs(), min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_final_rows_are_the_same_in_any_order_and_batching_and_match_the_rules(
    all_specs: list[Spec], rng: random.Random
) -> None:
    sent = events_of(all_specs)
    by_time = sorted(sent, key=lambda item: item[0].timestamp)
    shuffled = list(sent)
    rng.shuffle(shuffled)
    orders = {
        "by timestamp": [event for event, _ in by_time],
        "reversed": [event for event, _ in reversed(by_time)],
        "shuffled": [event for event, _ in shuffled],
        "as they arrive, late ones late": [event for event, _ in sorted(sent, key=lambda item: item[1])],
    }
    # At most 12 pauses of at most 20 s: event time stays below 120 + 25 + 240 + 50.
    batches = [(rng.randint(1, 6), rng.choice([0.0, 0.5, rng.uniform(0, 20)])) for _ in range(12)]

    expected = expected_calls(all_specs)
    results = {}
    for name, events in orders.items():
        for batching, plan in (("one batch", []), ("batches", batches)):
            flow = run(events, plan)
            assert letters_by_request(flow.letters) == expected_letters(all_specs), (name, batching)
            duplicates = len(sent) - sum(
                (spec.kind != "orphan") + (spec.kind != "timeout") + spec.stranger for spec in all_specs
            )
            assert flow.join.duplicates == duplicates, (name, batching)
            assert len(flow.join) == 0 and flow.join.next_wakeup() is None, (name, batching)
            assert all(len(windows) == 0 for windows in flow.windows.values()), (name, batching)
            # Each emission of a window raises its revision (what the sinks keep).
            revisions: dict[tuple[object, ...], list[int]] = {}
            for item in flow.rows:
                key = (item.row.window_start, item.row.tenant_id, item.row.route, item.row.model)
                revisions.setdefault(key, []).append(item.row.revision)
            for key, seen in revisions.items():
                assert seen == sorted(set(seen)), (name, batching, key, seen)
            results[name, batching] = flow.final_rows()

    reference = results["by timestamp", "one batch"]
    for variant, rows in results.items():
        assert rows == reference, variant
    assert set(reference) == set(expected)
    for window_key, calls in expected.items():
        emitted = reference[window_key]
        start = spec_window(window_key)
        assert_row(emitted.row, expected_row(calls, start), calls)
        responses = [call.response for call in calls if call.response is not None]
        assert emitted.row.revision == len(calls) + len(responses)
        assert emitted.ttft_count == sum(1 for r in responses if r.time_to_first_token_ms is not None)
    kinds = Counter(spec.kind for spec in all_specs)
    assert sum(item.row.requests for item in reference.values()) == len(all_specs) - kinds["orphan"]
    assert sum(item.row.timeouts for item in reference.values()) == kinds["timeout"] + kinds["far"]
