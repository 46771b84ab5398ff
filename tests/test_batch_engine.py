"""The batch engine against the per-event reference: same records, same schedule, same outputs.

The dataflow runs a batch engine: a partition's poll is decoded at once
(``decode_run``), split by join shard (``route_polls``), joined a run at a time
(``JoinShard.on_runs``), priced as columns (``PriceBook.price_calls``), split by
window shard (``route_to_windows``) and folded with array operations
(``WindowShard.on_calls``). Its contract is that it behaves exactly as the
per-event path it replaced: each record decoded alone (``decode_one``), each event
joined alone (``JoinShard.on_event``), each call priced and folded alone
(``PriceBook.price``, ``WindowShard.on_call``). This test drives both, in process
(no Kafka, Postgres or Bytewax runtime), through the very same schedule, and
compares:

- the final row of every window and key (its last emission, as the sinks keep it),
  every field, digest included;
- the dead letters, as the set of distinct letters (reason, topic, partition,
  offset, error, payload): what a reader of ``llm.deadletter`` sees once the
  repeats a replay emits are dropped;
- and, to pin a divergence to where it starts, every step's emissions (rows and
  dead letters as multisets, since the batch engine gathers letters in another
  order within a step) and the join's observability counters.

Why the schedule must be shared rather than the rows compared with "any order":
what is counted does not depend on arrival, but what is ``too_late`` does, through
each shard's watermark (the newest event time it saw, idling forward with the wall
clock). So both engines see the same polls, in the same order, at the same wall
clock ``now``, with the same join and window sharding, the same shards woken
while idle, and the same crashes. A crash restores every shard from the last
committed snapshot (the batch engine's join shards sealed first and their
remembered ids kept in a segment store that survives the crash, as Postgres
does), and the trace then replays the records read since that snapshot, in new
polls. A restored watermark idles from the resume, not from the crash: both
engines restart at the same points so that this rule, which they share, cancels
out, and what is compared is batching and the batch engine's own snapshot
format. Rows emitted before a crash stay emitted (the sinks saw them), so the
final row of a window is its last emission over the whole run, replays included.

The streams mix valid calls on several partitions per topic with what the join
and the windows must get right: repeats (some with other timestamps), responses
before requests, unanswered requests (timeouts, some replaced by a late
response), responses too far from their request or of another tenant, orphans,
late and too-late calls, and invalid records (bad JSON, wrong types, empty
values, JSON fragments that could confuse a decoder of the whole poll at once,
timestamps too far ahead of the clock). A scripted stream takes each of these paths
on purpose, and a bulk one fills a window past the latencies a row keeps exact.
"""

from __future__ import annotations

import pickle
import random
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, timezone
from itertools import count
from typing import Any, NamedTuple, TypeVar

import msgspec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dataflows.aggregate import EXACT_UP_TO
from dataflows.batches import CallBatch, SourceRef, decode_one, decode_run, invalid
from dataflows.dimensions import StaticPlan
from dataflows.evaluations import ANSWERED, CountedCalls
from dataflows.join import Call, JoinShard, call_into
from dataflows.operators import route_to_windows
from dataflows.pricing import PriceBook
from dataflows.remembered import Segment
from dataflows.shards import DEFAULT as SHARDS
from dataflows.sources import Poll, poll_of, route_polls
from dataflows.windows import WindowRow, WindowShard
from schemas.deadletter import DeadLetter
from schemas.events import LLMRequest, LLMResponse, encoder

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, a window boundary
# The wall clock at the start: every generated call is stamped within MAX_FUTURE_SECONDS
# of it or of a later step, except the records meant to be too far ahead.
NOW0 = T0 + 150.0
REQUESTS, RESPONSES = "llm.requests", "llm.responses"
KINDS: dict[str, type[LLMRequest] | type[LLMResponse]] = {REQUESTS: LLMRequest, RESPONSES: LLMResponse}
PARTITIONS = 3  # per topic
MAX_STEPS = 24  # before the final drain
MAX_CRASHES = 2

Part = tuple[str, int]  # topic, partition
Key = tuple[str, str, str]  # tenant_id, route, model


def route_sharing_window_shard(tenant_id: str, model: str, other: Key) -> str:
    """A route whose key lands in the same window shard as ``other``: keys sharing a shard
    share its watermark, so one key's calls can make another's too late."""
    return next(
        route
        for route in (f"/r{n}" for n in count())
        if SHARDS.window_key((tenant_id, route, model)) == SHARDS.window_key(other)
    )


# Priced (one with tiers past 200k prompt tokens) and unpriced models; two tenants.
KEYS: list[Key] = [("acme", "/chat", "gpt-4o"), ("beta", "/chat", "gemini-2.5-pro")]
KEYS += [
    ("beta", route_sharing_window_shard("beta", "claude-3-5-sonnet", KEYS[0]), "claude-3-5-sonnet"),
    ("acme", route_sharing_window_shard("acme", "no-such-model", KEYS[1]), "no-such-model"),
]
# Request ids that fall in three join shards only: several ids per shard, so one id's
# events move the watermark under which another's time out or arrive too late.
REQUEST_IDS = [rid for rid in (f"call-{n}" for n in range(2000)) if SHARDS.join_number(rid) < 3][:40]
# Model lookups are cached per book: one book per engine for the whole module.
BATCH_PRICES = PriceBook(None)
REFERENCE_PRICES = PriceBook(None)


