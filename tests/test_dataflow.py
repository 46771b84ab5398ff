"""The dataflow's wiring pieces on their own: decoding, shard keys, the stateful logics,
the Postgres upsert (on a real Postgres), the Kafka records and the runner's set-up."""

from __future__ import annotations

import base64
import json
import logging
import pickle
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import KafkaError as ConfluentKafkaError
from fastdigest import TDigest
from psycopg.rows import dict_row

from dataflows import clock as clock_module
from dataflows import operators, recovery, run, shards, sinks, sources
from dataflows.batches import CallBatch, EventRun
from dataflows.join import Call, SourceRef, calls_of
from dataflows.windows import WindowRow
from schemas.deadletter import DeadLetter, deadletter_decoder
from schemas.events import LLMRequest, LLMResponse
from schemas.rows import MetricsRow, row_decoder
from tests.support import dataflow as h
from tests.support.stacks import Broker

T0 = datetime(2025, 6, 1, tzinfo=UTC)


NOW = datetime(2025, 6, 1, 0, 5, tzinfo=UTC).timestamp()  # the wall clock when records are read


def read(
    topic: str, records: list[tuple[int, bytes | None]], partition: int = 0
) -> list[DeadLetter | tuple[str, list[EventRun]]]:
    """What the source hands on for one poll of a partition: decoded where it is read,
    then grouped by join shard (``route_polls``)."""
    offsets = [offset for offset, _ in records]
    items, times = sources.decode_values(topic, partition, offsets, [value for _, value in records], NOW)
    return sources.route_polls([sources.poll_of(topic, partition, offsets, items, times)])


def decode_one(
    topic: str, value: bytes | None, partition: int = 2, offset: int = 41
) -> tuple[LLMRequest | LLMResponse, SourceRef] | DeadLetter:
    """The one outcome of a record: decoded where it is read, then routed."""
    [out] = read(topic, [(offset, value)], partition)
    if isinstance(out, DeadLetter):
        return out
    shard, [run] = out
    assert (run.topic, run.partition, run.offsets) == (topic, partition, [offset])
    [event] = run.events
    assert shard == shards.DEFAULT.join_key(event.request_id)
    return event, run.source(0)


REQUEST = {
    "request_id": "r-1",
    "tenant_id": "acme",
    "route": "/chat",
    "model": "m",
    "timestamp": "2025-06-01T02:00:00+02:00",
    "prompt_tokens": 5,
}


# -- decoding -----------------------------------------------------------------------------


def test_decode_keeps_the_coordinates_and_accepts_the_type_field() -> None:
    decoded = decode_one("llm.requests", json.dumps({"type": "request", **REQUEST}).encode())
    assert isinstance(decoded, tuple)
    event, source = decoded
    assert isinstance(event, LLMRequest) and event.timestamp == T0
    assert source == SourceRef("llm.requests", 2, 41)


def test_a_response_on_the_requests_topic_is_invalid() -> None:
    letter = decode_one("llm.requests", json.dumps({**REQUEST, "type": "response"}).encode())
    assert isinstance(letter, DeadLetter)
    assert letter.reason == "invalid" and "$.type" in letter.error


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (b"{oops", "JSON"),
        (json.dumps({**REQUEST, "timestamp": "2025-06-01T00:00:00"}).encode(), "$.timestamp"),
        (json.dumps({k: v for k, v in REQUEST.items() if k != "tenant_id"}).encode(), "tenant_id"),
        (json.dumps({**REQUEST, "prompt_tokens": -1}).encode(), "$.prompt_tokens"),
    ],
)
def test_invalid_records_become_dead_letters_naming_the_problem(value: bytes, field: str) -> None:
    letter = decode_one("llm.requests", value, partition=1, offset=7)
    assert isinstance(letter, DeadLetter)
    assert (letter.reason, letter.source_topic, letter.partition, letter.offset) == (
        "invalid",
        "llm.requests",
        1,
        7,
    )
    assert field in letter.error
    assert letter.payload == value.decode()


def test_a_record_that_is_not_utf8_is_kept_base64_encoded() -> None:
    raw = b"\xff\xfe{}"
    letter = decode_one("llm.responses", raw)
    assert isinstance(letter, DeadLetter)
    assert letter.payload is not None and base64.b64decode(letter.payload) == raw
    assert "base64" in letter.error


