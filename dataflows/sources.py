"""Reading ``llm.requests`` and ``llm.responses``: raw records in, decoded events or dead letters out.

Each record keeps its coordinates (topic, partition, offset) as a
:class:`~dataflows.join.SourceRef`, so whatever cannot be counted can be traced
back to the record that caused it.

:class:`BatchingKafkaSource` is Bytewax's :class:`KafkaSource` (same partitions,
same configuration, the offset as recovery state) except that each poll of a
partition becomes ONE item, a :class:`RecordBatch`, instead of one
``KafkaSourceMessage`` per record. :func:`decode_batches` then reads the batches at hand in
one call and groups the records by join shard, so Bytewax moves a few dozen items
per poll instead of a thousand: per-item cost in Bytewax (a frozen dataclass per
record, a Python call per step) was most of the dataflow's time.

Records go to the join still undecoded, as bytes: with several processes a group
crosses to the process that owns its shard, and bytes pickle in a fraction of a
microsecond where a decoded event (a Struct holding a datetime) takes tens of
microseconds. Routing reads only the ``request_id`` (:func:`request_id_of`); the
join step decodes the whole record (:func:`decode_record`).

Neither raises, whatever the bytes: a record of any size or content is counted or
becomes an ``invalid`` dead letter, so no record can stop the dataflow on every
restart. A timestamp too far ahead of the clock is invalid here too, before the
join's event time can see it.
"""

from __future__ import annotations

import base64
import logging
import math
import time
import zlib
from collections import deque
from datetime import datetime
from typing import Any, NamedTuple

import msgspec
from bytewax.connectors.kafka import KafkaSource
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_NOT_AVAILABLE, Consumer, Message, TopicPartition

from dataflows.observability import BOARD, RECORDS_READ
from dataflows.progress import ReadProgress
from dataflows.stopping import STOPPING
from schemas.deadletter import DeadLetter
from schemas.events import (
    MAX_FUTURE_SECONDS,
    LLMRequest,
    LLMResponse,
    check_not_future,
    request_decoder,
    response_decoder,
)
from schemas.topics import REQUESTS, RESPONSES

logger = logging.getLogger("streamlens.dataflow")

# Where a partition starts when recovery holds no offset for it yet: the whole topic.
# Once a snapshot exists, Bytewax resumes from the offset stored in it instead.
STARTING_OFFSET = OFFSET_BEGINNING

# Records per partition per poll, at most: a poll returns what has arrived, so
# this only matters on a backlog. Larger batches amortise the per-batch cost of
# every downstream step, and with several processes the cost per exchanged
# message: in bench_dataflow two processes went from 22k to 43k calls/s between
# 1,000 (Bytewax's default) and 5,000; 20,000 was no faster.
BATCH_SIZE = 5000

# What each partition's consumer may prefetch. The dataflow runs one consumer per
# partition, and librdkafka's defaults let each queue up to 64 MiB
# (queued.max.messages.kbytes=65536) or 100,000 records, fetched in responses of up to
# 50 MiB. On bench_dataflow's backlog, 6 such consumers (2 topics × 3 partitions) held
# 585 MiB 2 s after their first poll, with ~156,000 records (38 MiB of values) queued
# each. With 2 MiB queued and 1 MiB per fetch response they held 70 MiB, ~13,000
# records each: a response still carries at least one whole producer batch, which
# overshoots the bound, and leaves two polls of BATCH_SIZE at hand while the next
# fetch is under way.
PREFETCH_KIB = 2048
FETCH_MAX_BYTES = 1 << 20
PREFETCH_CONFIG = {
    "queued.max.messages.kbytes": str(PREFETCH_KIB),
    "fetch.max.bytes": str(FETCH_MAX_BYTES),
}

_DECODERS: dict[str, msgspec.json.Decoder] = {
    REQUESTS: request_decoder,
    RESPONSES: response_decoder,
}

JOIN_SHARDS = 64
JOIN_SHARD_NAMES: tuple[str, ...] = tuple(str(n) for n in range(JOIN_SHARDS))

# A poll's records of one join shard: (topic, partition, [(offset, value), ...]).
RawGroup = tuple[str, int, list[tuple[int, bytes]]]


def join_shard_key(request_id: str) -> str:
    """The join shard of a request id (a str: Bytewax keys are strings).

    ``zlib.crc32``, not ``hash()``: a str's hash differs per process, and every
    process must route an id to the same shard.
    """
    return JOIN_SHARD_NAMES[zlib.crc32(request_id.encode()) % JOIN_SHARDS]


class _RequestId(msgspec.Struct):
    """The one field a record is routed by; msgspec skips the rest unchecked."""

    request_id: str


_request_id_decoder = msgspec.json.Decoder(_RequestId)


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
    topic: str | None, partition: int | None, offset: int | None, value: bytes | None, error: str
) -> DeadLetter:
    """The dead letter of a record that could not be read or decoded."""
    payload, encoded = payload_text(value)
    if encoded:
        error = f"{error} (payload is not UTF-8; it is shown base64-encoded)"
    return DeadLetter(
        reason="invalid", source_topic=topic, partition=partition, offset=offset, error=error, payload=payload
    )