def at(eighths: int, micros: int = 0) -> datetime:
    """T0 + ``eighths`` / 8 seconds (+ ``micros`` µs, off the exact binary grid)."""
    return datetime.fromtimestamp(T0 + eighths / 8, UTC) + timedelta(microseconds=micros)


def with_offset(value: bytes) -> bytes:
    """The event with its timestamp written at +02:00 instead of Z: the same instant."""
    fields: dict[str, Any] = msgspec.json.decode(value)
    instant = datetime.fromisoformat(fields["timestamp"])
    fields["timestamp"] = instant.astimezone(timezone(timedelta(hours=2))).isoformat()
    return msgspec.json.encode(fields)


class Config(NamedTuple):
    window: int
    grace: int
    lateness: int
    timeout: int
    dedupe: int

    def join(self) -> JoinShard:
        return JoinShard(self.timeout, self.dedupe, self.window, self.lateness)

    def windows(self) -> WindowShard:
        return WindowShard(self.window, self.grace, self.lateness, PLAN, VALUE_LIMIT)


# Dimensions: three for every tenant, one of them only in responses; the second tenant
# switches to the provider at a window boundary. Few values per window keep a row of
# their own, so values move in and out of "(other)" as calls arrive.
PLAN = StaticPlan(
    default=("metadata.team", "finish_reason", "user"),
    histories={KEYS[1][0]: [(T0 + 40, ("provider", "metadata.team"))]},
)
VALUE_LIMIT = 2


# -- the records -------------------------------------------------------------------------


class CallSpec(NamedTuple):
    """One request id and what is sent for it."""

    key: int
    request_at: int  # eighths of a second after T0
    jitter_us: int  # microseconds added to the request's timestamp
    zoned: bool  # timestamps written with an offset other than Z
    gap: int  # eighths from the request's timestamp to the response's
    requests: int  # copies of the request (0: the response is an orphan)
    responses: int  # copies of the response (0: the request times out)
    retry_shift: int  # eighths by which each repeated request is stamped later
    stamped: bool  # the response carries its tenant, as the ingestion API stamps it
    stranger: bool  # a response of another tenant is sent too
    latency_ms: float | None
    ttft_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    cache_read_tokens: int  # may exceed the prompt: the join clamps it
    reasoning_tokens: int
    error: str | None
    extras: bool  # provider, user hash and metadata, one integer beyond 64 bits
    team: int  # metadata "team": one of four, or (4) none
    finish_reason: str | None


@st.composite
def call_specs(draw: st.DrawFn, config: Config) -> CallSpec:
    reach = config.timeout * 8
    completion = draw(st.integers(0, 400))
    return CallSpec(
        key=draw(st.integers(0, len(KEYS) - 1)),
        request_at=draw(st.integers(0, 160 * 8)),
        jitter_us=draw(st.sampled_from([0, 0, 0, 1, 123_457, 999_999])),
        zoned=draw(st.integers(0, 4)) == 0,
        # Within the timeout (a response stamped before its request still pairs), or beyond it.
        gap=draw(st.one_of(st.integers(-16, reach), st.integers(reach + 1, reach * 4))),
        requests=draw(st.sampled_from([1, 1, 1, 2, 0])),
        responses=draw(st.sampled_from([1, 1, 1, 2, 0])),
        retry_shift=draw(st.sampled_from([0, 0, 24])),
        stamped=draw(st.booleans()),
        stranger=draw(st.integers(0, 5)) == 0,
        # Beyond 2**53 ms a latency is summed with Python integers instead of int64.
        latency_ms=draw(st.one_of(st.none(), st.integers(0, 80_000).map(lambda n: n / 8), st.just(1e20))),
        ttft_ms=draw(st.one_of(st.none(), st.integers(0, 4000).map(lambda n: n / 8))),
        prompt_tokens=draw(st.sampled_from([0, 120, 250_000])),
        completion_tokens=completion,
        cache_read_tokens=draw(st.sampled_from([0, 50, 200])),
        reasoning_tokens=draw(st.integers(0, completion)),
        error=draw(st.sampled_from([None, None, "", "rate limited"])),
        extras=draw(st.integers(0, 4)) == 0,
        team=draw(st.integers(0, 4)),
        finish_reason=draw(st.sampled_from([None, "stop", "length"])),
    )


def request_of(rid: str, spec: CallSpec, copy: int) -> LLMRequest:
    tenant_id, route, model = KEYS[spec.key]
    return LLMRequest(
        request_id=rid,
        tenant_id=tenant_id,
        route=route,
        model=model,
        timestamp=at(spec.request_at + copy * spec.retry_shift, spec.jitter_us),
        prompt_tokens=spec.prompt_tokens,
        provider=("openai" if spec.key == 0 else "nonesuch") if spec.extras else None,
        user_id_hash="u1" if spec.extras else None,
        metadata={"team": "x", "big": 2**70, "ok": True}
        if spec.extras
        else ({"team": f"t{spec.team}"} if spec.team < 4 else None),
    )


