"""Reading records, whatever their bytes: every record comes out counted or as an
``invalid`` dead letter that fits the producer's message limit, and no exception
escapes. Far-future timestamps are invalid where records are read."""

from __future__ import annotations

import base64
import functools
import json
import string
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaException, Producer
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows import sinks, sources
from dataflows.progress import ReadProgress
from deploy.stack import Broker
from schemas.deadletter import DeadLetter, deadletter_decoder, encode_bounded
from schemas.events import LLMRequest, LLMResponse
from schemas.topics import EVALUATIONS
from tests.support.stacks import TEST_PARTITIONS

REQUESTS, RESPONSES = "llm.requests", "llm.responses"
# The ingestion API's bound, as docs/api.md states it: two minutes ahead of the clock.
TWO_MINUTES = 120
# librdkafka's default message.max.bytes, and the framing it adds to key + value
# (measured against librdkafka: a 999,964-byte value is the largest it sends).
PRODUCER_LIMIT = 1_000_000
FRAMING = 36
NOW = datetime(2030, 1, 1, tzinfo=UTC).timestamp()


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def request(request_id: str = "r-1", at: float = NOW - 5) -> dict:
    return {
        "type": "request",
        "request_id": request_id,
        "tenant_id": "acme",
        "route": "/chat",
        "model": "m",
        "timestamp": iso(at),
        "prompt_tokens": 3,
    }


def response(request_id: str = "r-1", at: float = NOW - 4) -> dict:
    return {"type": "response", "request_id": request_id, "timestamp": iso(at), "completion_tokens": 2}


def outcomes(
    topic: str, values: list[bytes | None], now: float | None = NOW
) -> dict[int, LLMRequest | LLMResponse | DeadLetter]:
    """What becomes of each record, by offset: decoded as one poll where it is read, then
    routed to the join. Each record must have exactly one outcome."""
    offsets = list(range(100, 100 + len(values)))
    items, times = sources.decode_values(topic, 4, offsets, values, time.time() if now is None else now)
    found: dict[int, LLMRequest | LLMResponse | DeadLetter] = {}
    for item in sources.route_polls([sources.poll_of(topic, 4, offsets, items, times)]):
        if isinstance(item, DeadLetter):
            assert (item.source_topic, item.partition) == (topic, 4)
            assert item.offset is not None and item.offset not in found
            found[item.offset] = item
            continue
        _, runs = item
        for run in runs:
            assert (run.topic, run.partition) == (topic, 4)
            for offset, event in zip(run.offsets, run.events, strict=True):
                assert offset not in found
                found[offset] = event
    assert sorted(found) == offsets
    return found


def one(topic: str, value: bytes | None, now: float | None = NOW) -> LLMRequest | LLMResponse | DeadLetter:
    return outcomes(topic, [value], now)[100]


def check_letter(letter: object, value: bytes | None, offset: int = 100) -> DeadLetter:
    """An invalid dead letter of ``value``, at its coordinates, its payload the record's bytes."""
    assert isinstance(letter, DeadLetter), letter
    assert (letter.reason, letter.offset) == ("invalid", offset)
    assert letter.error
    if value is None:
        assert letter.payload is None
    else:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            assert letter.payload is not None and base64.b64decode(letter.payload) == value
            assert "base64" in letter.error
        else:
            assert letter.payload == text
    return letter


# -- the poison records of the issue --------------------------------------------------------


def test_invalid_utf8_inside_the_request_id_is_a_dead_letter() -> None:
    value = json.dumps(request("ab-PLACE-cd")).encode().replace(b"PLACE", b"\xff\xfe")
    letter = check_letter(one(REQUESTS, value), value)
    assert "utf-8" in letter.error.lower()


@pytest.mark.parametrize("topic", [REQUESTS, RESPONSES])
@pytest.mark.parametrize("opening", [b'{"request_id":', b'{"a":', b"["])
def test_json_nested_deeper_than_the_decoder_follows_is_a_dead_letter(topic: str, opening: bytes) -> None:
    value = opening * 50_000
    check_letter(one(topic, value), value)


def test_a_200kb_record_of_control_bytes_becomes_a_dead_letter_the_producer_accepts() -> None:
    value = b"\x01" * 200_000
    letter = check_letter(one(REQUESTS, value), value)
    key, encoded = check_sendable(letter)
    assert key is None
    sent = deadletter_decoder.decode(encoded)
    # Each \x01 is six bytes of JSON: the whole payload (1.2 MB) cannot fit.
    assert sent.payload is not None and 0 < len(sent.payload) < len(value)
    assert sent.payload == "\x01" * len(sent.payload)
    assert f"first {len(sent.payload)} of 200000 characters" in sent.error
    assert (sent.reason, sent.source_topic, sent.partition, sent.offset) == ("invalid", REQUESTS, 4, 100)


