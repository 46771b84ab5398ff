"""``POST /v1/traces``: OTLP/HTTP trace exports, GenAI spans become request and response events.

The mapping (:mod:`api.otlp`) is tested directly on spans built here; the endpoint over
real HTTP against a real broker and real API keys in a real Postgres, with the real
OpenTelemetry SDK exporter, hand-built OTLP JSON, the ``openai`` client instrumented by
``opentelemetry-instrumentation-openai-v2`` against a fake OpenAI-compatible server, and
the dataflow through to rows. Expected events and rows are computed here from the spans
sent, following the mapping table of the README.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from google.rpc import code_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status as SdkStatus
from opentelemetry.trace import StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api import otlp
from api.body import BodyError
from api.ingestion import create_app
from api.keys import create_key
from deploy.stack import Broker, Postgres
from schemas.config import Settings
from schemas.database import ensure_schema
from schemas.events import LLMRequest, LLMResponse, request_decoder, response_decoder
from schemas.topics import REQUESTS, RESPONSES, ensure_topics
from tests import dataflow_harness as h
from tests.conftest import TEST_PARTITIONS
from tests.serving import serving
from tests.test_ingestion import read_topic

PROTOBUF = {"Content-Type": "application/x-protobuf"}
JSON = {"Content-Type": "application/json"}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# -- spans as a test describes them ------------------------------------------------


@dataclass
class SpanSpec:
    """One span to send: times and attributes chosen by the test."""

    name: str
    start: datetime  # whole microseconds; the span starts 789 ns after it
    duration_ns: int
    attributes: dict[str, Any]
    error: str | None = None  # status ERROR with this description
    trace_id: int = 0
    span_id: int = 0

    @property
    def start_ns(self) -> int:
        return (self.start - EPOCH) // timedelta(microseconds=1) * 1000 + 789

    @property
    def end_ns(self) -> int:
        return self.start_ns + self.duration_ns


def genai_specs(start: datetime, route: str | None = None) -> list[SpanSpec]:
    """A mix: answered calls, a failed one, a cached and a reasoning one, and spans to ignore."""
    chat = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai"}
    if route is not None:
        chat["streamlens.route"] = route
    at = [start + timedelta(milliseconds=250 * n) for n in range(8)]
    return [
        SpanSpec("chat gpt-4o", at[0], 812_345_678, {
            **chat, "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-2024-08-06",
            "gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 96,
            "gen_ai.usage.cache_read.input_tokens": 1024,
            "gen_ai.response.finish_reasons": ("stop",),
        }),
        SpanSpec("chat o3", at[1], 2_500_000_001, {
            **chat, "gen_ai.request.model": "o3", "gen_ai.usage.input_tokens": 50,
            "gen_ai.usage.output_tokens": 700, "gen_ai.usage.reasoning.output_tokens": 640,
            "gen_ai.response.time_to_first_chunk": 0.4125,
            "gen_ai.response.finish_reasons": ("length", "stop"),
        }),
        SpanSpec("chat gpt-4o", at[2], 30_000_000, {
            **chat, "gen_ai.request.model": "gpt-4o", "error.type": "RateLimitError",
        }, error="429 Too Many Requests"),
        SpanSpec("chat claude", at[3], 1_000_000_000, {
            "gen_ai.system": "anthropic", "gen_ai.request.model": "claude-sonnet-4",
            "gen_ai.usage.prompt_tokens": 300, "gen_ai.usage.completion_tokens": 20,
        }, error="overloaded"),
        # Not model calls: accepted and ignored.
        SpanSpec("GET /search", at[4], 5_000_000, {"http.request.method": "GET"}),
        SpanSpec("invoke_agent planner", at[5], 9_000_000_000, {
            "gen_ai.operation.name": "invoke_agent", "gen_ai.request.model": "gpt-4o",
            "gen_ai.usage.input_tokens": 5000,
        }),
        SpanSpec("execute_tool search", at[6], 1_000_000, {"gen_ai.operation.name": "execute_tool"}),
    ]  # fmt: skip


def is_call(spec: SpanSpec) -> bool:
    operation = spec.attributes.get("gen_ai.operation.name")
    return operation == "chat" or (operation is None and "gen_ai.system" in spec.attributes)


def expected_call(spec: SpanSpec, tenant: str, service: str) -> tuple[LLMRequest, LLMResponse]:
    """The README's mapping table, applied by hand."""
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


def any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, tuple | list):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    return AnyValue(string_value=value)