def response_of(rid: str, spec: CallSpec, tenant_id: str | None) -> LLMResponse:
    return LLMResponse(
        request_id=rid,
        tenant_id=tenant_id,
        timestamp=at(spec.request_at + spec.gap),
        latency_ms=spec.latency_ms,
        completion_tokens=spec.completion_tokens,
        cache_read_tokens=spec.cache_read_tokens,
        reasoning_tokens=spec.reasoning_tokens,
        time_to_first_token_ms=spec.ttft_ms,
        error=spec.error,
        finish_reason=spec.finish_reason,
    )


def call_records(rid: str, spec: CallSpec) -> list[tuple[str, bytes]]:
    """The (topic, value) records sent for one request id, as the ingestion API encodes them."""
    records = [(REQUESTS, encoder.encode(request_of(rid, spec, copy))) for copy in range(spec.requests)]
    own = KEYS[spec.key][0] if spec.stamped else None
    records += [(RESPONSES, encoder.encode(response_of(rid, spec, own)))] * spec.responses
    if spec.stranger:
        records.append((RESPONSES, encoder.encode(response_of(rid, spec, "intruder"))))
    if spec.zoned:
        # Normalised to UTC on decoding: a request kept packed must come back the same.
        return [(topic, with_offset(value)) for topic, value in records]
    return records


def _event_json(topic: str, rid: str, eighths: int) -> dict[str, Any]:
    if topic == REQUESTS:
        event: LLMRequest | LLMResponse = LLMRequest(
            request_id=rid, tenant_id="acme", route="/chat", model="gpt-4o", timestamp=at(eighths)
        )
    else:
        event = LLMResponse(request_id=rid, timestamp=at(eighths), completion_tokens=3)
    decoded: dict[str, Any] = msgspec.json.decode(encoder.encode(event))
    return decoded


@st.composite
def invalid_records(draw: st.DrawFn) -> tuple[str, bytes | None]:
    """A record that must become an ``invalid`` dead letter, whatever the poll around it."""
    topic = draw(st.sampled_from([REQUESTS, RESPONSES]))
    other = RESPONSES if topic == REQUESTS else REQUESTS
    rid = draw(st.sampled_from(REQUEST_IDS[:6]))
    good = _event_json(topic, rid, 80)
    whole = msgspec.json.encode(good)
    shape = draw(st.integers(0, 8))
    if shape == 0:
        return topic, None  # a record without a value (a tombstone)
    if shape == 1:
        return topic, draw(st.sampled_from([b"", b"{", b"not json", b"[]", b"null", b"\xff\xfe", b"1,2"]))
    if shape == 2:
        # Pieces of events that, joined with their neighbours' values into one JSON array,
        # could line up into valid elements if the batch decoder counted them wrong.
        return topic, draw(
            st.sampled_from(
                [
                    whole + b"," + whole,
                    whole + b"]",
                    b"[" + whole,
                    whole + b",",
                    b"," + whole,
                    whole[:-1],
                    whole + b"],[" + whole,
                ]
            )
        )
    if shape == 3:
        field = draw(
            st.sampled_from(
                ["prompt_tokens", "route"] if topic == REQUESTS else ["completion_tokens", "latency_ms"]
            )
        )
        return topic, msgspec.json.encode(
            {**good, field: draw(st.sampled_from(["ten", -1, None, [], 1e400]))}
        )
    if shape == 4:
        del good["request_id"]
        return topic, msgspec.json.encode(good)
    if shape == 5:  # a timestamp without an offset
        return topic, msgspec.json.encode({**good, "timestamp": "2026-01-01T00:01:00"})
    if shape == 6:  # the other topic's event
        return topic, msgspec.json.encode(_event_json(other, rid, 80))
    if shape == 7 and topic == RESPONSES:  # reasoning tokens beyond completion tokens
        return topic, msgspec.json.encode({**good, "reasoning_tokens": 4})
    # Stamped a day ahead of the clock: invalid, and must never move event time.
    return topic, msgspec.json.encode(_event_json(topic, rid, 86_400 * 8))


class Stream(NamedTuple):
    config: Config
    # Each partition's records, by offset.
    records: dict[Part, list[bytes | None]]


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    config = Config(
        window=draw(st.sampled_from([10, 20])),
        grace=draw(st.sampled_from([0, 3])),
        lateness=draw(st.sampled_from([15, 40])),
        timeout=draw(st.sampled_from([5, 12, 30])),
        dedupe=draw(st.sampled_from([5, 60])),
    )
    specs = draw(st.lists(call_specs(config), min_size=1, max_size=14))
    sent: list[tuple[str, bytes | None]] = [
        record for rid, spec in zip(REQUEST_IDS, specs, strict=False) for record in call_records(rid, spec)
    ]
    sent += draw(st.lists(invalid_records(), max_size=5))
    # Where each record lands and in which order: responses may come before requests.
    placed: dict[Part, list[tuple[int, int, bytes | None]]] = {
        (topic, p): [] for topic in KINDS for p in range(PARTITIONS)
    }
    for index, (topic, value) in enumerate(sent):
        partition = draw(st.integers(0, PARTITIONS - 1))
        placed[topic, partition].append((draw(st.integers(0, 20)), index, value))
    records = {
        part: [value for _, _, value in sorted(items, key=lambda item: item[:2])]
        for part, items in placed.items()
    }
    return Stream(config, records)


