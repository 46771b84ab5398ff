"""The dataflow's /metrics during a real run: counters against what the test sent and read back.

Consumer lag is checked where it can be known exactly: Postgres is stopped, a row
is due, so the worker waits in its sink and reads nothing more; the records the
test then produces are the lag, to the record. Postgres back, the lag falls to 0.
"""

from __future__ import annotations

import random
import re
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from prometheus_client.parser import text_string_to_metric_families

from dataflows.observability import partition_end
from schemas.database import ensure_schema
from schemas.topics import REQUESTS
from tests.support import dataflow as h
from tests.support.stacks import Broker, Postgres

pytestmark = pytest.mark.slow


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def lag(samples: dict) -> float:
    return sum(v for (name, _), v in samples.items() if name == "streamlens_dataflow_consumer_lag_records")


def test_dataflow_metrics_follow_the_run(tmp_path: Path, broker: Broker) -> None:
    rng = random.Random(14)
    postgres = Postgres(tmp_path / "postgres").start()
    ensure_schema(postgres.dsn)
    processor = h.Processor.in_directory(
        broker.address,
        postgres.dsn,
        tmp_path,
        settings=h.SHORT_GRACE_SETTINGS,
    ).start()
    port = processor.metrics_port
    try:
        events, counted = h.answered_calls(rng, "acme", h.BASE, 300)
        invalid = [h.Event(h.REQUESTS, None, b"{not json"), h.Event(h.RESPONSES, None, b"\xff")]
        h.produce(broker.address, events + invalid)
        h.wait_for_rows(processor, postgres.dsn, h.expected_rows_of(counted))

        def counted_up() -> bool:
            samples = scrape(port)
            return (
                value(samples, "streamlens_dataflow_calls_total", outcome="answered") == 300
                and value(samples, "streamlens_dataflow_dead_letters_total", reason="invalid") == 2
                and lag(samples) == 0
            )

        h.wait_for(counted_up, 30, "the counters", processor.check_alive)
        samples = scrape(port)
        assert value(samples, "streamlens_dataflow_records_read_total", topic=h.REQUESTS) == 301
        assert value(samples, "streamlens_dataflow_records_read_total", topic=h.RESPONSES) == 301
        assert value(samples, "streamlens_dataflow_rows_written_total") >= 1
        assert value(samples, "streamlens_dataflow_join_remembered") == 300
        assert value(samples, "streamlens_dataflow_open_windows") == 1
        assert value(samples, "streamlens_dataflow_event_time_lag_seconds") > 0
        letters = h.dead_letters(broker.address)
        assert len([d for d in letters if d["reason"] == "invalid"]) == 2
        assert not any("acme" in str(key) for key in samples), "a tenant name in the metrics"

        # Postgres away and a row due: the worker waits for it (in its sink, or to read the
        # tenants' dimensions before a new window opens), reading nothing.
        postgres.stop()
        more, more_counted = h.answered_calls(rng, "acme", h.BASE + 5, 50)
        h.produce(broker.address, more)
        waiting = re.compile(r"postgres( \(tenant settings\))? unavailable")
        h.wait_for(
            lambda: waiting.search(processor.log.read_text()) is not None,
            60,
            "the worker waiting for Postgres",
            processor.check_alive,
        )
        unread = h.answered_calls(rng, "acme", h.BASE + 10, 400)
        h.produce(broker.address, unread[0])
        # At least what was produced since: the worker may have stopped before reading
        # all of ``more`` (a window of it could not open without Postgres).
        h.wait_for(
            lambda: lag(scrape(port)) >= len(unread[0]),
            30,
            "the lag of what is unread",
            processor.check_alive,
        )
        postgres.start(postgres.port)
        h.wait_for_rows(processor, postgres.dsn, h.expected_rows_of(counted + more_counted + unread[1]))
        h.wait_for(lambda: lag(scrape(port)) == 0, 30, "the lag back to 0", processor.check_alive)
        assert value(scrape(port), "streamlens_dataflow_calls_total", outcome="answered") == 750
    finally:
        processor.stop()
        postgres.stop()


def test_a_partitions_end_is_found_past_the_watermark_and_read_on_from_the_last_one(broker: Broker) -> None:
    """The broker's high watermark stops after the first record of the last batch: the
    end is read past it, from the end found last time when there is one, and from the
    watermark again when that one is gone (the topic was recreated)."""
    producer = Producer({"bootstrap.servers": broker.address, "linger.ms": "200"})
    for n in range(5_000):
        producer.produce(REQUESTS, value=b"x", key=str(n).encode(), partition=1)
    assert producer.flush(30) == 0
    consumer = Consumer(
        {"bootstrap.servers": broker.address, "group.id": "end-test", "enable.auto.commit": "false"}
    )
    try:
        assert partition_end(consumer, REQUESTS, 1) == 5_000
        for n in range(7):
            producer.produce(REQUESTS, value=b"y", key=str(n).encode(), partition=1)
        assert producer.flush(30) == 0
        assert partition_end(consumer, REQUESTS, 1, known=5_000) == 5_007
        assert partition_end(consumer, REQUESTS, 1, known=90_000) == 5_007
        assert partition_end(consumer, REQUESTS, 0) == 0
    finally:
        consumer.close()
