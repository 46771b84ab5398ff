"""What reached a topic, read back with ``assign()`` from its first offset."""

from __future__ import annotations

import json
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition


def records_on(brokers: str, topic: str) -> list[tuple[bytes | None, bytes, int, int]]:
    """Every record of ``topic`` now: (key, value, partition, offset).

    Each partition is read up to the end its fetches report (librdkafka's partition EOF),
    not up to the high watermark ListOffsets answers: the test broker answers that with
    the base offset of the partition's last record batch + 1, short of its end whenever
    that batch holds several records (a sink writes many at once), which left the tail
    of a topic unread or read depending on how the consumer's batches fell."""
    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": "streamlens-tests",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        partitions = list(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING) for partition in partitions])
        remaining = set(partitions)
        out = []
        deadline = time.monotonic() + 20
        while remaining and time.monotonic() < deadline:
            # consume() waits out its timeout unless 1,000 come: short, as the end is awaited.
            for message in consumer.consume(1000, 0.02):
                error = message.error()
                if error is None:
                    out.append((message.key(), message.value(), message.partition(), message.offset()))
                elif error.code() == KafkaError._PARTITION_EOF:
                    remaining.discard(message.partition())
        assert not remaining, f"could not read {topic} to its end"
        return out
    finally:
        consumer.close()


def read_topic(
    brokers: str, topic: str, expected: int, *, quiet: float = 0.5, timeout: float = 15.0
) -> list[tuple[str, dict[str, Any]]]:
    """Every record on ``topic`` as (key, JSON value), for records still being produced: read
    (:func:`records_on`) until ``expected`` are in, then again after ``quiet`` seconds until
    a read finds no more, so that extra records are seen too."""
    deadline = time.monotonic() + timeout
    records = records_on(brokers, topic)
    while len(records) < expected and time.monotonic() < deadline:
        records = records_on(brokers, topic)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        again = records_on(brokers, topic)
        if len(again) == len(records):
            break
        records = again
    by_offset = sorted(records, key=lambda record: (record[2], record[3]))
    assert all(key is not None for key, _, _, _ in by_offset), f"a record on {topic} has no key"
    return [(key.decode(), json.loads(value)) for key, value, _, _ in by_offset if key is not None]