def broker_error(
    topic: str, partition: int, offset: int | None, value: bytes | None, error: object
) -> DeadLetter:
    """A consumer error the broker reported instead of a record.

    Dead-lettered (and logged loudly) rather than raised: a record the consumer
    could not deliver must stay visible, and the dataflow keeps running while
    librdkafka retries. A broker that goes away entirely surfaces here too, as
    transport errors.
    """
    logger.error("kafka consumer error on %s[%s]@%s: %s", topic, partition, offset, error)
    return invalid(topic, partition, offset, value, f"kafka consumer error: {error}")


class RecordBatch(NamedTuple):
    """One poll of one partition: the records as (offset, value), and any errors."""

    topic: str
    partition: int
    records: list[tuple[int, bytes | None]]
    errors: list[DeadLetter]


class _BatchPartition(StatefulSourcePartition[RecordBatch, int]):
    def __init__(
        self,
        config: dict,
        topic: str,
        partition: int,
        starting_offset: int,
        resume_state: int | None,
        batch_size: int,
        progress: ReadProgress,
    ) -> None:
        self._offset = starting_offset if resume_state is None else resume_state
        self._consumer = Consumer(config)
        # assign(), not subscribe(): recovery, not a consumer group, owns the offsets.
        self._consumer.assign([TopicPartition(topic, partition, self._offset)])
        self._topic = topic
        self._partition = partition
        self._batch_size = batch_size
        self._progress = progress
        self._part = (topic, partition)
        progress.register(self._part, time.time())
        # Polled records not handed over yet (too far ahead), with their timestamps.
        self._held: deque[tuple[Message, int, float]] = deque()
        self._newest = -math.inf
        BOARD.report_position(topic, partition, self._offset)

    def next_batch(self) -> list[RecordBatch]:
        if STOPPING.is_set():
            raise StopIteration  # asked to stop: the input ends here (dataflows.stopping)
        now = time.time()
        progress, part = self._progress, self._part
        held = self._held
        if not held:
            messages = self._consumer.consume(self._batch_size, 0.001)
            progress.polled(part, appended_at(messages[-1]) if messages else None, now)
            if not messages:
                return []
            held.extend(stamped(messages, now))
        # Hand over, in offset order, what is not too far ahead of the other partitions.
        limit = progress.limit(part, now)
        records: list[tuple[int, bytes | None]] = []
        errors: list[DeadLetter] = []
        newest = self._newest
        while held and held[0][2] <= limit:
            message, offset, ts = held.popleft()
            error = message.error()
            if error is None:
                records.append((offset, message.value()))
            else:
                errors.append(broker_error(self._topic, self._partition, offset, message.value(), error))
            if offset is not None and offset >= 0:
                # Resume after the last record handed over, never before it.
                self._offset = offset + 1
            if ts > newest:
                newest = ts
        self._newest = newest
        progress.stands_at(part, held[0][2] if held else newest)
        if not records and not errors:
            return []
        RECORDS_READ.labels(self._topic).inc(len(records) + len(errors))
        BOARD.report_position(self._topic, self._partition, self._offset)
        return [RecordBatch(self._topic, self._partition, records, errors)]

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        self._consumer.close()


class _Stamp(msgspec.Struct):
    """The one field read progress is measured by."""

    timestamp: datetime


_stamp_decoder = msgspec.json.Decoder(_Stamp)


def appended_at(message: Message) -> float:
    """When the record was written to Kafka (its producer's or the broker's time), in Unix seconds."""
    kind, millis = message.timestamp()
    return millis / 1000 if kind != TIMESTAMP_NOT_AVAILABLE else -math.inf


def stamped(messages: list[Message], now: float) -> list[tuple[Message, int, float]]:
    """Each message with its offset and the event time it stands for: its ``timestamp`` in
    Unix seconds, or -inf when it has none that counts (an error, an invalid record, a
    time further ahead of the clock than allowed: their dead letters hold nobody back)."""
    decode = _stamp_decoder.decode
    latest = now + MAX_FUTURE_SECONDS
    out = []
    for message in messages:
        ts = -math.inf
        value = message.value()
        if message.error() is None and value is not None:
            try:
                ts = decode(value).timestamp.timestamp()
            except _UNDECODABLE:
                ts = -math.inf  # an invalid record: its dead letter says why
            if ts > latest:
                ts = -math.inf
        out.append((message, message.offset(), ts))
    return out


