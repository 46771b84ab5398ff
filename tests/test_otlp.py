"""``POST /v1/traces``: OTLP/HTTP trace exports, GenAI spans become request and response events;
``gen_ai.evaluation.result`` span events, and log records on ``POST /v1/logs``, become evaluations.

The mapping (:mod:`api.otlp`) is tested directly on spans built here; the endpoint over
real HTTP against a real broker and real API keys in a real Postgres, with the real
OpenTelemetry SDK exporter, hand-built OTLP JSON, the ``openai`` client instrumented by
``opentelemetry-instrumentation-openai-v2`` against a fake OpenAI-compatible server, and
the dataflow through to rows. Expected events and rows are computed here from the spans
sent, following the mapping table of docs/otlp.md; the metadata of spans with many or
unusual attributes is written out by hand.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from google.rpc import code_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import (
    InMemoryLogRecordExporter,
    LogRecordExportResult,
    SimpleLogRecordProcessor,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status as SdkStatus
from opentelemetry.trace import StatusCode
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api import otlp
from api.body import BodyError
from api.ingestion import create_app
from api.keys import create_key
from schemas.config import Settings
from schemas.database import ensure_schema
from schemas.events import (
    LLMEvaluation,
    LLMRequest,
    LLMResponse,
    encoder,
    evaluation_decoder,
    request_decoder,
    response_decoder,
)
from schemas.topics import EVALUATIONS, REQUESTS, RESPONSES, ensure_topics
from tests.support import dataflow as h
from tests.support.servers import serving
from tests.support.spans import (
    EPOCH,
    PROTOBUF,
    SpanSpec,
    any_value,
    genai_specs,
    is_call,
    proto_attributes,
    proto_export,
    proto_span,
    recent,
    serials,
    with_ids,
)
from tests.support.stacks import TEST_PARTITIONS, Broker, Postgres
from tests.support.topics import read_topic

JSON = {"Content-Type": "application/json"}


# -- spans as a test describes them ------------------------------------------------


# The attributes docs/otlp.md's table reads an event field from: not repeated in metadata.
FIELD_SOURCES = {
    "gen_ai.system", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model",
    "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.usage.prompt_tokens",
    "gen_ai.usage.completion_tokens", "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.reasoning.output_tokens", "gen_ai.response.finish_reasons",
    "gen_ai.response.time_to_first_chunk", "gen_ai.server.time_to_first_token", "error.type",
    "streamlens.route", "streamlens.tenant_id",
}  # fmt: skip


def expected_metadata(resource: dict[str, Any], attributes: dict[str, Any]) -> dict[str, Any] | None:
    """docs/otlp.md's metadata rule for plain attributes (few, short, with ordinary names):
    the scalars that are no field's source, the span's over the resource's."""

    def scalars(pairs: dict[str, Any]) -> dict[str, Any]:
        scalar = str | bool | int | float
        return {k: v for k, v in pairs.items() if k not in FIELD_SOURCES and isinstance(v, scalar)}

    return {**scalars(resource), **scalars(attributes)} or None