def test_an_empty_record_is_invalid() -> None:
    letter = decode_one("llm.responses", None)
    assert isinstance(letter, DeadLetter) and letter.payload is None
    assert "empty record" in letter.error


def test_broker_errors_are_dead_lettered() -> None:
    letter = sources.broker_error(
        "llm.requests", 2, 41, b"{}", ConfluentKafkaError(ConfluentKafkaError._TRANSPORT)
    )
    assert letter.reason == "invalid" and "kafka consumer error" in letter.error
    assert (letter.source_topic, letter.partition, letter.offset) == ("llm.requests", 2, 41)


def test_a_batch_is_grouped_by_join_shard_keeping_order() -> None:
    ids = [f"r-{n}" for n in range(200)]
    records: list[tuple[int, bytes | None]] = [
        (offset, json.dumps({**REQUEST, "request_id": rid}).encode()) for offset, rid in enumerate(ids)
    ]
    records.insert(5, (999, b"junk"))
    responses: list[tuple[int, bytes | None]] = [
        (offset, json.dumps({"request_id": rid, "timestamp": "2025-06-01T00:00:01Z"}).encode())
        for offset, rid in enumerate(ids[:50])
    ]
    polls = []
    for topic, partition, batch in (("llm.requests", 0, records), ("llm.responses", 1, responses)):
        offsets = [offset for offset, _ in batch]
        items, times = sources.decode_values(topic, partition, offsets, [value for _, value in batch], NOW)
        polls.append(sources.poll_of(topic, partition, offsets, items, times))
    out = sources.route_polls(polls)
    letters = [item for item in out if isinstance(item, DeadLetter)]
    routed = [item for item in out if not isinstance(item, DeadLetter)]
    assert [letter.offset for letter in letters] == [999]
    assert len({shard for shard, _ in routed}) == len(routed)  # one item per shard
    seen: dict[tuple[str, int], int] = {("llm.requests", 0): 0, ("llm.responses", 1): 0}
    sent = {("llm.requests", offset): value for offset, value in records}
    sent |= {("llm.responses", offset): value for offset, value in responses}
    for shard, runs in routed:
        for part in runs:
            seen[(part.topic, part.partition)] += len(part)
            assert all(shards.DEFAULT.join_key(event.request_id) == shard for event in part.events)
            for offset, event in zip(part.offsets, part.events, strict=True):
                value = sent[(part.topic, offset)]
                assert value is not None and json.loads(value)["request_id"] == event.request_id
            assert part.offsets == sorted(part.offsets)
    assert seen == {("llm.requests", 0): 200, ("llm.responses", 1): 50}


def test_a_record_goes_to_the_shard_of_the_request_id_it_decodes_to() -> None:
    # An escaped id, and a repeated key: routing reads the id as the full decoding does.
    escaped = json.dumps({**REQUEST, "request_id": "r-\u00e9"}).encode()
    assert b"r-\\u00e9" in escaped
    repeated = b'{"request_id": "first", ' + json.dumps(REQUEST).encode()[1:]
    for value, request_id in ((escaped, "r-\u00e9"), (repeated, "r-1")):
        decoded = decode_one("llm.requests", value)  # asserts the shard is the decoded id's
        assert isinstance(decoded, tuple) and decoded[0].request_id == request_id


def test_an_invalid_record_among_valid_ones_is_dead_lettered_where_it_is_read() -> None:
    value = json.dumps({**REQUEST, "timestamp": "2025-06-01T00:00:00"}).encode()
    good = json.dumps(REQUEST).encode()
    out = read("llm.requests", [(7, good), (8, value), (9, good)], partition=3)
    [letter] = [item for item in out if isinstance(item, DeadLetter)]
    [(shard, [run])] = [item for item in out if not isinstance(item, DeadLetter)]
    assert shard == shards.DEFAULT.join_key("r-1") and run.offsets == [7, 9]
    assert (letter.reason, letter.source_topic, letter.partition, letter.offset) == (
        "invalid",
        "llm.requests",
        3,
        8,
    )
    assert "$.timestamp" in letter.error and letter.payload == value.decode()