# -- the schedule ------------------------------------------------------------------------


class Step(NamedTuple):
    """One activation: polls of the partitions, in order, read at wall clock ``now``."""

    now: float
    polls: tuple[tuple[Part, int, int], ...]  # partition, first offset, end offset
    notify: bool  # shards without input are woken too (their notify_at came due)


class Commit(NamedTuple):
    """The end of an epoch: the shards touched since the last one are snapshotted."""


class Crash(NamedTuple):
    """A restart from the last committed snapshot; ``torn``: while a snapshot was being
    taken, after the join shards sealed their ids into the store but before it committed."""

    torn: bool


Action = Step | Commit | Crash


@st.composite
def schedules(draw: st.DrawFn, stream: Stream) -> list[Action]:
    """Random polls of random sizes, interleaved, pauses of the wall clock, commits and
    crashes; after a crash the records since the last commit are read again."""
    sizes = {part: len(values) for part, values in stream.records.items()}
    parts = sorted(part for part, size in sizes.items() if size)
    positions = dict.fromkeys(sizes, 0)
    committed = dict(positions)
    actions: list[Action] = []
    now = NOW0
    crashes = 0
    # One partition may lag behind the others for a while (a backlog read unevenly): its
    # responses come late, some converting a timeout, some too late to.
    lagging = draw(st.sampled_from([None, *parts]))
    lag = draw(st.integers(0, 12))
    for number in range(MAX_STEPS):
        if all(positions[part] == sizes[part] for part in parts):
            break
        now += draw(st.sampled_from([0.0, 0.5, 1.0, 2.5, 6.0, 20.0]))
        ready = [part for part in parts if part != lagging or number >= lag] or parts
        polls: list[tuple[Part, int, int]] = []
        for _ in range(draw(st.integers(0, 3))):
            part = draw(st.sampled_from(ready))
            start = positions[part]
            end = min(sizes[part], start + draw(st.integers(1, 6)))
            if end > start:
                polls.append((part, start, end))
                positions[part] = end
        actions.append(Step(now, tuple(polls), draw(st.booleans())))
        after = draw(st.sampled_from(["go", "go", "go", "commit", "commit", "crash", "torn"]))
        if after == "commit":
            actions.append(Commit())
            committed = dict(positions)
        elif after in ("crash", "torn") and crashes < MAX_CRASHES:
            actions.append(Crash(torn=after == "torn"))
            positions = dict(committed)
            crashes += 1
    return actions + drain(positions, sizes, now)


def drain(positions: dict[Part, int], sizes: dict[Part, int], now: float) -> list[Step]:
    """Read what is left, then let every deadline pass: timeouts, then windows closing,
    then everything forgotten."""
    rest = tuple(
        (part, positions[part], size) for part, size in sorted(sizes.items()) if positions[part] < size
    )
    steps = [Step(now + 1.0, rest, True)]
    for pause in (60.0, 200.0, 100_000.0):
        steps.append(Step(steps[-1].now + pause, (), True))
    return steps


# -- the two engines ---------------------------------------------------------------------


class MemorySegments:
    """The segment store (:class:`dataflows.remembered.SegmentStore`) as Postgres keeps it,
    in memory: copies, not the live arrays, and it outlives every crash."""

    def __init__(self) -> None:
        self.shards: dict[str, dict[int, Segment]] = {}
        self.saved = 0

    def save(self, shard: str, number: int, segment: Segment) -> bool:
        segments = self.shards.setdefault(shard, {})
        if number == 0:
            segments.clear()  # a shard starting afresh: what a crashed start left is no one's
        segments[number] = Segment(
            segment.digests.copy(), segment.expiry.copy(), segment.tenant.copy(), list(segment.tenants)
        )
        self.saved += 1
        return True

    def load(self, shard: str, low: int, high: int) -> list[Segment]:
        segments = self.shards.get(shard, {})
        missing = [number for number in range(low, high) if number not in segments]
        if missing:
            raise LookupError(f"join shard {shard}: segments {missing} are not in the store")
        return [segments[number] for number in range(low, high)]

    def forget(self, shard: str, below: int, from_: int | None = None) -> bool:
        segments = self.shards.get(shard, {})
        for number in list(segments):
            if number < below or (from_ is not None and number >= from_):
                del segments[number]
        return True


Output = tuple[list[WindowRow], list[DeadLetter]]
RowKey = tuple[datetime, str, str | None, str | None]


def row_key(item: WindowRow) -> RowKey:
    row = item.row
    return row.window_start, row.tenant_id, row.route, row.model