def expected_call(
    spec: SpanSpec, tenant: str, service: str, resource: dict[str, Any] | None = None
) -> tuple[LLMRequest, LLMResponse]:
    """docs/otlp.md's mapping table, applied by hand; ``resource``: the resource's attributes
    when they are more than ``service.name``."""
    a = spec.attributes
    request_id = f"{spec.trace_id:032x}{spec.span_id:016x}"
    start = spec.start  # the 789 ns past it are below a microsecond
    end = EPOCH + timedelta(microseconds=spec.end_ns // 1000)
    ttft = a.get("gen_ai.response.time_to_first_chunk")
    reasons = a.get("gen_ai.response.finish_reasons")
    error = a.get("error.type") or spec.error
    request = LLMRequest(
        request_id=request_id,
        tenant_id=tenant,
        route=a.get("streamlens.route", service),
        model=a.get("gen_ai.response.model", a.get("gen_ai.request.model")),
        timestamp=start,
        prompt_tokens=a.get("gen_ai.usage.input_tokens", a.get("gen_ai.usage.prompt_tokens", 0)),
        provider=a.get("gen_ai.provider.name", a.get("gen_ai.system")),
        metadata=expected_metadata({"service.name": service} if resource is None else resource, a),
    )
    response = LLMResponse(
        request_id=request_id,
        tenant_id=tenant,
        timestamp=end,
        latency_ms=spec.duration_ns / 1e6,
        completion_tokens=a.get("gen_ai.usage.output_tokens", a.get("gen_ai.usage.completion_tokens", 0)),
        cache_read_tokens=a.get("gen_ai.usage.cache_read.input_tokens", 0),
        reasoning_tokens=a.get("gen_ai.usage.reasoning.output_tokens", 0),
        time_to_first_token_ms=None if ttft is None else ttft * 1000,
        finish_reason=None if reasons is None else reasons[0],
        error=error,
    )
    return request, response


# -- building OTLP by hand ----------------------------------------------------------


def json_value(value: Any) -> dict[str, Any]:
    """OTLP JSON: 64-bit integers as strings, bytes in base64, NaN and infinities as strings."""
    if value is None:
        return {}
    if isinstance(value, bytes):
        return {"bytesValue": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {"kvlistValue": {"values": json_attributes(value)}}
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        if not math.isfinite(value):
            return {"doubleValue": "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")}
        return {"doubleValue": value}
    if isinstance(value, tuple | list):
        return {"arrayValue": {"values": [json_value(v) for v in value]}}
    return {"stringValue": value}


def json_attributes(attributes: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": json_value(v)} for k, v in attributes.items()]


def json_export(
    specs: list[SpanSpec], service: str, resource: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An export as OTLP JSON, written by hand: hex ids, integer enums, an unknown field."""
    spans = []
    for spec in specs:
        span: dict[str, Any] = {
            "traceId": f"{spec.trace_id:032x}",
            "spanId": f"{spec.span_id:016x}",
            "name": spec.name,
            "kind": 3,
            "startTimeUnixNano": str(spec.start_ns),
            "endTimeUnixNano": spec.end_ns,  # a number is allowed as well
            "attributes": json_attributes(spec.attributes),
            "someFutureField": {"x": 1},
        }
        if spec.error is not None:
            span["status"] = {"code": 2, "message": spec.error}
        spans.append(span)
    return {"resourceSpans": [{
        "resource": {"attributes": json_attributes({"service.name": service, **(resource or {})})},
        "scopeSpans": [{"scope": {"name": "hand-built"}, "spans": spans}],
    }]}  # fmt: skip


# -- the mapping, unit-tested ---------------------------------------------------------


def mapped_calls(
    specs: list[SpanSpec],
    service: str = "svc",
    tenant: str | None = "acme",
    resource: dict[str, Any] | None = None,
) -> otlp.Mapped:
    return otlp.calls_from_export(proto_export(specs, service, resource), tenant)


def test_genai_spans_map_to_the_events_of_the_readme_table() -> None:
    specs = with_ids(genai_specs(recent(), route="/support"), 1)
    specs[3].attributes["streamlens.route"] = "/legacy"
    mapped = mapped_calls(specs, service="chat-service")
    assert mapped.rejected == []
    assert mapped.calls == [expected_call(s, "acme", "chat-service") for s in specs if is_call(s)]
    first_request, first_response = mapped.calls[0]
    # Spelled out for the first span, without expected_call.
    assert first_request.request_id == f"{specs[0].trace_id:032x}{specs[0].span_id:016x}"
    assert first_request.metadata == {"service.name": "chat-service", "gen_ai.operation.name": "chat"}
    assert mapped.calls[3][0].metadata == {"service.name": "chat-service"}  # every attribute fills a field
    assert first_request.model == "gpt-4o-2024-08-06"
    assert (first_request.prompt_tokens, first_response.cache_read_tokens) == (1200, 1024)
    assert first_response.latency_ms == pytest.approx(812.345678)
    assert mapped.calls[1][1].time_to_first_token_ms == pytest.approx(412.5)
    assert (mapped.calls[2][1].error, mapped.calls[3][1].error) == ("RateLimitError", "overloaded")
    assert mapped.calls[3][0].provider == "anthropic"


def test_the_route_is_the_span_attribute_else_the_service_name() -> None:
    spec = with_ids(genai_specs(recent())[:1], 2)
    assert mapped_calls(spec, service="billing").calls[0][0].route == "billing"
    spec[0].attributes["streamlens.route"] = "/per-call"
    assert mapped_calls(spec, service="billing").calls[0][0].route == "/per-call"


def test_cached_tokens_stay_inside_prompt_tokens() -> None:
    # OpenTelemetry counts cached tokens inside input_tokens, as StreamLens counts
    # cache_read_tokens inside prompt_tokens: both pass through unchanged.
    spec = with_ids(genai_specs(recent())[:1], 3)
    request, response = mapped_calls(spec).calls[0]
    assert (request.prompt_tokens, response.cache_read_tokens) == (1200, 1024)
    spec[0].attributes["gen_ai.usage.cache_read.input_tokens"] = 1201
    mapped = mapped_calls(spec)
    assert mapped.calls == []
    assert len(mapped.rejected) == 1
    assert "gen_ai.usage.cache_read.input_tokens exceeds gen_ai.usage.input_tokens" in mapped.rejected[0]


def test_a_status_error_without_description_or_type_is_still_an_error() -> None:
    spec = with_ids(
        [
            SpanSpec(
                "chat m",
                recent(),
                1000,
                {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"},
                error="",
            )
        ],
        4,
    )
    assert mapped_calls(spec).calls[0][1].error == "error"
    spec[0].error = None
    spec[0].attributes["error.type"] = "timeout"  # error.type alone marks a failure too
    assert mapped_calls(spec).calls[0][1].error == "timeout"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"gen_ai.usage.input_tokens": "12"}, "gen_ai.usage.input_tokens: expected an integer, got string"),
        ({"gen_ai.usage.output_tokens": 2.5}, "gen_ai.usage.output_tokens: expected an integer, got double"),
        ({"gen_ai.usage.input_tokens": -1}, "at `$.prompt_tokens` (from gen_ai.usage.input_tokens)"),
        ({"gen_ai.usage.reasoning.output_tokens": 97}, "(from gen_ai.usage.reasoning.output_tokens)"),
        ({"gen_ai.request.model": 4}, "gen_ai.request.model: expected a string, got int"),
        ({"gen_ai.response.model": "m" * 256}, "(from gen_ai.response.model or gen_ai.request.model)"),
        ({"streamlens.route": ""}, "no route"),
        ({"streamlens.tenant_id": "globex"}, None),  # judged by the endpoint against the key
        ({"gen_ai.response.finish_reasons": 3}, "gen_ai.response.finish_reasons: expected an array"),
        ({"gen_ai.response.time_to_first_chunk": -0.1}, "(from gen_ai.response.time_to_first_chunk)"),
        ({"gen_ai.request.model": "", "gen_ai.response.model": ""}, "neither gen_ai.response.model"),
    ],
)
def test_a_broken_genai_span_is_rejected_naming_its_attribute(
    change: dict[str, Any], named: str | None
) -> None:
    spec = with_ids(genai_specs(recent())[:1], 5)
    spec[0].attributes.update(change)
    mapped = mapped_calls(spec, service="" if "streamlens.route" in change else "svc")
    if named is None:
        assert mapped.rejected == [] and mapped.calls[0][0].tenant_id == "globex"
        return
    assert mapped.calls == []
    assert len(mapped.rejected) == 1
    assert named in mapped.rejected[0]
    assert f"{spec[0].trace_id:032x}/{spec[0].span_id:016x}" in mapped.rejected[0]


def test_broken_span_framing_is_rejected() -> None:
    base = with_ids(genai_specs(recent())[:1], 6)[0]
    cases = {
        "trace_id": proto_span(base),
        "span_id": proto_span(base),
        "required": proto_span(base),
        "before": proto_span(base),
    }
    cases["trace_id"].trace_id = bytes(16)
    cases["span_id"].span_id = b"\x01\x02"
    cases["required"].start_time_unix_nano = 0
    cases["before"].end_time_unix_nano = base.start_ns - 1
    for expected, span in cases.items():
        with pytest.raises(otlp.SpanRejected, match=expected):
            otlp.call_from_span(span, {}, "acme")


def test_without_a_key_a_span_names_its_tenant() -> None:
    spec = with_ids(genai_specs(recent())[:1], 7)
    mapped = mapped_calls(spec, tenant=None)
    assert mapped.calls == [] and "no tenant" in mapped.rejected[0]
    spec[0].attributes["streamlens.tenant_id"] = "initech"
    assert mapped_calls(spec, tenant=None).calls[0][0].tenant_id == "initech"


def test_otlp_json_decodes_to_the_same_export_as_protobuf() -> None:
    specs = with_ids(genai_specs(recent()), 8)
    from_json = otlp.decode_export(json.dumps(json_export(specs, "svc")).encode(), "json")
    from_proto = otlp.decode_export(proto_export(specs, "svc").SerializeToString(), "protobuf")
    assert from_json.resource_spans[0].scope_spans[0].spans[0].kind == Span.SPAN_KIND_CLIENT
    assert otlp.calls_from_export(from_json, "acme") == otlp.calls_from_export(from_proto, "acme")
    assert from_json.resource_spans[0].scope_spans[0].spans[0].trace_id == specs[0].trace_id.to_bytes(
        16, "big"
    )


def test_bodies_that_are_not_otlp_are_refused_with_their_status() -> None:
    cases: list[tuple[int, str, Any]] = [
        (400, "not an OTLP protobuf", lambda: otlp.decode_export(b"\xff\xff\xff", "protobuf")),
        (400, "not JSON", lambda: otlp.decode_export(b"{", "json")),
        (400, "not a JSON object", lambda: otlp.decode_export(b"[]", "json")),
        (400, "is not hex", lambda: otlp.decode_export(
            b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"xyz"}]}]}]}', "json")),
        (400, "not an OTLP JSON export", lambda: otlp.decode_export(b'{"resourceSpans": 3}', "json")),
        (400, "not valid gzip", lambda: otlp.decompress(b"not gzip", "gzip")),
        (400, "truncated", lambda: otlp.decompress(gzip.compress(b"x" * 100)[:-12], "gzip")),
        (413, "exceeds 1 MiB", lambda: otlp.decompress(gzip.compress(bytes(2 << 20)), "gzip", 1 << 20)),
        (415, "'br'", lambda: otlp.decompress(b"x", "br")),
        (415, "not OTLP", lambda: otlp.request_encoding("text/plain")),
        (415, "missing", lambda: otlp.request_encoding(None)),
    ]  # fmt: skip
    for status, words, call in cases:
        with pytest.raises(BodyError) as raised:
            call()
        assert (raised.value.status, words in raised.value.detail) == (status, True), raised.value.detail
    two_members = gzip.compress(b"ab") + gzip.compress(b"cd")
    assert otlp.decompress(two_members, "gzip") == b"abcd"
    assert otlp.request_encoding("application/x-protobuf") == "protobuf"
    assert otlp.request_encoding("Application/JSON; charset=utf-8") == "json"


# -- attributes as metadata -----------------------------------------------------------

METADATA_SERVICE = "checkout"
# Each kind of attribute the rule tells apart, on the resource and on the span.
METADATA_RESOURCE: dict[str, Any] = {
    "service.version": "1.4.2",
    "deployment.environment.name": "prod",
    "team": "search",
    "shared": "from the resource",
    "process.command_args": ("python", "app.py"),  # an array
    "streamlens.tenant_id": "acme",  # the tenant's source
    "host.id": b"\x01\x02",  # bytes
}
METADATA_SPAN: dict[str, Any] = {
    "gen_ai.operation.name": "chat",
    "gen_ai.provider.name": "openai",
    "gen_ai.request.model": "gpt-4o",
    "gen_ai.response.model": "gpt-4o-2024-08-06",
    "gen_ai.usage.input_tokens": 10,
    "gen_ai.usage.output_tokens": 5,
    "gen_ai.response.finish_reasons": ("stop",),
    "streamlens.route": "/checkout",
    "error.type": "Timeout",
    "gen_ai.request.temperature": 0.25,
    "gen_ai.request.max_tokens": 512,
    "gen_ai.request.stop_sequences": ("\n\n",),
    "gen_ai.input.messages": '[{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]',
    "gen_ai.prompt.0.content": "hi",
    "gen_ai.completion.0.content": "hello",
    "shared": "from the span",
    "server.port": 443,
    "cache.hit": True,
    "cache.miss": False,
    "retries": 0,
    "empty": "",
    "int.max": 2**63 - 1,
    "int.min": -(2**63),
    "ratio.nan": math.nan,
    "ratio.inf": math.inf,
    "blob": b"\x00",
    "nested": {"a": 1},
    "unset": None,
    "bad\nkey": "a newline in the name",
    "del\x7fkey": "a DEL in the name",
    "": "no name",
    "n" * 129: "a name too long for a dimension",
    "m" * 128: "the longest name",
    "note": "é" * 300,
    "unicode.名前": "値",
}
METADATA_EXPECTED: dict[str, Any] = {
    "service.name": "checkout",
    "service.version": "1.4.2",
    "deployment.environment.name": "prod",
    "team": "search",
    "shared": "from the span",
    "gen_ai.operation.name": "chat",
    "gen_ai.request.temperature": 0.25,
    "gen_ai.request.max_tokens": 512,
    "server.port": 443,
    "cache.hit": True,
    "cache.miss": False,
    "retries": 0,
    "empty": "",
    "int.max": 9223372036854775807,
    "int.min": -9223372036854775808,
    "m" * 128: "the longest name",
    "note": "é" * 128,
    "unicode.名前": "値",
}

# More than 64: three names that come first, then by name until 64 are kept.
MANY_RESOURCE: dict[str, Any] = {"deployment.environment": "staging", "zeta.resource": "after attr.*"}
MANY_SPAN: dict[str, Any] = {
    "gen_ai.operation.name": "chat",  # after attr.*: left out
    "gen_ai.request.model": "m",
    "service.version": "2.0",
    **{f"attr.{n:02d}": n for n in range(70)},
}
MANY_EXPECTED: dict[str, Any] = {
    "service.name": "many",
    "service.version": "2.0",
    "deployment.environment": "staging",
    **{f"attr.{n:02d}": n for n in range(61)},
}

# Over 8 KiB in 44 keys. Encoded, "service.name":"big" takes 20 bytes, then by name
# "gen_ai.operation.name":"chat" 30, each "k<nn>xxx…":"vvv…" (a 120-character name,
# the value cut to 128) 253, "note":"éé…" 265 (é is 2 bytes), "zz":1 6; plus the
# braces and a comma between entries. With k00-k31: 2 + 20 + 30 + 32 × 253 + 33
# commas = 8181; k32 would make it 8435 and "note" 8447, both over 8192; "zz" makes 8188.
BIG_SPAN: dict[str, Any] = {
    "gen_ai.operation.name": "chat",
    "gen_ai.request.model": "m",
    **{f"k{n:02d}" + "x" * 117: "v" * 200 for n in range(40)},
    "note": "é" * 300,
    "zz": 1,
}
BIG_EXPECTED: dict[str, Any] = {
    "service.name": "big",
    "gen_ai.operation.name": "chat",
    **{f"k{n:02d}" + "x" * 117: "v" * 128 for n in range(32)},
    "zz": 1,
}


def metadata_exports(test_number: int) -> list[tuple[SpanSpec, str, dict[str, Any], dict[str, Any]]]:
    """(span, service.name, the resource's other attributes, the metadata expected) for each case."""
    start = recent()
    cases = [
        ("every kind", METADATA_SERVICE, METADATA_RESOURCE, METADATA_SPAN, METADATA_EXPECTED),
        ("many", "many", MANY_RESOURCE, MANY_SPAN, MANY_EXPECTED),
        ("big", "big", {}, BIG_SPAN, BIG_EXPECTED),
    ]
    specs = [SpanSpec(name, start, 1_000_000, dict(span)) for name, _, _, span, _ in cases]
    with_ids(specs, test_number)
    return [
        (spec, service, resource, expected)
        for spec, (_, service, resource, _, expected) in zip(specs, cases, strict=True)
    ]


def encoded(spec: SpanSpec, service: str, resource: dict[str, Any], encoding: str) -> bytes:
    if encoding == "protobuf":
        return proto_export([spec], service, resource).SerializeToString()
    return json.dumps(json_export([spec], service, resource)).encode()


@pytest.mark.parametrize("encoding", ["protobuf", "json"])
def test_resource_and_span_attributes_become_the_request_metadata(encoding: otlp.Encoding) -> None:
    for spec, service, resource, expected in metadata_exports(9):
        export = otlp.decode_export(encoded(spec, service, resource, encoding), encoding)
        mapped = otlp.calls_from_export(export, "acme")
        assert mapped.rejected == [], mapped.rejected
        [(request, _)] = mapped.calls
        assert request.metadata == expected, spec.name
        assert len(request.metadata) <= 64 and len(encoder.encode(request.metadata)) <= 8192
        # The event on the topic is the request encoded; it decodes to the same metadata.
        assert request_decoder.decode(encoder.encode(request)).metadata == expected


def test_which_attributes_are_kept_does_not_depend_on_their_order() -> None:
    shuffle = random.Random(11).shuffle
    for spec, service, resource, expected in metadata_exports(10):
        for _ in range(3):
            pairs = list(spec.attributes.items())
            shuffle(pairs)
            resource_pairs = list(resource.items())
            shuffle(resource_pairs)
            spec.attributes = dict(pairs)
            [(request, _)] = mapped_calls([spec], service, resource=dict(resource_pairs)).calls
            assert request.metadata == expected, spec.name


def test_a_span_attribute_hides_a_resource_attribute_only_when_kept() -> None:
    spec = with_ids(genai_specs(recent())[:1], 11)[0]
    spec.attributes.update({"region": ("eu", "us"), "tier": "gold"})
    [(request, _)] = mapped_calls([spec], "svc", resource={"region": "eu", "tier": "silver"}).calls
    # The span's array is left out on its own: the resource's region stays.
    assert request.metadata == {
        "service.name": "svc", "region": "eu", "tier": "gold", "gen_ai.operation.name": "chat"
    }  # fmt: skip


def test_without_other_attributes_there_is_no_metadata() -> None:
    spec = with_ids(genai_specs(recent())[3:4], 12)[0]  # gen_ai.system, model, tokens
    spec.attributes["streamlens.route"] = "/r"  # every attribute fills a field
    call = otlp.call_from_span(proto_span(spec), {}, "acme")
    assert call is not None and call[0].metadata is None


# -- evaluation events, unit-tested -------------------------------------------------------

EVALUATION = "gen_ai.evaluation.result"
EVALUATION_ATTRIBUTES: dict[str, Any] = {
    "gen_ai.evaluation.name": "relevance",
    "gen_ai.evaluation.score.value": 0.83,
    "gen_ai.evaluation.score.label": "relevant",
    "gen_ai.evaluation.explanation": "answers the question asked",
}


def at_ns(moment: datetime) -> int:
    """``moment`` (whole microseconds) in Unix nanoseconds, and 456 ns past it."""
    return (moment - EPOCH) // timedelta(microseconds=1) * 1000 + 456


def request_id_of(trace_id: int, span_id: int) -> str:
    return f"{trace_id:032x}{span_id:016x}"


def expected_evaluation(
    request_id: str, tenant: str, attributes: dict[str, Any], unix_nano: int
) -> LLMEvaluation:
    """docs/otlp.md's evaluation mapping, applied by hand."""
    score = attributes.get("gen_ai.evaluation.score.value")
    return LLMEvaluation(
        request_id=request_id,
        tenant_id=tenant,
        name=attributes["gen_ai.evaluation.name"],
        timestamp=EPOCH + timedelta(microseconds=unix_nano // 1000),
        score=None if score is None else float(score),
        label=attributes.get("gen_ai.evaluation.score.label"),
        evaluator=None,
        explanation=attributes.get("gen_ai.evaluation.explanation"),
    )


def by_call(evaluations: list[LLMEvaluation]) -> list[LLMEvaluation]:
    return sorted(evaluations, key=lambda e: (e.request_id, e.name, e.timestamp))


def with_events(span: Span, *events: tuple[str, int, dict[str, Any]]) -> Span:
    """``span`` with these (name, time, attributes) events added."""
    for name, unix_nano, attributes in events:
        span.events.add(name=name, time_unix_nano=unix_nano, attributes=proto_attributes(attributes))
    return span


def trace_export(spans: list[Span], resource: dict[str, Any] | None = None) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource={"attributes": proto_attributes({"service.name": "svc", **(resource or {})})},
        scope_spans=[ScopeSpans(spans=spans)],
    )])  # fmt: skip


def test_evaluation_span_events_are_about_the_call_of_their_span() -> None:
    start = recent()
    specs = genai_specs(start)
    call, other = with_ids([specs[0], specs[4]], 40)  # a chat span, an HTTP span
    other.attributes["streamlens.tenant_id"] = "initech"
    judged = at_ns(start + timedelta(seconds=5))
    whole_score = {"gen_ai.evaluation.name": "toxicity", "gen_ai.evaluation.score.value": 0}
    spans = [
        with_events(
            proto_span(call),
            (EVALUATION, judged, EVALUATION_ATTRIBUTES),
            ("gen_ai.client.inference.operation.details", judged, {"gen_ai.evaluation.name": "not this"}),
        ),
        with_events(proto_span(other), (EVALUATION, judged + 1000, whole_score)),
    ]
    mapped = otlp.calls_from_export(trace_export(spans), "acme")
    assert (mapped.rejected, mapped.rejected_evaluations) == ([], 0)
    [(request, _)] = mapped.calls
    call_id = request_id_of(call.trace_id, call.span_id)
    assert request.request_id == call_id
    assert mapped.evaluations == [
        expected_evaluation(call_id, "acme", EVALUATION_ATTRIBUTES, judged),
        expected_evaluation(
            request_id_of(other.trace_id, other.span_id), "initech", whole_score, judged + 1000
        ),
    ]
    # Spelled out, without expected_evaluation.
    first, second = mapped.evaluations
    assert (first.name, first.score, first.label, first.evaluator) == ("relevance", 0.83, "relevant", None)
    assert first.timestamp == start + timedelta(seconds=5)
    assert (second.score, second.label, second.explanation) == (0.0, None, None)
    # The resource's tenant comes before the key's, the span's before the resource's.
    tenants = otlp.calls_from_export(trace_export(spans, {"streamlens.tenant_id": "hooli"}), "acme")
    assert [e.tenant_id for e in tenants.evaluations] == ["hooli", "initech"]


def test_a_broken_evaluation_event_costs_neither_the_call_nor_the_other_events() -> None:
    valid, broken_call = with_ids(genai_specs(recent())[:2], 41)
    broken_call.attributes["gen_ai.usage.input_tokens"] = "many"
    nameless = {k: v for k, v in EVALUATION_ATTRIBUTES.items() if k != "gen_ai.evaluation.name"}
    at = valid.end_ns
    spans = [
        with_events(proto_span(valid), (EVALUATION, at, nameless), (EVALUATION, at, EVALUATION_ATTRIBUTES)),
        with_events(proto_span(broken_call), (EVALUATION, at, EVALUATION_ATTRIBUTES)),
    ]
    mapped = otlp.calls_from_export(trace_export(spans), "acme")
    assert [request.request_id for request, _ in mapped.calls] == [
        request_id_of(valid.trace_id, valid.span_id)
    ]
    assert mapped.evaluations == [
        expected_evaluation(request_id_of(spec.trace_id, spec.span_id), "acme", EVALUATION_ATTRIBUTES, at)
        for spec in (valid, broken_call)
    ]
    assert mapped.rejected_evaluations == 1 and len(mapped.rejected) == 2
    event, span = mapped.rejected
    assert event == (
        f"span {valid.trace_id:032x}/{valid.span_id:016x} ('chat gpt-4o'), event 0 "
        "(gen_ai.evaluation.result): gen_ai.evaluation.name is required"
    )
    assert span.startswith(f"span {broken_call.trace_id:032x}/") and "gen_ai.usage.input_tokens" in span


@dataclass
class RecordSpec:
    """One log record to send: ids 0 for a record outside any span."""

    attributes: dict[str, Any]
    event_name: str = EVALUATION
    time_ns: int = 0
    observed_ns: int = 0
    trace_id: int = 0
    span_id: int = 0
    body: str | None = None


def proto_record(spec: RecordSpec) -> LogRecord:
    return LogRecord(
        event_name=spec.event_name,
        time_unix_nano=spec.time_ns,
        observed_time_unix_nano=spec.observed_ns,
        trace_id=spec.trace_id.to_bytes(16, "big") if spec.trace_id else b"",
        span_id=spec.span_id.to_bytes(8, "big") if spec.span_id else b"",
        attributes=proto_attributes(spec.attributes),
        body=any_value(spec.body),
    )


def logs_export(specs: list[RecordSpec], resource: dict[str, Any] | None = None) -> ExportLogsServiceRequest:
    return ExportLogsServiceRequest(resource_logs=[ResourceLogs(
        resource={"attributes": proto_attributes({"service.name": "evaluator", **(resource or {})})},
        scope_logs=[ScopeLogs(log_records=[proto_record(spec) for spec in specs])],
    )])  # fmt: skip


def json_logs(specs: list[RecordSpec], resource: dict[str, Any] | None = None) -> dict[str, Any]:
    """A log export as OTLP JSON, written by hand: hex ids, 64-bit integers as strings, an unknown field."""
    records = []
    for spec in specs:
        record: dict[str, Any] = {
            "timeUnixNano": str(spec.time_ns),
            "observedTimeUnixNano": str(spec.observed_ns),
            "attributes": json_attributes(spec.attributes),
            "someFutureField": [1],
        }
        if spec.event_name:
            record["eventName"] = spec.event_name
        if spec.trace_id:
            record["traceId"], record["spanId"] = f"{spec.trace_id:032x}", f"{spec.span_id:016x}"
        if spec.body is not None:
            record["body"] = json_value(spec.body)
        records.append(record)
    return {"resourceLogs": [{
        "resource": {"attributes": json_attributes({"service.name": "evaluator", **(resource or {})})},
        "scopeLogs": [{"scope": {"name": "hand-built"}, "logRecords": records}],
    }]}  # fmt: skip


def log_specs(test_number: int, start: datetime) -> list[RecordSpec]:
    """An evaluation in a span, two outside any (one in the older form), a record that is no evaluation."""
    made, observed = at_ns(start), at_ns(start + timedelta(seconds=1))
    ids = {"trace_id": (test_number << 64) | next(serials), "span_id": 0xEEE0_0000_0000_0000 | next(serials)}
    return [
        RecordSpec(EVALUATION_ATTRIBUTES, time_ns=made, observed_ns=observed, **ids),
        RecordSpec({
            "gen_ai.evaluation.name": "user_feedback", "gen_ai.evaluation.score.label": "thumbs_up",
            "gen_ai.response.id": f"chatcmpl-{test_number}-{next(serials)}", "streamlens.tenant_id": "acme",
        }, observed_ns=observed),
        RecordSpec({
            **EVALUATION_ATTRIBUTES, "event.name": EVALUATION,
            "gen_ai.response.id": f"chatcmpl-{test_number}-{next(serials)}",
        }, event_name="", time_ns=made),
        RecordSpec({"http.route": "/judge"}, event_name="", time_ns=made, body="judged 3 answers"),
    ]  # fmt: skip


def expected_log_evaluations(specs: list[RecordSpec], tenant: str) -> list[LLMEvaluation]:
    """docs/otlp.md's mapping of log records, applied by hand."""
    found = []
    for spec in specs:
        attributes = spec.attributes
        if EVALUATION not in (spec.event_name, attributes.get("event.name")):
            continue
        if spec.trace_id:
            request_id = request_id_of(spec.trace_id, spec.span_id)
        else:
            request_id = attributes["gen_ai.response.id"]
        record_tenant = attributes.get("streamlens.tenant_id", tenant)
        found.append(
            expected_evaluation(request_id, record_tenant, attributes, spec.time_ns or spec.observed_ns)
        )
    return found


def test_an_evaluation_log_record_is_about_the_span_of_its_context_else_the_response_id() -> None:
    start = recent()
    specs = log_specs(42, start)
    specs[1].attributes["streamlens.tenant_id"] = "initech"
    # A response id beside a span context: the span is the call.
    specs.append(replace(specs[0], attributes={**EVALUATION_ATTRIBUTES, "gen_ai.response.id": "chatcmpl-x"}))
    found = otlp.evaluations_from_logs(logs_export(specs), "acme")
    assert found.rejected == []
    assert found.evaluations == expected_log_evaluations(specs, "acme")
    in_span, feedback, older, beside = found.evaluations
    # Spelled out, without expected_log_evaluations.
    assert in_span.request_id == beside.request_id == f"{specs[0].trace_id:032x}{specs[0].span_id:016x}"
    assert (feedback.request_id, older.request_id) == (
        specs[1].attributes["gen_ai.response.id"], specs[2].attributes["gen_ai.response.id"])  # fmt: skip
    assert (feedback.tenant_id, feedback.score, feedback.label) == ("initech", None, "thumbs_up")
    # time_unix_nano, else the observed time.
    assert (in_span.timestamp, feedback.timestamp) == (start, start + timedelta(seconds=1))
    # The record's tenant comes before the resource's, the resource's before the key's.
    with_resource = otlp.evaluations_from_logs(logs_export(specs, {"streamlens.tenant_id": "hooli"}), "acme")
    assert [e.tenant_id for e in with_resource.evaluations] == ["hooli", "initech", "hooli", "hooli"]


def test_log_records_that_are_not_evaluation_events_are_ignored() -> None:
    at = at_ns(recent())
    specs = [
        RecordSpec({}, event_name="", time_ns=at, body="GET /health 200"),
        RecordSpec(EVALUATION_ATTRIBUTES, event_name="gen_ai.client.inference.operation.details", time_ns=at),
        RecordSpec({**EVALUATION_ATTRIBUTES, "event.name": "gen_ai.choice"}, event_name="", time_ns=at),
        RecordSpec({**EVALUATION_ATTRIBUTES, "event.name": 3}, event_name="", time_ns=at),
        # The record's own event name is its name, whatever the older attribute says.
        RecordSpec({**EVALUATION_ATTRIBUTES, "event.name": EVALUATION}, event_name="app.other", time_ns=at),
        # Not evaluations, so not rejected for what an evaluation would lack.
        RecordSpec({}, event_name="app.started"),
    ]
    found = otlp.evaluations_from_logs(logs_export(specs), "acme")
    assert (found.evaluations, found.rejected) == ([], [])


VALID_RECORD = RecordSpec(
    {**EVALUATION_ATTRIBUTES, "gen_ai.response.id": "chatcmpl-1"}, time_ns=1_700_000_000 * 10**9
)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"gen_ai.evaluation.name": None}, "gen_ai.evaluation.name is required"),
        ({"gen_ai.evaluation.name": 7}, "gen_ai.evaluation.name: expected a string, got int"),
        ({"gen_ai.evaluation.name": "n" * 65}, "at `$.name` (from gen_ai.evaluation.name)"),
        ({"gen_ai.evaluation.name": "bad\nname"}, "at `$.name` (from gen_ai.evaluation.name)"),
        (
            {"gen_ai.evaluation.score.value": None, "gen_ai.evaluation.score.label": None},
            "neither gen_ai.evaluation.score.value nor gen_ai.evaluation.score.label is set",
        ),
        (
            {"gen_ai.evaluation.score.value": "high"},
            "gen_ai.evaluation.score.value: expected a number, got string",
        ),
        (
            {"gen_ai.evaluation.score.value": True},
            "gen_ai.evaluation.score.value: expected a number, got bool",
        ),
        ({"gen_ai.evaluation.score.value": math.nan}, "at `$.score` (from gen_ai.evaluation.score.value)"),
        ({"gen_ai.evaluation.score.label": "l" * 65}, "at `$.label` (from gen_ai.evaluation.score.label)"),
        (
            {"gen_ai.evaluation.explanation": "é" * 2049},
            "at `$.explanation` (from gen_ai.evaluation.explanation)",
        ),
        ({"gen_ai.response.id": None}, "no span context (trace_id and span_id) and no gen_ai.response.id"),
        ({"gen_ai.response.id": "r" * 129}, "at `$.request_id` (from gen_ai.response.id)"),
        ({"streamlens.tenant_id": "bad\ttenant"}, "at `$.tenant_id` (from streamlens.tenant_id)"),
    ],
)
def test_a_broken_evaluation_log_record_is_rejected_naming_its_attribute(
    change: dict[str, Any], named: str
) -> None:
    attributes = {k: v for k, v in {**VALID_RECORD.attributes, **change}.items() if v is not None}
    broken = replace(VALID_RECORD, attributes=attributes)
    found = otlp.evaluations_from_logs(logs_export([VALID_RECORD, broken, VALID_RECORD]), "acme")
    assert found.evaluations == expected_log_evaluations([VALID_RECORD] * 2, "acme")
    assert len(found.rejected) == 1
    prefix = "log record resourceLogs[0].scopeLogs[0].logRecords[1]: "
    assert found.rejected[0].startswith(prefix) and named in found.rejected[0], found.rejected[0]


