"""The ingestion API over real HTTP (uvicorn) against a real broker.

What is accepted is read back from the topics with ``assign()`` and compared
with values computed here, independently of the schemas under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka.admin import AdminClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.auth import TENANT_NOT_ALLOWED
from api.keys import create_key
from schemas.config import Settings
from schemas.events import MAX_FUTURE_SECONDS, check_not_future, request_decoder, response_decoder
from schemas.topics import EVALUATIONS, REQUESTS, RESPONSES, ensure_topics
from tests.support.ports import free_port
from tests.support.servers import ServerThread, wait_answering
from tests.support.stacks import TEST_PARTITIONS, Broker
from tests.support.topics import read_topic

ROOT = Path(__file__).resolve().parent.parent
JSON = {"Content-Type": "application/json"}
# How far ahead of the server's clock a timestamp may be, in seconds.
FUTURE_LIMIT = 120


# -- helpers -------------------------------------------------------------------


def instant(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).astimezone(UTC)


def in_utc(records: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Records by key, each timestamp checked to be written in UTC and read as an instant."""
    by_key = {}
    for key, value in records:
        assert value["timestamp"].endswith("Z"), value["timestamp"]
        by_key[key] = {**value, "timestamp": instant(value["timestamp"])}
    return by_key


def a_request(request_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "tenant_id": "acme",
        "route": "/chat",
        "model": "gpt-4o",
        "timestamp": "2026-03-01T12:00:00Z",
        **fields,
    }


def a_response(request_id: str, **fields: Any) -> dict[str, Any]:
    return {"request_id": request_id, "timestamp": "2026-03-01T12:00:01Z", **fields}


def an_evaluation(request_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "tenant_id": "acme",
        "name": "helpfulness",
        "score": 0.75,
        "timestamp": "2026-03-01T12:05:00Z",
        **fields,
    }


REQUEST_DEFAULTS = {
    "type": "request",
    "prompt_tokens": 0,
    "provider": None,
    "user_id_hash": None,
    "metadata": None,
}
RESPONSE_DEFAULTS = {
    "type": "response",
    "tenant_id": None,
    "latency_ms": None,
    "completion_tokens": 0,
    "cache_read_tokens": 0,
    "reasoning_tokens": 0,
    "time_to_first_token_ms": None,
    "finish_reason": None,
    "error": None,
}


EVALUATION_DEFAULTS = {
    "type": "evaluation",
    "score": None,
    "label": None,
    "evaluator": None,
    "explanation": None,
}


def normalised(event: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """What should be on the topic: known fields only, defaults filled, time in UTC."""
    known = {
        key: value
        for key, value in event.items()
        if key in defaults or key in ("request_id", "tenant_id", "route", "model", "timestamp", "name")
    }
    return {**defaults, **known, "timestamp": instant(event["timestamp"])}


@pytest.fixture
def server(broker: Broker) -> Iterator[ServerThread]:
    with ServerThread(broker.address) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=20) as http:
        yield http


@pytest.fixture(scope="module")
def shared_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """One broker and server for the tests that only look at answers, not at topics."""
    broker = Broker(tmp_path_factory.mktemp("shared-broker")).start()
    try:
        ensure_topics(broker.address, TEST_PARTITIONS)
        with ServerThread(broker.address) as running, httpx.Client(base_url=running.url, timeout=20) as http:
            yield http
    finally:
        broker.stop()


# -- accepted events reach the topics, normalised --------------------------------


def test_single_events_are_on_the_topics_keyed_and_normalised(client: httpx.Client, broker: Broker) -> None:
    requests = [
        a_request(
            "r-0",
            timestamp="2026-03-01T17:30:00+05:30",
            prompt_tokens=12,
            provider="openai",
            unknown_field={"ignored": True},
        ),
        a_request(
            "r-1",
            timestamp="2026-02-28T23:59:59.250-08:00",
            metadata={"team": "search", "n": 3, "ok": True, "none": None},
        ),
        a_request("r-2", user_id_hash="abc"),
    ]
    responses = [
        a_response(
            "r-0",
            timestamp="2026-03-01T13:00:02+01:00",
            latency_ms=2000.5,
            completion_tokens=40,
            reasoning_tokens=10,
            cache_read_tokens=4,
        ),
        a_response("r-1", error="rate limited", finish_reason="error", type="response"),
    ]
    for event in requests:
        answer = client.post("/v1/llm/request", json=event)
        assert (answer.status_code, answer.json()) == (202, {"status": "accepted"})
    for event in responses:
        answer = client.post("/v1/llm/response", json=event)
        assert (answer.status_code, answer.json()) == (202, {"status": "accepted"})

    on_requests = read_topic(broker.address, REQUESTS, len(requests))
    on_responses = read_topic(broker.address, RESPONSES, len(responses))
    expected_requests = {e["request_id"]: normalised(e, REQUEST_DEFAULTS) for e in requests}
    expected_responses = {e["request_id"]: normalised(e, RESPONSE_DEFAULTS) for e in responses}
    assert len(on_requests) == len(requests)
    assert len(on_responses) == len(responses)
    assert in_utc(on_requests) == expected_requests
    assert in_utc(on_responses) == expected_responses
    texts = {key: value["timestamp"] for key, value in on_requests}
    assert texts["r-0"] == "2026-03-01T12:00:00Z"
    assert texts["r-1"].startswith("2026-03-01T07:59:59.25")


