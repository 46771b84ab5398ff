"""What reached a topic, read back with ``assign()`` from its first offset: every record as
(key, JSON value)."""

from __future__ import annotations

import json
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition


def read_topic(
    brokers: str, topic: str, expected: int, *, quiet: float = 0.5, timeout: float = 15.0
) -> list[tuple[str, dict[str, Any]]]:
    """Every record on ``topic`` as (key, JSON value): until ``expected`` are in and then
    ``quiet`` seconds pass without another, so that extra records are seen too."""
    consumer = Consumer(
        {"bootstrap.servers": brokers, "group.id": "test-readback", "enable.auto.commit": False}
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    records: list[tuple[str, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = consumer.consume(1000, 0.1)
            for message in batch:
                assert message.error() is None, message.error()
                records.append((message.key().decode(), json.loads(message.value())))
            if batch:
                last = time.monotonic()
            elif len(records) >= expected and time.monotonic() - last >= quiet:
                break
    finally:
        consumer.close()
    return records