def test_an_evaluation_log_record_needs_a_time_a_tenant_and_a_well_formed_span_context() -> None:
    timeless = replace(VALID_RECORD, time_ns=0, observed_ns=0)
    [timeless_error] = otlp.evaluations_from_logs(logs_export([timeless]), "acme").rejected
    assert "no time: time_unix_nano or observed_time_unix_nano is required" in timeless_error
    [tenantless_error] = otlp.evaluations_from_logs(logs_export([VALID_RECORD]), None).rejected
    assert "no tenant" in tenantless_error and "streamlens.tenant_id" in tenantless_error
    short_trace = proto_record(VALID_RECORD)
    short_trace.trace_id, short_trace.span_id = b"\x01\x02", bytes(range(1, 9))
    with pytest.raises(otlp.SpanRejected, match="trace_id: expected 16 bytes"):
        otlp.evaluation_from_log_record(short_trace, {}, "acme")
    # A trace id without a span id is no span's context: the response id names the call.
    trace_only = proto_record(VALID_RECORD)
    trace_only.trace_id = bytes(range(1, 17))
    evaluation = otlp.evaluation_from_log_record(trace_only, {}, "acme")
    assert evaluation is not None and evaluation.request_id == "chatcmpl-1"


def test_otlp_json_logs_decode_to_the_same_export_as_protobuf() -> None:
    specs = log_specs(43, recent())
    from_json = otlp.decode_logs_export(json.dumps(json_logs(specs)).encode(), "json")
    from_proto = otlp.decode_logs_export(logs_export(specs).SerializeToString(), "protobuf")
    [in_span, *_] = from_json.resource_logs[0].scope_logs[0].log_records
    assert (in_span.trace_id, in_span.span_id) == (
        specs[0].trace_id.to_bytes(16, "big"), specs[0].span_id.to_bytes(8, "big"))  # fmt: skip
    assert otlp.evaluations_from_logs(from_json, "acme") == otlp.evaluations_from_logs(from_proto, "acme")
    assert len(otlp.evaluations_from_logs(from_json, "acme").evaluations) == 3
    not_hex = b'{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"traceId":"00","spanId":"xyz"}]}]}]}'
    with pytest.raises(BodyError) as raised:
        otlp.decode_logs_export(not_hex, "json")
    assert raised.value.detail == "resourceLogs[0].scopeLogs[0].logRecords[0].spanId: 'xyz' is not hex"