def test_evaluations_are_on_their_topic_keyed_by_request_and_normalised(
    client: httpx.Client, broker: Broker
) -> None:
    evaluations = [
        an_evaluation("r-0", timestamp="2026-03-01T13:05:00+01:00", unknown_field=[1, 2]),
        an_evaluation("r-1", score=None, label="pass", evaluator="ci-suite", explanation="é" * 2048),
        an_evaluation("r-2", score=-3, label="bad", name="judge.v2"),
    ]
    for event in evaluations:
        answer = client.post("/v1/llm/evaluation", json=event)
        assert (answer.status_code, answer.json()) == (202, {"status": "accepted"})
    on_topic = read_topic(broker.address, EVALUATIONS, len(evaluations))
    assert len(on_topic) == len(evaluations)
    assert in_utc(on_topic) == {e["request_id"]: normalised(e, EVALUATION_DEFAULTS) for e in evaluations}
    assert read_topic(broker.address, REQUESTS, 0, quiet=0.2) == []


def test_a_batch_takes_evaluations_beside_the_events_of_calls(client: httpx.Client, broker: Broker) -> None:
    events = [
        {"type": "request", **a_request("m-1")},
        {"type": "evaluation", **an_evaluation("m-1", label="fail", score=None)},
        {"type": "evaluation", **an_evaluation("m-2", score=None)},  # neither score nor label
        {"type": "response", **a_response("m-1")},
        {"type": "evaluation", **an_evaluation("m-3", name="x" * 65)},
    ]
    answer = client.post("/v1/llm/events", json={"events": events})
    assert answer.status_code == 207, answer.text
    body = answer.json()
    assert body["accepted"] == 3
    assert [item["index"] for item in body["rejected"]] == [2, 4]
    assert "`$.score`" in body["rejected"][0]["error"]
    assert "`$.name`" in body["rejected"][1]["error"]
    on_topic = read_topic(broker.address, EVALUATIONS, 1)
    assert in_utc(on_topic) == {"m-1": normalised(events[1], EVALUATION_DEFAULTS)}
    assert len(read_topic(broker.address, REQUESTS, 1)) == 1
    assert len(read_topic(broker.address, RESPONSES, 1)) == 1


def test_another_tenants_evaluation_is_refused(broker: Broker, postgres_dsn: str) -> None:
    settings = Settings(
        kafka_brokers=broker.address, topic_partitions=TEST_PARTITIONS, postgres_dsn=postgres_dsn
    )
    with (
        ServerThread(broker.address, settings) as running,
        httpx.Client(base_url=running.url, timeout=20) as http,
    ):
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            key = create_key(conn, "acme", "ingest").key
        headers = {"Authorization": f"Bearer {key}"}
        refused = http.post(
            "/v1/llm/evaluation", json=an_evaluation("t-1", tenant_id="globex"), headers=headers
        )
        assert refused.status_code == 403, refused.text
        assert refused.json() == {"error": "forbidden", "detail": TENANT_NOT_ALLOWED}
        batch = {
            "events": [
                {"type": "evaluation", **an_evaluation("t-2", tenant_id="globex")},
                {"type": "evaluation", **an_evaluation("t-3")},
            ]
        }
        answer = http.post("/v1/llm/events", json=batch, headers=headers)
        assert answer.status_code == 207, answer.text
        assert answer.json()["rejected"] == [{"index": 0, "error": TENANT_NOT_ALLOWED}]
        assert http.post("/v1/llm/evaluation", json=an_evaluation("t-4"), headers=headers).status_code == 202
        assert http.post("/v1/llm/evaluation", json=an_evaluation("t-5")).status_code == 401
    assert sorted(key for key, _ in read_topic(broker.address, EVALUATIONS, 2)) == ["t-3", "t-4"]


def test_a_batch_keeps_its_valid_events_and_names_the_invalid_by_index(
    client: httpx.Client, broker: Broker
) -> None:
    valid_requests = [{"type": "request", **a_request(f"b-{i}", prompt_tokens=i)} for i in range(5)]
    valid_responses = [{"type": "response", **a_response(f"b-{i}", completion_tokens=i)} for i in range(3)]
    invalid = {
        1: {"type": "request", **a_request("bad-ts", timestamp="2026-03-01T12:00:00")},
        4: a_request("no-type"),
        6: {"type": "response", **a_response("bad-tokens", completion_tokens=-1)},
        8: {"type": "mystery", **a_request("bad-type")},
        9: 42,
    }
    events: list[Any] = []
    valid = iter(valid_requests + valid_responses)
    for index in range(len(valid_requests) + len(valid_responses) + len(invalid)):
        events.append(invalid[index] if index in invalid else next(valid))

    answer = client.post("/v1/llm/events", json={"events": events})
    assert answer.status_code == 207
    body = answer.json()
    assert body["accepted"] == len(valid_requests) + len(valid_responses)
    assert [entry["index"] for entry in body["rejected"]] == sorted(invalid)
    errors = {entry["index"]: entry["error"] for entry in body["rejected"]}
    assert "$.timestamp" in errors[1]
    assert "type" in errors[4]
    assert "$.completion_tokens" in errors[6]
    assert "$.type" in errors[8]
    assert "object" in errors[9]

    all_valid = [{"type": "request", **a_request("c-0")}, {"type": "response", **a_response("c-0")}]
    answer = client.post("/v1/llm/events", json={"events": all_valid})
    assert (answer.status_code, answer.json()) == (202, {"accepted": 2})

    expected_requests = [*valid_requests, all_valid[0]]
    expected_responses = [*valid_responses, all_valid[1]]
    on_requests = read_topic(broker.address, REQUESTS, len(expected_requests))
    on_responses = read_topic(broker.address, RESPONSES, len(expected_responses))
    assert len(on_requests) == len(expected_requests)
    assert len(on_responses) == len(expected_responses)
    assert in_utc(on_requests) == {
        e["request_id"]: normalised(e, REQUEST_DEFAULTS) for e in expected_requests
    }
    assert in_utc(on_responses) == {
        e["request_id"]: normalised(e, RESPONSE_DEFAULTS) for e in expected_responses
    }