def test_an_unknown_topic_makes_every_record_a_dead_letter() -> None:
    out = read("other", [(1, b"{}"), (2, b"{}")])
    assert [item.offset for item in out if isinstance(item, DeadLetter)] == [1, 2]


# -- shard keys and the stateful logics -----------------------------------------------------


def test_shard_keys_are_stable_strings() -> None:
    # crc32 is the same in every process (str hash() is not).
    assert shards.DEFAULT.join_key("r-1") == str(zlib.crc32(b"r-1") % shards.DEFAULT.count)
    assert shards.DEFAULT.window_key(("t", "r", "m")) == str(
        zlib.crc32(b"t\x00r\x00m") % shards.DEFAULT.count
    )


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# The wall clock of the logic tests: an hour after the events, as a live run would see.
WALL = T0.timestamp() + 3600.0


def _notify_until_output(
    logic: operators.JoinLogic | operators.WindowLogic, clock: Clock
) -> tuple[list, list[float]]:
    """Wake the logic whenever it asks until it emits something; its outputs and the waits."""
    waits = []
    for _ in range(100):
        wake = logic.notify_at()
        assert wake is not None and wake.tzinfo is not None
        waits.append(wake.timestamp() - clock.now)
        clock.now = wake.timestamp() + 0.01
        out, _ = logic.on_notify()
        if out:
            return list(out), waits
    raise AssertionError("no output after 100 wake-ups")


def _events(request_id: str, at: datetime, latency: float = 1.0) -> list[EventRun]:
    """The request and the response of one call, as the join step receives them."""
    request = LLMRequest(request_id=request_id, tenant_id="t", route="/r", model="m", timestamp=at)
    response = LLMResponse(request_id=request_id, timestamp=at + timedelta(seconds=latency))
    return [
        EventRun("llm.requests", 0, LLMRequest, [1], [request], [at.timestamp()]),
        EventRun("llm.responses", 0, LLMResponse, [1], [response], [at.timestamp() + latency]),
    ]


def _counted(out: object) -> list[tuple[str, LLMResponse | None]]:
    """The calls of a join logic's outputs: (request id, response) each."""
    assert isinstance(out, list)
    found = []
    for calls, letters in out:
        assert isinstance(calls, CallBatch) and letters == []
        found += [
            (request.request_id, response)
            for request, response in zip(calls.requests, calls.responses, strict=True)
        ]
    return found


def test_join_logic_pairs_in_a_batch_and_expires_on_notify() -> None:
    clock = Clock(WALL)
    build = operators.join_builder(
        timeout_seconds=30, dedupe_seconds=60, window_seconds=10, lateness_seconds=60
    )
    logic = build(None)
    logic.clock = clock
    out, retain = logic.on_batch([_events("a", T0), _events("b", T0)[:1]])
    assert retain is False  # RETAIN
    assert [rid for rid, _ in _counted(out)] == ["a"]
    # "b" times out 30 s of event time after its request; event time idles with the clock,
    # and the logic asks to be woken at least every MAX_GAP / 2 meanwhile.
    out, waits = _notify_until_output(logic, clock)
    assert _counted(out) == [("b", None)]
    assert all(wait <= clock_module.MAX_GAP / 2 for wait in waits)
    assert WALL + 29 <= clock.now <= WALL + 31.1


def test_join_logic_snapshot_is_a_frozen_copy_that_resumes() -> None:
    clock = Clock(WALL)
    build = operators.join_builder(
        timeout_seconds=30, dedupe_seconds=60, window_seconds=10, lateness_seconds=60
    )
    logic = build(None)
    logic.clock = clock
    logic.on_batch([_events("a", T0)[:1]])
    snapshot = logic.snapshot()
    logic.on_batch([_events("a", T0)[1:]])  # later changes do not reach the snapshot
    resumed = build(snapshot)
    resumed.clock = clock
    out, _ = resumed.on_batch([_events("a", T0)[1:]])
    assert [rid for rid, response in _counted(out) if response is not None] == ["a"]