# -- the endpoint, over real HTTP, against a real broker ------------------------------


@dataclass
class Stack:
    broker: Broker
    dsn: str
    url: str
    keys: dict[str, str] = field(default_factory=dict)  # "acme", "acme-read", "globex"


def _database(server: Postgres, name: str) -> str:
    admin = server.dsn.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = server.dsn.rsplit("/", 1)[0] + f"/{name}"
    ensure_schema(dsn)
    return dsn


def _keys(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {
            "acme": create_key(conn, "acme", "ingest").key,
            "acme-read": create_key(conn, "acme", "read").key,
            "globex": create_key(conn, "globex", "ingest").key,
        }


@contextlib.contextmanager
def running_stack(broker: Broker, dsn: str) -> Iterator[Stack]:
    settings = Settings(kafka_brokers=broker.address, postgres_dsn=dsn, topic_partitions=TEST_PARTITIONS)
    with serving(create_app(settings)) as url:
        running = Stack(broker, dsn, url, _keys(dsn))
        # Until the key store's pool has connected, keys cannot be checked (503).
        h.wait_for(lambda: httpx.post(f"{url}/v1/traces", headers=bearer(running.keys["acme"], **PROTOBUF))
                   .status_code == 200, 30, "the key store")  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def stack(postgres_server: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One broker, database and ingestion API (keys on) for the tests that share them."""
    broker = Broker(tmp_path_factory.mktemp("otlp-broker")).start()
    try:
        ensure_topics(broker.address, TEST_PARTITIONS)
        with running_stack(broker, _database(postgres_server, "otlp_shared")) as running:
            yield running
    finally:
        broker.stop()


def bearer(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


def events_on_topics(
    brokers: str, request_ids: set[str], expected: int
) -> tuple[list[LLMRequest], list[LLMResponse]]:
    """This test's records, decoded with the schemas' decoders, in request_id order.

    ``expected``: how many records of this test each topic holds at least (the
    wait ends once that many are in and the topic has been quiet for a moment)."""
    found = []
    for topic, decoder in ((REQUESTS, request_decoder), (RESPONSES, response_decoder)):
        records = read_topic(brokers, topic, expected)
        values = [v for k, v in records if k in request_ids]
        found.append(sorted((decoder.decode(json.dumps(v)) for v in values), key=lambda e: e.request_id))
    return found[0], found[1]


def expected_events(
    specs: list[SpanSpec], tenant: str, service: str, resource: dict[str, Any] | None = None
) -> tuple[list[LLMRequest], list[LLMResponse]]:
    calls = sorted(
        (expected_call(s, tenant, service, resource) for s in specs if is_call(s)),
        key=lambda c: c[0].request_id,
    )
    return [c[0] for c in calls], [c[1] for c in calls]


def sdk_spans(specs: list[SpanSpec], service: str) -> list[ReadableSpan]:
    """The specs recorded by the real SDK (its own ids, written back into the specs)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("streamlens-tests")
    for spec in specs:
        span = tracer.start_span(spec.name, start_time=spec.start_ns, attributes=spec.attributes)
        if spec.error is not None:
            span.set_status(SdkStatus(StatusCode.ERROR, spec.error or None))
        context = span.get_span_context()
        spec.trace_id, spec.span_id = context.trace_id, context.span_id
        span.end(end_time=spec.end_ns)
    provider.shutdown()
    return list(memory.get_finished_spans())


def test_the_sdk_exporter_sends_genai_spans_that_become_events(stack: Stack) -> None:
    specs = genai_specs(recent(), route="/support")
    spans = sdk_spans(specs, "chat-service")
    exporter = OTLPSpanExporter(endpoint=f"{stack.url}/v1/traces", headers=bearer(stack.keys["acme"]))
    assert exporter.export(spans) == SpanExportResult.SUCCESS
    exporter.shutdown()
    ids = {f"{s.trace_id:032x}{s.span_id:016x}" for s in specs}
    # The SDK's resource: service.name, and the telemetry.sdk.* attributes it adds itself.
    resource = dict(spans[0].resource.attributes)
    assert resource["service.name"] == "chat-service" and "telemetry.sdk.language" in resource
    expected = expected_events(specs, "acme", "chat-service", resource)
    assert events_on_topics(stack.broker.address, ids, 4) == expected


def test_otlp_json_and_gzip_give_the_same_events(stack: Stack) -> None:
    specs = with_ids(genai_specs(recent()), 20)
    body = gzip.compress(json.dumps(json_export(specs, "json-service")).encode())
    answer = httpx.post(
        f"{stack.url}/v1/traces",
        content=body,
        headers=bearer(stack.keys["acme"], **JSON, **{"Content-Encoding": "gzip"}),
    )
    assert (answer.status_code, answer.headers["content-type"], answer.json()) == (
        200,
        "application/json",
        {},
    )
    ids = {f"{s.trace_id:032x}{s.span_id:016x}" for s in specs}
    assert events_on_topics(stack.broker.address, ids, 4) == expected_events(specs, "acme", "json-service")


def partial_success(
    stack: Stack, path: str, body: bytes, headers: dict[str, str], encoding: str
) -> tuple[int, str]:
    """POST an export to ``path``; the partial success answered: (rejected, error message)."""
    answer = httpx.post(f"{stack.url}{path}", content=body, headers=bearer(stack.keys["acme"], **headers))
    assert answer.status_code == 200
    logs = path == "/v1/logs"
    if encoding == "protobuf":
        assert answer.headers["content-type"] == "application/x-protobuf"
        if logs:
            partial_logs = ExportLogsServiceResponse.FromString(answer.content).partial_success
            return partial_logs.rejected_log_records, partial_logs.error_message
        partial = ExportTraceServiceResponse.FromString(answer.content).partial_success
        return partial.rejected_spans, partial.error_message
    document = answer.json()["partialSuccess"]
    return int(document["rejectedLogRecords" if logs else "rejectedSpans"]), document["errorMessage"]


def test_partial_success_keeps_the_valid_spans_and_names_the_first_problem(stack: Stack) -> None:
    specs = with_ids(genai_specs(recent())[:3], 21)
    specs[1].attributes["gen_ai.usage.input_tokens"] = "many"
    specs[2].attributes["streamlens.tenant_id"] = "globex"  # another tenant than the key's
    for encoding, headers in (("protobuf", PROTOBUF), ("json", JSON)):
        body = (
            proto_export(specs, "svc").SerializeToString()
            if encoding == "protobuf"
            else json.dumps(json_export(specs, "svc")).encode()
        )
        rejected, message = partial_success(stack, "/v1/traces", body, headers, encoding)
        assert rejected == 2
        assert message.startswith(f"span {specs[1].trace_id:032x}/{specs[1].span_id:016x}")
        assert "gen_ai.usage.input_tokens: expected an integer, got string" in message
        assert message.endswith("(and 1 more)")
    ids = {f"{s.trace_id:032x}{s.span_id:016x}" for s in specs}
    # Sent twice (both encodings): the one valid call is on each topic twice, the others never.
    requests, responses = events_on_topics(stack.broker.address, ids, 2)
    expected_request, expected_response = expected_call(specs[0], "acme", "svc")
    assert (requests, responses) == ([expected_request] * 2, [expected_response] * 2)


@pytest.mark.parametrize("encoding", ["protobuf", "json"])
def test_the_attributes_reach_the_request_metadata_on_the_topic(
    stack: Stack, encoding: otlp.Encoding
) -> None:
    cases = metadata_exports(24 if encoding == "protobuf" else 25)
    headers = bearer(stack.keys["acme"], **(PROTOBUF if encoding == "protobuf" else JSON))
    for spec, service, resource, _ in cases:
        answer = httpx.post(
            f"{stack.url}/v1/traces", content=encoded(spec, service, resource, encoding), headers=headers
        )
        # No partial_success: no span was rejected for its attributes.
        assert answer.status_code == 200
        assert (answer.content if encoding == "protobuf" else answer.json()) in (b"", {}), answer.content
    expected = {f"{spec.trace_id:032x}{spec.span_id:016x}": metadata for spec, _, _, metadata in cases}
    requests, _ = events_on_topics(stack.broker.address, set(expected), len(cases))
    assert {request.request_id: request.metadata for request in requests} == expected
    records = read_topic(stack.broker.address, REQUESTS, len(cases))
    assert {key: value["metadata"] for key, value in records if key in expected} == expected


def test_the_sdk_resource_and_span_attributes_reach_the_metadata(stack: Stack) -> None:
    from opentelemetry.sdk.version import __version__ as sdk_version

    memory = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": "checkout", "deployment.environment": "staging", "team": "payments"}
        )
    )
    provider.add_span_processor(SimpleSpanProcessor(memory))
    start = recent()
    spec = SpanSpec("chat gpt-4o", start, 640_000_000, {})
    attributes = {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 3,
        "gen_ai.response.finish_reasons": ("stop",), "gen_ai.request.temperature": 0.5,
        "app.feature": "faq", "app.retries": 2, "app.cached": False, "app.tags": ("a", "b"),
        "team": "search",  # the span's wins over the resource's
    }  # fmt: skip
    tracer = provider.get_tracer("streamlens-tests")
    span = tracer.start_span(spec.name, start_time=spec.start_ns, attributes=attributes)
    span.end(end_time=spec.end_ns)
    provider.shutdown()
    exporter = OTLPSpanExporter(endpoint=f"{stack.url}/v1/traces", headers=bearer(stack.keys["acme"]))
    assert exporter.export(memory.get_finished_spans()) == SpanExportResult.SUCCESS
    exporter.shutdown()
    context = span.get_span_context()
    request_id = f"{context.trace_id:032x}{context.span_id:016x}"
    [request], _ = events_on_topics(stack.broker.address, {request_id}, 1)
    assert request.metadata is not None
    metadata = dict(request.metadata)
    # A random id per process, which the SDK adds to every resource.
    instance = provider.resource.attributes.get("service.instance.id")
    assert metadata.pop("service.instance.id", None) == instance
    assert metadata == {
        "service.name": "checkout",
        "deployment.environment": "staging",
        "team": "search",
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.version": sdk_version,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.temperature": 0.5,
        "app.feature": "faq",
        "app.retries": 2,
        "app.cached": False,
    }
    assert (request.route, request.model, request.prompt_tokens) == ("checkout", "gpt-4o", 12)