def test_many_concurrent_events_are_each_on_the_topic_once(server: ServerThread, broker: Broker) -> None:
    singles = 200
    batch = [{"type": "response", **a_response(f"m-{i}")} for i in range(500)]

    async def send() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
            posts = [http.post("/v1/llm/request", json=a_request(f"m-{i}")) for i in range(singles)]
            posts.append(http.post("/v1/llm/events", json={"events": batch}))
            return [answer.status_code for answer in await asyncio.gather(*posts)]

    assert asyncio.run(send()) == [202] * (singles + 1)
    on_requests = read_topic(broker.address, REQUESTS, singles)
    on_responses = read_topic(broker.address, RESPONSES, len(batch))
    assert sorted(key for key, _ in on_requests) == sorted(f"m-{i}" for i in range(singles))
    assert sorted(key for key, _ in on_responses) == sorted(f"m-{i}" for i in range(len(batch)))


# -- timestamps ahead of the server's clock ----------------------------------------


def rfc3339_at(unix_seconds: float) -> str:
    return datetime.fromtimestamp(unix_seconds, UTC).isoformat().replace("+00:00", "Z")


def seconds_ahead(detail: str) -> float:
    match = re.search(r"ahead of it by ([0-9.]+) s - at `\$\.timestamp`", detail)
    assert match is not None, detail
    return float(match.group(1))


def test_the_future_check_allows_exactly_the_limit() -> None:
    assert MAX_FUTURE_SECONDS == FUTURE_LIMIT
    now = 1_800_000_000.0
    for decode, event in (
        (request_decoder.decode, a_request("f")),
        (response_decoder.decode, a_response("f")),
    ):
        at_limit = decode(json.dumps({**event, "timestamp": rfc3339_at(now + FUTURE_LIMIT)}))
        assert check_not_future(at_limit, now) is None
        past = decode(json.dumps({**event, "timestamp": rfc3339_at(now + FUTURE_LIMIT + 0.001)}))
        error = check_not_future(past, now)
        assert error is not None and "server clock" in error
        assert abs(seconds_ahead(error) - (FUTURE_LIMIT + 0.001)) < 1e-6
        # The offset is only notation: the same instant written in another zone.
        shifted = decode(json.dumps({**event, "timestamp": "2027-01-15T10:00:00+05:00"}))
        same_instant = datetime(2027, 1, 15, 5, 0, tzinfo=UTC).timestamp()
        assert check_not_future(shifted, same_instant - FUTURE_LIMIT) is None
        assert check_not_future(shifted, same_instant - FUTURE_LIMIT - 1) is not None


def test_an_event_too_far_ahead_of_the_server_clock_is_refused(client: httpx.Client, broker: Broker) -> None:
    now = time.time()
    # Sent at the limit as the test's clock reads it: the server reads its clock
    # later, so the event is at most at the limit there.
    at_limit = a_request("at-limit", timestamp=rfc3339_at(now + FUTURE_LIMIT))
    answer = client.post("/v1/llm/request", json=at_limit)
    assert (answer.status_code, answer.json()) == (202, {"status": "accepted"})
    for path, event in (
        ("/v1/llm/request", a_request("ahead", timestamp=rfc3339_at(now + 3600))),
        ("/v1/llm/response", a_response("ahead", timestamp=rfc3339_at(now + FUTURE_LIMIT + 30))),
    ):
        answer = client.post(path, json=event)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == "invalid_event"
        detail = answer.json()["detail"]
        assert "server clock" in detail
        sent_ahead = instant(event["timestamp"]).timestamp() - now
        # The server's clock read later than ours, by less than the test took;
        # the detail rounds to the millisecond.
        assert sent_ahead - (time.time() - now) - 0.0005 <= seconds_ahead(detail) <= sent_ahead + 0.0005
    on_requests = read_topic(broker.address, REQUESTS, 1)
    assert in_utc(on_requests) == {"at-limit": normalised(at_limit, REQUEST_DEFAULTS)}
    assert read_topic(broker.address, RESPONSES, 0, quiet=0.2) == []
    assert read_topic(broker.address, EVALUATIONS, 0, quiet=0.2) == []