def test_a_2mb_record_with_a_readable_id_is_dead_lettered_and_fits() -> None:
    record = request("big-1")
    record["route"] = "/" + "r" * 2_000_000
    value = json.dumps(record).encode()
    letter = check_letter(one(REQUESTS, value), value)
    assert "$.route" in letter.error
    key, encoded = check_sendable(letter)
    assert key == b"big-1"
    sent = deadletter_decoder.decode(encoded)
    assert sent.payload is not None and value.decode().startswith(sent.payload)
    assert "truncated" in sent.error and "$.route" in sent.error


# -- far-future timestamps ---------------------------------------------------------------------


@pytest.mark.parametrize("make", [request, response])
def test_a_timestamp_more_than_two_minutes_ahead_is_invalid(make: Callable[..., dict]) -> None:
    topic = REQUESTS if make is request else RESPONSES
    assert not isinstance(one(topic, json.dumps(make(at=NOW + TWO_MINUTES - 1)).encode()), DeadLetter)
    value = json.dumps(make(at=NOW + TWO_MINUTES + 1)).encode()
    letter = check_letter(one(topic, value), value)
    assert "$.timestamp" in letter.error and "ahead" in letter.error


@pytest.mark.parametrize("make", [request, response])
def test_year_9999_is_invalid_against_the_wall_clock_by_default(make: Callable[..., dict]) -> None:
    topic = REQUESTS if make is request else RESPONSES
    record = make()
    record["timestamp"] = "9999-12-31T23:59:59Z"
    value = json.dumps(record).encode()
    check_letter(one(topic, value, now=None), value)
    # Without ``now`` the wall clock is the reference: a moment ago is fine, an hour ahead not.
    assert not isinstance(one(topic, json.dumps(make(at=time.time() - 1)).encode(), now=None), DeadLetter)
    ahead = json.dumps(make(at=time.time() + 3600)).encode()
    check_letter(one(topic, ahead, now=None), ahead)


# -- any bytes --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
FIELDS = [
    "type",
    "request_id",
    "tenant_id",
    "route",
    "model",
    "timestamp",
    "prompt_tokens",
    "completion_tokens",
    "cache_read_tokens",
    "reasoning_tokens",
    "latency_ms",
    "metadata",
    "error",
]


@st.composite
def near_events(draw: st.DrawFn) -> bytes:
    """A valid event with damage: a field set to any JSON value, removed, or bytes spliced in."""
    record = draw(st.sampled_from([request, response]))(
        draw(st.text(string.printable, min_size=1, max_size=20))
    )
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()):
            record[name] = draw(json_values)
        else:
            record.pop(name, None)
    value = json.dumps(record).encode()
    if draw(st.booleans()):
        at = draw(st.integers(0, len(value)))
        value = value[:at] + draw(st.binary(max_size=8)) + value[at:]
    return value


records = st.one_of(st.none(), st.binary(max_size=300), near_events())


@settings(max_examples=300, deadline=None)
@given(
    topic=st.sampled_from([REQUESTS, RESPONSES, "llm.other"]),
    values=st.lists(records, min_size=1, max_size=6),
)
def test_any_bytes_give_one_outcome_each_and_no_exception(topic: str, values: list[bytes | None]) -> None:
    found = outcomes(topic, values)
    for offset, value in enumerate(values, start=100):
        outcome = found[offset]
        if isinstance(outcome, DeadLetter):
            check_letter(outcome, value, offset)
            check_sendable(outcome)
        else:
            assert topic == (REQUESTS if isinstance(outcome, LLMRequest) else RESPONSES)


@settings(max_examples=300, deadline=None)
@given(value=st.binary(max_size=300) | near_events())
def test_a_record_decodes_the_same_alone_and_among_others(value: bytes) -> None:
    # A poll is decoded as one JSON array: a record must not change what its neighbours
    # decode to (``1,2`` or an empty value would shift them), nor they what it decodes to.
    good = json.dumps(request("good-1")).encode()
    [alone], _ = sources.decode_values(REQUESTS, 0, [0], [value], NOW)
    [first, middle, last], _ = sources.decode_values(REQUESTS, 0, [0, 1, 2], [good, value, good], NOW)
    for neighbour in (first, last):
        assert isinstance(neighbour, LLMRequest) and neighbour.request_id == "good-1"
    if isinstance(alone, DeadLetter):
        assert isinstance(middle, DeadLetter)
        assert (middle.error, middle.payload) == (alone.error, alone.payload)
    else:
        assert middle == alone


# -- the bound on a dead letter's size -----------------------------------------------------------


def check_sendable(letter: DeadLetter) -> tuple[bytes | None, bytes]:
    """The dead letter's record, checked against the limit and against librdkafka itself."""
    message = sinks.deadletter_message(letter)
    key, value = message.key, message.value
    assert len(key or b"") + len(value) + FRAMING <= PRODUCER_LIMIT
    producer = unconnected_producer()
    try:
        # librdkafka checks the size when the record is queued; no broker is needed for that.
        producer.produce("llm.deadletter", value, key=key)
    except KafkaException as error:
        raise AssertionError(f"librdkafka refuses the dead letter: {error}") from error
    finally:
        producer.purge()
    return key, value