def _status(answer: httpx.Response) -> status_pb2.Status:
    if answer.headers["content-type"] == "application/x-protobuf":
        return status_pb2.Status.FromString(answer.content)
    body = answer.json()
    return status_pb2.Status(code=body["code"], message=body["message"])


def test_every_error_status_is_a_google_rpc_status_in_the_request_encoding(stack: Stack) -> None:
    spec = with_ids(genai_specs(recent())[:1], 22)
    good = proto_export(spec, "svc").SerializeToString()
    key = bearer(stack.keys["acme"])
    cases: list[tuple[dict[str, str], bytes, int, int, str]] = [
        ({**PROTOBUF}, good, 401, code_pb2.UNAUTHENTICATED, "missing Authorization"),
        (bearer(stack.keys["acme-read"], **PROTOBUF), good, 403, code_pb2.PERMISSION_DENIED, "scope 'read'"),
        ({**key, **PROTOBUF}, b"\x0a\xff", 400, code_pb2.INVALID_ARGUMENT, "invalid_otlp"),
        ({**key, **JSON}, b"{nope", 400, code_pb2.INVALID_ARGUMENT, "invalid_json"),
        ({**key, **PROTOBUF, "Content-Encoding": "gzip"}, b"plain", 400, code_pb2.INVALID_ARGUMENT, "gzip"),
        ({**key, **PROTOBUF, "Content-Encoding": "br"}, good, 415, code_pb2.INVALID_ARGUMENT, "'br'"),
        ({**key, "Content-Type": "text/plain"}, good, 415, code_pb2.INVALID_ARGUMENT, "not OTLP"),
        ({**key, **JSON, "Content-Type": "application/json; charset=latin-1"}, b"{}", 415,
         code_pb2.INVALID_ARGUMENT, "charset"),
        ({**key, **PROTOBUF}, bytes(otlp.TRACES_BODY_LIMIT + 1), 413, code_pb2.RESOURCE_EXHAUSTED,
         "exceeds 16 MiB"),
    ]  # fmt: skip
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        for headers, body, status, code, words in cases:
            answer = client.post("/v1/traces", content=body, headers=headers)
            assert answer.status_code == status, (headers, answer.text)
            media = (
                "application/x-protobuf"
                if headers.get("Content-Type") == PROTOBUF["Content-Type"]
                else ("application/json")
            )
            assert answer.headers["content-type"] == media
            decoded = _status(answer)
            assert decoded.code == code and words in decoded.message, decoded
        # A key of another tenant is not refused outright: its spans are its own tenant's.
        answer = client.post("/v1/traces", content=good, headers=bearer(stack.keys["globex"], **PROTOBUF))
        assert answer.status_code == 200 and answer.content == b""
    request_id = f"{spec[0].trace_id:032x}{spec[0].span_id:016x}"
    requests, responses = events_on_topics(stack.broker.address, {request_id}, 1)
    assert [(r.tenant_id, r.request_id) for r in requests] == [("globex", request_id)]
    assert [r.tenant_id for r in responses] == ["globex"]


