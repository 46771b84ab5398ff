"""The one-core ceiling: decode → join → price → windows in a plain Python loop.

No Bytewax, no Kafka: the same classes the dataflow runs, called directly, in
batches of :data:`BATCH` records as a source would hand them over. The dataflow
benchmark runs :func:`plain_loop` on the same data in the same run to show how
much of that ceiling the dataflow reaches.

Beside it, :func:`lean_loop`: the least per-event work the metrics need (decode,
join, fold into windows, price, t-digest) with none of the dataflow's machinery, a
fixed reference the dataflow is to beat; and :func:`batch_loop`: the dataflow's own
batch operators in one process, without Kafka or Bytewax, timed stage by stage.
"""

from __future__ import annotations

import gc
import linecache
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fastdigest import TDigest

from dataflows import operators, sources
from dataflows.aggregate import new_digest
from dataflows.join import Call, JoinShard, SourceRef
from dataflows.metrics import tune_gc
from dataflows.pricing import PriceBook, Rates, cost
from dataflows.windows import WindowRow, WindowShard
from schemas.config import Settings
from schemas.events import LLMRequest, LLMResponse, request_decoder, response_decoder
from schemas.topics import REQUESTS, RESPONSES
from tests.bench.dataset import generate

BATCH = 1_000
# Far enough past the data for every timeout and window to close.
FLUSH_AFTER = 100_000.0


def in_step(requests: list[bytes], responses: list[bytes]) -> list[tuple[range, range]]:
    """Batches of offsets of both topics covering the same stretch of event time, as the
    dataflow reads them (its partitions read in step): BATCH requests and the responses
    in the same share of their topic. Both topics are uniform in event time
    (:func:`tests.bench.dataset.generate`); reading them offset for offset instead
    would let the shorter responses topic (about 1 % of requests are never answered)
    run ever further ahead of the requests."""
    ratio = len(responses) / max(1, len(requests))
    out = []
    for first in range(0, len(requests), BATCH):
        last = min(first + BATCH, len(requests))
        end = len(responses) if last == len(requests) else round(last * ratio)
        out.append((range(first, last), range(round(first * ratio), end)))
    return out


def plain_loop(
    requests_payloads: list[bytes],
    responses_payloads: list[bytes],
    settings: Settings | None = None,
    passed: dict[int, float] | None = None,
) -> tuple[int, float]:
    """Count every call in the payloads; return (calls counted, seconds taken).

    The two topics are read side by side in batches, as a consumer assigned to
    both would; the timing includes a final flush that closes every window.
    ``settings`` (the defaults when None) gives the join's and windows' times.
    ``passed``: offsets whose seconds since the start are filled in once the loop
    has read that far. It runs with the dataflow's garbage-collector settings
    (:func:`dataflows.metrics.tune_gc`), restored afterwards.
    """
    with _dataflow_gc():
        return _plain_loop(requests_payloads, responses_payloads, settings, passed)


@contextmanager
def _dataflow_gc() -> Iterator[None]:
    """The dataflow's garbage-collector settings (:func:`dataflows.metrics.tune_gc`)
    while inside; the previous thresholds, and nothing frozen, afterwards."""
    previous = gc.get_threshold()
    tune_gc()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*previous)


def _plain_loop(
    requests_payloads: list[bytes],
    responses_payloads: list[bytes],
    settings: Settings | None,
    passed: dict[int, float] | None,
) -> tuple[int, float]:
    marks = sorted(passed) if passed is not None else []
    settings = settings or Settings()
    join = JoinShard(
        settings.join_timeout_seconds,
        settings.dedupe_seconds,
        settings.window_seconds,
        settings.lateness_seconds,
    )
    prices = PriceBook()
    windows = WindowShard(settings.window_seconds, settings.grace_seconds, settings.lateness_seconds)
    calls = 0
    rows: list[WindowRow] = []
    started = time.perf_counter()

    def fold(outputs: list) -> None:
        nonlocal calls
        for output in outputs:
            if type(output) is Call:
                calls += 1
                windows.on_call(prices.price(output), now)

    for first, (requests, responses) in enumerate(in_step(requests_payloads, responses_payloads)):
        while marks and marks[0] <= first * BATCH:
            assert passed is not None
            passed[marks.pop(0)] = time.perf_counter() - started
        now = time.time()
        for topic, decode, payloads, offsets in (
            ("llm.requests", request_decoder.decode, requests_payloads, requests),
            ("llm.responses", response_decoder.decode, responses_payloads, responses),
        ):
            for offset in offsets:
                fold(join.on_event(decode(payloads[offset]), SourceRef(topic, 0, offset), now))
        fold(join.on_time(now))
        rows.extend(windows.on_time(now))
    now = time.time() + FLUSH_AFTER
    fold(join.on_time(now))
    rows.extend(windows.on_time(now))
    seconds = time.perf_counter() - started
    for mark in marks:
        assert passed is not None
        passed[mark] = seconds
    assert rows, "the loop emitted no rows"
    return calls, seconds