def test_a_batch_rejects_only_its_events_too_far_ahead(client: httpx.Client, broker: Broker) -> None:
    now = time.time()
    events = [
        {"type": "request", **a_request("fb-0", timestamp=rfc3339_at(now + FUTURE_LIMIT))},
        {"type": "request", **a_request("fb-1", timestamp=rfc3339_at(now + FUTURE_LIMIT + 20))},
        {"type": "response", **a_response("fb-0", timestamp=rfc3339_at(now + 86400 * 365))},
        {"type": "response", **a_response("fb-2", timestamp=rfc3339_at(now - 60))},
    ]
    answer = client.post("/v1/llm/events", json={"events": events})
    assert answer.status_code == 207, answer.text
    body = answer.json()
    assert body["accepted"] == 2
    assert [entry["index"] for entry in body["rejected"]] == [1, 2]
    for entry in body["rejected"]:
        assert "server clock" in entry["error"]
        assert seconds_ahead(entry["error"]) > FUTURE_LIMIT
    on_requests = read_topic(broker.address, REQUESTS, 1)
    on_responses = read_topic(broker.address, RESPONSES, 1)
    assert in_utc(on_requests) == {"fb-0": normalised(events[0], REQUEST_DEFAULTS)}
    assert in_utc(on_responses) == {"fb-2": normalised(events[3], RESPONSE_DEFAULTS)}


# -- the error matrix ----------------------------------------------------------

VALID = json.dumps(a_request("e-1")).encode()