def test_a_broker_without_acknowledgement_is_a_503_with_retry_after(
    broker: Broker, postgres_dsn: str
) -> None:
    spec = with_ids(genai_specs(recent())[:1], 23)
    with running_stack(broker, postgres_dsn) as running:
        key = bearer(running.keys["acme"], **PROTOBUF)
        body = proto_export(spec, "svc").SerializeToString()
        assert httpx.post(f"{running.url}/v1/traces", content=body, headers=key).status_code == 200
        broker.stop()
        answer = httpx.post(f"{running.url}/v1/traces", content=body, headers=key, timeout=30)
        assert answer.status_code == 503 and answer.headers["Retry-After"].isdigit()
        assert _status(answer).code == code_pb2.UNAVAILABLE


# -- evaluation events over real HTTP ---------------------------------------------------------


def evaluations_on_topic(brokers: str, request_ids: set[str], expected: int) -> list[LLMEvaluation]:
    """This test's evaluations on ``llm.evaluations``, decoded with the schema's decoder, each
    checked to be keyed by its request_id; ``expected`` as for :func:`events_on_topics`."""
    found = []
    for key, value in read_topic(brokers, EVALUATIONS, expected):
        if key in request_ids:
            evaluation = evaluation_decoder.decode(json.dumps(value))
            assert evaluation.request_id == key
            found.append(evaluation)
    return by_call(found)


