"""Poison records produced straight into the input topics, against the real broker and
Postgres: the dataflow stays up, each one is an ``invalid`` dead letter at its
coordinates that fits the producer's limit, and the valid calls around them are exact."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, Message, Producer
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import dataflow as h
from tests.support.stacks import TEST_PARTITIONS, Broker

pytestmark = pytest.mark.slow

# librdkafka's default message.max.bytes (the dataflow's producer keeps it) and the
# framing librdkafka adds to key + value (measured: 999,964 bytes is the largest value).
PRODUCER_LIMIT = 1_000_000
FRAMING = 36
CALLS = 60


@dataclass
class Poison:
    what: str
    topic: str
    value: bytes | None
    partition: int = 0
    offset: int = -1
    truncated: bool = False  # its dead letter cannot hold it whole
    key: bytes | None = None  # the record's Kafka key
    # Its dead letter's Kafka key: the request id the payload names, else the record's key.
    letter_key: bytes | None = None


def request(rid: str, key: tuple[str, str, str], ts: float) -> dict:
    return {
        "type": "request",
        "request_id": rid,
        "tenant_id": key[0],
        "route": key[1],
        "model": key[2],
        "timestamp": h.timestamp(ts),
        "prompt_tokens": 100 + len(rid),
    }


def response(rid: str, ts: float, n: int) -> dict:
    return {
        "type": "response",
        "request_id": rid,
        "timestamp": h.timestamp(ts + 0.5),
        "latency_ms": 100.0 + n,
        "completion_tokens": 10 + n,
        "cache_read_tokens": n % 7,
        "reasoning_tokens": n % 3,
    }


def far_future(record: dict) -> bytes:
    return json.dumps({**record, "timestamp": "9999-12-31T23:59:59Z"}).encode()


def hypothesis_bytes(count: int) -> list[bytes]:
    """Arbitrary byte strings from hypothesis; none of them a JSON object, so none can
    be an event (each must end as a dead letter)."""
    found: list[bytes] = []

    @settings(max_examples=count, database=None, deadline=None)
    @given(st.binary(max_size=2000))
    def collect(value: bytes) -> None:
        found.append(value)

    collect()

    def is_object(value: bytes) -> bool:
        try:
            return isinstance(json.loads(value), dict)
        except ValueError:
            return False

    return [value for value in dict.fromkeys(found) if not is_object(value)]


def poison_records() -> list[Poison]:
    big = request("big-route", h.NORMAL_KEYS[0], h.BASE + 1)
    big["route"] = "/" + "r" * 2_000_000
    bad_id = json.dumps(request("bad-PLACE-id", h.NORMAL_KEYS[0], h.BASE + 1)).encode()
    latin = request("latin-1", h.NORMAL_KEYS[0], h.BASE + 1)
    latin["route"] = "/café"
    records = [
        Poison("2 MB value", h.REQUESTS, json.dumps(big).encode(), truncated=True, letter_key=b"big-route"),
        Poison("200 KB of \\x01", h.REQUESTS, b"\x01" * 200_000, truncated=True),
        Poison(
            "invalid UTF-8 in request_id",
            h.REQUESTS,
            bad_id.replace(b"PLACE", b"\xc3\x28"),
            key=b"bad-\xc3\x28-id",
            letter_key=b"bad-\xc3\x28-id",
        ),
        Poison(
            "year-9999 request",
            h.REQUESTS,
            far_future(request("future-req", h.NORMAL_KEYS[1], h.BASE + 1)),
            letter_key=b"future-req",
        ),
        Poison(
            "year-9999 response",
            h.RESPONSES,
            far_future(response("future-resp", h.BASE, 1)),
            letter_key=b"future-resp",
        ),
        Poison("JSON nested too deep", h.RESPONSES, b'{"request_id":' * 50_000),
        # Not UTF-8, so the payload is base64 and names no request id: the record's key does.
        Poison(
            "Latin-1 request",
            h.REQUESTS,
            json.dumps(latin, ensure_ascii=False).encode("latin-1"),
            key=b"latin-1",
            letter_key=b"latin-1",
        ),
        Poison("binary response", h.RESPONSES, bytes(range(128, 256)) * 8, key=b"rsp-7", letter_key=b"rsp-7"),
        Poison("no value", h.RESPONSES, None, key=b"rsp-8", letter_key=b"rsp-8"),
        # A key longer than any request id is left out: the dead letter must fit the limit.
        Poison("not UTF-8, 600-byte key", h.REQUESTS, b"\xff" * 10, key=b"k" * 600),
    ]
    records += [
        Poison(f"hypothesis #{n}", (h.REQUESTS, h.RESPONSES)[n % 2], value)
        for n, value in enumerate(hypothesis_bytes(30))
    ]
    for n, poison in enumerate(records):
        poison.partition = n % TEST_PARTITIONS
    return records


def produce_poison(brokers: str, records: list[Poison]) -> None:
    """Straight into the topics, as a tool with topic access would; notes each offset."""
    producer = Producer({"bootstrap.servers": brokers, "message.max.bytes": 10_000_000})
    for poison in records:

        def noted(error: KafkaError | None, message: Message, poison: Poison = poison) -> None:
            assert error is None, error
            offset = message.offset()
            assert offset is not None  # a delivered record has one
            poison.offset = offset

        producer.produce(
            poison.topic, poison.value, poison.key, partition=poison.partition, on_delivery=noted
        )
    assert producer.flush(30) == 0
    assert all(poison.offset >= 0 for poison in records)


def valid_calls(shards: set[str]) -> tuple[list[h.Event], list[h.Event], list[h.Counted]]:
    """Requests and responses of answered calls; a third of them share a join shard
    with the year-9999 records, where a moved event time would time them out."""
    requests, responses, counted = [], [], []
    candidates = (f"ok-{n:05d}" for n in range(10**6))
    for n in range(CALLS):
        rid = next(candidates)
        while (n % 3 == 0) != (h.SHARDS.join_key(rid) in shards):
            rid = next(candidates)
        key = h.NORMAL_KEYS[n % len(h.NORMAL_KEYS)]
        ts = h.BASE + 0.5 + n * 0.15
        req, resp = request(rid, key, ts), response(rid, ts, n)
        requests.append(h.Event(h.REQUESTS, req))
        responses.append(h.Event(h.RESPONSES, resp))
        counted.append(h.Counted(key, ts, resp, req, late=False))
    return requests, responses, counted


def test_poison_records_are_dead_lettered_and_the_calls_around_them_are_exact(
    tmp_path: Path, broker: Broker, postgres_dsn: str
) -> None:
    poison = poison_records()
    future = {h.SHARDS.join_key("future-req"), h.SHARDS.join_key("future-resp")}
    requests, responses, counted = valid_calls(future)
    data = h.DataSet(counted=counted)
    processor = h.Processor.in_directory(
        broker.address,
        postgres_dsn,
        tmp_path,
    )
    scenario = h.Scenario(data, processor, broker.address, postgres_dsn)
    processor.start()
    try:
        produce_poison(broker.address, poison)
        where = {(p.topic, p.partition, p.offset): p for p in poison}

        def letters_of_poison() -> dict[tuple[str, int, int], list[tuple[bytes | None, bytes]]]:
            found: dict[tuple[str, int, int], list[tuple[bytes | None, bytes]]] = {}
            for key, value, _, _ in h.records_on(broker.address, h.DEADLETTER):
                letter = json.loads(value)
                at = (letter["source_topic"], letter["partition"], letter["offset"])
                if at in where:
                    found.setdefault(at, []).append((key, value))
            return found

        h.wait_for(
            lambda: letters_of_poison().keys() == where.keys(),
            60,
            "a dead letter for every poison record",
            processor.check_alive,
        )
        # Requests first and responses only once they are read: a request whose shard
        # had jumped ahead in event time would time out before its response arrives.
        h.produce(broker.address, requests)
        scenario.barrier()
        h.produce(broker.address, responses)
        expected = h.expected_rows(data)
        h.wait_for(
            lambda: h.postgres_rows(postgres_dsn).keys() >= expected.keys(),
            90,
            "the rows of the valid calls",
            processor.check_alive,
        )
        processor.check_alive()
        h.check_rows(h.postgres_rows(postgres_dsn), expected)

        letters = letters_of_poison()
        for at, poison_record in where.items():
            [(key, value)] = letters[at]
            assert len(key or b"") + len(value) + FRAMING <= PRODUCER_LIMIT, poison_record.what
            assert key == poison_record.letter_key, poison_record.what
            letter = json.loads(value)
            assert letter["reason"] == "invalid", (poison_record.what, letter["error"])
            assert ("payload truncated" in letter["error"]) == poison_record.truncated, (
                poison_record.what,
                letter["error"],
            )
            if poison_record.truncated:
                assert poison_record.value is not None
                assert poison_record.value.decode().startswith(letter["payload"])
        futures = [
            json.loads(value)
            for p in poison
            if "9999" in p.what
            for _, value in letters[(p.topic, p.partition, p.offset)]
        ]
        assert all("ahead" in letter["error"] for letter in futures)
        # Nothing of the valid calls went astray.
        others = [
            d
            for d in h.dead_letters(broker.address)
            if (d["source_topic"], d["partition"], d["offset"]) not in where
            and d["payload"] not in scenario.markers
        ]
        assert others == []
    finally:
        processor.stop()