def proto_span(spec: SpanSpec) -> Span:
    span = Span(
        trace_id=spec.trace_id.to_bytes(16, "big"),
        span_id=spec.span_id.to_bytes(8, "big"),
        name=spec.name,
        kind=Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=spec.start_ns,
        end_time_unix_nano=spec.end_ns,
        attributes=[KeyValue(key=k, value=any_value(v)) for k, v in spec.attributes.items()],
    )
    if spec.error is not None:
        span.status.code = Status.STATUS_CODE_ERROR
        span.status.message = spec.error
    return span


def proto_export(specs: list[SpanSpec], service: str) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource={"attributes": [KeyValue(key="service.name", value=AnyValue(string_value=service))]},
        scope_spans=[ScopeSpans(spans=[proto_span(spec) for spec in specs])],
    )])  # fmt: skip


def json_value(value: Any) -> dict[str, Any]:
    """OTLP JSON: 64-bit integers as strings."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, tuple | list):
        return {"arrayValue": {"values": [json_value(v) for v in value]}}
    return {"stringValue": value}


def json_export(specs: list[SpanSpec], service: str) -> dict[str, Any]:
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
            "attributes": [{"key": k, "value": json_value(v)} for k, v in spec.attributes.items()],
            "someFutureField": {"x": 1},
        }
        if spec.error is not None:
            span["status"] = {"code": 2, "message": spec.error}
        spans.append(span)
    return {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [{"scope": {"name": "hand-built"}, "spans": spans}],
    }]}  # fmt: skip


_ids = iter(range(1, 10**9))


def with_ids(specs: list[SpanSpec], test_number: int) -> list[SpanSpec]:
    """Ids of this test's own, so tests sharing a broker tell their records apart."""
    for spec in specs:
        spec.trace_id = (test_number << 64) | next(_ids)
        spec.span_id = 0xABC0_0000_0000_0000 | next(_ids)
    return specs


def recent() -> datetime:
    """A start time a little in the past, in whole microseconds."""
    return (datetime.now(UTC) - timedelta(seconds=30)).replace(microsecond=123_456)


# -- the mapping, unit-tested ---------------------------------------------------------


def mapped_calls(specs: list[SpanSpec], service: str = "svc", tenant: str | None = "acme") -> otlp.Mapped:
    return otlp.calls_from_export(proto_export(specs, service), tenant)


def test_genai_spans_map_to_the_events_of_the_readme_table() -> None:
    specs = with_ids(genai_specs(recent(), route="/support"), 1)
    specs[3].attributes["streamlens.route"] = "/legacy"
    mapped = mapped_calls(specs, service="chat-service")
    assert mapped.rejected == []
    assert mapped.calls == [expected_call(s, "acme", "chat-service") for s in specs if is_call(s)]
    first_request, first_response = mapped.calls[0]
    # Spelled out for the first span, without expected_call.
    assert first_request.request_id == f"{specs[0].trace_id:032x}{specs[0].span_id:016x}"
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
    specs: list[SpanSpec], tenant: str, service: str
) -> tuple[list[LLMRequest], list[LLMResponse]]:
    calls = sorted(
        (expected_call(s, tenant, service) for s in specs if is_call(s)), key=lambda c: c[0].request_id
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
    assert events_on_topics(stack.broker.address, ids, 4) == expected_events(specs, "acme", "chat-service")


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
        answer = httpx.post(
            f"{stack.url}/v1/traces", content=body, headers=bearer(stack.keys["acme"], **headers)
        )
        assert answer.status_code == 200
        if encoding == "protobuf":
            assert answer.headers["content-type"] == "application/x-protobuf"
            partial = ExportTraceServiceResponse.FromString(answer.content).partial_success
            rejected, message = partial.rejected_spans, partial.error_message
        else:
            partial_json = answer.json()["partialSuccess"]
            rejected, message = int(partial_json["rejectedSpans"]), partial_json["errorMessage"]
        assert rejected == 2
        assert message.startswith(f"span {specs[1].trace_id:032x}/{specs[1].span_id:016x}")
        assert "gen_ai.usage.input_tokens: expected an integer, got string" in message
        assert message.endswith("(and 1 more)")
    ids = {f"{s.trace_id:032x}{s.span_id:016x}" for s in specs}
    # Sent twice (both encodings): the one valid call is on each topic twice, the others never.
    requests, responses = events_on_topics(stack.broker.address, ids, 2)
    expected_request, expected_response = expected_call(specs[0], "acme", "svc")
    assert (requests, responses) == ([expected_request] * 2, [expected_response] * 2)


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
    entries become span attributes, as the README shows for ``streamlens.route``."""
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
