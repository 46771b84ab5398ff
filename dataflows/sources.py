"""Reading ``llm.requests`` and ``llm.responses``: records in, decoded events or dead letters out.

Each record keeps its coordinates (topic, partition, offset), so whatever cannot be
counted can be traced back to the record that caused it.

:class:`BatchingKafkaSource` is Bytewax's :class:`KafkaSource` (same partitions,
same configuration, the offset as recovery state) except that each poll of a
partition is decoded at once, in one msgspec call
(:func:`dataflows.batches.decode_run`), and handed over as ONE item, a
:class:`Poll`: the poll's events as an :class:`~dataflows.batches.EventRun`, and
its dead letters. :func:`route_polls` then splits the polls at hand by join shard,
so Bytewax moves a few dozen items per activation instead of one per record, and
every record is parsed once, where it is read.

With several processes, a run crossing to the process that owns its shard
travels as msgpack (see :class:`~dataflows.batches.EventRun`).

Nothing here raises, whatever the bytes: a record of any size or content is
counted or becomes an ``invalid`` dead letter, so no record can stop the dataflow
on every restart. A timestamp too far ahead of the clock is invalid here too,
before the join's event time can see it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import numpy as np
from bytewax.connectors.kafka import KafkaSource
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from numpy.typing import NDArray

from dataflows.batches import Event, EventRun, decode_run, invalid
from dataflows.observability import BOARD, RECORDS_READ
from dataflows.progress import ReadProgress
from dataflows.shards import DEFAULT, Shards
from dataflows.stopping import STOPPING
from schemas.deadletter import DeadLetter
from schemas.events import LLMEvaluation, LLMRequest, LLMResponse
from schemas.topics import EVALUATIONS, REQUESTS, RESPONSES

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
# Once a partition's queue is full, librdkafka postpones its next fetch by this (1 s by
# default): with so small a queue, reading bench_dataflow's backlog alone then took
# 10.2-10.6 s of wall clock, 1.5 s with 10 ms, holding the same memory.
FETCH_QUEUE_BACKOFF_MS = 10
# How long the broker holds a fetch that finds nothing new (500 ms by default). An empty
# partition reports its end (dataflows.progress: idle at once) when its first fetch
# comes back, so at every start it held the others back this long; at idle each
# partition's consumer asks this often, 10 small requests a second.
FETCH_WAIT_MAX_MS = 100
PREFETCH_CONFIG = {
    "queued.max.messages.kbytes": str(PREFETCH_KIB),
    "fetch.max.bytes": str(FETCH_MAX_BYTES),
    "fetch.queue.backoff.ms": str(FETCH_QUEUE_BACKOFF_MS),
    "fetch.wait.max.ms": str(FETCH_WAIT_MAX_MS),
}

_KINDS: dict[str, type[Event]] = {REQUESTS: LLMRequest, RESPONSES: LLMResponse, EVALUATIONS: LLMEvaluation}


def broker_error(
    topic: str,
    partition: int,
    offset: int | None,
    value: bytes | None,
    error: object,
    key: bytes | None = None,
) -> DeadLetter:
    """A consumer error the broker reported instead of a record.

    Dead-lettered (and logged loudly) rather than raised: a record the consumer
    could not deliver must stay visible, and the dataflow keeps running while
    librdkafka retries. A broker that goes away entirely surfaces here too, as
    transport errors.
    """
    logger.error("kafka consumer error on %s[%s]@%s: %s", topic, partition, offset, error)
    return invalid(topic, partition, offset, value, f"kafka consumer error: {error}", key)


class Poll(NamedTuple):
    """What one partition hands over at a time: its decoded events, and its dead letters."""

    run: EventRun
    letters: list[DeadLetter]


class _BatchPartition(StatefulSourcePartition[Poll, int]):
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
        if self._offset < 0:
            learn_leader(self._consumer, topic)
        # assign(), not subscribe(): recovery, not a consumer group, owns the offsets.
        self._consumer.assign([TopicPartition(topic, partition, self._offset)])
        self._topic = topic
        self._partition = partition
        self._batch_size = batch_size
        self._progress = progress
        self._part = (topic, partition)
        progress.register(self._part, time.time())
        # Polled records not handed over yet (too far ahead): from index _next on, each
        # record's offset, event or dead letter, and the event time it stands for.
        self._held = _Held.of([], [], [])
        self._next = 0
        self._newest = -math.inf
        # The consumer said it reached the end of the partition after records not all
        # handed over yet: the partition is idle once they are (dataflows.progress).
        self._at_end = False
        BOARD.report_position(topic, partition, self._offset)

    def next_batch(self) -> list[Poll]:
        if STOPPING.is_set():
            raise StopIteration  # asked to stop: the input ends here (dataflows.stopping)
        now = time.time()
        progress, part = self._progress, self._part
        held = self._held
        if self._next >= len(held.offsets):
            if self._at_end:
                progress.reached_end(part, now)  # and all it read is handed over
                self._at_end = False
            messages = self._consumer.consume(self._batch_size, 0.001)
            clean = all(message.error() is None for message in messages)
            if not clean:
                # End reports are not records: without them a poll is usually clean again,
                # and decodes in one call (a live poll ends with one nearly every time).
                messages, self._at_end = ends_removed(messages)
                clean = all(message.error() is None for message in messages)
            progress.polled(part, appended_at(messages[-1]) if messages else None, now)
            if not messages:
                if self._at_end:
                    progress.reached_end(part, now)
                    self._at_end = False
                return []
            self._held = held = self._decode(messages, now, clean)
            self._next = 0
        # Hand over, in offset order, what is not too far ahead of the other partitions.
        limit = progress.limit(part, now)
        first = self._next
        times = held.times
        last = _within(held.stamps, first, limit)
        end = len(times)
        self._next = last
        if last == first:
            progress.stands_at(part, times[first])
            return []
        offsets = held.offsets[first:last]
        items = held.items[first:last]
        newest = max(self._newest, float(held.stamps[first:last].max()))
        self._newest = newest
        progress.stands_at(part, times[last] if last < end else newest)
        # Resume after the last record handed over, never before it (offsets ascend; a
        # broker error's message may have none).
        for offset in reversed(offsets):
            if offset is not None and offset >= 0:
                self._offset = max(self._offset, offset + 1)
                break
        RECORDS_READ.labels(self._topic).inc(len(items))
        BOARD.report_position(self._topic, self._partition, self._offset)
        return [poll_of(self._topic, self._partition, offsets, items, times[first:last])]

    def _decode(self, messages: list[Message], now: float, clean: bool) -> _Held:
        """A poll's messages, decoded (:func:`decode_values`); a broker error dead-letters its
        own message only. ``clean``: none of them is an error."""
        topic, partition = self._topic, self._partition
        offsets = [message.offset() for message in messages]
        if clean:
            values = [message.value() for message in messages]
            return _Held.of(
                offsets, *decode_values(topic, partition, offsets, values, now, keys_of(messages))
            )
        items: list[Event | DeadLetter] = []
        times: list[float] = []
        for message, offset in zip(messages, offsets, strict=True):
            error = message.error()
            if error is None:
                decoded, stamps = decode_values(
                    topic, partition, [offset], [message.value()], now, keys_of([message])
                )
            else:
                decoded = [broker_error(topic, partition, offset, message.value(), error, message.key())]
                stamps = [-math.inf]
            items += decoded
            times += stamps
        return _Held.of(offsets, items, times)

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        self._consumer.close()


class _Held(NamedTuple):
    offsets: list[int]
    items: list[Event | DeadLetter]
    times: list[float]
    stamps: NDArray[np.float64]  # the times as an array, for handing over by time

    @classmethod
    def of(cls, offsets: list[int], items: list[Event | DeadLetter], times: list[float]) -> _Held:
        return cls(offsets, items, times, np.array(times, dtype=np.float64))


def _within(stamps: NDArray[np.float64], first: int, limit: float) -> int:
    """The end of the run of records from ``first`` on stamped at most ``limit``."""
    over = np.flatnonzero(stamps[first:] > limit)
    return first + int(over[0]) if len(over) else len(stamps)


# How long a fresh start waits for a topic's metadata before assigning its partitions.
LEADER_TIMEOUT = 1.0


def learn_leader(consumer: Consumer, topic: str) -> None:
    """Fetch ``topic``'s metadata before a partition of it is assigned at a logical offset
    (the beginning, on a fresh start): librdkafka looks such an offset up once it knows the
    partition's leader, and when the assignment comes first it retries the lookup only
    after 500 ms, which was a third of the dataflow's start-up. Metadata not had within
    :data:`LEADER_TIMEOUT` is left to librdkafka, as without this; a resumed partition
    starts at an offset of its own, with no lookup."""
    with contextlib.suppress(KafkaException):
        consumer.list_topics(topic, timeout=LEADER_TIMEOUT)


def ends_removed(messages: list[Message]) -> tuple[list[Message], bool]:
    """The consumer's messages without its end-of-partition events (``enable.partition.eof``),
    and whether there was one: an event, not a record, and no error either."""
    kept = [message for message in messages if not _is_end(message)]
    return kept, len(kept) < len(messages)


def _is_end(message: Message) -> bool:
    error = message.error()
    return error is not None and error.code() == KafkaError._PARTITION_EOF


def keys_of(messages: list[Message]) -> Callable[[int], bytes | None]:
    """The Kafka key of ``messages[i]``, read only when asked (for a dead letter)."""
    return lambda index: cast("bytes | None", messages[index].key())


def appended_at(message: Message) -> float:
    """When the record was written to Kafka (its producer's or the broker's time), in Unix seconds."""
    kind, millis = message.timestamp()
    return millis / 1000 if kind != TIMESTAMP_NOT_AVAILABLE else -math.inf


class BatchingKafkaSource(FixedPartitionedSource[Poll, int]):
    """Bytewax's :class:`KafkaSource` (its partitions, its arguments) handing over each
    poll of a partition as one :class:`Poll`, its partitions reading in step
    (:mod:`dataflows.progress`): none more than ``read_ahead`` seconds of event time
    past the slowest one still busy (``progress``, when given, keeps them in step
    instead of a board of its own).

    Not a subclass of :class:`KafkaSource`: its items are batches, not Bytewax's
    messages. It keeps one to list the partitions and hold the arguments."""

    def __init__(
        self, *args: Any, read_ahead: float, progress: ReadProgress | None = None, **kwargs: Any
    ) -> None:
        self._kafka = KafkaSource(*args, **kwargs)
        # One per process: the flow, and so this source, is built once per process.
        self._progress = progress or ReadProgress(read_ahead)

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
            # Reaching the end tells the in-step reading that nothing is on its way.
            "enable.partition.eof": "true",
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


def decode_values(
    topic: str,
    partition: int,
    offsets: list[int],
    values: list[bytes | None],
    now: float,
    keys: Callable[[int], bytes | None] | None = None,
) -> tuple[list[Event | DeadLetter], list[float]]:
    """A poll's records of ``llm.requests`` or ``llm.responses`` → each one's event or
    ``invalid`` dead letter, and the event time each stands for
    (:func:`dataflows.batches.decode_run`); ``now`` is the wall clock, ``keys(i)`` the Kafka
    key of the record of ``values[i]``, asked for dead letters only."""
    kind = _KINDS.get(topic)
    if kind is None:
        error = f"record from unexpected topic {topic!r}"
        letters = [
            invalid(topic, partition, offset, value, error, None if keys is None else keys(index))
            for index, (offset, value) in enumerate(zip(offsets, values, strict=True))
        ]
        return cast("list[Event | DeadLetter]", letters), [-math.inf] * len(values)
    return decode_run(topic, partition, kind, offsets, values, now, keys)


def poll_of(
    topic: str, partition: int, offsets: list[int], items: list[Event | DeadLetter], times: list[float]
) -> Poll:
    """Decoded records of one partition (offsets ascending) as one :class:`Poll`."""
    kind = _KINDS.get(topic, LLMRequest)
    letters = [item for item in items if type(item) is DeadLetter]
    if not letters:
        return Poll(EventRun(topic, partition, kind, offsets, cast("list[Event]", items), times), [])
    valid = [index for index, item in enumerate(items) if type(item) is not DeadLetter]
    return Poll(
        EventRun(
            topic,
            partition,
            kind,
            [offsets[i] for i in valid],
            [cast("Event", items[i]) for i in valid],
            [times[i] for i in valid],
        ),
        letters,
    )


class EvaluationRuns(NamedTuple):
    """Runs of evaluations whose request ids belong to join shard ``shard``."""

    shard: str
    runs: list[EventRun]


Routed = DeadLetter | tuple[str, list[EventRun]] | EvaluationRuns


def route_polls(polls: list[Poll], shards: Shards = DEFAULT) -> list[Routed]:
    """The polls of one activation → their dead letters, and their events grouped by join
    shard of ``shards`` as ``(shard, [run, ...])``, each partition's events in offset order;
    evaluations apart, as :class:`EvaluationRuns`.

    One item per shard for all the polls at hand: Bytewax's cost per item (and,
    across processes, per message) is paid once per shard, not once per poll.
    """
    out: list[Routed] = []
    grouped: dict[str, list[EventRun]] = {}
    evaluations: dict[str, list[EventRun]] = {}
    shard_number, names = shards.join_number, shards.names
    for poll in polls:
        out.extend(poll.letters)
        run = poll.run
        if not run.events:
            continue
        into = evaluations if run.kind is LLMEvaluation else grouped
        by_shard: dict[int, list[int]] = {}
        for index, event in enumerate(run.events):
            shard = shard_number(event.request_id)
            found = by_shard.get(shard)
            if found is None:
                by_shard[shard] = [index]
            else:
                found.append(index)
        for shard, indexes in by_shard.items():
            part = run.take(indexes) if len(indexes) < len(run) else run
            runs = into.get(names[shard])
            if runs is None:
                into[names[shard]] = [part]
            else:
                runs.append(part)
    out.extend(grouped.items())
    out.extend(EvaluationRuns(shard, runs) for shard, runs in evaluations.items())
    return out
