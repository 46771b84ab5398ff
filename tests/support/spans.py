"""GenAI spans as a test describes them (:class:`SpanSpec`; a mix of calls and other spans from
:func:`genai_specs`), OTLP/protobuf trace exports built from them by hand, ids of a test's own
and a recent start time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

PROTOBUF = {"Content-Type": "application/x-protobuf"}
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


# -- building OTLP by hand ----------------------------------------------------------


def any_value(value: Any) -> AnyValue:
    if value is None:
        return AnyValue()
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, dict):
        return AnyValue(kvlist_value=KeyValueList(values=proto_attributes(value)))
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, tuple | list):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    return AnyValue(string_value=value)


def proto_attributes(attributes: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attributes.items()]


def proto_span(spec: SpanSpec) -> Span:
    span = Span(
        trace_id=spec.trace_id.to_bytes(16, "big"),
        span_id=spec.span_id.to_bytes(8, "big"),
        name=spec.name,
        kind=Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=spec.start_ns,
        end_time_unix_nano=spec.end_ns,
        attributes=proto_attributes(spec.attributes),
    )
    if spec.error is not None:
        span.status.code = Status.STATUS_CODE_ERROR
        span.status.message = spec.error
    return span


def proto_export(
    specs: list[SpanSpec], service: str, resource: dict[str, Any] | None = None
) -> ExportTraceServiceRequest:
    """One resource (``service.name`` and ``resource``) with ``specs`` as its spans."""
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource={"attributes": proto_attributes({"service.name": service, **(resource or {})})},
        scope_spans=[ScopeSpans(spans=[proto_span(spec) for spec in specs])],
    )])  # fmt: skip


# -- ids and times of a test's own --------------------------------------------------


# Numbers never handed out twice in the test process, for ids of a test's own.
serials = iter(range(1, 10**9))


def with_ids(specs: list[SpanSpec], test_number: int) -> list[SpanSpec]:
    """Ids of this test's own, so tests sharing a broker tell their records apart."""
    for spec in specs:
        spec.trace_id = (test_number << 64) | next(serials)
        spec.span_id = 0xABC0_0000_0000_0000 | next(serials)
    return specs


def recent() -> datetime:
    """A start time a little in the past, in whole microseconds."""
    return (datetime.now(UTC) - timedelta(seconds=30)).replace(microsecond=123_456)