ERRORS = [
    # (name, method, path, headers, body, status, code, detail must contain)
    ("malformed JSON", "POST", "/v1/llm/request", JSON, b'{"request_id": ', 400, "invalid_json", "truncated"),
    ("not JSON at all", "POST", "/v1/llm/response", JSON, b"hello", 400, "invalid_json", "malformed"),
    (
        "invalid UTF-8 in a field",
        "POST",
        "/v1/llm/request",
        JSON,
        VALID.replace(b'"e-1"', b'"e-\xff"'),
        400,
        "invalid_json",
        "UTF-8",
    ),
    ("empty body", "POST", "/v1/llm/request", JSON, b"", 400, "empty_body", "empty"),
    ("a JSON array", "POST", "/v1/llm/request", JSON, b"[]", 400, "invalid_event", "object"),
    (
        "missing field",
        "POST",
        "/v1/llm/request",
        JSON,
        json.dumps({k: v for k, v in a_request("e").items() if k != "model"}).encode(),
        400,
        "invalid_event",
        "`model`",
    ),
    (
        "wrong type",
        "POST",
        "/v1/llm/request",
        JSON,
        json.dumps(a_request("e", prompt_tokens="12")).encode(),
        400,
        "invalid_event",
        "$.prompt_tokens",
    ),
    (
        "negative tokens",
        "POST",
        "/v1/llm/request",
        JSON,
        json.dumps(a_request("e", prompt_tokens=-1)).encode(),
        400,
        "invalid_event",
        "$.prompt_tokens",
    ),
    (
        "timestamp without offset",
        "POST",
        "/v1/llm/request",
        JSON,
        json.dumps(a_request("e", timestamp="2026-03-01T12:00:00")).encode(),
        400,
        "invalid_event",
        "$.timestamp",
    ),
    (
        "timestamp out of range in UTC",
        "POST",
        "/v1/llm/request",
        JSON,
        json.dumps(a_request("e", timestamp="0001-01-01T00:30:00+01:00")).encode(),
        400,
        "invalid_event",
        "$.timestamp",
    ),
    (
        "empty request_id",
        "POST",
        "/v1/llm/request",
        JSON,
        json.dumps(a_request("")).encode(),
        400,
        "invalid_event",
        "$.request_id",
    ),
    (
        "request_id too long",
        "POST",
        "/v1/llm/request",
        JSON,
        json.dumps(a_request("x" * 129)).encode(),
        400,
        "invalid_event",
        "$.request_id",
    ),
    (
        "control character in tenant_id",
        "POST",
        "/v1/llm/request",
        JSON,
        json.dumps(a_request("e", tenant_id="ac\nme")).encode(),
        400,
        "invalid_event",
        "$.tenant_id",
    ),
    (
        "trailing newline in request_id",
        "POST",
        "/v1/llm/response",
        JSON,
        json.dumps(a_response("e\n")).encode(),
        400,
        "invalid_event",
        "$.request_id",
    ),
    (
        "route too long",
        "POST",
        "/v1/llm/request",
        JSON,
        json.dumps(a_request("e", route="r" * 256)).encode(),
        400,
        "invalid_event",
        "$.route",
    ),
    (
        "user_id_hash too long",
        "POST",
        "/v1/llm/request",
        JSON,
        json.dumps(a_request("e", user_id_hash="h" * 129)).encode(),
        400,
        "invalid_event",
        "$.user_id_hash",
    ),
    (
        "metadata with 65 keys",
        "POST",
        "/v1/llm/request",
        JSON,
        json.dumps(a_request("e", metadata={f"k{i}": i for i in range(65)})).encode(),
        400,
        "invalid_event",
        "$.metadata",
    ),
    (
        "metadata over 8 KiB",
        "POST",
        "/v1/llm/request",
        JSON,
        json.dumps(a_request("e", metadata={"big": "x" * 9000})).encode(),
        400,
        "invalid_event",
        "$.metadata",
    ),
    (
        "nested metadata value",
        "POST",
        "/v1/llm/request",
        JSON,
        json.dumps(a_request("e", metadata={"nested": {"a": 1}})).encode(),
        400,
        "invalid_event",
        "$.metadata",
    ),
    (
        "type of the other kind",
        "POST",
        "/v1/llm/request",
        JSON,
        json.dumps({"type": "response", **a_request("e")}).encode(),
        400,
        "invalid_event",
        "$.type",
    ),
    (
        "negative latency",
        "POST",
        "/v1/llm/response",
        JSON,
        json.dumps(a_response("e", latency_ms=-0.5)).encode(),
        400,
        "invalid_event",
        "$.latency_ms",
    ),
    (
        "reasoning over completion",
        "POST",
        "/v1/llm/response",
        JSON,
        json.dumps(a_response("e", completion_tokens=1, reasoning_tokens=2)).encode(),
        400,
        "invalid_event",
        "$.reasoning_tokens",
    ),
    (
        "finish_reason too long",
        "POST",
        "/v1/llm/response",
        JSON,
        json.dumps(a_response("e", finish_reason="f" * 65)).encode(),
        400,
        "invalid_event",
        "$.finish_reason",
    ),
    (
        "error of the wrong type",
        "POST",
        "/v1/llm/response",
        JSON,
        json.dumps(a_response("e", error=5)).encode(),
        400,
        "invalid_event",
        "$.error",
    ),
    (
        "batch without events",
        "POST",
        "/v1/llm/events",
        JSON,
        b'{"evens": []}',
        400,
        "invalid_batch",
        "`events`",
    ),
    (
        "batch of 1,001 events",
        "POST",
        "/v1/llm/events",
        JSON,
        json.dumps({"events": [{"type": "request", **a_request(f"x{i}")} for i in range(1001)]}).encode(),
        400,
        "invalid_batch",
        "$.events",
    ),
    ("batch malformed", "POST", "/v1/llm/events", JSON, b'{"events": [', 400, "invalid_json", "truncated"),
    (
        "event over 1 MiB",
        "POST",
        "/v1/llm/request",
        JSON,
        json.dumps(a_request("e", pad="x" * (1024 * 1024))).encode(),
        413,
        "body_too_large",
        "1 MiB",
    ),
    (
        "batch over 8 MiB",
        "POST",
        "/v1/llm/events",
        JSON,
        json.dumps({"events": [], "pad": "x" * (8 * 1024 * 1024)}).encode(),
        413,
        "body_too_large",
        "8 MiB",
    ),
    ("no content type", "POST", "/v1/llm/request", {}, VALID, 415, "unsupported_media_type", "missing"),
    (
        "form content type",
        "POST",
        "/v1/llm/request",
        {"Content-Type": "application/x-www-form-urlencoded"},
        VALID,
        415,
        "unsupported_media_type",
        "x-www-form-urlencoded",
    ),
    (
        "text/plain",
        "POST",
        "/v1/llm/events",
        {"Content-Type": "text/plain"},
        VALID,
        415,
        "unsupported_media_type",
        "text/plain",
    ),
    (
        "JSON in another charset",
        "POST",
        "/v1/llm/request",
        {"Content-Type": "application/json; charset=latin-1"},
        VALID,
        415,
        "unsupported_media_type",
        "latin-1",
    ),
    (
        "evaluation without a name",
        "POST",
        "/v1/llm/evaluation",
        JSON,
        json.dumps({k: v for k, v in an_evaluation("e").items() if k != "name"}).encode(),
        400,
        "invalid_event",
        "`name`",
    ),
    (
        "evaluation name too long",
        "POST",
        "/v1/llm/evaluation",
        JSON,
        json.dumps(an_evaluation("e", name="n" * 65)).encode(),
        400,
        "invalid_event",
        "`$.name`",
    ),
    (
        "evaluation name with a control character",
        "POST",
        "/v1/llm/evaluation",
        JSON,
        json.dumps(an_evaluation("e", name="a\nb")).encode(),
        400,
        "invalid_event",
        "`$.name`",
    ),
    (
        "evaluation without score or label",
        "POST",
        "/v1/llm/evaluation",
        JSON,
        json.dumps(an_evaluation("e", score=None)).encode(),
        400,
        "invalid_event",
        "`$.score`",
    ),
    (
        "evaluation score not a number",
        "POST",
        "/v1/llm/evaluation",
        JSON,
        json.dumps(an_evaluation("e", score="high")).encode(),
        400,
        "invalid_event",
        "`$.score`",
    ),
    (
        "evaluation label empty",
        "POST",
        "/v1/llm/evaluation",
        JSON,
        json.dumps(an_evaluation("e", label="", score=None)).encode(),
        400,
        "invalid_event",
        "`$.label`",
    ),
    (
        "evaluation label too long",
        "POST",
        "/v1/llm/evaluation",
        JSON,
        json.dumps(an_evaluation("e", label="l" * 65)).encode(),
        400,
        "invalid_event",
        "`$.label`",
    ),
    (
        "evaluator too long",
        "POST",
        "/v1/llm/evaluation",
        JSON,
        json.dumps(an_evaluation("e", evaluator="v" * 129)).encode(),
        400,
        "invalid_event",
        "`$.evaluator`",
    ),
    (
        "explanation over 4 KiB encoded",
        "POST",
        "/v1/llm/evaluation",
        JSON,
        json.dumps(an_evaluation("e", explanation="é" * 2049)).encode(),
        400,
        "invalid_event",
        "`$.explanation`",
    ),
    (
        "evaluation without tenant",
        "POST",
        "/v1/llm/evaluation",
        JSON,
        json.dumps({k: v for k, v in an_evaluation("e").items() if k != "tenant_id"}).encode(),
        400,
        "invalid_event",
        "`tenant_id`",
    ),
    (
        "evaluation time without offset",
        "POST",
        "/v1/llm/evaluation",
        JSON,
        json.dumps(an_evaluation("e", timestamp="2026-03-01T12:05:00")).encode(),
        400,
        "invalid_event",
        "`$.timestamp`",
    ),
    ("unknown path", "POST", "/v1/llm/nothing", JSON, VALID, 404, "not_found", "/v1/llm/nothing"),
    ("unknown path, GET", "GET", "/", {}, b"", 404, "not_found", "/"),
    ("GET on an event endpoint", "GET", "/v1/llm/request", {}, b"", 405, "method_not_allowed", "GET"),
    ("PUT on the batch endpoint", "PUT", "/v1/llm/events", JSON, VALID, 405, "method_not_allowed", "PUT"),
    ("POST on /health", "POST", "/health", JSON, b"{}", 405, "method_not_allowed", "POST"),
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "code", "detail"),
    [case[1:] for case in ERRORS],
    ids=[case[0] for case in ERRORS],
)
def test_bad_input_gets_a_json_error_naming_what_is_wrong(
    shared_client: httpx.Client,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
    code: str,
    detail: str,
) -> None:
    answer = shared_client.request(method, path, headers=headers, content=body)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"] == code
    assert detail in answer.json()["detail"]


