"""The ingestion API's Kafka producer on its own, against a real broker."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from api.producer import BrokerUnavailable, EventProducer
from schemas.topics import REQUESTS, RESPONSES
from tests.support.stacks import Broker

T = TypeVar("T")


def read_keys(brokers: str, topic: str, expected: int, timeout: float = 10.0) -> list[str]:
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "test", "enable.auto.commit": False})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    keys: list[str] = []
    deadline = time.monotonic() + timeout
    idle_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = consumer.consume(1000, 0.1)
            keys += [message.key().decode() for message in batch if message.error() is None]
            if batch:
                idle_since = time.monotonic()
            elif len(keys) >= expected and time.monotonic() - idle_since > 0.5:
                break
    finally:
        consumer.close()
    return keys


async def _with_producer(
    brokers: str,
    work: Callable[[EventProducer], Awaitable[T]],
    *,
    overrides: Mapping[str, object] | None = None,
) -> T:
    producer = EventProducer(brokers, overrides=overrides)
    producer.start()
    try:
        return await work(producer)
    finally:
        await producer.close()


def test_send_returns_once_every_record_is_acknowledged(broker: Broker) -> None:
    records = [(REQUESTS, f"k{i}".encode(), b"{}") for i in range(50)]
    records += [(RESPONSES, f"k{i}".encode(), b"{}") for i in range(30)]

    async def work(producer: EventProducer) -> None:
        await asyncio.gather(producer.send(records[:40]), producer.send(records[40:]))
        await producer.send([])  # nothing to wait for

    asyncio.run(_with_producer(broker.address, work))
    assert sorted(read_keys(broker.address, REQUESTS, 50)) == sorted(f"k{i}" for i in range(50))
    assert sorted(read_keys(broker.address, RESPONSES, 30)) == sorted(f"k{i}" for i in range(30))


def test_a_full_send_queue_is_refused_at_once(broker: Broker) -> None:
    async def work(producer: EventProducer) -> float:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="queue is full"):
            await producer.send([(REQUESTS, b"k", b"{}")] * 10)
        return time.monotonic() - started

    elapsed = asyncio.run(_with_producer(broker.address, work, overrides={"queue.buffering.max.messages": 3}))
    assert elapsed < 1


def test_a_paused_broker_is_unavailable_within_the_deadline_then_usable_again(
    broker: Broker,
) -> None:
    async def work(producer: EventProducer) -> list[str]:
        await producer.send([(REQUESTS, b"before", b"{}")])
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable, match="did not acknowledge"):
                await producer.send([(REQUESTS, b"paused", b"{}")])
            assert 4.5 < time.monotonic() - started < 6
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        acknowledged = []
        deadline = time.monotonic() + 15
        while len(acknowledged) < 3:
            assert time.monotonic() < deadline, "sends did not succeed again within 15 s"
            key = f"after-{len(acknowledged)}-{time.monotonic_ns()}"
            try:
                await producer.send([(REQUESTS, key.encode(), b"{}")])
                acknowledged.append(key)
            except BrokerUnavailable:
                await asyncio.sleep(0.1)
        return acknowledged

    acknowledged = asyncio.run(_with_producer(broker.address, work))
    on_topic = read_keys(broker.address, REQUESTS, 1 + len(acknowledged))
    assert {"before", *acknowledged} <= set(on_topic)