class Engine:
    """Shards by name as Bytewax keys them, and their recovery snapshots: a shard is
    created when its first input arrives, snapshotted at a commit when it was woken
    since the previous one, and restored from its latest snapshot at a crash."""

    def __init__(self, config: Config, stream: Stream) -> None:
        self.config = config
        self.records = stream.records
        self.joins: dict[str, JoinShard] = {}
        self.windows: dict[str, WindowShard] = {}
        self.touched: set[tuple[str, str]] = set()
        self.snapshots: dict[tuple[str, str], bytes] = {}
        # What each engine saw on the way, for the coverage checks.
        self.paths: Counter[str] = Counter()

    def join_shard(self, name: str) -> JoinShard:
        self.touched.add(("join", name))
        shard = self.joins.get(name)
        if shard is None:
            shard = self.joins[name] = self.new_join()
        return shard

    def window_shard(self, name: str) -> WindowShard:
        self.touched.add(("windows", name))
        shard = self.windows.get(name)
        if shard is None:
            shard = self.windows[name] = self.config.windows()
            shard.counted = CountedCalls.empty()
        return shard

    def taken_counted(self) -> Counter[tuple[Any, ...]]:
        """The calls the window shards told the call directory of since the last time, with
        their dimension values (the event time each was known at is the engines' own)."""
        told: Counter[tuple[Any, ...]] = Counter()
        for shard in self.windows.values():
            assert shard.counted is not None
            rids, keys, starts, _, dimensions = shard.counted
            told.update(zip(rids, keys, starts, dimensions, strict=True))
            shard.counted = CountedCalls.empty()
        return told

    def new_join(self) -> JoinShard:
        return self.config.join()

    def freeze_join(self, shard: JoinShard) -> bytes:
        # The reference pickles its shards as they are, unsealed and without a store: sealing
        # changes how remembered ids are held, never what a lookup answers.
        return pickle.dumps(shard)

    def thaw_join(self, frozen: bytes) -> JoinShard:
        shard = pickle.loads(frozen)
        assert isinstance(shard, JoinShard)
        return shard

    def frozen(self) -> dict[tuple[str, str], bytes]:
        out: dict[tuple[str, str], bytes] = {}
        for step, name in sorted(self.touched):
            if step == "join":
                out[step, name] = self.freeze_join(self.joins[name])
            else:
                out[step, name] = pickle.dumps(self.windows[name])
        return out

    def commit(self) -> None:
        self.snapshots.update(self.frozen())
        self.touched = set()

    def crash(self, torn: bool) -> None:
        if torn:
            self.frozen()  # sealed and written to the store, never committed
        self.joins = {
            name: self.thaw_join(data) for (step, name), data in self.snapshots.items() if step == "join"
        }
        self.windows = {}
        for (step, name), data in self.snapshots.items():
            if step == "windows":
                shard = pickle.loads(data)
                assert isinstance(shard, WindowShard)
                shard.attach(PLAN)
                shard.counted = CountedCalls.empty()
                self.windows[name] = shard
        self.touched = set()
        self.paths["restored"] += 1

    def counters(self) -> tuple[int, int]:
        """Repeats ignored and cache reads clamped, over the live join shards."""
        return (
            sum(shard.duplicates for shard in self.joins.values()),
            sum(shard.cache_reads_clamped for shard in self.joins.values()),
        )

    def step(self, step: Step) -> Output:
        raise NotImplementedError


class BatchEngine(Engine):
    """What the dataflow runs (``dataflows.metrics``), minus Bytewax: ``JoinLogic``,
    ``route_to_windows`` and ``WindowLogic`` per activation, join shards built and resumed
    as ``join_builder`` does, with a segment store."""

    def __init__(self, config: Config, stream: Stream) -> None:
        super().__init__(config, stream)
        self.store = MemorySegments()
        self.route = route_to_windows(BATCH_PRICES.price_calls)

    def new_join(self) -> JoinShard:
        shard = self.config.join()
        shard.attach(self.store, SHARDS.join_key)
        return shard

    def freeze_join(self, shard: JoinShard) -> bytes:
        shard.seal()  # as JoinLogic.snapshot: the snapshot names segments, the store holds them
        return pickle.dumps(shard)

    def thaw_join(self, frozen: bytes) -> JoinShard:
        shard = super().thaw_join(frozen)
        if shard.needs_store():
            self.paths["segments read back"] += 1
        shard.attach(self.store, SHARDS.join_key)
        return shard

    def step(self, step: Step) -> Output:
        now = step.now
        polls: list[Poll] = []
        for (topic, partition), start, end in step.polls:
            offsets = list(range(start, end))
            items, times = decode_run(
                topic, partition, KINDS[topic], offsets, self.records[topic, partition][start:end], now
            )
            poll = poll_of(topic, partition, offsets, items, times)
            if poll.letters and len(poll.run):
                self.paths["poll decoded record by record"] += 1
            polls.append(poll)
        letters: list[DeadLetter] = []
        runs_by_shard = by_shard(route_polls(polls), letters)
        joined: list[tuple[str, tuple[CallBatch, list[DeadLetter]]]] = []
        for name in sorted(set(self.joins) | set(runs_by_shard), key=int):
            arrived = runs_by_shard.get(name)
            if arrived is None and not step.notify:
                continue
            join = self.join_shard(name)
            calls = CallBatch()
            found: list[DeadLetter] = [] if arrived is None else join.on_runs(arrived, now, calls)
            for expired in join.on_time(now):
                if isinstance(expired, Call):
                    call_into(calls, expired)
                else:
                    found.append(expired)
            if len(calls) or found:
                joined.append((name, (calls, found)))
        batches = by_shard(self.route(joined), letters)
        rows: list[WindowRow] = []
        for name in sorted(set(self.windows) | set(batches), key=int):
            batch = batches.get(name)
            if batch is None and not step.notify:
                continue
            windows = self.window_shard(name)
            if batch is not None:
                letters += windows.on_calls(batch, now)
            rows += windows.on_time(now)
        return rows, letters