def test_window_logic_emits_when_event_time_passes_the_grace() -> None:
    clock = Clock(WALL)
    logic = operators.window_builder(10, 2, 60)(None)
    logic.clock = clock
    request = LLMRequest(request_id="a", tenant_id="t", route="/r", model="m", timestamp=T0)
    response = LLMResponse(request_id="a", timestamp=T0 + timedelta(seconds=1), latency_ms=5.0)
    call = Call(request=request, response=response, source=SourceRef("llm.responses", 0, 3), cost_usd=0.5)
    out, _ = logic.on_batch([calls_of([call])])
    assert out == []
    rows, _ = _notify_until_output(logic, clock)
    assert len(rows) == 1 and isinstance(rows[0], WindowRow)
    # One answered call: requests + answered calls.
    assert rows[0].row.requests == 1 and rows[0].row.revision == 2


# -- Postgres ------------------------------------------------------------------------------

# A real digest: the sink merges each written window's hour and day from them.
_DIGEST = TDigest.from_values([1.0, 2.0]).to_bytes()


def _row(revision: int, requests: int, tenant: str = "acme", minute: int = 0) -> WindowRow:
    start = T0 + timedelta(minutes=minute)
    return WindowRow(
        row=MetricsRow(
            tenant_id=tenant,
            route="/chat",
            model="m",
            window_start=start,
            window_end=start + timedelta(minutes=1),
            requests=requests,
            errors=0,
            timeouts=0,
            avg_latency_ms=1.5,
            p50_latency_ms=1.0,
            p95_latency_ms=2.0,
            p99_latency_ms=2.0,
            avg_time_to_first_token_ms=None,
            prompt_tokens=10,
            completion_tokens=20,
            cache_read_tokens=0,
            reasoning_tokens=0,
            avg_prompt_tokens=10.0,
            avg_completion_tokens=20.0,
            estimated_cost_usd=0.25,
            unpriced_requests=0,
            revision=revision,
        ),
        digest=_DIGEST,
        ttft_count=0,
    )


def _stored(dsn: str) -> list[dict]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return conn.execute("SELECT * FROM llm_metrics ORDER BY tenant_id, window_start").fetchall()


def test_latest_per_window_keeps_the_highest_revision() -> None:
    kept = sinks.latest_per_window([_row(2, 5), _row(3, 6), _row(1, 4), _row(1, 9, "b")])
    assert sorted((k.row.tenant_id, k.row.revision) for k in kept) == [("acme", 3), ("b", 1)]


def _published(broker: Broker) -> list[tuple[int, int]]:
    """(revision, requests) of every llm.metrics record, in the order they were written."""
    records = sorted(h.records_on(broker.address, h.METRICS), key=lambda r: (r[2], r[3]))
    return [(row.revision, row.requests) for row in (row_decoder.decode(r[1]) for r in records)]


def test_rows_sink_upserts_never_go_back_and_publish_what_postgres_took(
    postgres_dsn: str, broker: Broker
) -> None:
    partition = sinks.RowsSink(postgres_dsn, broker.address).build("rows", 0, 1)
    try:
        # Two emissions of one window in one batch, and another window.
        partition.write_batch([_row(1, 4), _row(2, 5), _row(1, 7, minute=1)])
        rows = _stored(postgres_dsn)
        assert [(r["revision"], r["requests"]) for r in rows] == [(2, 5), (1, 7)]
        assert bytes(rows[0]["latency_digest"]) == _DIGEST
        assert rows[0]["ttft_count"] == 0 and rows[0]["avg_time_to_first_token_ms"] is None
        assert rows[0]["window_start"] == T0
        # A replayed older emission changes nothing and is not published; the same one
        # again is taken (equal revisions hold equal content) and published again.
        partition.write_batch([_row(1, 4)])
        partition.write_batch([_row(2, 5)])
        assert [(r["revision"], r["requests"]) for r in _stored(postgres_dsn)] == [(2, 5), (1, 7)]
        partition.write_batch([_row(3, 6)])
        assert _stored(postgres_dsn)[0]["requests"] == 6
    finally:
        partition.close()
    published = _published(broker)
    assert sorted(published) == sorted([(2, 5), (1, 7), (2, 5), (3, 6)])
    first_window = [p for p in published if p != (1, 7)]
    assert first_window == sorted(first_window), "a key's revision went down on llm.metrics"