def counters(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The ingestion API's counters, by name and labels."""
    text = httpx.get(f"{url}/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def counted(before: dict[tuple[str, frozenset[tuple[str, str]]], float], url: str) -> dict[str, float]:
    """What the counters of :func:`counters` counted since ``before``, by ``name{label=value,…}``."""
    grown = {}
    for (name, labels), value in counters(url).items():
        delta = value - before.get((name, labels), 0.0)
        if delta and not name.startswith("streamlens_ingestion_responses"):
            shown = ",".join(f"{k}={v}" for k, v in sorted(labels))
            grown[f"{name}{{{shown}}}"] = delta
    return grown


def test_the_sdk_exporter_sends_evaluation_span_events_that_become_evaluations(stack: Stack) -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "support-bot"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("streamlens-tests")
    start = recent()
    judged = at_ns(start + timedelta(seconds=2))
    spec = SpanSpec("chat gpt-4o", start, 900_000_000, {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 20, "gen_ai.usage.output_tokens": 4,
    })  # fmt: skip
    label_only = {"gen_ai.evaluation.name": "format", "gen_ai.evaluation.score.label": "json"}
    whole_score = {"gen_ai.evaluation.name": "recall", "gen_ai.evaluation.score.value": 3}
    call = tracer.start_span(spec.name, start_time=spec.start_ns, attributes=spec.attributes)
    call.add_event(EVALUATION, EVALUATION_ATTRIBUTES, timestamp=judged)
    call.add_event(EVALUATION, label_only, timestamp=judged + 1000)
    call.add_event("gen_ai.client.inference.operation.details", {"gen_ai.evaluation.name": "not this"})
    call.end(end_time=spec.end_ns)
    # A span that is no call: its evaluation is about it all the same.
    step = tracer.start_span("retrieve documents", start_time=spec.start_ns)
    step.add_event(EVALUATION, whole_score, timestamp=judged)
    step.end(end_time=spec.end_ns)
    provider.shutdown()
    exporter = OTLPSpanExporter(endpoint=f"{stack.url}/v1/traces", headers=bearer(stack.keys["acme"]))
    before = counters(stack.url)
    assert exporter.export(memory.get_finished_spans()) == SpanExportResult.SUCCESS
    exporter.shutdown()
    call_id = request_id_of(call.get_span_context().trace_id, call.get_span_context().span_id)
    step_id = request_id_of(step.get_span_context().trace_id, step.get_span_context().span_id)
    expected = by_call([
        expected_evaluation(call_id, "acme", EVALUATION_ATTRIBUTES, judged),
        expected_evaluation(call_id, "acme", label_only, judged + 1000),
        expected_evaluation(step_id, "acme", whole_score, judged),
    ])  # fmt: skip
    assert evaluations_on_topic(stack.broker.address, {call_id, step_id}, 3) == expected
    [request], [response] = events_on_topics(stack.broker.address, {call_id, step_id}, 1)
    assert request.request_id == response.request_id == call_id
    assert counted(before, stack.url) == {
        "streamlens_ingestion_spans_accepted_total{}": 1,
        "streamlens_ingestion_events_accepted_total{endpoint=traces}": 3,
    }


def test_a_refused_evaluation_event_is_a_rejected_span_of_the_partial_success(stack: Stack) -> None:
    spec = with_ids(genai_specs(recent())[:1], 44)[0]
    call_id = request_id_of(spec.trace_id, spec.span_id)
    in_an_hour = time.time_ns() + 3600 * 10**9
    late = {**EVALUATION_ATTRIBUTES, "gen_ai.evaluation.name": "late"}
    span = with_events(
        proto_span(spec), (EVALUATION, in_an_hour, late), (EVALUATION, spec.end_ns, EVALUATION_ATTRIBUTES)
    )
    before = counters(stack.url)
    answer = httpx.post(
        f"{stack.url}/v1/traces",
        content=trace_export([span]).SerializeToString(),
        headers=bearer(stack.keys["acme"], **PROTOBUF),
    )
    assert answer.status_code == 200
    partial = ExportTraceServiceResponse.FromString(answer.content).partial_success
    assert partial.rejected_spans == 1
    assert partial.error_message.startswith(f"evaluation 'late' of {call_id}: Expected a time at most 120 s")
    assert evaluations_on_topic(stack.broker.address, {call_id}, 1) == [
        expected_evaluation(call_id, "acme", EVALUATION_ATTRIBUTES, spec.end_ns)
    ]
    assert events_on_topics(stack.broker.address, {call_id}, 1) == expected_events([spec], "acme", "svc")
    assert counted(before, stack.url) == {
        "streamlens_ingestion_spans_accepted_total{}": 1,
        "streamlens_ingestion_events_accepted_total{endpoint=traces}": 1,
        "streamlens_ingestion_events_rejected_total{endpoint=traces,reason=future_timestamp}": 1,
    }


class RecordingLogExporter(OTLPLogExporter):
    """The SDK's OTLP/HTTP log exporter, keeping what each export returned."""

    def __init__(self, endpoint: str, headers: dict[str, str]) -> None:
        super().__init__(endpoint=endpoint, headers=headers)
        self.results: list[LogRecordExportResult] = []

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        result = super().export(batch)
        self.results.append(result)
        return result


def test_the_sdk_logs_exporter_sends_evaluation_events_that_become_evaluations(stack: Stack) -> None:
    memory = InMemoryLogRecordExporter()
    exporter = RecordingLogExporter(f"{stack.url}/v1/logs", bearer(stack.keys["acme"]))
    provider = LoggerProvider(resource=Resource.create({"service.name": "evaluator"}))
    provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    logger = provider.get_logger("streamlens-tests")
    tracer = TracerProvider().get_tracer("streamlens-tests")
    response_id = f"chatcmpl-sdk-{next(serials)}"
    judged = at_ns(recent())
    feedback = {
        "gen_ai.evaluation.name": "user_feedback", "gen_ai.evaluation.score.label": "thumbs_up",
        "gen_ai.response.id": response_id,
    }  # fmt: skip
    with tracer.start_as_current_span("chat gpt-4o") as span:
        # No timestamp: the SDK sets only the observed time.
        logger.emit(event_name=EVALUATION, attributes=EVALUATION_ATTRIBUTES)
    logger.emit(event_name=EVALUATION, timestamp=judged, attributes=feedback)
    logger.emit(body="evaluation run finished", severity_text="INFO")  # not an evaluation: ignored
    provider.shutdown()
    assert exporter.results == [LogRecordExportResult.SUCCESS] * 3
    observed = memory.get_finished_logs()[0].log_record.observed_timestamp
    assert observed is not None
    span_id = request_id_of(span.get_span_context().trace_id, span.get_span_context().span_id)
    expected = by_call([
        expected_evaluation(span_id, "acme", EVALUATION_ATTRIBUTES, observed),
        expected_evaluation(response_id, "acme", feedback, judged),
    ])  # fmt: skip
    assert evaluations_on_topic(stack.broker.address, {span_id, response_id}, 2) == expected


def test_otlp_json_and_gzip_logs_give_the_same_evaluations(stack: Stack) -> None:
    specs = log_specs(45, recent())
    bodies = [
        (logs_export(specs).SerializeToString(), PROTOBUF),
        (gzip.compress(json.dumps(json_logs(specs)).encode()), {**JSON, "Content-Encoding": "gzip"}),
    ]
    for body, headers in bodies:
        answer = httpx.post(
            f"{stack.url}/v1/logs", content=body, headers=bearer(stack.keys["acme"], **headers)
        )
        assert (answer.status_code, answer.headers["content-type"]) == (200, headers["Content-Type"])
        # No partial_success: nothing was rejected, the record that is no evaluation ignored.
        assert answer.content in (b"", b"{}"), answer.content
    expected = expected_log_evaluations(specs, "acme")
    assert len(expected) == 3
    ids = {evaluation.request_id for evaluation in expected}
    assert evaluations_on_topic(stack.broker.address, ids, 2 * len(expected)) == by_call(expected * 2)


def test_logs_partial_success_names_the_first_rejected_record_and_keeps_the_others(stack: Stack) -> None:
    specs = log_specs(46, recent())
    valid = specs[1]
    nameless = replace(valid, attributes={
        k: v for k, v in valid.attributes.items() if k != "gen_ai.evaluation.name"
    })  # fmt: skip
    other_tenant = replace(valid, attributes={**valid.attributes, "streamlens.tenant_id": "globex"})
    records = [valid, nameless, specs[3], other_tenant]
    before = counters(stack.url)
    for encoding, headers in (("protobuf", PROTOBUF), ("json", JSON)):
        body = (
            logs_export(records).SerializeToString()
            if encoding == "protobuf"
            else json.dumps(json_logs(records)).encode()
        )
        rejected, message = partial_success(stack, "/v1/logs", body, headers, encoding)
        assert rejected == 2
        assert message == (
            "log record resourceLogs[0].scopeLogs[0].logRecords[1]: gen_ai.evaluation.name is required"
            " (and 1 more)"
        )
    request_id = valid.attributes["gen_ai.response.id"]
    # Sent twice (both encodings): the valid evaluation is on the topic twice, the others never.
    assert evaluations_on_topic(stack.broker.address, {request_id}, 2) == expected_log_evaluations(
        [valid, valid], "acme"
    )
    assert counted(before, stack.url) == {
        "streamlens_ingestion_events_accepted_total{endpoint=logs}": 2,
        "streamlens_ingestion_events_rejected_total{endpoint=logs,reason=invalid}": 2,
        "streamlens_ingestion_events_rejected_total{endpoint=logs,reason=other_tenant}": 2,
    }


def test_logs_errors_are_google_rpc_statuses_as_for_traces(stack: Stack) -> None:
    good = logs_export(log_specs(47, recent())).SerializeToString()
    key = bearer(stack.keys["acme"])
    cases: list[tuple[dict[str, str], bytes, int, int, str]] = [
        ({**PROTOBUF}, good, 401, code_pb2.UNAUTHENTICATED, "missing Authorization"),
        (bearer(stack.keys["acme-read"], **JSON), b"{}", 403, code_pb2.PERMISSION_DENIED, "scope 'read'"),
        ({**key, **PROTOBUF}, b"\x0a\xff", 400, code_pb2.INVALID_ARGUMENT, "not an OTLP protobuf export"),
        ({**key, **JSON}, b'{"resourceLogs": 3}', 400, code_pb2.INVALID_ARGUMENT, "not an OTLP JSON export"),
        ({**key, **PROTOBUF, "Content-Encoding": "gzip"}, good, 400, code_pb2.INVALID_ARGUMENT, "gzip"),
        ({**key, "Content-Type": "text/plain"}, good, 415, code_pb2.INVALID_ARGUMENT, "not OTLP"),
        ({**key, **PROTOBUF}, bytes(otlp.TRACES_BODY_LIMIT + 1), 413, code_pb2.RESOURCE_EXHAUSTED,
         "exceeds 16 MiB"),
    ]  # fmt: skip
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        for headers, body, status, code, words in cases:
            answer = client.post("/v1/logs", content=body, headers=headers)
            assert answer.status_code == status, (headers, answer.text)
            protobuf = headers.get("Content-Type") == PROTOBUF["Content-Type"]
            assert answer.headers["content-type"] == (
                "application/x-protobuf" if protobuf else JSON["Content-Type"]
            )
            decoded = _status(answer)
            assert decoded.code == code and words in decoded.message, decoded
        # An export without records is an empty protobuf body: answered as any other.
        answer = client.post("/v1/logs", content=b"", headers={**key, **PROTOBUF})
        assert (answer.status_code, answer.content) == (200, b"")


# -- a real instrumentation: the openai client ------------------------------------------


FAKE_MODEL = "gpt-4o-mini-2024-07-18"
FAKE_USAGE = {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49}


def fake_openai() -> Starlette:
    """An OpenAI-compatible chat completions endpoint, answering the same completion to all."""

    async def completions(request: Request) -> JSONResponse:
        asked = await request.json()
        return JSONResponse({
            "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
            "model": FAKE_MODEL if asked["model"] == "gpt-4o-mini" else asked["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                         "finish_reason": "stop"}],
            "usage": FAKE_USAGE,
        })  # fmt: skip

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


@contextlib.contextmanager
def instrumented_openai(
    ingestion_url: str, key: str, service: str
) -> Iterator[tuple[Any, InMemorySpanExporter]]:
    """An ``openai`` client instrumented by opentelemetry-instrumentation-openai-v2, its spans
    exported to StreamLens with the SDK's OTLP exporter and kept in memory too; baggage
    entries become span attributes, as docs/otlp.md shows for ``streamlens.route``."""
    import openai
    from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
    from opentelemetry.processor.baggage import ALLOW_ALL_BAGGAGE_KEYS, BaggageSpanProcessor
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BaggageSpanProcessor(ALLOW_ALL_BAGGAGE_KEYS))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    exporter = OTLPSpanExporter(endpoint=f"{ingestion_url}/v1/traces", headers=bearer(key))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        with serving(fake_openai()) as fake_url:
            yield openai.OpenAI(base_url=f"{fake_url}/v1", api_key="not-a-real-key"), memory
            assert provider.force_flush(10_000)
    finally:
        instrumentor.uninstrument()
        provider.shutdown()


def test_the_openai_instrumentation_gives_a_call_with_its_model_tokens_and_latency(stack: Stack) -> None:
    from opentelemetry import baggage, context

    with instrumented_openai(stack.url, stack.keys["acme"], "assistant") as (client, memory):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        token = context.attach(baggage.set_baggage("streamlens.route", "/faq"))
        try:  # the route of this one call
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "?"}])
        finally:
            context.detach(token)
    spans = sorted(memory.get_finished_spans(), key=lambda span: span.start_time or 0)
    ids = [f"{span.context.trace_id:032x}{span.context.span_id:016x}" for span in spans]
    requests, responses = events_on_topics(stack.broker.address, set(ids), 2)
    by_id = {
        request.request_id: (request, response) for request, response in zip(requests, responses, strict=True)
    }
    for span, request_id, route in zip(spans, ids, ("assistant", "/faq"), strict=True):
        request, response = by_id[request_id]
        assert (request.tenant_id, request.route, request.model, request.provider) == (
            "acme", route, FAKE_MODEL, "openai")  # fmt: skip
        assert (request.prompt_tokens, response.completion_tokens) == (42, 7)
        assert response.finish_reason == "stop" and response.error is None
        assert response.latency_ms == pytest.approx((span.end_time - span.start_time) / 1e6)
        assert 0 < response.latency_ms < 10_000


# -- through the dataflow to rows ---------------------------------------------------------


class QuickProcessor(h.Processor):
    """The dataflow of the harness, with a short grace so that live windows close in seconds."""

    def env(self) -> dict[str, str]:
        return {**super().env(), "GRACE_SECONDS": "1"}


def _totals(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, float]]:
    """Per key, what does not depend on how calls are windowed: counts, tokens, latency sum."""
    totals: dict[tuple[str, str, str], dict[str, float]] = {}
    for row in rows:
        total = totals.setdefault((row["tenant_id"], row["route"], row["model"]), dict.fromkeys(
            ("requests", "errors", "prompt_tokens", "completion_tokens", "cache_read_tokens",
             "reasoning_tokens", "latency_sum"), 0.0))  # fmt: skip
        for name in list(total)[:-1]:
            total[name] += row[name]
        answered = row["requests"] - row["timeouts"]
        total["latency_sum"] += (row["avg_latency_ms"] or 0.0) * answered
    return totals


