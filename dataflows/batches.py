"""Records in batches: decoded once, then moved and counted as columns.

A poll of one partition is decoded in one msgspec call (:func:`decode_run`): the
records' values are joined into one JSON array and read as ``list[Event]``,
which costs about half of what decoding them one by one does. When the array
does not decode (a record in it is invalid), each record is decoded on its own,
so exactly the invalid ones become ``invalid`` dead letters, as before.

What the rest of the dataflow moves:

- :class:`EventRun`: decoded events of one partition, in offset order, with
  their offsets and timestamps (Unix seconds). The join takes runs.
- :class:`CallBatch`: counted calls as parallel columns, in the order the join
  counted them. The windows fold a batch with array operations.

Both cross between Bytewax processes as msgpack (``__reduce__``): a decoded
event holds a datetime, which pickles in tens of microseconds.

No Bytewax, Kafka or Postgres here: this is the pure floor of the dataflow.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import NamedTuple

import msgspec

from schemas.deadletter import DeadLetter
from schemas.events import (
    MAX_FUTURE_SECONDS,
    LLMEvaluation,
    LLMRequest,
    LLMResponse,
    check_not_future,
)

logger = logging.getLogger("streamlens.dataflow")

Event = LLMRequest | LLMResponse | LLMEvaluation
# The kinds of event a run may hold, numbered for the runs that cross processes.
KINDS: tuple[type[Event], ...] = (LLMRequest, LLMResponse, LLMEvaluation)

# What msgspec raises on a record it cannot decode: its own errors (ValidationError
# among them), UnicodeDecodeError (a ValueError) for invalid UTF-8 inside a string it
# keeps, and RecursionError for JSON nested deeper than it follows.
UNDECODABLE = (msgspec.DecodeError, ValueError, RecursionError)


class SourceRef(NamedTuple):
    """Where a record came from, for the dead-letter topic."""

    topic: str
    partition: int
    offset: int


def payload_text(value: bytes | None) -> tuple[str | None, bool]:
    """The record as text for the dead-letter topic, and whether it had to be base64-encoded.

    UTF-8 records are kept as they are, so they can be replayed; anything else is
    base64 (the error line says so), so no byte is lost.
    """
    if value is None:
        return None, False
    try:
        return value.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(value).decode("ascii"), True


def invalid(
    topic: str | None,
    partition: int | None,
    offset: int | None,
    value: bytes | None,
    error: str,
    key: bytes | None = None,
) -> DeadLetter:
    """The dead letter of a record that could not be read or decoded; ``key`` is the record's
    Kafka key, the dead letter's own when its payload names no request id (as base64 of a
    value that is not UTF-8 cannot)."""
    payload, encoded = payload_text(value)
    if encoded:
        error = f"{error} (payload is not UTF-8; it is shown base64-encoded)"
    return DeadLetter(
        reason="invalid",
        source_topic=topic,
        partition=partition,
        offset=offset,
        error=error,
        payload=payload,
        source_key=key,
    )


class _Decoders(NamedTuple):
    one: msgspec.json.Decoder
    many: msgspec.json.Decoder
    packed: msgspec.msgpack.Decoder


_DECODERS: dict[type, _Decoders] = {
    kind: _Decoders(
        msgspec.json.Decoder(kind), msgspec.json.Decoder(list[kind]), msgspec.msgpack.Decoder(list[kind])
    )
    for kind in KINDS
}
_packer = msgspec.msgpack.Encoder()


def decode_one(
    kind: type[Event], topic: str, partition: int, offset: int, value: bytes, now: float
) -> Event | DeadLetter:
    """One record → its event, or an ``invalid`` dead letter naming what is wrong; never an
    exception, whatever the bytes. ``now`` is the wall clock: an event more than
    :data:`~schemas.events.MAX_FUTURE_SECONDS` ahead of it is invalid, as at the
    ingestion API, so that a record produced straight into the topic cannot move event
    time (which never goes back) into the future."""
    try:
        event = _DECODERS[kind].one.decode(value)
    except UNDECODABLE as error:
        return invalid(topic, partition, offset, value, str(error))
    except Exception as error:
        # Not expected from decoding, but a record that raises it must not stop the
        # dataflow on every restart: it is dead-lettered, and logged as the surprise it is.
        logger.exception("decoding %s[%s]@%s raised", topic, partition, offset)
        return invalid(topic, partition, offset, value, f"decoding raised {type(error).__name__}: {error}")
    future = check_not_future(event, now)
    if future is not None:
        return invalid(topic, partition, offset, value, future)
    return event


def _decode_many(kind: type[Event], values: list[bytes]) -> list[Event] | None:
    """All ``values`` decoded in one call; None when any of them does not decode alone.

    Joined with commas, a value that is not one JSON value (``1,2``, or nothing)
    would shift the others: the count must match, and each element is then the
    decoding of its own value, since a JSON array's elements are decoded exactly as
    the same text alone."""
    try:
        events = _DECODERS[kind].many.decode(b"[" + b",".join(values) + b"]")
    except Exception:
        return None
    return events if len(events) == len(values) else None


class EventRun:
    """Decoded events of one partition, in offset order: what the join takes.

    ``times`` are the events' timestamps in Unix seconds, read once here.
    """

    __slots__ = ("events", "kind", "offsets", "partition", "times", "topic")

    def __init__(
        self,
        topic: str,
        partition: int,
        kind: type[Event],
        offsets: list[int],
        events: list[Event],
        times: list[float],
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.kind = kind
        self.offsets = offsets
        self.events = events
        self.times = times

    def __len__(self) -> int:
        return len(self.events)

    def source(self, index: int) -> SourceRef:
        return SourceRef(self.topic, self.partition, self.offsets[index])

    def take(self, indexes: list[int]) -> EventRun:
        """The events at ``indexes`` (ascending), as a run of their own."""
        events, offsets, times = self.events, self.offsets, self.times
        return EventRun(
            self.topic,
            self.partition,
            self.kind,
            [offsets[i] for i in indexes],
            [events[i] for i in indexes],
            [times[i] for i in indexes],
        )

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # Crossing to another process: the events as one msgpack string.
        return _run_from_msgpack, (
            self.topic,
            self.partition,
            KINDS.index(self.kind),
            self.offsets,
            _packer.encode(self.events),
            self.times,
        )


def _run_from_msgpack(
    topic: str, partition: int, kind_number: int, offsets: list[int], packed: bytes, times: list[float]
) -> EventRun:
    kind = KINDS[kind_number]
    return EventRun(topic, partition, kind, offsets, _DECODERS[kind].packed.decode(packed), times)


def decode_run(
    topic: str,
    partition: int,
    kind: type[Event],
    offsets: list[int],
    values: list[bytes | None],
    now: float,
    keys: Callable[[int], bytes | None] | None = None,
) -> tuple[list[Event | DeadLetter], list[float]]:
    """A poll's records (offsets ascending) → each one's event or dead letter, and the event
    time each stands for: its timestamp, or -inf for a dead letter (which holds nobody back).

    ``keys(i)`` is the Kafka key of the record of ``values[i]``, which its dead letter
    carries (:func:`invalid`): asked for dead letters only, so valid records cost nothing.
    """
    valid = [value for value in values if value is not None]
    decoded: list[Event | DeadLetter] | None = None
    if len(valid) == len(values):
        many = _decode_many(kind, valid)  # type-narrowed: no None among values
        if many is not None:
            latest = now + MAX_FUTURE_SECONDS
            times = [event.timestamp.timestamp() for event in many]
            if max(times, default=-math.inf) <= latest:
                return list(many), times
    decoded = []
    for index, (offset, value) in enumerate(zip(offsets, values, strict=True)):
        if value is None:
            item: Event | DeadLetter = invalid(topic, partition, offset, None, "empty record (no value)")
        else:
            item = decode_one(kind, topic, partition, offset, value, now)
        if keys is not None and type(item) is DeadLetter:
            item.source_key = keys(index)
        decoded.append(item)
    times = [
        item.timestamp.timestamp() if not isinstance(item, DeadLetter) else -math.inf for item in decoded
    ]
    return decoded, times


class CallBatch:
    """Counted calls as parallel columns, in the order the join counted them.

    A call is a request and its response (``responses[i]`` is None for a timed-out
    call); ``replaces[i]``: an answered call taking the place of its request's earlier
    timeout (docs/counting.md §1.1: timeouts are provisional). ``completed[i]`` is the event time at
    which the call became known: the later of its two timestamps, or the request's
    + timeout for a timeout. ``costs[i]`` is set by pricing (None: no known price).
    """

    __slots__ = (
        "completed",
        "costs",
        "replaces",
        "request_times",
        "requests",
        "response_times",
        "responses",
        "sources",
    )

    def __init__(self) -> None:
        self.requests: list[LLMRequest] = []
        self.responses: list[LLMResponse | None] = []
        self.sources: list[SourceRef] = []
        self.request_times: list[float] = []
        self.response_times: list[float] = []  # nan for a timeout
        self.completed: list[float] = []
        self.replaces: list[bool] = []
        self.costs: list[float | None] = []

    def __len__(self) -> int:
        return len(self.requests)

    def add(
        self,
        request: LLMRequest,
        response: LLMResponse | None,
        source: SourceRef,
        request_time: float,
        response_time: float,
        completed: float,
        replaces: bool = False,
    ) -> None:
        self.requests.append(request)
        self.responses.append(response)
        self.sources.append(source)
        self.request_times.append(request_time)
        self.response_times.append(response_time)
        self.completed.append(completed)
        self.replaces.append(replaces)

    @classmethod
    def concat(cls, batches: Iterable[CallBatch]) -> CallBatch:
        """The calls of ``batches``, one after the other, as one batch."""
        whole = cls()
        for batch in batches:
            for name in cls.__slots__:
                getattr(whole, name).extend(getattr(batch, name))
        if len(whole.costs) != len(whole.requests):
            whole.costs = []  # priced and unpriced parts: price the whole again
        return whole

    def take(self, indexes: list[int]) -> CallBatch:
        """The calls at ``indexes``, in that order, as a batch of their own."""
        part = CallBatch()
        for name in CallBatch.__slots__:
            column = getattr(self, name)
            if column:
                setattr(part, name, [column[i] for i in indexes])
        return part

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return _calls_from_msgpack, (
            _packer.encode(
                (
                    self.requests,
                    self.responses,
                    [tuple(source) for source in self.sources],
                    self.request_times,
                    self.response_times,
                    self.completed,
                    self.replaces,
                    self.costs,
                )
            ),
        )


class _PackedCalls(msgspec.Struct, array_like=True):
    requests: list[LLMRequest]
    responses: list[LLMResponse | None]
    sources: list[tuple[str, int, int]]
    request_times: list[float]
    response_times: list[float]
    completed: list[float]
    replaces: list[bool]
    costs: list[float | None]


_calls_decoder = msgspec.msgpack.Decoder(_PackedCalls)


def _calls_from_msgpack(packed: bytes) -> CallBatch:
    fields = _calls_decoder.decode(packed)
    batch = CallBatch()
    for name in CallBatch.__slots__:
        setattr(batch, name, getattr(fields, name))
    batch.sources = [SourceRef(*source) for source in fields.sources]
    return batch


def iso(seconds: float) -> str:
    """``seconds`` after the epoch as an ISO time, or as seconds when out of range."""
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat()
    except (OverflowError, ValueError, OSError):
        return f"{seconds:.0f} s after the epoch"