@functools.cache
def unconnected_producer() -> Producer:
    """A producer with librdkafka's default limits, pointed at no broker."""
    return Producer({"bootstrap.servers": "127.0.0.1:9", "log_level": 0})


letters = st.builds(
    DeadLetter,
    reason=st.sampled_from(["invalid", "orphan_response", "too_late"]),
    source_topic=st.none() | st.sampled_from([REQUESTS, RESPONSES]),
    partition=st.none() | st.integers(0, 1000),
    offset=st.none() | st.integers(0, 2**62),
    error=st.text(max_size=50) | st.text(st.characters(max_codepoint=0x1F), min_size=3000, max_size=5000),
    payload=st.none()
    | st.text(max_size=40_000)
    | st.text(st.characters(max_codepoint=0x1F), min_size=1, max_size=40_000),
)


@settings(max_examples=200, deadline=None)
@given(letter=letters, limit=st.integers(16 * 1024, 120_000))
def test_a_bounded_dead_letter_fits_and_keeps_what_identifies_it(letter: DeadLetter, limit: int) -> None:
    encoded = encode_bounded(letter, limit)
    assert len(encoded) <= limit
    sent = json.loads(encoded)
    assert (sent["reason"], sent["source_topic"], sent["partition"], sent["offset"]) == (
        letter.reason,
        letter.source_topic,
        letter.partition,
        letter.offset,
    )
    plain = json.dumps(
        {
            "reason": letter.reason,
            "source_topic": letter.source_topic,
            "partition": letter.partition,
            "offset": letter.offset,
            "error": letter.error,
            "payload": letter.payload,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()
    if len(plain) <= limit:
        assert sent["error"] == letter.error and sent["payload"] == letter.payload
        return
    assert sent["error"].startswith(letter.error[:2000])
    if letter.payload is None:
        assert sent["payload"] is None
        return
    assert letter.payload.startswith(sent["payload"])
    if sent["payload"] != letter.payload:
        kept = len(sent["payload"])
        assert f"first {kept} of {len(letter.payload)} characters" in sent["error"]
        # As much as fits: one more character (6 bytes at most, one more digit in the
        # count) would not have.
        assert len(encoded) > limit - 8


def test_a_dead_letter_whose_payload_names_a_huge_or_deep_request_id_still_sends() -> None:
    huge = DeadLetter(
        reason="invalid",
        source_topic=REQUESTS,
        partition=0,
        offset=1,
        error="too long",
        payload=json.dumps({"request_id": "x" * 600_000}),
    )
    key, _ = check_sendable(huge)
    assert key is None
    deep = DeadLetter(
        reason="invalid",
        source_topic=REQUESTS,
        partition=0,
        offset=2,
        error="too deep",
        payload='{"request_id":' * 50_000,
    )
    key, value = check_sendable(deep)
    assert key is None and deadletter_decoder.decode(value).payload == deep.payload
    named = DeadLetter(
        reason="orphan_response",
        source_topic=RESPONSES,
        partition=0,
        offset=3,
        error="no request",
        payload=json.dumps(response("r-9")),
    )
    assert check_sendable(named)[0] == b"r-9"


def test_empty_partitions_hold_the_others_back_only_until_their_end_is_read(broker: Broker) -> None:
    """Reading in step (dataflows.progress): a partition the consumer has not read yet holds the
    others back, here for an hour; the end of an empty partition, which the consumer reports on
    its first fetch, releases them. The end is not a record: nothing of it is dead-lettered."""
    producer = Producer({"bootstrap.servers": broker.address, "acks": "all"})
    now = time.time()
    sent = [json.dumps(request(f"r-{number}", now - 60 + number)).encode() for number in range(20)]
    for value in sent:
        producer.produce(REQUESTS, value, partition=0)
    assert producer.flush(15) == 0
    source = sources.BatchingKafkaSource(
        [broker.address],
        [REQUESTS, EVALUATIONS],
        starting_offset=OFFSET_BEGINNING,
        batch_size=sources.BATCH_SIZE,
        read_ahead=1.0,
        progress=ReadProgress(read_ahead=1.0, backlog_idle_after=3600.0),
    )
    parts = {name: source.build_part("read", name, None) for name in source.list_parts()}
    assert len(parts) == 2 * TEST_PARTITIONS
    polls: dict[str, list[sources.Poll]] = {name: [] for name in parts}
    deadline = time.monotonic() + 60
    while sum(len(poll.run) for poll in polls[f"0-{REQUESTS}"]) < len(sent):
        assert time.monotonic() < deadline, (
            "the records were held back although every other partition is empty"
        )
        for name, part in parts.items():
            polls[name] += part.next_batch()
    for part in parts.values():
        part.close()

    assert [letter for found in polls.values() for poll in found for letter in poll.letters] == []
    assert [event.request_id for poll in polls[f"0-{REQUESTS}"] for event in poll.run.events] == [
        f"r-{number}" for number in range(20)
    ]
    assert all(
        not poll.run.events for name, found in polls.items() if name != f"0-{REQUESTS}" for poll in found
    )