def test_rows_sink_reconnects_after_a_dropped_connection(postgres_dsn: str, broker: Broker) -> None:
    partition = sinks.RowsSink(postgres_dsn, broker.address).build("rows", 0, 1)
    try:
        partition.write_batch([_row(1, 4)])
        conn = partition._postgres._conn
        assert conn is not None  # the batch was written through it
        pid = conn.info.backend_pid
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        partition.write_batch([_row(2, 5)])
        assert _stored(postgres_dsn)[0]["revision"] == 2
    finally:
        partition.close()


# -- Kafka records -----------------------------------------------------------------------


def test_metrics_record_is_keyed_by_window() -> None:
    record = sinks.metrics_message(_row(2, 5))
    assert record.key == b"acme|/chat|m|2025-06-01T00:00:00+00:00"
    assert row_decoder.decode(record.value) == _row(2, 5).row


@pytest.mark.parametrize(
    ("payload", "key"),
    [
        ('{"request_id": "r-9", "timestamp": "x"}', b"r-9"),
        ('{"request": {"request_id": "r-8"}, "response": null}', b"r-8"),
        ("{not json", None),
        ("[1, 2]", None),
        (None, None),
    ],
)
def test_dead_letter_record_is_keyed_by_request_id_when_known(payload: str | None, key: bytes | None) -> None:
    letter = DeadLetter(
        reason="orphan_response",
        source_topic="llm.responses",
        partition=0,
        offset=3,
        error="no request",
        payload=payload,
    )
    record = sinks.deadletter_message(letter)
    assert record.key == key
    assert deadletter_decoder.decode(record.value) == letter


# -- the runner ------------------------------------------------------------------------------


def test_recovery_directory_is_initialised_once_and_reset_on_demand(tmp_path: Path) -> None:
    directory = tmp_path / "recovery"
    run.prepare_recovery(directory, 2)
    parts = sorted(p.name for p in directory.glob("part-*.sqlite3"))
    assert parts == ["part-0.sqlite3", "part-1.sqlite3"]
    (directory / "keep").write_text("x")
    run.prepare_recovery(directory, 2)  # resumes: nothing re-created
    assert (directory / "keep").exists()
    run.prepare_recovery(directory, 1, reset=True)
    assert not (directory / "keep").exists()
    assert sorted(p.name for p in directory.glob("part-*.sqlite3")) == ["part-0.sqlite3"]


def test_state_made_before_an_input_topic_existed_resumes_and_records_it(
    tmp_path: Path, broker: Broker
) -> None:
    """State made when the dataflow read two topics resumes when it reads three: it holds no
    offset of the third and reads it from the beginning; a recorded topic made again is
    still refused."""
    directory = tmp_path / "recovery"
    run.prepare_recovery(directory, 1)
    now = recovery.broker_identity(broker.address, run.INPUTS)
    older = {**now, "topic_ids": {name: now["topic_ids"][name] for name in ("llm.requests", "llm.responses")}}
    recovery.record_identity(directory, older)
    assert recovery.mismatch(directory, broker.address, run.INPUTS) is None
    assert json.loads((directory / recovery.IDENTITY_FILE).read_text()) == now
    remade = {**now, "topic_ids": {**now["topic_ids"], "llm.responses": "AAAAAAAAAAAAAAAAAAAAAA"}}
    recovery.record_identity(directory, remade)
    why = recovery.mismatch(directory, broker.address, run.INPUTS)
    assert why is not None and why.startswith("the topics llm.responses on"), why