def test_bad_input_never_reaches_the_topics(client: httpx.Client, broker: Broker) -> None:
    for _, method, path, headers, body, _, _, _ in ERRORS:
        assert client.request(method, path, headers=headers, content=body).status_code >= 400
    client.post("/v1/llm/request", json=a_request("marker"))
    on_requests = read_topic(broker.address, REQUESTS, 1)
    assert len(on_requests) == 1
    assert in_utc(on_requests) == {"marker": normalised(a_request("marker"), REQUEST_DEFAULTS)}
    assert read_topic(broker.address, RESPONSES, 0, quiet=0.2) == []


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        "application/vnd.streamlens+json",
    ],
)
def test_json_content_types_are_accepted(shared_client: httpx.Client, content_type: str) -> None:
    answer = shared_client.post("/v1/llm/request", content=VALID, headers={"Content-Type": content_type})
    assert answer.status_code == 202


def _raw_exchange(port: int, head: bytes, chunks: list[bytes]) -> bytes:
    """Send a request by hand and return all the server says until it closes the connection.

    The body is never completed, so the answer can only come from the limit, and
    a server that kept the connection open would fail this by the socket timeout.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                answer += data
        return answer


def test_a_declared_content_length_over_the_limit_is_refused_before_the_body(
    server: ServerThread,
) -> None:
    head = (
        b"POST /v1/llm/request HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 104857600\r\n\r\n"
    )
    started = time.monotonic()
    answer = _raw_exchange(server.port, head, [])  # not one byte of the 100 MiB is sent
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"body_too_large"' in answer
    assert time.monotonic() - started < 5


def test_a_streamed_body_is_cut_off_once_over_the_limit(server: ServerThread) -> None:
    head = (
        b"POST /v1/llm/request HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 65536
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    # 2 MiB, then the stream stays open: an answer can only come from the limit.
    answer = _raw_exchange(server.port, head, [framed] * 32)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_health_and_ready(shared_client: httpx.Client) -> None:
    assert (shared_client.get("/health").status_code, shared_client.get("/health").json()) == (
        200,
        {"status": "ok"},
    )
    assert shared_client.get("/ready").status_code == 200


# -- arbitrary input -------------------------------------------------------------

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _text(value: object, low: int, high: int, *, controls: bool = True) -> bool:
    return isinstance(value, str) and low <= len(value) <= high and (controls or not CONTROL.search(value))


def _count(value: object) -> bool:
    return type(value) is int and 0 <= value <= 1_000_000_000


def _millis(value: object) -> bool:
    return (type(value) is int or type(value) is float) and value >= 0


def _timestamp(value: object) -> bool:
    if not isinstance(value, str) or not RFC3339.match(value):
        return False
    try:
        parsed = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        moment = parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        return False
    return moment.timestamp() <= time.time() + FUTURE_LIMIT


def _metadata(value: object) -> bool:
    if not isinstance(value, dict) or len(value) > 64:
        return False
    if not all(v is None or type(v) in (str, int, float, bool) for v in value.values()):
        return False
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()) <= 8192


REQUEST_RULES = {
    "request_id": (True, lambda v: _text(v, 1, 128, controls=False)),
    "tenant_id": (True, lambda v: _text(v, 1, 128, controls=False)),
    "route": (True, lambda v: _text(v, 1, 255)),
    "model": (True, lambda v: _text(v, 1, 255)),
    "timestamp": (True, _timestamp),
    "prompt_tokens": (False, _count),
    "provider": (False, lambda v: v is None or isinstance(v, str)),
    "user_id_hash": (False, lambda v: v is None or _text(v, 0, 128)),
    "metadata": (False, lambda v: v is None or _metadata(v)),
}
RESPONSE_RULES = {
    "request_id": (True, lambda v: _text(v, 1, 128, controls=False)),
    "timestamp": (True, _timestamp),
    "tenant_id": (False, lambda v: v is None or _text(v, 1, 128, controls=False)),
    "latency_ms": (False, lambda v: v is None or _millis(v)),
    "completion_tokens": (False, _count),
    "cache_read_tokens": (False, _count),
    "reasoning_tokens": (False, _count),
    "time_to_first_token_ms": (False, lambda v: v is None or _millis(v)),
    "finish_reason": (False, lambda v: v is None or _text(v, 0, 64)),
    "error": (False, lambda v: v is None or isinstance(v, str)),
}


def spec_valid(kind: str, event: object) -> bool:
    """The contract's §1 rules, written out again here to judge the API by."""
    if not isinstance(event, dict):
        return False
    rules = REQUEST_RULES if kind == "request" else RESPONSE_RULES
    if "type" in event and event["type"] != kind:
        return False
    for field, (required, rule) in rules.items():
        if field not in event:
            if required:
                return False
        elif not rule(event[field]):
            return False
    return not (kind == "response" and event.get("reasoning_tokens", 0) > event.get("completion_tokens", 0))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
