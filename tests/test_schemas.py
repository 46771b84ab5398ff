"""Every rule of the event contract (§1), at decode time, with its boundaries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.events import (
    BATCH_MAX_EVENTS,
    MAX_TOKENS,
    LLMRequest,
    LLMResponse,
    batch_decoder,
    check_cache_read,
    encoder,
    event_decoder,
    request_decoder,
    response_decoder,
)
from schemas.rows import MetricsRow, row_decoder, row_encoder

REQUEST = {
    "request_id": "req-1",
    "tenant_id": "acme",
    "route": "/chat",
    "model": "gpt-4o",
    "timestamp": "2026-01-02T03:04:05.123456+00:00",
}
RESPONSE = {"request_id": "req-1", "timestamp": "2026-01-02T03:04:06Z"}


def decode_request(**changes):
    body = {**REQUEST, **changes}
    return request_decoder.decode(msgspec.json.encode({k: v for k, v in body.items() if v is not ...}))


def decode_response(**changes):
    body = {**RESPONSE, **changes}
    return response_decoder.decode(msgspec.json.encode({k: v for k, v in body.items() if v is not ...}))


def rejected(decode, field: str, **changes) -> str:
    with pytest.raises(msgspec.ValidationError) as error:
        decode(**changes)
    message = str(error.value)
    assert field in message, message
    return message


# --- requests -------------------------------------------------------------------------


def test_minimal_request_gets_defaults():
    request = decode_request()
    assert request.prompt_tokens == 0
    assert request.provider is None and request.user_id_hash is None and request.metadata is None
    assert request.timestamp == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


@pytest.mark.parametrize("field", ["request_id", "tenant_id", "route", "model", "timestamp"])
def test_request_required_fields(field):
    message = rejected(decode_request, field, **{field: ...})
    assert "missing required field" in message


@pytest.mark.parametrize("field", ["request_id", "tenant_id"])
def test_identifier_lengths(field):
    assert getattr(decode_request(**{field: "x"}), field) == "x"
    assert getattr(decode_request(**{field: "x" * 128}), field) == "x" * 128
    rejected(decode_request, f"$.{field}", **{field: ""})
    rejected(decode_request, f"$.{field}", **{field: "x" * 129})


@pytest.mark.parametrize("field", ["request_id", "tenant_id"])
@pytest.mark.parametrize("char", ["\x00", "\n", "\t", "\x1f", "\x7f"])
def test_identifiers_refuse_control_characters(field, char):
    rejected(decode_request, f"$.{field}", **{field: f"a{char}b"})


def test_identifiers_accept_unicode():
    assert decode_request(tenant_id="café-東京").tenant_id == "café-東京"


@pytest.mark.parametrize("field", ["route", "model"])
def test_name_lengths(field):
    assert getattr(decode_request(**{field: "r" * 255}), field) == "r" * 255
    rejected(decode_request, f"$.{field}", **{field: ""})
    rejected(decode_request, f"$.{field}", **{field: "r" * 256})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-02T03:04:05Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T05:04:05+02:00", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-01T22:04:05.5-05:00", datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)),
    ],
)
def test_timestamps_normalised_to_utc(text, expected):
    timestamp = decode_request(timestamp=text).timestamp
    assert timestamp == expected
    assert timestamp.utcoffset() == timedelta(0)
    assert timestamp.tzinfo is UTC


@pytest.mark.parametrize("text", ["2026-01-02T03:04:05", "2026-01-02", "yesterday", "", 1767323045])
def test_timestamps_without_offset_or_malformed_are_rejected(text):
    rejected(decode_request, "$.timestamp", timestamp=text)


def test_prompt_tokens_non_negative_integer():
    assert decode_request(prompt_tokens=0).prompt_tokens == 0
    assert decode_request(prompt_tokens=MAX_TOKENS).prompt_tokens == MAX_TOKENS
    rejected(decode_request, "$.prompt_tokens", prompt_tokens=MAX_TOKENS + 1)
    rejected(decode_request, "$.prompt_tokens", prompt_tokens=2**64)
    rejected(decode_request, "$.prompt_tokens", prompt_tokens=-1)
    rejected(decode_request, "$.prompt_tokens", prompt_tokens=1.5)
    rejected(decode_request, "$.prompt_tokens", prompt_tokens="10")
    rejected(decode_request, "$.prompt_tokens", prompt_tokens=True)


def test_user_id_hash_length():
    assert decode_request(user_id_hash="h" * 128).user_id_hash == "h" * 128
    rejected(decode_request, "$.user_id_hash", user_id_hash="h" * 129)


def test_metadata_rules():
    values = {"s": "x", "i": 1, "f": 1.5, "b": True, "n": None}
    assert decode_request(metadata=values).metadata == values
    assert decode_request(metadata={f"k{i}": i for i in range(64)}).metadata is not None
    rejected(decode_request, "$.metadata", metadata={f"k{i}": i for i in range(65)})
    rejected(decode_request, "$.metadata", metadata={"nested": {"a": 1}})
    rejected(decode_request, "$.metadata", metadata={"list": [1]})
    rejected(decode_request, "$.metadata", metadata=["not", "an", "object"])


def test_metadata_encoded_size_limit():
    # {"k":"<v>"} is 8 bytes of overhead around the value.
    at_limit = {"k": "v" * (8192 - 8)}
    assert len(msgspec.json.encode(at_limit)) == 8192
    assert decode_request(metadata=at_limit).metadata == at_limit
    message = rejected(decode_request, "$.metadata", metadata={"k": "v" * (8192 - 7)})
    assert "8192" in message


def test_unknown_fields_are_ignored():
    request = decode_request(future_field={"anything": [1, 2]}, another=3)
    assert not hasattr(request, "future_field")


def test_wrong_types_name_the_field():
    rejected(decode_request, "$.route", route=5)
    rejected(decode_request, "$.model", model=None)


# --- responses ------------------------------------------------------------------------


def test_minimal_response_gets_defaults():
    response = decode_response()
    assert (response.completion_tokens, response.cache_read_tokens, response.reasoning_tokens) == (0, 0, 0)
    assert response.latency_ms is None and response.error is None
    assert not response.failed


@pytest.mark.parametrize("field", ["request_id", "timestamp"])
def test_response_required_fields(field):
    rejected(decode_response, field, **{field: ...})


@pytest.mark.parametrize("field", ["latency_ms", "time_to_first_token_ms"])
def test_durations_non_negative_numbers(field):
    assert getattr(decode_response(**{field: 0}), field) == 0
    assert getattr(decode_response(**{field: 12.5}), field) == 12.5
    rejected(decode_response, f"$.{field}", **{field: -0.001})
    rejected(decode_response, f"$.{field}", **{field: "12"})


@pytest.mark.parametrize("field", ["completion_tokens", "cache_read_tokens", "reasoning_tokens"])
def test_response_token_counts_non_negative(field):
    rejected(decode_response, f"$.{field}", **{field: -1})


def test_reasoning_tokens_are_a_subset_of_completion_tokens():
    assert decode_response(completion_tokens=10, reasoning_tokens=10).reasoning_tokens == 10
    rejected(decode_response, "$.reasoning_tokens", completion_tokens=10, reasoning_tokens=11)


def test_finish_reason_length():
    assert decode_response(finish_reason="s" * 64).finish_reason == "s" * 64
    rejected(decode_response, "$.finish_reason", finish_reason="s" * 65)


@pytest.mark.parametrize(("error", "failed"), [(None, False), ("", False), ("rate_limited", True)])
def test_only_a_non_empty_error_marks_failure(error, failed):
    assert decode_response(error=error).failed is failed


def test_cache_read_tokens_checked_against_the_request():
    request = decode_request(prompt_tokens=100)
    assert check_cache_read(request, decode_response(cache_read_tokens=100)) is None
    message = check_cache_read(request, decode_response(cache_read_tokens=101))
    assert message is not None and "cache_read_tokens" in message


# --- tagged events and batches --------------------------------------------------------


def test_event_decoder_uses_the_type_tag():
    assert isinstance(event_decoder.decode(msgspec.json.encode({**REQUEST, "type": "request"})), LLMRequest)
    assert isinstance(
        event_decoder.decode(msgspec.json.encode({**RESPONSE, "type": "response"})), LLMResponse
    )
    with pytest.raises(msgspec.ValidationError, match=r"\$\.type"):
        event_decoder.decode(msgspec.json.encode({**RESPONSE, "type": "other"}))
    with pytest.raises(msgspec.ValidationError, match="type"):
        event_decoder.decode(msgspec.json.encode(RESPONSE))


def test_single_event_decoders_accept_a_matching_type_only():
    assert request_decoder.decode(msgspec.json.encode({**REQUEST, "type": "request"}))
    with pytest.raises(msgspec.ValidationError, match=r"\$\.type"):
        request_decoder.decode(msgspec.json.encode({**REQUEST, "type": "response"}))


def test_batch_size_limit():
    events = [msgspec.json.encode(REQUEST)] * BATCH_MAX_EVENTS
    body = b'{"events":[' + b",".join(events) + b"]}"
    assert len(batch_decoder.decode(body).events) == BATCH_MAX_EVENTS
    too_many = b'{"events":[' + b",".join(events + events[:1]) + b"]}"
    with pytest.raises(msgspec.ValidationError, match=r"\$\.events"):
        batch_decoder.decode(too_many)


def test_batch_keeps_invalid_events_raw_for_individual_judgement():
    batch = batch_decoder.decode(b'{"events":[{"type":"request"}, 5, "x"]}')
    assert len(batch.events) == 3


def test_malformed_json_is_a_decode_error():
    with pytest.raises(msgspec.DecodeError):
        request_decoder.decode(b'{"request_id": ')


# --- round trips ----------------------------------------------------------------------

identifiers = st.text(alphabet=st.characters(blacklist_categories=["Cc", "Cs"]), min_size=1, max_size=128)
names = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=255)
offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
timestamps = st.builds(
    lambda naive, tz: naive.replace(tzinfo=tz),
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1)),
    offsets,
)
tokens = st.integers(min_value=0, max_value=MAX_TOKENS)
millis = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
metadata_values = st.one_of(
    st.text(max_size=20),
    st.integers(-(2**53), 2**53),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
)


@given(
    request_id=identifiers,
    tenant_id=identifiers,
    route=names,
    model=names,
    timestamp=timestamps,
    prompt_tokens=tokens,
    metadata=st.none() | st.dictionaries(st.text(max_size=10), metadata_values, max_size=8),
)
def test_request_round_trip(request_id, tenant_id, route, model, timestamp, prompt_tokens, metadata):
    request = LLMRequest(
        request_id=request_id,
        tenant_id=tenant_id,
        route=route,
        model=model,
        timestamp=timestamp,
        prompt_tokens=prompt_tokens,
        metadata=metadata,
    )
    decoded = request_decoder.decode(encoder.encode(request))
    assert decoded == request
    assert decoded.timestamp == timestamp  # the same instant, now in UTC
    assert decoded.timestamp.tzinfo is UTC


@given(
    request_id=identifiers,
    timestamp=timestamps,
    latency=st.none() | millis,
    completion=tokens,
    data=st.data(),
    error=st.none() | st.text(max_size=40),
)
def test_response_round_trip(request_id, timestamp, latency, completion, data, error):
    reasoning = data.draw(st.integers(min_value=0, max_value=completion))
    response = LLMResponse(
        request_id=request_id,
        timestamp=timestamp,
        latency_ms=latency,
        completion_tokens=completion,
        reasoning_tokens=reasoning,
        error=error,
    )
    decoded = event_decoder.decode(encoder.encode(response))
    assert decoded == response
    assert decoded.failed is bool(error)


def test_metrics_row_round_trip_and_key():
    start = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
    row = MetricsRow(
        tenant_id="acme",
        route="/chat",
        model="gpt-4o",
        window_start=start,
        window_end=start + timedelta(minutes=1),
        requests=3,
        errors=1,
        timeouts=1,
        avg_latency_ms=10.0,
        p50_latency_ms=9.0,
        p95_latency_ms=11.0,
        p99_latency_ms=11.0,
        avg_time_to_first_token_ms=None,
        prompt_tokens=30,
        completion_tokens=20,
        cache_read_tokens=5,
        reasoning_tokens=0,
        avg_prompt_tokens=15.0,
        avg_completion_tokens=10.0,
        estimated_cost_usd=0.0012,
        unpriced_requests=0,
        revision=2,
    )
    assert row_decoder.decode(row_encoder.encode(row)) == row
    assert row.kafka_key() == b"acme|/chat|gpt-4o|2026-01-02T03:04:00+00:00"