class BatchingKafkaSource(FixedPartitionedSource[RecordBatch, int]):
    """Bytewax's :class:`KafkaSource` (its partitions, its arguments) handing over each
    poll of a partition as one :class:`RecordBatch`, its partitions reading in step
    (:mod:`dataflows.progress`): none more than ``read_ahead`` seconds of event time
    past the slowest one still busy.

    Not a subclass of :class:`KafkaSource`: its items are batches, not Bytewax's
    messages. It keeps one to list the partitions and hold the arguments."""

    def __init__(self, *args: Any, read_ahead: float, **kwargs: Any) -> None:
        self._kafka = KafkaSource(*args, **kwargs)
        # One per process: the flow, and so this source, is built once per process.
        self._progress = ReadProgress(read_ahead)

    def list_parts(self) -> list[str]:
        return self._kafka.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _BatchPartition:
        kafka = self._kafka
        index, topic = for_part.split("-", 1)
        if topic not in kafka._topics:
            raise ValueError(f"recovery state names topic {topic!r}, not one of {kafka._topics}")
        config = {
            "group.id": "streamlens-dataflow-unused",  # required by librdkafka, never joined
            "enable.auto.commit": "false",
            "bootstrap.servers": ",".join(kafka._brokers),
            "enable.partition.eof": "false",
            **PREFETCH_CONFIG,
        }
        config.update(kafka._add_config)
        return _BatchPartition(
            config,
            topic,
            int(index),
            kafka._starting_offset,
            resume_state,
            kafka._batch_size,
            self._progress,
        )


# What msgspec raises on a record it cannot decode: its own errors (ValidationError
# among them), UnicodeDecodeError (a ValueError) for invalid UTF-8 inside a string it
# keeps, and RecursionError for JSON nested deeper than it follows.
_UNDECODABLE = (msgspec.DecodeError, ValueError, RecursionError)


def decode_record(
    topic: str, partition: int, offset: int, value: bytes, now: float | None = None
) -> LLMRequest | LLMResponse | DeadLetter:
    """One record of ``llm.requests`` or ``llm.responses`` → its event, or an ``invalid``
    dead letter naming what is wrong; never an exception, whatever the bytes.

    ``now`` is the wall clock in Unix seconds (read here when None). An event more
    than :data:`~schemas.events.MAX_FUTURE_SECONDS` ahead of it is invalid, as at the
    ingestion API: a record produced straight into the topic must not move event
    time (which never goes back) into the future.
    """
    try:
        event = _DECODERS[topic].decode(value)
    except _UNDECODABLE as error:
        return invalid(topic, partition, offset, value, str(error))
    except Exception as error:
        # Not expected from decoding, but a record that raises it must not stop the
        # dataflow on every restart: it is dead-lettered, and logged as the surprise it is.
        logger.exception("decoding %s[%s]@%s raised", topic, partition, offset)
        return invalid(topic, partition, offset, value, f"decoding raised {type(error).__name__}: {error}")
    future = check_not_future(event, time.time() if now is None else now)
    if future is not None:
        return invalid(topic, partition, offset, value, future)
    return event


def request_id_of(value: bytes) -> str | None:
    """The record's ``request_id``, read without decoding the rest; None when it has none
    or the record cannot be decoded at all (:func:`decode_record` then says why).

    The same JSON decoding as the event's own, so the full decoding in the join
    finds the same id (duplicate keys, escapes and all): a record always lands on
    the shard of the id it is joined by.
    """
    try:
        return _request_id_decoder.decode(value).request_id
    except Exception:
        # Whatever the bytes do to the decoder, routing is not the place to say so.
        return None


def decode_batches(batches: list[RecordBatch]) -> list[DeadLetter | tuple[str, list[RawGroup]]]:
    """The batches of one activation → their dead letters, and their records grouped by
    join shard as ``(shard, [(topic, partition, [(offset, value), ...]), ...])``, each
    partition's offsets in order.

    One item per shard for all the batches at hand: Bytewax's cost per item (and,
    across processes, per message) is paid once per shard, not once per poll.
    """
    out: list[DeadLetter | tuple[str, list[RawGroup]]] = []
    shards: dict[str, list[RawGroup]] = {}
    for batch in batches:
        out.extend(batch.errors)
        topic, partition = batch.topic, batch.partition
        if topic not in _DECODERS:
            out.extend(
                invalid(topic, partition, offset, value, f"record from unexpected topic {topic!r}")
                for offset, value in batch.records
            )
            continue
        groups: dict[str, list[tuple[int, bytes]]] = {}
        for offset, value in batch.records:
            if value is None:
                out.append(invalid(topic, partition, offset, None, "empty record (no value)"))
                continue
            request_id = request_id_of(value)
            if request_id is None:
                # No usable request_id: the full decoding says what is wrong.
                decoded = decode_record(topic, partition, offset, value)
                if isinstance(decoded, DeadLetter):
                    out.append(decoded)
                    continue
                request_id = decoded.request_id
            shard = join_shard_key(request_id)
            group = groups.get(shard)
            if group is None:
                groups[shard] = group = []
            group.append((offset, value))
        for shard, records in groups.items():
            found = shards.get(shard)
            if found is None:
                shards[shard] = [(topic, partition, records)]
            else:
                found.append((topic, partition, records))
    out.extend(shards.items())
    return out