_Item = TypeVar("_Item")


def by_shard(items: Iterable[DeadLetter | tuple[str, _Item]], letters: list[DeadLetter]) -> dict[str, _Item]:
    """A step's output as the next step takes it: one item per shard (each shard at most
    once), its dead letters appended to ``letters``."""
    out: dict[str, _Item] = {}
    for item in items:
        if isinstance(item, DeadLetter):
            letters.append(item)
        else:
            name, value = item
            assert name not in out
            out[name] = value
    return out


def decode_record(
    topic: str, partition: int, offset: int, value: bytes | None, now: float
) -> LLMRequest | LLMResponse | DeadLetter:
    """One record as the per-event path read it."""
    if value is None:
        return invalid(topic, partition, offset, None, "empty record (no value)")
    return decode_one(KINDS[topic], topic, partition, offset, value, now)


class ReferenceEngine(Engine):
    """The per-event path: every record decoded, joined, priced and folded on its own, in
    the batch engine's order: shard by shard, each shard's events in poll order."""

    def __init__(self, config: Config, stream: Stream) -> None:
        super().__init__(config, stream)
        self.revisions: dict[RowKey, int] = {}  # the last emitted, by key

    def step(self, step: Step) -> Output:
        now = step.now
        letters: list[DeadLetter] = []
        events: dict[str, list[tuple[LLMRequest | LLMResponse, SourceRef]]] = {}
        for (topic, partition), start, end in step.polls:
            for offset in range(start, end):
                item = decode_record(topic, partition, offset, self.records[topic, partition][offset], now)
                if isinstance(item, DeadLetter):
                    letters.append(item)
                    self.paths[f"invalid: {invalid_kind(item)}"] += 1
                else:
                    events.setdefault(SHARDS.join_key(item.request_id), []).append(
                        (item, SourceRef(topic, partition, offset))
                    )
        calls: dict[str, list[Call]] = {}
        for name in sorted(set(self.joins) | set(events), key=int):
            arrived = events.get(name)
            if arrived is None and not step.notify:
                continue
            join = self.join_shard(name)
            found: list[Call | DeadLetter] = []
            for item, source in arrived or []:
                found += join.on_event(item, source, now)
            found += join.on_time(now)
            for outcome in found:
                if isinstance(outcome, DeadLetter):
                    letters.append(outcome)
                    self.paths[letter_kind(outcome)] += 1
                    continue
                self.paths[call_kind(outcome)] += 1
                request = outcome.request
                key = (request.tenant_id, request.route, request.model)
                calls.setdefault(SHARDS.window_key(key), []).append(REFERENCE_PRICES.price(outcome))
        rows: list[WindowRow] = []
        for name in sorted(set(self.windows) | set(calls), key=int):
            arriving = calls.get(name)
            if arriving is None and not step.notify:
                continue
            windows = self.window_shard(name)
            for call in arriving or []:
                late = windows.on_call(call, now)
                self.paths.update(f"window {letter.reason}" for letter in late)
                letters += late
            rows += windows.on_time(now)
        for emitted in rows:
            if emitted.row.requests - emitted.row.timeouts > EXACT_UP_TO:
                self.paths["latencies in buckets"] += 1
            emitted_key = row_key(emitted)
            if self.revisions.get(emitted_key, emitted.row.revision) < emitted.row.revision:
                self.paths["row revised"] += 1
            self.revisions[emitted_key] = emitted.row.revision
        return rows, letters


def invalid_kind(letter: DeadLetter) -> str:
    if "ahead of the server clock" in letter.error:
        return "too far ahead"
    if letter.payload is None:
        return "no value"
    return "undecodable"


def letter_kind(letter: DeadLetter) -> str:
    if letter.reason != "orphan_response":
        return f"join {letter.reason}"
    if "tenant mismatch" in letter.error:
        return "orphan: another tenant's"
    if "beyond JOIN_TIMEOUT_SECONDS" in letter.error:
        return "orphan: too far from its request"
    return "orphan: no request"


def call_kind(call: Call) -> str:
    if call.response is None:
        return "timeout"
    return "replaced timeout" if call.replaces_timeout else "answered"


# -- running and comparing ---------------------------------------------------------------

LetterId = tuple[str, str | None, int | None, int | None, str, str | None]


def letter_id(letter: DeadLetter) -> LetterId:
    return (letter.reason, letter.source_topic, letter.partition, letter.offset, letter.error, letter.payload)


class Run(NamedTuple):
    final_rows: dict[RowKey, dict[str, Any]]
    dimension_rows: dict[tuple[RowKey, str], dict[str, Any]]
    letters: set[LetterId]
    steps: list[tuple[int, Counter[bytes], Counter[LetterId]]]  # each step's emissions
    counters: tuple[int, int]
    told: list[Counter[tuple[Any, ...]]]  # each step's calls told to the call directory


