"""Freshness: how long after a window ends its first row is in Postgres, in a live run.

A broker, a Postgres and the processor of their own; calls for 50 keys are
produced at a steady rate, stamped with the wall clock as they are sent (a
response 50-500 ms after its request), for 90 s, with 10 s windows and a 2 s
grace (so the target is 4 s: GRACE_SECONDS + 2). A window's first row is timed
by its first ``llm.metrics`` record, which is published right after Postgres
commits it: its Kafka timestamp minus the window's end. The same-run baseline is
the grace itself, the least any window can take.
"""

from __future__ import annotations

import json
import random
import statistics
import time
import uuid
from datetime import datetime

from confluent_kafka import Consumer, Producer, TopicPartition

from tests import dataflow_harness as h
from tests.bench.stack import local_stack

RATE = 2_000  # calls per second
SECONDS = 90
KEYS = [(f"tenant-{n % 5}", f"/route-{n}", "test-model-a") for n in range(50)]
WINDOW, GRACE = 10, 2
SETTINGS = {"WINDOW_SECONDS": str(WINDOW), "GRACE_SECONDS": str(GRACE)}


def _send(brokers: str, seconds: float) -> int:
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 5, "acks": "all",
                         "enable.idempotence": True})
    rng = random.Random(5)
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < seconds:
        due = int((time.monotonic() - started) * RATE)
        for _ in range(due - sent):
            now = time.time()
            key = rng.choice(KEYS)
            rid = uuid.uuid4().hex
            request = {"request_id": rid, "tenant_id": key[0], "route": key[1], "model": key[2],
                       "timestamp": h.timestamp(now), "prompt_tokens": 100}
            response = {"request_id": rid, "timestamp": h.timestamp(now + rng.uniform(0.05, 0.5)),
                        "completion_tokens": 20}
            producer.produce(h.REQUESTS, json.dumps(request).encode(), rid.encode())
            producer.produce(h.RESPONSES, json.dumps(response).encode(), rid.encode())
            sent += 1
        producer.poll(0)
        time.sleep(0.005)
    producer.flush(30)
    return sent


def main() -> None:
    with local_stack("streamlens-bench-freshness-") as (directory, broker, postgres):
        processor = h.Processor(broker.address, postgres.dsn, directory / "recovery",
                                h.write_prices(directory / "prices.json"),
                                directory / "dataflow.log", settings=SETTINGS).start()
        try:
            time.sleep(3)  # the processor's start is not what is measured
            started = time.time()
            sent = _send(broker.address, SECONDS)
            time.sleep(WINDOW + GRACE + 5)  # the last windows close on the wall clock
            processor.check_alive()
        finally:
            processor.stop()
        first: dict[tuple[str, str, str, str], float] = {}
        for _key, value, _partition, _offset, stamp in _records_with_time(broker.address):
            row = json.loads(value)
            key = (row["tenant_id"], row["route"], row["model"], row["window_start"])
            end = datetime.fromisoformat(row["window_end"]).timestamp()
            if key not in first or stamp - end < first[key]:
                first[key] = stamp - end
    # Whole windows only: those that started after the traffic did.
    delays = sorted(delay for (_, _, _, start), delay in first.items()
                    if datetime.fromisoformat(start).timestamp() >= started)
    p99 = delays[min(len(delays) - 1, int(0.99 * len(delays)))]
    print(f"{sent:,} calls at {RATE:,}/s for {SECONDS} s, {len(KEYS)} keys, "
          f"{WINDOW} s windows, GRACE_SECONDS {GRACE}: {len(delays)} windows")
    print(f"window end → first row in Postgres: median {statistics.median(delays):.2f} s, "
          f"p99 {p99:.2f} s, max {delays[-1]:.2f} s (target ≤ {GRACE + 2} s)")
    print(f"baseline: the grace period itself, {GRACE:.2f} s")


def _records_with_time(brokers: str) -> list[tuple[bytes | None, bytes, int, int, float]]:
    """Every llm.metrics record with its Kafka timestamp in Unix seconds."""
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "bench-freshness",
                         "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(h.METRICS, timeout=10).topics[h.METRICS].partitions
        consumer.assign([TopicPartition(h.METRICS, p, 0) for p in partitions])
        out = []
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 2:
            for message in consumer.consume(1000, 0.2):
                if message.error():
                    continue
                quiet_since = time.monotonic()
                out.append((message.key(), message.value(), message.partition(), message.offset(),
                            message.timestamp()[1] / 1000))
        return out
    finally:
        consumer.close()


if __name__ == "__main__":
    main()