class LeanWindow:
    """What :func:`lean_loop` sums for one (tenant_id, route, model, window_start)."""

    __slots__ = (
        "cache_read_tokens",
        "completion_tokens",
        "cost_usd",
        "digest",
        "errors",
        "latency_ms",
        "prompt_tokens",
        "reasoning_tokens",
        "requests",
        "ttft_count",
        "ttft_ms",
        "unpriced",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency_ms = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cache_read_tokens = 0
        self.reasoning_tokens = 0
        self.ttft_ms = 0.0
        self.ttft_count = 0
        self.cost_usd = 0.0
        self.unpriced = 0
        self.digest: TDigest = new_digest()


# What one activation of the dataflow holds on a backlog: polls of both topics.
POLLS_PER_STEP = 6


def batch_loop(
    requests_payloads: list[bytes], responses_payloads: list[bytes]
) -> tuple[int, float, dict[str, float]]:
    """The dataflow's batch operators, called as Bytewax calls them, without Bytewax or
    Kafka: both topics read in step (:func:`in_step`), :data:`POLLS_PER_STEP` polls an
    activation, each decoded (``decode_values``), routed by join shard, joined
    (``JoinLogic``), priced and split by window shard (``route_to_windows``) and folded
    (``WindowLogic``), with one worker's shards. Returns (calls folded, seconds, seconds
    per stage)."""
    with _dataflow_gc():
        return _batch_loop(requests_payloads, responses_payloads)


def _batch_loop(
    requests_payloads: list[bytes], responses_payloads: list[bytes]
) -> tuple[int, float, dict[str, float]]:
    settings = Settings()
    build_join = operators.join_builder(
        settings.join_timeout_seconds,
        settings.dedupe_seconds,
        settings.window_seconds,
        settings.lateness_seconds,
    )
    build_windows = operators.window_builder(
        settings.window_seconds, settings.grace_seconds, settings.lateness_seconds
    )
    joins: dict[str, operators.JoinLogic] = {}
    windows: dict[str, operators.WindowLogic] = {}
    route = operators.route_to_windows(PriceBook().price_calls)
    stages = dict.fromkeys(("decode", "route", "join", "price and split", "windows"), 0.0)
    calls = 0
    polls: list[sources.Poll] = []
    now = time.time()

    def step() -> int:
        folded = 0
        started = time.perf_counter()
        routed = sources.route_polls(polls)
        polls.clear()
        joined_at = time.perf_counter()
        stages["route"] += joined_at - started
        outputs = []
        for item in routed:
            if type(item) is tuple:
                shard, runs = item
                logic = joins.get(shard) or joins.setdefault(shard, build_join(None))
                out, _ = logic.on_batch([runs])
                outputs.extend((shard, output) for output in out)
        priced_at = time.perf_counter()
        stages["join"] += priced_at - joined_at
        split = route(outputs)
        folded_at = time.perf_counter()
        stages["price and split"] += folded_at - priced_at
        for item in split:
            if type(item) is tuple:
                shard, batch = item
                folded += len(batch)
                logic = windows.get(shard) or windows.setdefault(shard, build_windows(None))
                logic.on_batch([batch])
        stages["windows"] += time.perf_counter() - folded_at
        return folded

    started = time.perf_counter()
    for request_offsets, response_offsets in in_step(requests_payloads, responses_payloads):
        for topic, payloads, offsets in (
            (REQUESTS, requests_payloads, request_offsets),
            (RESPONSES, responses_payloads, response_offsets),
        ):
            decoding = time.perf_counter()
            offset_list = list(offsets)
            items, times = sources.decode_values(
                topic, 0, offset_list, [payloads[offset] for offset in offset_list], now
            )
            polls.append(sources.poll_of(topic, 0, offset_list, items, times))
            stages["decode"] += time.perf_counter() - decoding
        if len(polls) >= POLLS_PER_STEP:
            calls += step()
    calls += step()
    return calls, time.perf_counter() - started, stages


def lean_loop(requests_payloads: list[bytes], responses_payloads: list[bytes]) -> tuple[int, float]:
    """The lean per-event loop: count every call in the payloads with the least work its
    metrics need; return (calls counted, seconds taken).

    Each record is decoded (and so validated) by the project's own decoders; requests
    wait in a dict for their response, a response that comes first waits in another;
    each answered call is folded into its window's sums, priced at its (provider,
    model)'s rates (looked up once per pair with :meth:`PriceBook.rates`), and its
    latency added to the window's t-digest. Requests still unanswered at the end count
    as timeouts. Nothing else: no watermark, no memory of counted ids, no revisions,
    no rows. The topics are read as :func:`plain_loop` reads them (:func:`in_step`),
    with the same garbage-collector settings.
    """
    with _dataflow_gc():
        return _lean_loop(requests_payloads, responses_payloads)


def lean_fold(
    windows: dict[tuple[str, str, str, int], LeanWindow], width: int
) -> tuple[Callable[[LLMRequest], LeanWindow], Callable[[LLMRequest, LLMResponse], None]]:
    """The lean loop's fold into ``windows`` of ``width`` seconds: ``window_of(request)``, and
    ``answered(request, response)``, which adds an answered call to its window's sums, prices
    it at its (provider, model)'s rates (looked up once per pair with :meth:`PriceBook.rates`)
    and adds its latency to the window's t-digest."""
    book = PriceBook()
    prices: dict[tuple[str | None, str], Rates | None] = {}

    def window_of(request: LLMRequest) -> LeanWindow:
        start = int(request.timestamp.timestamp() // width) * width
        key = (request.tenant_id, request.route, request.model, start)
        window = windows.get(key)
        if window is None:
            window = windows[key] = LeanWindow()
        return window

    def answered(request: LLMRequest, response: LLMResponse) -> None:
        window = window_of(request)
        window.requests += 1
        if response.error:
            window.errors += 1
        latency = response.latency_ms
        if latency is None:
            latency = max(0.0, (response.timestamp.timestamp() - request.timestamp.timestamp()) * 1000.0)
        window.latency_ms += latency
        window.digest.update(latency)
        ttft = response.time_to_first_token_ms
        if ttft is not None:
            window.ttft_ms += ttft
            window.ttft_count += 1
        prompt = request.prompt_tokens
        cached = response.cache_read_tokens
        completion = response.completion_tokens
        window.prompt_tokens += prompt
        window.completion_tokens += completion
        window.cache_read_tokens += cached
        window.reasoning_tokens += response.reasoning_tokens
        pair = (request.provider, request.model)
        if pair in prices:
            rates = prices[pair]
        else:
            rates = prices[pair] = book.rates(request.provider, request.model, request.timestamp)
        if rates is None:
            window.unpriced += 1
        else:
            window.cost_usd += cost(rates, prompt, cached, completion)

    return window_of, answered


def _lean_loop(requests_payloads: list[bytes], responses_payloads: list[bytes]) -> tuple[int, float]:
    windows: dict[tuple[str, str, str, int], LeanWindow] = {}
    window_of, answered = lean_fold(windows, Settings().window_seconds)
    requests_waiting: dict[str, LLMRequest] = {}
    responses_waiting: dict[str, LLMResponse] = {}
    decode_request = request_decoder.decode
    decode_response = response_decoder.decode

    started = time.perf_counter()
    for requests, responses in in_step(requests_payloads, responses_payloads):
        for offset in requests:
            request = decode_request(requests_payloads[offset])
            early = responses_waiting.pop(request.request_id, None)
            if early is None:
                requests_waiting[request.request_id] = request
            else:
                answered(request, early)
        for offset in responses:
            response = decode_response(responses_payloads[offset])
            waiting = requests_waiting.pop(response.request_id, None)
            if waiting is None:
                responses_waiting[response.request_id] = response
            else:
                answered(waiting, response)
    for request in requests_waiting.values():
        window = window_of(request)
        window.requests += 1
        window.errors += 1
    seconds = time.perf_counter() - started
    assert windows, "the loop folded no calls"
    # Every answered call and every timeout is one request of its window.
    return sum(window.requests for window in windows.values()), seconds


def bytes_per_inflight_request(sample: int = 20_000) -> float:
    """Memory the join holds per request waiting for its response (tracemalloc)."""
    requests_payloads, _ = generate(sample, 1_000, seed=7)
    now = time.time()
    # As for remembered ids: the process-wide interned names are not the join's.
    warm = JoinShard(300, 3600, 60, 600)
    for offset, payload in enumerate(requests_payloads):
        warm.on_event(request_decoder.decode(payload), SourceRef("llm.requests", 0, offset), now)
    join = JoinShard(300, 3600, 60, 600)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for offset, payload in enumerate(requests_payloads):
            join.on_event(request_decoder.decode(payload), SourceRef("llm.requests", 0, offset), now)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(warm) == len(join)
    return held / sample


def _held_since(before: tracemalloc.Snapshot) -> int:
    """Bytes allocated since ``before`` and still held, less the interpreter's table of
    interned names: interning the same names again can rebuild that process-wide
    table (a megabyte or two at once), which is not the join's to count."""
    after = tracemalloc.take_snapshot()
    return sum(
        stat.size_diff
        for stat in after.compare_to(before, "traceback")
        if not any(
            frame.filename.endswith("join.py")
            and "intern" in (linecache.getline(frame.filename, frame.lineno))
            for frame in stat.traceback
        )
    )


def bytes_per_remembered_id(sample: int = 20_000) -> float:
    """Memory the join holds per counted request id it remembers to ignore repeats
    (tracemalloc): ``sample`` answered calls, each request followed by its response."""
    requests_payloads, responses_payloads = generate(sample, 1_000, seed=7)
    responses = {response_decoder.decode(payload).request_id: payload for payload in responses_payloads}
    pairs = [
        (payload, responses[rid])
        for payload in requests_payloads
        if (rid := request_decoder.decode(payload).request_id) in responses
    ]
    del responses
    now = time.time()
    # A first shard over the same calls holds the process-wide things a long run
    # has anyway (interned tenant, route and model names), so they are not counted.
    # It stays alive while the other is measured: the names it interned would die
    # with it, and the interpreter's table of interned names would be rebuilt (a
    # megabyte or two) as the measured shard interns them again. Tracing starts, and
    # a snapshot is taken, before it: their first use imports and interns names too,
    # which could leave the interpreter's table just short of growing.
    tracemalloc.start(4)
    tracemalloc.take_snapshot()
    warm = JoinShard(300, 3600, 60, 600)
    for offset, (request, response) in enumerate(pairs):
        warm.on_event(request_decoder.decode(request), SourceRef("llm.requests", 0, offset), now)
        warm.on_event(response_decoder.decode(response), SourceRef("llm.responses", 0, offset), now)
    warm.on_time(now + 301)
    join = JoinShard(300, 3600, 60, 600)
    counted = 0
    try:
        before = tracemalloc.take_snapshot()
        # Decoded here, as the dataflow does: the join keeps what it needs of each event.
        for offset, (request, response) in enumerate(pairs):
            join.on_event(request_decoder.decode(request), SourceRef("llm.requests", 0, offset), now)
            # The call the response completes is handed on, not kept.
            counted += len(
                join.on_event(response_decoder.decode(response), SourceRef("llm.responses", 0, offset), now)
            )
        # Past the requests' timeouts, well within DEDUPE_SECONDS: what is left is
        # what remembering costs, as in a dataflow that has run for a while.
        join.on_time(now + 301)
        held = _held_since(before)
    finally:
        tracemalloc.stop()
    assert counted == len(pairs), f"{counted} calls counted of {len(pairs)} pairs"
    assert len(warm) == len(join)
    return held / len(pairs)


def main() -> None:
    calls_wanted, keys = 200_000, 1_000
    generated = time.perf_counter()
    requests_payloads, responses_payloads = generate(calls_wanted, keys, seed=1)
    print(
        f"data set: {calls_wanted:,} calls over {keys:,} keys "
        f"({len(responses_payloads):,} responses), "
        f"generated in {time.perf_counter() - generated:.1f}s"
    )
    calls, seconds = plain_loop(requests_payloads, responses_payloads)
    print(
        f"plain loop (decode → join → price → windows), one process: "
        f"{calls:,} calls in {seconds:.2f}s = {calls / seconds:,.0f} calls/s"
    )
    per_request = bytes_per_inflight_request()
    print(
        f"join state: {per_request:,.0f} bytes per in-flight request "
        f"→ {per_request * 1_000_000 / 2**30:.2f} GiB for 1,000,000"
    )
    per_id = bytes_per_remembered_id()
    print(
        f"join state: {per_id:,.0f} bytes per remembered (counted) request id "
        f"→ {per_id * 18_000_000 / 2**30:.2f} GiB for 18,000,000 (an hour at 5,000 calls/s)"
    )