def run(engine: Engine, schedule: list[Action]) -> Run:
    final: dict[RowKey, dict[str, Any]] = {}
    dimension_rows: dict[tuple[RowKey, str], dict[str, Any]] = {}
    letters: set[LetterId] = set()
    steps: list[tuple[int, Counter[bytes], Counter[LetterId]]] = []
    told: list[Counter[tuple[Any, ...]]] = []
    for number, action in enumerate(schedule):
        if isinstance(action, Commit):
            engine.commit()
        elif isinstance(action, Crash):
            engine.crash(action.torn)
        else:
            rows, found = engine.step(action)
            for item in rows:
                # The last emission of a window wins, replays included: what the sinks keep.
                final[row_key(item)] = {
                    **msgspec.structs.asdict(item.row),
                    "digest": item.digest,
                    "ttft_count": item.ttft_count,
                }
                # Its dimensions' rows, replaced whole at every emission as the sink does.
                for emitted in item.dimensions:
                    dimension_rows[row_key(item), emitted.rows.dimension] = {
                        **msgspec.structs.asdict(emitted.rows),
                        "ttft_count": emitted.ttft_count,
                        "latency_digest": emitted.latency_digest,
                    }
            letters.update(letter_id(letter) for letter in found)
            told.append(engine.taken_counted())
            steps.append(
                (
                    number,
                    Counter(msgspec.json.encode(item) for item in rows),
                    Counter(letter_id(letter) for letter in found),
                )
            )
    return Run(final, dimension_rows, letters, steps, engine.counters(), told)


def compare(stream: Stream, schedule: list[Action]) -> Counter[str]:
    """Run both engines through ``schedule``; assert they agree; the paths the reference took."""
    batch = BatchEngine(stream.config, stream)
    reference = ReferenceEngine(stream.config, stream)
    expected = run(reference, schedule)
    got = run(batch, schedule)
    assert got.final_rows == expected.final_rows, "final rows differ"
    assert got.dimension_rows == expected.dimension_rows, "dimension rows differ"
    check_dimensions_add_up(got)
    assert got.letters == expected.letters, "dead letters differ"
    for (number, rows, letters), (_, want_rows, want_letters) in zip(got.steps, expected.steps, strict=True):
        assert (rows, letters) == (want_rows, want_letters), f"emissions differ at action {number}"
    assert got.counters == expected.counters, "repeats ignored / cache reads clamped differ"
    assert got.told == expected.told, "calls told to the call directory differ"
    paths = reference.paths + batch.paths
    if any(told[3][1:2] == ANSWERED for step in expected.told for told in step):
        paths["answer told to move its evaluations"] += 1
    if batch.store.saved:
        paths["segments saved"] += 1
    return paths


SUMMED = (
    "requests",
    "errors",
    "timeouts",
    "prompt_tokens",
    "completion_tokens",
    "cache_read_tokens",
    "reasoning_tokens",
    "unpriced_requests",
    "ttft_count",
)


def check_dimensions_add_up(run: Run) -> None:
    """Each window's dimension rows, per dimension, sum to its main row, and each window has
    the rows of every dimension of its tenant's setting at its start."""
    for key, row in run.final_rows.items():
        start = key[0].timestamp()
        for name in PLAN.names(key[1], start):
            values = run.dimension_rows.get((key, name))
            assert values is not None, f"no {name} rows for {key}"
            assert len(values["values"]) <= VALUE_LIMIT + 1
            for field in SUMMED:
                assert sum(values[field]) == row[field], (key, name, field)
            # Each row's cost is rounded to 1e-9 USD: the sum may differ by that much per row.
            cost = sum(values["estimated_cost_usd"])
            assert abs(cost - row["estimated_cost_usd"]) <= 1e-9 * (VALUE_LIMIT + 2)
    windows = {key for key, _ in run.dimension_rows}
    assert windows <= set(run.final_rows), "dimension rows of windows without a row"


@settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(st.data())
def test_the_batch_engine_gives_the_reference_rows_and_dead_letters(data: st.DataObject) -> None:
    stream = data.draw(streams(), label="stream")
    schedule = data.draw(schedules(stream), label="schedule")
    for path in compare(stream, schedule):
        event(path)


# -- the generator reaches the paths that matter -------------------------------------------

EXPECTED_PATHS = {
    "answered",
    "timeout",
    "replaced timeout",
    "orphan: no request",
    "orphan: another tenant's",
    "orphan: too far from its request",
    "join too_late",
    "window too_late",
    "invalid: undecodable",
    "invalid: no value",
    "invalid: too far ahead",
    "row revised",
    "answer told to move its evaluations",
    "restored",
    "segments saved",
    "segments read back",
    "poll decoded record by record",
}


def _request(rid: str, seconds: float) -> bytes:
    tenant_id, route, model = KEYS[0]
    return encoder.encode(
        LLMRequest(
            request_id=rid, tenant_id=tenant_id, route=route, model=model, timestamp=at(round(seconds * 8))
        )
    )


