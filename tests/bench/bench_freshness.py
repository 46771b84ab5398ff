"""Freshness: how long after a window ends its first row is in Postgres, in a live run.

A broker, a Postgres and the processor of their own, for each rate in turn
(1,000 and 20,000 calls/s by default: small batches at a low rate must not add
latency, and a high one must not queue); calls for 50 keys are produced at a
steady rate, stamped with the wall clock as they are sent (a response 50-500 ms
after its request), for 60 s, with 10 s windows and a 2 s grace (so the target
is 4 s: GRACE_SECONDS + 2). The producer's own rate is printed beside
the target rate (it shares the cores). A window's first row is timed
by its first ``llm.metrics`` record, which is published right after Postgres
commits it: its Kafka timestamp minus the window's end. The same-run baseline is
the grace itself, the least any window can take.

``python -m tests.bench.bench_freshness [--rates 1000,20000] [--seconds 60]``
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid
from datetime import datetime

from confluent_kafka import Consumer, Producer, TopicPartition

from tests.bench.stack import local_stack
from tests.support import dataflow as h

RATES = "1000,20000"  # calls per second, run in turn
SECONDS = 60
KEYS = [(f"tenant-{n % 5}", f"/route-{n}", "test-model-a") for n in range(50)]
WINDOW, GRACE = 10, 2
SETTINGS = {"WINDOW_SECONDS": str(WINDOW), "GRACE_SECONDS": str(GRACE)}


def send_calls(brokers: str, rate: int, seconds: float, keys: list[tuple[str, str, str]] = KEYS) -> int:
    """Calls of ``keys`` at ``rate`` a second for ``seconds``, stamped with the wall clock."""
    producer = Producer(
        {"bootstrap.servers": brokers, "linger.ms": 5, "acks": "all", "enable.idempotence": True}
    )
    rng = random.Random(5)
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < seconds:
        due = int((time.monotonic() - started) * rate)
        for _ in range(due - sent):
            now = time.time()
            key = rng.choice(keys)
            rid = uuid.uuid4().hex
            request = {
                "request_id": rid,
                "tenant_id": key[0],
                "route": key[1],
                "model": key[2],
                "timestamp": h.timestamp(now),
                "prompt_tokens": 100,
            }
            response = {
                "request_id": rid,
                "timestamp": h.timestamp(now + rng.uniform(0.05, 0.5)),
                "completion_tokens": 20,
            }
            producer.produce(h.REQUESTS, json.dumps(request).encode(), rid.encode())
            producer.produce(h.RESPONSES, json.dumps(response).encode(), rid.encode())
            sent += 1
        producer.poll(0)
        time.sleep(0.005)
    producer.flush(30)
    return sent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_freshness")
    parser.add_argument("--rates", default=RATES, help="comma-separated calls per second, run in turn")
    parser.add_argument("--seconds", type=float, default=SECONDS)
    args = parser.parse_args(argv if argv is not None else [])
    for rate in (int(rate) for rate in args.rates.split(",")):
        run(rate, args.seconds)


def run(rate: int, seconds: float) -> None:
    with local_stack("streamlens-bench-freshness-") as (directory, broker, postgres):
        processor = h.Processor(
            broker.address,
            postgres.dsn,
            directory / "recovery",
            h.write_prices(directory / "prices.json"),
            directory / "dataflow.log",
            settings=SETTINGS,
        ).start()
        try:
            time.sleep(3)  # the processor's start is not what is measured
            started = time.time()
            sent = send_calls(broker.address, rate, seconds)
            sending = time.time() - started
            time.sleep(WINDOW + GRACE + 5)  # the last windows close on the wall clock
            processor.check_alive()
        finally:
            processor.stop()
        first: dict[tuple[str, str, str, str], float] = {}
        for _key, value, _partition, _offset, stamp in records_with_time(broker.address):
            row = json.loads(value)
            key = (row["tenant_id"], row["route"], row["model"], row["window_start"])
            end = datetime.fromisoformat(row["window_end"]).timestamp()
            if key not in first or stamp - end < first[key]:
                first[key] = stamp - end
    # Whole windows only: those that started after the traffic did.
    delays = sorted(
        delay
        for (_, _, _, start), delay in first.items()
        if datetime.fromisoformat(start).timestamp() >= started
    )
    p99 = delays[min(len(delays) - 1, int(0.99 * len(delays)))]
    print(
        f"{sent:,} calls at {rate:,}/s for {seconds:.0f} s (sent at {sent / sending:,.0f}/s), "
        f"{len(KEYS)} keys, {WINDOW} s windows, GRACE_SECONDS {GRACE}: {len(delays)} windows"
    )
    print(
        f"window end → first row in Postgres: median {statistics.median(delays):.2f} s, "
        f"p99 {p99:.2f} s, max {delays[-1]:.2f} s (target ≤ {GRACE + 2} s)"
    )
    print(f"baseline: the grace period itself, {GRACE:.2f} s")


def records_with_time(brokers: str) -> list[tuple[bytes | None, bytes, int, int, float]]:
    """Every llm.metrics record with its Kafka timestamp in Unix seconds."""
    consumer = Consumer(
        {"bootstrap.servers": brokers, "group.id": "bench-freshness", "enable.auto.commit": False}
    )
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
                out.append(
                    (
                        message.key(),
                        message.value(),
                        message.partition(),
                        message.offset(),
                        message.timestamp()[1] / 1000,
                    )
                )
        return out
    finally:
        consumer.close()


if __name__ == "__main__":
    main(sys.argv[1:])