timestamps = st.one_of(
    st.builds(
        lambda moment, minutes: moment.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat(),
        st.datetimes(),
        st.integers(-12 * 60, 14 * 60),
    ),
    st.datetimes().map(lambda moment: moment.isoformat()),  # no offset
    st.sampled_from(["2026-13-01T00:00:00Z", "2026-03-01", "yesterday", "2026-03-01T12:00:00+1"]),
    json_values,
)
identifiers = st.one_of(st.text(min_size=1, max_size=8), st.text(max_size=140), json_values)
counts = st.one_of(st.integers(-3, 10**6), json_values)
field_values = {
    "request_id": identifiers,
    "tenant_id": identifiers,
    "route": st.one_of(st.text(min_size=1, max_size=8), st.text(max_size=300)),
    "model": st.one_of(st.text(min_size=1, max_size=8), json_values),
    "timestamp": timestamps,
    "prompt_tokens": counts,
    "completion_tokens": counts,
    "cache_read_tokens": counts,
    "reasoning_tokens": counts,
    "provider": st.one_of(st.none(), st.text(max_size=10), json_values),
    "user_id_hash": st.one_of(st.none(), st.text(max_size=140)),
    "metadata": st.one_of(st.none(), st.dictionaries(st.text(max_size=5), json_values, max_size=4)),
    "latency_ms": st.one_of(st.none(), st.floats(-10, 1e6), json_values),
    "time_to_first_token_ms": st.one_of(st.none(), st.floats(-10, 1e6)),
    "finish_reason": st.one_of(st.none(), st.text(max_size=70)),
    "error": st.one_of(st.none(), st.text(max_size=10), json_values),
    "type": st.sampled_from(["request", "response", "other"]),
    "extra": json_values,
}


@st.composite
def candidate_events(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """An event of either kind: its fields drawn near the rules and now and then across them."""
    kind = draw(st.sampled_from(["request", "response"]))
    rules = REQUEST_RULES if kind == "request" else RESPONSE_RULES
    base = a_request("h") if kind == "request" else a_response("h")
    event: dict[str, Any] = {}
    for field in [*rules, "type", "extra"]:
        choice = draw(st.sampled_from(["base", "drawn", "absent"]))
        if choice == "base" and field in base:
            event[field] = base[field]
        elif choice == "drawn":
            event[field] = draw(field_values[field])
    return kind, event


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(candidate=candidate_events())
def test_an_event_is_accepted_exactly_when_the_contract_allows_it(
    shared_client: httpx.Client, candidate: tuple[str, dict[str, Any]]
) -> None:
    kind, event = candidate
    answer = shared_client.post(f"/v1/llm/{kind}", content=json.dumps(event).encode(), headers=JSON)
    if spec_valid(kind, event):
        assert answer.status_code == 202, answer.text
    else:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == "invalid_event"


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(events=st.lists(candidate_events(), max_size=6))
def test_a_batch_accepts_exactly_the_events_the_contract_allows(
    shared_client: httpx.Client, events: list[tuple[str, dict[str, Any]]]
) -> None:
    # In a batch the type field is required and chooses the kind.
    payload = [{**event, "type": kind} for kind, event in events]
    answer = shared_client.post("/v1/llm/events", json={"events": payload})
    invalid = [i for i, event in enumerate(payload) if not spec_valid(event["type"], event)]
    assert answer.status_code == (207 if invalid else 202), answer.text
    assert answer.json()["accepted"] == len(events) - len(invalid)
    assert [entry["index"] for entry in answer.json().get("rejected", [])] == invalid


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.sampled_from(["/v1/llm/request", "/v1/llm/response", "/v1/llm/events"]),
    body=st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.sampled_from(["events", "type", "request_id"]), json_values).map(
            lambda v: json.dumps(v).encode()
        ),
    ),
)
def test_arbitrary_bodies_get_a_client_error_never_a_server_error(
    shared_client: httpx.Client, path: str, body: bytes
) -> None:
    answer = shared_client.post(path, content=body, headers=JSON)
    # None of these bodies holds a valid event (none can have all required fields),
    # so the answer is a 400, or for a batch a 207 rejecting every event or a 202
    # for an empty one: never an event accepted, never a server error.
    if path.endswith("events"):
        assert answer.status_code in (400, 207, 202), answer.text
        if answer.status_code != 400:
            assert answer.json()["accepted"] == 0
    else:
        assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"] == "application/json"


# -- the broker goes away and comes back ---------------------------------------