@pytest.mark.slow
def test_spans_through_the_dataflow_become_rows(tmp_path: Path, broker: Broker, postgres_dsn: str) -> None:
    processor = QuickProcessor(
        broker.address,
        postgres_dsn,
        tmp_path / "recovery",
        h.write_prices(tmp_path / "prices.json"),
        tmp_path / "dataflow.log",
    ).start()
    try:
        with running_stack(broker, postgres_dsn) as running:
            specs = genai_specs(recent(), route="/support")
            spans = sdk_spans(specs, "chat-service")
            exporter = OTLPSpanExporter(
                endpoint=f"{running.url}/v1/traces", headers=bearer(running.keys["acme"])
            )
            assert exporter.export(spans) == SpanExportResult.SUCCESS
            with instrumented_openai(running.url, running.keys["globex"], "assistant") as (client, memory):
                for _ in range(3):
                    client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": "?"}]
                    )
        expected: dict[tuple[str, str, str], dict[str, float]] = {}
        calls = [expected_call(s, "acme", "chat-service") for s in specs if is_call(s)]
        calls += [expected_call(SpanSpec(
            "chat", EPOCH, span.end_time - span.start_time,
            {"gen_ai.system": "openai", "gen_ai.response.model": FAKE_MODEL,
             "gen_ai.usage.input_tokens": 42, "gen_ai.usage.output_tokens": 7},
        ), "globex", "assistant") for span in memory.get_finished_spans()]  # fmt: skip
        for request, response in calls:
            total = expected.setdefault((request.tenant_id, request.route, request.model), dict.fromkeys(
                ("requests", "errors", "prompt_tokens", "completion_tokens", "cache_read_tokens",
                 "reasoning_tokens", "latency_sum"), 0.0))  # fmt: skip
            total["requests"] += 1
            total["errors"] += bool(response.error)
            total["prompt_tokens"] += request.prompt_tokens
            total["completion_tokens"] += response.completion_tokens
            total["cache_read_tokens"] += response.cache_read_tokens
            total["reasoning_tokens"] += response.reasoning_tokens
            total["latency_sum"] += response.latency_ms or 0.0
        assert len(expected) == 5 and expected[("globex", "assistant", FAKE_MODEL)]["requests"] == 3

        def rows() -> dict[tuple[str, str, str], dict[str, float]]:
            return _totals(list(h.postgres_rows(postgres_dsn).values()))

        h.wait_for(lambda: {k: v["requests"] for k, v in rows().items()}
                   == {k: v["requests"] for k, v in expected.items()},
                   60, "the rows of the spans", processor.check_alive)  # fmt: skip
        actual = rows()
        for key, total in expected.items():
            for name, value in total.items():
                assert math.isclose(actual[key][name], value, rel_tol=1e-9, abs_tol=1e-6), (key, name)
    finally:
        processor.stop()


# -- properties: never a server error -------------------------------------------------------

GENAI_KEYS = sorted(otlp._SPAN_ATTRIBUTES | {"service.name", "http.route"})
any_values = st.recursive(
    st.one_of(
        st.text(max_size=20).map(lambda v: AnyValue(string_value=v)),
        st.integers(-(2**63), 2**63 - 1).map(lambda v: AnyValue(int_value=v)),
        st.floats(allow_nan=True).map(lambda v: AnyValue(double_value=v)),
        st.booleans().map(lambda v: AnyValue(bool_value=v)),
        st.binary(max_size=10).map(lambda v: AnyValue(bytes_value=v)),
        st.just(AnyValue()),
    ),
    lambda inner: st.lists(inner, max_size=3).map(lambda v: AnyValue(array_value=ArrayValue(values=v))),
    max_leaves=5,
)
key_values = st.builds(KeyValue, key=st.sampled_from(GENAI_KEYS), value=any_values)
nanos = st.one_of(
    st.just(0), st.integers(0, 2**64 - 1), st.integers(time.time_ns() - 10**12, time.time_ns() + 10**12)
)
spans = st.builds(
    Span,
    trace_id=st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=20)),
    span_id=st.one_of(st.binary(min_size=8, max_size=8), st.binary(max_size=10)),
    name=st.text(max_size=10),
    start_time_unix_nano=nanos,
    end_time_unix_nano=nanos,
    attributes=st.lists(key_values, max_size=8),
    status=st.builds(Status, code=st.sampled_from([0, 1, 2]), message=st.text(max_size=10)),
)
exports = st.lists(st.tuples(st.lists(key_values, max_size=3), st.lists(spans, max_size=4)), max_size=2).map(
    lambda groups: ExportTraceServiceRequest(resource_spans=[
        ResourceSpans(resource={"attributes": resource}, scope_spans=[ScopeSpans(spans=group)])
        for resource, group in groups
    ])
)  # fmt: skip


def _as_otlp_json(export: ExportTraceServiceRequest) -> bytes:
    from google.protobuf import json_format

    document = json_format.MessageToDict(export)
    for resource in document.get("resourceSpans", []):
        for scope in resource.get("scopeSpans", []):
            for span in scope.get("spans", []):
                for name in ("traceId", "spanId"):
                    if name in span:
                        import base64

                        span[name] = base64.b64decode(span[name]).hex()
    return json.dumps(document).encode()


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=20) as client:
        yield client


PROPERTY_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY_SETTINGS
@given(body=st.binary(max_size=300), headers=st.sampled_from([PROTOBUF, JSON]), gzipped=st.booleans())
def test_arbitrary_bytes_get_a_client_error_or_an_answer_never_a_server_error(
    stack: Stack, http: httpx.Client, body: bytes, headers: dict[str, str], gzipped: bool
) -> None:
    sent = {**bearer(stack.keys["acme"]), **headers}
    if gzipped:
        body, sent = gzip.compress(body), {**sent, "Content-Encoding": "gzip"}
    answer = http.post("/v1/traces", content=body, headers=sent)
    assert answer.status_code in (200, 400), answer.content
    if answer.status_code == 200 and headers is PROTOBUF:
        ExportTraceServiceResponse.FromString(answer.content)


@PROPERTY_SETTINGS
@given(export=exports, as_json=st.booleans())
def test_well_formed_otlp_is_always_answered_200(
    stack: Stack, http: httpx.Client, export: ExportTraceServiceRequest, as_json: bool
) -> None:
    body = _as_otlp_json(export) if as_json else export.SerializeToString()
    answer = http.post(
        "/v1/traces",
        content=body,
        headers=bearer(stack.keys["acme"], **(JSON if as_json else PROTOBUF)),
    )
    assert answer.status_code == 200, answer.content
    calls = otlp.calls_from_export(export, "acme")
    if as_json:
        rejected = int(answer.json().get("partialSuccess", {}).get("rejectedSpans", 0))
    else:
        rejected = ExportTraceServiceResponse.FromString(answer.content).partial_success.rejected_spans
    # The endpoint rejects what the mapping rejects, and calls too far ahead of the clock.
    assert rejected >= len(calls.rejected)


# Names of every sort: the ones the rule puts first, message content, dotted ones,
# control characters, very long ones; never one a field is read from.
extra_names = st.one_of(
    st.sampled_from([*otlp.METADATA_FIRST, "gen_ai.input.messages", "gen_ai.prompt.0.content", "x.y"]),
    st.text(max_size=12),
    st.text(alphabet="ab.\n\x7f", min_size=120, max_size=140),
).filter(lambda name: name not in otlp._SPAN_ATTRIBUTES)
extra_values = st.one_of(
    any_values,
    st.text(min_size=100, max_size=400).map(lambda v: AnyValue(string_value=v)),
)
extra_attribute = st.builds(KeyValue, key=extra_names, value=extra_values)


def many_attributes(count: int, seed: int) -> list[KeyValue]:
    """``count`` attributes made up from ``seed``: enough to reach the limits, more than
    hypothesis draws one by one. A share of them long strings, of 2 bytes a character."""
    rnd = random.Random(seed)
    special = [*otlp.METADATA_FIRST, "gen_ai.input.messages", "bad\nname", "x" * 129]
    strings = rnd.random()
    pairs = []
    for _ in range(count):
        name = rnd.choice(special) if rnd.random() < 0.1 else f"{rnd.choice('abz')}.{rnd.randrange(1000)}"
        if rnd.random() < strings:
            value = AnyValue(string_value="é" * rnd.randrange(300))
        else:
            value = rnd.choice([
                AnyValue(int_value=rnd.randrange(-(2**63), 2**63)),
                AnyValue(double_value=rnd.random()),
                AnyValue(bool_value=True),
                AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="a")])),
            ])  # fmt: skip
        pairs.append(KeyValue(key=name, value=value))
    return pairs


# A few of every sort, or enough to reach the limits.
extra_attributes = st.one_of(
    st.lists(extra_attribute, max_size=8),
    st.builds(many_attributes, st.integers(60, 150), st.integers(0, 2**32)),
)


@settings(max_examples=100, deadline=None)
@given(resource=extra_attributes, extra=extra_attributes)
def test_other_attributes_never_get_a_span_rejected(resource: list[KeyValue], extra: list[KeyValue]) -> None:
    # The route from the span: the resource's service.name may be anything here.
    spec = with_ids(genai_specs(recent(), route="/support")[:1], 30)[0]
    span = proto_span(spec)
    span.attributes.extend(extra)
    export = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource={"attributes": resource},
        scope_spans=[ScopeSpans(spans=[span])],
    )])  # fmt: skip
    mapped = otlp.calls_from_export(export, "acme")
    assert mapped.rejected == []
    [(request, response)] = mapped.calls
    # Everything but the metadata is what the span's own attributes give.
    expected_request, expected_response = expected_call(spec, "acme", "svc")
    assert (response, request.route, request.model) == (
        expected_response, expected_request.route, expected_request.model)  # fmt: skip
    metadata = request.metadata or {}
    assert len(metadata) <= 64 and len(encoder.encode(metadata)) <= 8192
    for name, value in metadata.items():
        assert 1 <= len(name) <= 128 and all(" " <= c != "\x7f" for c in name), name
        assert name not in FIELD_SOURCES and not name.startswith(("gen_ai.input", "gen_ai.prompt"))
        assert isinstance(value, str | bool | int | float)
        assert not isinstance(value, str) or len(value) <= 128
    assert request_decoder.decode(encoder.encode(request)) == request