def test_the_state_keeps_the_shard_count_its_recovery_directory_was_made_with(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fresh = tmp_path / "fresh"
    assert run.prepare_recovery(fresh, 3)
    assert run.shard_count(fresh, True, None, 3) == 96  # 32 per worker, several workers
    # A resume keeps it, whatever the setting or the number of workers now.
    assert run.shard_count(fresh, False, None, 1) == 96
    with caplog.at_level(logging.WARNING, logger="streamlens.dataflow"):
        assert run.shard_count(fresh, False, 5, 1) == 96
    assert "STATE_SHARDS=5 ignored" in caplog.text and "96 shards" in caplog.text
    alone = tmp_path / "alone"
    assert run.prepare_recovery(alone, 1)
    assert run.shard_count(alone, True, None, 1) == 8  # one worker holds them all
    two = tmp_path / "two"
    assert run.prepare_recovery(two, 2)
    assert run.shard_count(two, True, None, 2) == 64
    chosen = tmp_path / "chosen"
    assert run.prepare_recovery(chosen, 1)
    assert run.shard_count(chosen, True, 5, 1) == 5
    assert run.shard_count(chosen, False, None, 4) == 5
    # A directory made before the count was recorded had 64 shards.
    legacy = tmp_path / "legacy"
    assert run.prepare_recovery(legacy, 1)
    assert run.shard_count(legacy, False, None, 1) == 64


def test_commands_for_several_processes_share_the_addresses(tmp_path: Path) -> None:
    [single] = run.commands(tmp_path, 1, 2, 5, 0)
    assert "-i" not in single and single[single.index("-w") + 1] == "2"
    assert single[single.index("-r") + 1] == str(tmp_path)
    argvs = run.commands(tmp_path, 3, 1, 5, 0)
    assert [argv[argv.index("-i") + 1] for argv in argvs] == ["0", "1", "2"]
    addresses = {argv[argv.index("-a") + 1] for argv in argvs}
    assert len(addresses) == 1 and len(addresses.pop().split(";")) == 3


def test_calls_are_priced_and_grouped_by_window_shard() -> None:
    def call(tenant: str, n: int) -> Call:
        return Call(
            request=LLMRequest(
                request_id=f"{tenant}-{n}", tenant_id=tenant, route="/r", model="m", timestamp=T0
            ),
            response=None,
            source=SourceRef("llm.requests", 0, n),
        )

    letter = DeadLetter(
        reason="orphan_response",
        source_topic="llm.responses",
        partition=0,
        offset=1,
        error="none",
        payload=None,
    )
    priced: list[str] = []

    def price(batch: CallBatch) -> None:
        priced.extend(request.request_id for request in batch.requests)
        batch.costs = [float(source.offset) for source in batch.sources]

    calls = [call(tenant, n) for n in range(3) for tenant in ("a", "b", "c", "d")]
    # The outputs of two join shards, regrouped together.
    first, second = calls_of(calls[:5]), calls_of(calls[5:])
    out = operators.route_to_windows(price)([("7", (first, [letter])), ("9", (second, []))])
    assert letter in out
    groups = dict(item for item in out if not isinstance(item, DeadLetter))
    assert sorted(priced) == sorted(c.request.request_id for c in calls)
    assert len(groups) == len([item for item in out if not isinstance(item, DeadLetter)])
    for shard, group in groups.items():
        window_key = shards.DEFAULT.window_key
        assert all(window_key((r.tenant_id, r.route, r.model)) == shard for r in group.requests)
        # Each call keeps its own price through the split (priced here as its offset).
        assert group.costs == [float(source.offset) for source in group.sources]
    assert sum(len(group) for group in groups.values()) == len(calls)


def test_calls_pickle_to_equal_calls() -> None:
    # Calls cross between processes (join shard to window shard) as msgpack.
    assert (
        Call(
            request=LLMRequest(request_id="r", tenant_id="t", route="/", model="m", timestamp=T0),
            response=None,
            source=SourceRef("t", 0, 0),
        )
        .__reduce__()[0]
        .__name__
        == "_call_from_msgpack"
    )
    request = LLMRequest(
        request_id="r-1",
        tenant_id="acme",
        route="/chat",
        model="m",
        timestamp=T0 + timedelta(microseconds=7),
        prompt_tokens=5,
        provider="openai",
        metadata={"a": 1, "b": None, "c": "x"},
    )
    response = LLMResponse(
        request_id="r-1",
        timestamp=T0 + timedelta(seconds=1.5),
        tenant_id="acme",
        latency_ms=1500.25,
        completion_tokens=3,
        time_to_first_token_ms=0.5,
        error="boom",
    )
    calls = [
        Call(
            request=request,
            response=response,
            source=SourceRef("llm.responses", 2, 9),
            cost_usd=0.125,
            completed_at=T0.timestamp() + 1.5,
        ),
        Call(request=request, response=None, source=SourceRef("llm.requests", 0, 3), cost_usd=None),
    ]
    restored = pickle.loads(pickle.dumps(calls, protocol=pickle.HIGHEST_PROTOCOL))
    assert restored == calls
    assert type(restored[0].source) is SourceRef
    assert restored[0].request.timestamp.tzinfo is UTC


def test_a_stalled_worker_does_not_make_open_windows_too_late() -> None:
    # A window holds an answered call; then the worker is blocked for 700 s (a sink
    # waiting out an outage, longer than end + lateness), and only then does the
    # window's timed-out call arrive, due long before. Idle time while nothing is
    # blocked counts as event time; the stall does not.
    clock = Clock(WALL)
    logic = operators.window_builder(10, 2, 60)(None)
    logic.clock = clock
    request = LLMRequest(request_id="a", tenant_id="t", route="/r", model="m", timestamp=T0)
    answered = Call(
        request=request,
        source=SourceRef("llm.responses", 0, 3),
        cost_usd=0.5,
        response=LLMResponse(request_id="a", timestamp=T0 + timedelta(seconds=1), latency_ms=5.0),
    )
    lost = Call(
        request=LLMRequest(
            request_id="b", tenant_id="t", route="/r", model="m", timestamp=T0 + timedelta(seconds=2)
        ),
        response=None,
        source=SourceRef("llm.requests", 0, 4),
        completed_at=T0.timestamp() + 2 + 30,
    )
    assert logic.on_batch([calls_of([answered])])[0] == []
    clock.now += 700
    out, _ = logic.on_batch([calls_of([lost])])
    assert not [item for item in out if isinstance(item, DeadLetter)]
    [row] = [item for item in out if isinstance(item, WindowRow)]
    assert (row.row.requests, row.row.timeouts) == (2, 1)


# -- the Kafka key of a dead letter of an unreadable record ------------------------------


def test_the_kafka_key_of_a_record_is_read_for_its_dead_letter_only() -> None:
    valid = json.dumps({"type": "request", **REQUEST}).encode()
    values: list[bytes | None] = [valid, b"caf\xe9 is not UTF-8", valid.replace(b"r-1", b"r-2"), None]
    keys = [b"r-1", b"k-not-utf8", b"r-2", b"k-no-value"]
    asked: list[int] = []

    def key_of(index: int) -> bytes | None:
        asked.append(index)
        return keys[index]

    items, _ = sources.decode_values("llm.requests", 0, [10, 11, 12, 13], values, NOW, key_of)
    assert asked == [1, 3]  # the valid records' keys are never read
    letters = [item for item in items if isinstance(item, DeadLetter)]
    assert [(letter.offset, letter.source_key) for letter in letters] == [(11, keys[1]), (13, keys[3])]
    records = [sinks.deadletter_message(letter) for letter in letters]
    assert [record.key for record in records] == [keys[1], keys[3]]
    # The key is the record's, not part of the dead letter's value.
    for record, letter in zip(records, letters, strict=True):
        assert b"source_key" not in record.value
        assert deadletter_decoder.decode(record.value) == DeadLetter(
            reason=letter.reason,
            source_topic=letter.source_topic,
            partition=letter.partition,
            offset=letter.offset,
            error=letter.error,
            payload=letter.payload,
        )
    [base64_letter] = [letter for letter in letters if letter.offset == 11]
    assert base64.b64decode(base64_letter.payload or "") == values[1]


@pytest.mark.parametrize(
    ("payload", "source_key", "key"),
    [
        ('{"request_id": "r-9"}', b"other", b"r-9"),  # the request id the payload names first
        ("{not json", b"k-1", b"k-1"),
        ('{"request_id":' * 50_000, b"k-2", b"k-2"),
        (json.dumps({"request_id": "x" * 600}), b"k-3", b"k-3"),
        ("bm90IFVURi04", b"k" * 600, None),  # longer than any request id: left out
        (None, None, None),
    ],
)
def test_a_dead_letter_without_a_request_id_in_its_payload_takes_its_records_key(
    payload: str | None, source_key: bytes | None, key: bytes | None
) -> None:
    letter = DeadLetter(
        reason="invalid",
        source_topic="llm.requests",
        partition=0,
        offset=3,
        error="unreadable",
        payload=payload,
        source_key=source_key,
    )
    assert sinks.deadletter_message(letter).key == key