def test_broker_outage_is_a_503_and_service_resumes_when_it_returns(
    client: httpx.Client, server: ServerThread, broker: Broker
) -> None:
    assert client.post("/v1/llm/request", json=a_request("before")).status_code == 202
    assert [key for key, _ in read_topic(broker.address, REQUESTS, 1)] == ["before"]

    broker.stop()

    async def during() -> list[tuple[httpx.Response, float]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:

            async def timed(post: Any) -> tuple[httpx.Response, float]:
                started = time.monotonic()
                answer = await post
                return answer, time.monotonic() - started

            return await asyncio.gather(
                *(timed(http.post("/v1/llm/request", json=a_request(f"down-{i}"))) for i in range(3)),
                timed(
                    http.post(
                        "/v1/llm/events", json={"events": [{"type": "response", **a_response("down-0")}]}
                    )
                ),
            )

    for answer, elapsed in asyncio.run(during()):
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "5"
        assert answer.json()["error"] == "broker_unavailable"
        assert elapsed < 7
    assert client.get("/ready").status_code == 503

    broker.start(broker.port)  # memory storage: back empty
    ensure_topics(broker.address, TEST_PARTITIONS)
    accepted: list[str] = []
    deadline = time.monotonic() + 30
    attempt = 0
    while len(accepted) < 5:
        assert time.monotonic() < deadline, "requests did not succeed again within 30 s"
        answer = client.post("/v1/llm/request", json=a_request(f"after-{attempt}"))
        assert answer.status_code in (202, 503), answer.text
        if answer.status_code == 202:
            accepted.append(f"after-{attempt}")
        attempt += 1

    on_topic = {key for key, _ in read_topic(broker.address, REQUESTS, len(accepted))}
    # Every 202 is on the topic; a 503 may or may not be (it was not promised).
    assert set(accepted) <= on_topic
    assert on_topic <= {f"after-{i}" for i in range(attempt)}
    ready_deadline = time.monotonic() + 5
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < ready_deadline, "/ready did not recover"
        time.sleep(0.3)


def test_starting_without_a_broker_answers_503_until_it_comes(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "late", port=free_port())
    try:
        with ServerThread(broker.address) as server, httpx.Client(base_url=server.url, timeout=20) as http:
            assert http.get("/health").status_code == 200
            assert http.get("/ready").status_code == 503
            answer = http.post("/v1/llm/request", json=a_request("early"))
            assert answer.status_code == 503 and answer.headers["retry-after"] == "5"

            broker.start()  # no topics: the API creates them itself
            deadline = time.monotonic() + 30
            while (answer := http.post("/v1/llm/request", json=a_request("late"))).status_code != 202:
                assert answer.status_code == 503, answer.text
                assert time.monotonic() < deadline, "no 202 within 30 s of the broker starting"
            keys = [key for key, _ in read_topic(broker.address, REQUESTS, 1)]
            assert "late" in keys and set(keys) <= {"early", "late"}
            topics = AdminClient({"bootstrap.servers": broker.address}).list_topics(timeout=10)
            for name in (REQUESTS, RESPONSES):
                assert len(topics.topics[name].partitions) == TEST_PARTITIONS
    finally:
        broker.stop()


# -- graceful shutdown -----------------------------------------------------------


def test_sigterm_answers_every_request_in_flight(broker: Broker, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BROKERS": broker.address,
        "TOPIC_PARTITIONS": str(TEST_PARTITIONS),
        "AUTH": "off",
    }
    log = open(tmp_path / "uvicorn.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "api.ingestion:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--timeout-graceful-shutdown",
            "15",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_answering(f"{url}/health", process, tmp_path / "uvicorn.log")
        assert httpx.post(f"{url}/v1/llm/request", json=a_request("warm"), timeout=10).status_code == 202

        async def in_flight() -> list[httpx.Response | BaseException]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                posts = [
                    asyncio.ensure_future(http.post("/v1/llm/request", json=a_request(f"sigterm-{i}")))
                    for i in range(20)
                ]
                posts.append(
                    asyncio.ensure_future(
                        http.post(
                            "/v1/llm/events",
                            json={
                                "events": [
                                    {"type": "response", **a_response(f"sigterm-{i}")} for i in range(20)
                                ]
                            },
                        )
                    )
                )
                await asyncio.sleep(1.0)  # all sent, none acknowledged: the broker is paused
                assert not any(post.done() for post in posts)
                process.send_signal(signal.SIGTERM)
                await asyncio.sleep(1.0)
                os.kill(broker.pid, signal.SIGCONT)
                return await asyncio.gather(*posts, return_exceptions=True)

        os.kill(broker.pid, signal.SIGSTOP)
        try:
            answers = asyncio.run(in_flight())
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert process.wait(30) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    output = (tmp_path / "uvicorn.log").read_text()
    assert "Application shutdown complete" in output, output
    assert "were not delivered" not in output, output

    for answer in answers:
        assert isinstance(answer, httpx.Response), repr(answer)
        assert answer.status_code in (202, 503), answer.text
    single = [f"sigterm-{i}" for i, answer in enumerate(answers[:-1]) if answer.status_code == 202]
    assert single, "the broker came back within the deadline: requests should have succeeded"
    on_topic = {key for key, _ in read_topic(broker.address, REQUESTS, 1 + len(single))}
    assert {"warm", *single} <= on_topic
    if answers[-1].status_code == 202:
        responses = {key for key, _ in read_topic(broker.address, RESPONSES, 20)}
        assert responses == {f"sigterm-{i}" for i in range(20)}