def _response(
    rid: str, seconds: float, tenant_id: str = KEYS[0][0], finish_reason: str | None = None
) -> bytes:
    return encoder.encode(
        LLMResponse(
            request_id=rid,
            tenant_id=tenant_id,
            timestamp=at(round(seconds * 8)),
            completion_tokens=5,
            finish_reason=finish_reason,
        )
    )


def test_every_path_in_one_scripted_stream() -> None:
    """Each path above, taken on purpose (the property test reaches them by chance: its
    ``event`` statistics show how often), through both engines, across a torn crash."""
    config = Config(window=10, grace=0, lateness=15, timeout=5, dedupe=60)
    records: dict[Part, list[bytes | None]] = {(topic, p): [] for topic in KINDS for p in range(PARTITIONS)}
    records[REQUESTS, 0] += [
        _request("answered", 1),
        _request("converted", 3),  # its response comes after its timeout, in time
        _request("too-late", 4),  # its response comes after its window stopped taking calls
        _request("far", 1),
        _request("stranger", 2),
        None,
        b"{",
        _request("ahead", 100_000),  # beyond MAX_FUTURE_SECONDS of the clock
    ]
    records[RESPONSES, 0] += [
        _response("answered", 2),
        _response("no-request", 5),
        _response("far", 20),  # beyond the timeout
        _response("stranger", 3, tenant_id="intruder"),
        _response("stranger", 3),
    ]
    # Read once the window [0, 10) has moved on: its own window closed long ago.
    records[REQUESTS, 1] += [_request("ancient", -100)]
    records[RESPONSES, 1] += [_response("ancient", -99.5)]
    # A partition read late.
    records[RESPONSES, 2] += [_response("converted", 6, finish_reason="stop"), _response("too-late", 7)]
    first = ((REQUESTS, 0), 0, 8), ((RESPONSES, 0), 0, 5)
    ancient = ((REQUESTS, 1), 0, 1), ((RESPONSES, 1), 0, 1)
    late = ((RESPONSES, 2), 0, 1), ((RESPONSES, 2), 1, 2)
    schedule: list[Action] = [
        Step(NOW0, first, True),
        # The join's event time idles past both timeouts, the windows' past [0, 10).
        Step(NOW0 + 7, ancient, True),
        Commit(),
        Step(NOW0 + 8, late[:1], True),  # converts a timeout: the window is emitted again
        Crash(torn=True),
        Step(NOW0 + 8, late[:1], True),
        # Woken idle, the join drops the timed-out request its window no longer takes...
        Step(NOW0 + 40, (), True),
        # ... so its response is too late.
        Step(NOW0 + 41, late[1:], True),
    ]
    sizes = {part: len(values) for part, values in records.items()}
    schedule += drain(sizes, sizes, NOW0 + 41)  # everything read: the deadlines pass
    paths = compare(Stream(config, records), schedule)
    assert set(paths) >= EXPECTED_PATHS, sorted(EXPECTED_PATHS - set(paths))


def test_a_window_past_its_exact_latencies_folds_alike() -> None:
    """More answered calls in one window than a row keeps exact latencies for: the
    latencies move to buckets, in large batches in one engine and one by one in the other."""
    rng = random.Random(7)
    config = Config(window=60, grace=3, lateness=40, timeout=30, dedupe=60)
    records: dict[Part, list[bytes | None]] = {(topic, p): [] for topic in KINDS for p in range(PARTITIONS)}
    for n in range(1200):
        spec = CallSpec(
            key=0,
            request_at=rng.randrange(0, 50 * 8),
            jitter_us=rng.randrange(1_000_000),
            zoned=False,
            gap=rng.randrange(0, 200),
            requests=1,
            responses=int(rng.random() < 0.9),
            retry_shift=0,
            stamped=True,
            stranger=False,
            latency_ms=rng.choice([None, rng.uniform(0, 20_000)]),
            ttft_ms=None,
            prompt_tokens=rng.randrange(1000),
            completion_tokens=10,
            cache_read_tokens=0,
            reasoning_tokens=0,
            error=None,
            extras=False,
            team=rng.randrange(5),
            finish_reason=rng.choice([None, "stop"]),
        )
        for topic, value in call_records(f"bulk-{n}", spec):
            records[topic, rng.randrange(PARTITIONS)].append(value)
    sizes = {part: len(values) for part, values in records.items()}
    positions = dict.fromkeys(sizes, 0)
    committed = dict(positions)
    schedule: list[Action] = []
    now = NOW0
    crashed = False
    while any(positions[part] < size for part, size in sizes.items()):
        now += 0.5
        polls = []
        for part in rng.sample(sorted(sizes), k=3):
            end = min(sizes[part], positions[part] + rng.randint(1, 150))
            if end > positions[part]:
                polls.append((part, positions[part], end))
                positions[part] = end
        schedule.append(Step(now, tuple(polls), True))
        if rng.random() < 0.2:
            schedule.append(Commit())
            committed = dict(positions)
        elif not crashed and rng.random() < 0.1:
            schedule.append(Crash(torn=True))
            positions = dict(committed)
            crashed = True
    paths = compare(Stream(config, records), [*schedule, *drain(positions, sizes, now)])
    assert {"latencies in buckets", "restored", "timeout"} <= set(paths)
