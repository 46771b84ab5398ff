"""OpenTelemetry in (docs/api.md, docs/evaluations.md): OTLP/HTTP exports, GenAI spans become calls and
``gen_ai.evaluation.result`` events become evaluations.

Pure functions for ``POST /v1/traces`` and ``POST /v1/logs`` of :mod:`api.ingestion`:
which encoding a body is in, decompressing and decoding it with ``opentelemetry-proto``,
mapping each span of the OpenTelemetry GenAI semantic conventions to a request and a
response event (the same schemas as every other endpoint), with the span's and
its resource's other attributes as the request's ``metadata`` (:func:`metadata`),
mapping each evaluation event — a span event or a log record — to an evaluation
(:func:`evaluation_from_span_event`, :func:`evaluation_from_log_record`), and the
answers OTLP expects (an ``ExportTraceServiceResponse`` or ``ExportLogsServiceResponse``,
or a ``google.rpc.Status`` for an error, in the request's encoding).
"""

from __future__ import annotations

import base64
import functools
import math
import re
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Literal, NamedTuple, TypeVar

import msgspec
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsPartialSuccess,
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from starlette.responses import Response

from api.body import BodyError, MiB
from api.errors import ApiError
from schemas.dimensions import VALUE_MAX_CHARS
from schemas.events import (
    METADATA_MAX_BYTES,
    LLMEvaluation,
    LLMRequest,
    LLMResponse,
    MetadataValue,
    check_cache_read,
)

Encoding = Literal["protobuf", "json"]
PROTOBUF = "application/x-protobuf"
JSON = "application/json"

# Exporters send up to 512 spans per export by default, and spans that capture
# message content can be tens of KiB each: the limit is on the decompressed body.
# Log exports (as many records, explanations of up to 4 KiB) have the same one.
TRACES_BODY_LIMIT = 16 * MiB

# Span attributes read here. ``streamlens.*`` are StreamLens's own.
OPERATION = "gen_ai.operation.name"
SYSTEM = "gen_ai.system"
PROVIDER = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"  # deprecated name of input_tokens
COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"  # deprecated name of output_tokens
CACHE_READ_TOKENS = "gen_ai.usage.cache_read.input_tokens"
REASONING_TOKENS = "gen_ai.usage.reasoning.output_tokens"
FINISH_REASONS = "gen_ai.response.finish_reasons"
TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"  # seconds, the conventions' name
TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"  # seconds, as OpenLIT reports it
ERROR_TYPE = "error.type"
ROUTE = "streamlens.route"
TENANT = "streamlens.tenant_id"
SERVICE_NAME = "service.name"

# The member of its ``AnyValue`` each attribute is expected in, read first by
# :func:`_attributes` ("" for an array, whose values are read instead).
_STRING, _INT, _DOUBLE, _ARRAY = "string_value", "int_value", "double_value", ""
_SPAN_ATTRIBUTE_FIELDS = {
    OPERATION: _STRING, SYSTEM: _STRING, PROVIDER: _STRING, REQUEST_MODEL: _STRING,
    RESPONSE_MODEL: _STRING, INPUT_TOKENS: _INT, OUTPUT_TOKENS: _INT, PROMPT_TOKENS: _INT,
    COMPLETION_TOKENS: _INT, CACHE_READ_TOKENS: _INT, REASONING_TOKENS: _INT,
    FINISH_REASONS: _ARRAY, TIME_TO_FIRST_CHUNK: _DOUBLE, TIME_TO_FIRST_TOKEN: _DOUBLE,
    ERROR_TYPE: _STRING, ROUTE: _STRING, TENANT: _STRING,
}  # fmt: skip
_SPAN_ATTRIBUTES = frozenset(_SPAN_ATTRIBUTE_FIELDS)
_RESOURCE_ATTRIBUTE_FIELDS = {SERVICE_NAME: _STRING, TENANT: _STRING}
# An evaluation event (a span event or a log record) and its attributes.
EVALUATION_EVENT = "gen_ai.evaluation.result"
EVENT_NAME = "event.name"  # where log records named their event before LogRecord.event_name
EVALUATION_NAME = "gen_ai.evaluation.name"
SCORE_VALUE = "gen_ai.evaluation.score.value"
SCORE_LABEL = "gen_ai.evaluation.score.label"
EXPLANATION = "gen_ai.evaluation.explanation"
RESPONSE_ID = "gen_ai.response.id"
_EVALUATION_ATTRIBUTE_FIELDS = {
    EVALUATION_NAME: _STRING, SCORE_VALUE: _DOUBLE, SCORE_LABEL: _STRING, EXPLANATION: _STRING,
}  # fmt: skip
_LOG_ATTRIBUTE_FIELDS = {
    **_EVALUATION_ATTRIBUTE_FIELDS, EVENT_NAME: _STRING, RESPONSE_ID: _STRING, TENANT: _STRING,
}  # fmt: skip
_TENANT_FIELD = {TENANT: _STRING}
# Operations that call a model: without a model such a span cannot be counted, and says so.
MODEL_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "embeddings"})
# Agent and tool steps are not model calls: the model calls they make are spans
# of their own, so counting these too would count those calls twice.
STEP_OPERATIONS = frozenset({"create_agent", "invoke_agent", "invoke_workflow", "execute_tool"})

# -- the request's metadata (docs/otlp.md, "Attributes as metadata") --
# The attributes an event field is read from: in metadata they would only repeat
# the field. ``gen_ai.operation.name`` decides whether a span is a call but fills
# no field, and the resource's ``service.name`` is only the fallback route: both
# are kept, as dimensions slice by them.
FIELD_ATTRIBUTES = _SPAN_ATTRIBUTES - {OPERATION}
# Message content, as the conventions and OpenLLMetry/OpenLIT record it when asked
# to: users' prompts and the model's answers are not StreamLens's to keep, and
# would fill the 8 KiB on their own. A name here and every name below it.
CONTENT_ATTRIBUTES = (
    "gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions",
    "gen_ai.tool.definitions", "gen_ai.prompt", "gen_ai.completion", "gen_ai.content",
)  # fmt: skip
_CONTENT_BELOW = tuple(f"{name}." for name in CONTENT_ATTRIBUTES)
# What schemas.events allows a request's metadata (``Metadata``'s max_length).
METADATA_MAX_KEYS = 64
# Kept before the others, whatever their names, when not all attributes fit.
METADATA_FIRST = ("service.name", "service.version", "deployment.environment", "deployment.environment.name")
_METADATA_FIRST = frozenset(METADATA_FIRST)
# A dimension names a key of 1-128 characters without control characters
# (schemas.dimensions): a key it could never name would only use up the limits.
METADATA_KEY_MAX_CHARS = 128
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_encoder = msgspec.json.Encoder()
# metadata_key of the names seen: the same few dozen names come with every span.
_key_verdicts: dict[str, bool] = {}
_KEY_VERDICTS_MAX = 4096

# Where each event field comes from, so that a broken rule names the span attribute.
_FIELD_SOURCES = {
    "route": f"{ROUTE} or the resource's {SERVICE_NAME}",
    "model": f"{RESPONSE_MODEL} or {REQUEST_MODEL}",
    "tenant_id": TENANT,
    "timestamp": "start_time_unix_nano / end_time_unix_nano",
    "prompt_tokens": INPUT_TOKENS,
    "completion_tokens": OUTPUT_TOKENS,
    "cache_read_tokens": CACHE_READ_TOKENS,
    "reasoning_tokens": REASONING_TOKENS,
    "finish_reason": FINISH_REASONS,
    "time_to_first_token_ms": TIME_TO_FIRST_CHUNK,
}
# The same for an evaluation; its request_id from a span context is always valid hex.
_EVALUATION_SOURCES = {
    "request_id": RESPONSE_ID,
    "tenant_id": TENANT,
    "name": EVALUATION_NAME,
    "score": SCORE_VALUE,
    "label": SCORE_LABEL,
    "explanation": EXPLANATION,
}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_ZERO_TRACE_ID = bytes(16)
_ZERO_SPAN_ID = bytes(8)


class SpanRejected(Exception):
    """A GenAI span that cannot become a call, or an evaluation event (a span event or a
    log record) that cannot become an evaluation; the message names what is wrong."""


Call = tuple[LLMRequest, LLMResponse]


# -- the body ---------------------------------------------------------------------


def request_encoding(content_type: str | None) -> Encoding:
    """The body's encoding from its Content-Type, or :class:`BodyError` 415.

    A JSON body's charset is then checked as on every JSON endpoint (:func:`api.body.check_content_type`).
    """
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type == PROTOBUF:
        return "protobuf"
    if media_type == JSON:
        return "json"
    shown = f"Content-Type {media_type!r} is" if media_type else "Content-Type is missing:"
    raise BodyError(415, "unsupported_media_type", f"{shown} not OTLP; send {PROTOBUF} or {JSON}")


def answer_encoding(content_type: str | None) -> Encoding:
    """The encoding of the answer: the request's, JSON when it has none that OTLP knows."""
    try:
        return request_encoding(content_type)
    except BodyError:
        return "json"


def decompress(body: bytes, content_encoding: str | None, limit: int = TRACES_BODY_LIMIT) -> bytes:
    """The body without its ``Content-Encoding`` (gzip or none), at most ``limit`` bytes."""
    coding = (content_encoding or "identity").strip().lower()
    if coding == "identity":
        return body
    if coding != "gzip":
        raise BodyError(
            415, "unsupported_media_type", f"Content-Encoding {coding!r} is not supported; send gzip or none"
        )
    parts: list[bytes] = []
    size = 0
    rest = body
    try:
        # Concatenated gzip members are one gzip stream.
        while rest:
            inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            # Never more than the limit in memory, however far the body inflates.
            part = inflater.decompress(rest, limit - size + 1)
            size += len(part)
            if size > limit or inflater.unconsumed_tail:
                raise BodyError(413, "body_too_large", f"the decompressed body exceeds {limit // MiB} MiB")
            if not inflater.eof:
                raise BodyError(400, "invalid_gzip", "the gzip body is truncated")
            parts.append(part)
            rest = inflater.unused_data
    except zlib.error as error:
        raise BodyError(400, "invalid_gzip", f"the body is not valid gzip: {error}") from None
    return b"".join(parts)


class _JsonLayout(NamedTuple):
    """Where an OTLP JSON export of one signal holds trace and span ids (in hex)."""

    resources: str
    scopes: str
    items: str
    ids: tuple[str, ...]
    nested: str | None = None  # a list in each item whose entries hold ids too


_LINK_IDS = ("traceId", "spanId")
_TRACES_JSON = _JsonLayout(
    "resourceSpans", "scopeSpans", "spans", ("traceId", "spanId", "parentSpanId"), "links"
)
_LOGS_JSON = _JsonLayout("resourceLogs", "scopeLogs", "logRecords", ("traceId", "spanId"))
_Export = TypeVar("_Export", bound=Message)


def decode_export(body: bytes, encoding: Encoding) -> ExportTraceServiceRequest:
    """An ``ExportTraceServiceRequest`` from OTLP protobuf or OTLP JSON, or :class:`BodyError` 400."""
    return _decode(body, encoding, ExportTraceServiceRequest(), _TRACES_JSON)


def decode_logs_export(body: bytes, encoding: Encoding) -> ExportLogsServiceRequest:
    """An ``ExportLogsServiceRequest`` from OTLP protobuf or OTLP JSON, or :class:`BodyError` 400."""
    return _decode(body, encoding, ExportLogsServiceRequest(), _LOGS_JSON)


def _decode(body: bytes, encoding: Encoding, export: _Export, layout: _JsonLayout) -> _Export:
    if encoding == "protobuf":
        try:
            export.ParseFromString(body)
        except DecodeError as error:
            raise BodyError(
                400, "invalid_otlp", f"the body is not an OTLP protobuf export: {error}"
            ) from None
        return export
    try:
        document = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as error:
        raise BodyError(400, "invalid_json", f"the body is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise BodyError(400, "invalid_otlp", "the body is not a JSON object")
    _hex_ids_to_base64(document, layout)
    try:
        json_format.ParseDict(document, export, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as error:
        raise BodyError(400, "invalid_otlp", f"the body is not an OTLP JSON export: {error}") from None
    return export


def _hex_ids_to_base64(document: dict[str, object], layout: _JsonLayout) -> None:
    """OTLP JSON writes trace and span ids in hex; the protobuf JSON mapping reads bytes as base64.

    Anything not shaped like an export is left for ``ParseDict`` to name.
    """
    for path, holder, field in _id_fields(document, layout):
        value = holder[field]
        if not isinstance(value, str):
            continue
        try:
            holder[field] = base64.b64encode(bytes.fromhex(value)).decode()
        except ValueError:
            raise BodyError(400, "invalid_otlp", f"{path}.{field}: {value[:40]!r} is not hex") from None


def _id_fields(
    document: dict[str, object], layout: _JsonLayout
) -> Iterator[tuple[str, dict[str, object], str]]:
    resources, scopes, items = layout.resources, layout.scopes, layout.items
    for r, resource in _dicts(_either(document, resources)):
        for s, scope in _dicts(_either(resource, scopes)):
            for n, item in _dicts(_either(scope, items)):
                path = f"{resources}[{r}].{scopes}[{s}].{items}[{n}]"
                yield from _ids_in(path, item, layout.ids)
                if layout.nested is not None:
                    for k, entry in _dicts(item.get(layout.nested)):
                        yield from _ids_in(f"{path}.{layout.nested}[{k}]", entry, _LINK_IDS)


def _ids_in(
    path: str, holder: dict[str, object], names: tuple[str, ...]
) -> Iterator[tuple[str, dict[str, object], str]]:
    for name in names:
        for field in (name, _snake(name)):
            if field in holder:
                yield path, holder, field


def _either(holder: dict[str, object], camel: str) -> object:
    """The member named in lowerCamelCase, as OTLP JSON writes it, else in snake_case,
    which the protobuf JSON mapping reads too."""
    return holder.get(camel, holder.get(_snake(camel)))


@functools.cache
def _snake(camel: str) -> str:
    return re.sub(r"[A-Z]", lambda upper: "_" + upper.group().lower(), camel)


def _dicts(items: object) -> Iterator[tuple[int, dict[str, object]]]:
    if isinstance(items, list):
        for index, item in enumerate(items):
            if isinstance(item, dict):
                yield index, item


# -- spans to calls ---------------------------------------------------------------


class Mapped(msgspec.Struct):
    """What a trace export holds: its calls, the evaluations its spans' events record, and
    why each rejected GenAI span or evaluation event was rejected, in the export's order."""

    calls: list[Call]
    rejected: list[str]
    evaluations: list[LLMEvaluation] = []
    # How many of ``rejected`` are evaluation events: the rest are spans.
    rejected_evaluations: int = 0


def calls_from_export(export: ExportTraceServiceRequest, tenant_id: str | None) -> Mapped:
    """Every GenAI span of ``export`` as a call, and every ``gen_ai.evaluation.result``
    event of any span as an evaluation; other spans and events are left out.

    ``tenant_id`` is the API key's tenant (None with ``AUTH=off``: the spans must
    then name theirs in ``streamlens.tenant_id``).
    """
    mapped = Mapped(calls=[], rejected=[])
    for resource_spans in export.resource_spans:
        pairs = resource_spans.resource.attributes
        resource = _attributes(pairs, _RESOURCE_ATTRIBUTE_FIELDS)
        # Decoded once for all the resource's spans.
        resource_metadata = _scalars({pair.key: pair for pair in pairs})
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                try:
                    call = call_from_span(span, resource, tenant_id, resource_metadata)
                except SpanRejected as error:
                    mapped.rejected.append(f"span {_span_name(span)}: {error}")
                    call = None
                if call is not None:
                    mapped.calls.append(call)
                # Most spans have no events: those cost one read here, nothing more.
                if span.events:
                    _add_span_evaluations(span, resource, tenant_id, mapped)
    return mapped


def _add_span_evaluations(
    span: Span, resource: dict[str, Value], tenant_id: str | None, mapped: Mapped
) -> None:
    # An evaluation stands on its own, as in a batch: a rejected call does not cost
    # the evaluations of its span, nor a broken evaluation the others.
    for index, event in enumerate(span.events):
        if event.name != EVALUATION_EVENT:
            continue
        try:
            evaluation = evaluation_from_span_event(span, event, resource, tenant_id)
        except SpanRejected as error:
            mapped.rejected.append(f"span {_span_name(span)}, event {index} ({EVALUATION_EVENT}): {error}")
            mapped.rejected_evaluations += 1
            continue
        mapped.evaluations.append(evaluation)


def call_from_span(
    span: Span,
    resource: dict[str, Value],
    tenant_id: str | None,
    resource_metadata: dict[str, MetadataValue] | None = None,
) -> Call | None:
    """The call a span records, None for a span that is not a model call, or :class:`SpanRejected`.

    ``resource`` holds the resource's ``service.name`` and ``streamlens.tenant_id``
    attributes, ``resource_metadata`` the resource's attributes that may become
    metadata (see :func:`calls_from_export`).
    """
    # Kept as protobuf pairs: only a call's are decoded, and many spans of an
    # export may not be calls.
    others: dict[str, KeyValue] = {}
    attributes = _attributes(span.attributes, _SPAN_ATTRIBUTE_FIELDS, others)
    operation = _string(attributes, OPERATION)
    system = _string(attributes, SYSTEM)
    request_model = _string(attributes, REQUEST_MODEL)
    if operation is None and (system is None or request_model is None):
        return None
    if operation in STEP_OPERATIONS:
        return None
    model = _string(attributes, RESPONSE_MODEL) or request_model
    if not model:
        if operation in MODEL_OPERATIONS:
            raise SpanRejected(
                f"{OPERATION} is {operation!r} but neither {RESPONSE_MODEL} nor {REQUEST_MODEL} is set"
            )
        return None
    # Each read of a protobuf field builds a new Python object: read each once.
    request_id = span_request_id(span.trace_id, span.span_id)
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    if start == 0 or end == 0:
        raise SpanRejected("start_time_unix_nano and end_time_unix_nano are required")
    if end < start:
        raise SpanRejected("end_time_unix_nano is before start_time_unix_nano")
    route = _string(attributes, ROUTE) or _string(resource, SERVICE_NAME)
    if route is None:
        raise SpanRejected(
            f"no route: set the span attribute {ROUTE} or the resource attribute {SERVICE_NAME}"
        )
    tenant = _string(attributes, TENANT) or _string(resource, TENANT) or tenant_id
    if tenant is None:
        raise SpanRejected(f"no tenant: without API keys a span names its tenant in {TENANT}")
    prompt = _tokens(attributes, INPUT_TOKENS, PROMPT_TOKENS)
    completion = _tokens(attributes, OUTPUT_TOKENS, COMPLETION_TOKENS)
    fields_request = {
        "request_id": request_id,
        "tenant_id": tenant,
        "route": route,
        "model": model,
        "timestamp": _instant(start),
        "prompt_tokens": prompt,
        "provider": _string(attributes, PROVIDER) or system,
        "metadata": metadata(resource_metadata or {}, _span_scalars(others, attributes)),
    }
    fields_response = {
        "request_id": request_id,
        "tenant_id": tenant,
        "timestamp": _instant(end),
        "latency_ms": (end - start) / 1e6,
        "completion_tokens": completion,
        "cache_read_tokens": _tokens(attributes, CACHE_READ_TOKENS),
        "reasoning_tokens": _tokens(attributes, REASONING_TOKENS),
        "time_to_first_token_ms": _first_chunk_ms(attributes),
        "finish_reason": _first_string(attributes, FINISH_REASONS),
        "error": _error(span, attributes),
    }
    try:
        request = msgspec.convert(fields_request, LLMRequest)
        response = msgspec.convert(fields_response, LLMResponse)
    except msgspec.ValidationError as error:
        raise SpanRejected(_with_source(str(error))) from None
    mismatch = check_cache_read(request, response)
    if mismatch is not None:
        raise SpanRejected(f"{CACHE_READ_TOKENS} exceeds {INPUT_TOKENS}: {mismatch}")
    return request, response


def span_request_id(trace_id: bytes, span_id: bytes) -> str:
    """The request_id of the call a span records: its trace id and span id in hex."""
    if len(trace_id) != 16 or trace_id == _ZERO_TRACE_ID:
        raise SpanRejected("trace_id: expected 16 bytes, not all zero")
    if len(span_id) != 8 or span_id == _ZERO_SPAN_ID:
        raise SpanRejected("span_id: expected 8 bytes, not all zero")
    return trace_id.hex() + span_id.hex()


def _span_name(span: Span) -> str:
    return f"{span.trace_id.hex()}/{span.span_id.hex()} ({span.name[:80]!r})"


def _with_source(message: str, sources: dict[str, str] = _FIELD_SOURCES) -> str:
    for field, source in sources.items():
        if message.endswith(f"`$.{field}`"):
            return f"{message} (from {source})"
    return message


def _instant(unix_nano: int) -> datetime:
    # Integer arithmetic: a float of nanoseconds since 1970 is off by up to a microsecond.
    return _EPOCH + _MICROSECOND * (unix_nano // 1000)


def _error(span: Span, attributes: dict[str, Value]) -> str | None:
    error_type = _string(attributes, ERROR_TYPE)
    if span.status.code == Status.STATUS_CODE_ERROR:
        return error_type or span.status.message or "error"
    return error_type


def _first_chunk_ms(attributes: dict[str, Value]) -> float | None:
    seconds = _number(attributes, TIME_TO_FIRST_CHUNK)
    if seconds is None:
        seconds = _number(attributes, TIME_TO_FIRST_TOKEN)
    return None if seconds is None else seconds * 1000


# -- evaluation events to evaluations --------------------------------------------------


class Evaluations(msgspec.Struct):
    """What a log export holds: its evaluations, and why each rejected evaluation event
    was rejected. Log records that are not evaluation events are left out."""

    evaluations: list[LLMEvaluation]
    rejected: list[str]


def evaluations_from_logs(export: ExportLogsServiceRequest, tenant_id: str | None) -> Evaluations:
    """Every ``gen_ai.evaluation.result`` log record of ``export`` as an evaluation.

    ``tenant_id`` is the API key's tenant, as for :func:`calls_from_export`.
    """
    found = Evaluations(evaluations=[], rejected=[])
    for r, resource_logs in enumerate(export.resource_logs):
        resource = _attributes(resource_logs.resource.attributes, _RESOURCE_ATTRIBUTE_FIELDS)
        for s, scope_logs in enumerate(resource_logs.scope_logs):
            for n, record in enumerate(scope_logs.log_records):
                try:
                    evaluation = evaluation_from_log_record(record, resource, tenant_id)
                except SpanRejected as error:
                    where = f"resourceLogs[{r}].scopeLogs[{s}].logRecords[{n}]"
                    found.rejected.append(f"log record {where}: {error}")
                    continue
                if evaluation is not None:
                    found.evaluations.append(evaluation)
    return found


def evaluation_from_span_event(
    span: Span, event: Span.Event, resource: dict[str, Value], tenant_id: str | None
) -> LLMEvaluation:
    """The evaluation a ``gen_ai.evaluation.result`` span event records, about the call of
    its span (the request_id :func:`call_from_span` gives it), or :class:`SpanRejected`.

    The tenant is the span's, as for its call: ``resource`` holds the resource's
    ``streamlens.tenant_id`` and ``tenant_id`` is the API key's.
    """
    request_id = span_request_id(span.trace_id, span.span_id)
    own = _attributes(span.attributes, _TENANT_FIELD)
    tenant = _string(own, TENANT) or _string(resource, TENANT) or tenant_id
    attributes = _attributes(event.attributes, _EVALUATION_ATTRIBUTE_FIELDS)
    return _evaluation(attributes, request_id, tenant, event.time_unix_nano, "the event's time_unix_nano")


def evaluation_from_log_record(
    record: LogRecord, resource: dict[str, Value], tenant_id: str | None
) -> LLMEvaluation | None:
    """The evaluation a ``gen_ai.evaluation.result`` log record records, None for another
    log record, or :class:`SpanRejected`.

    The call is the span of the record's span context, else the one whose response
    ``gen_ai.response.id`` names; the tenant is the record's ``streamlens.tenant_id``,
    else the resource's, else the API key's ``tenant_id``.
    """
    event_name = record.event_name
    if event_name and event_name != EVALUATION_EVENT:
        return None
    attributes = _attributes(record.attributes, _LOG_ATTRIBUTE_FIELDS)
    if not event_name and attributes.get(EVENT_NAME) != EVALUATION_EVENT:
        return None
    trace_id, span_id = record.trace_id, record.span_id
    if any(trace_id) and any(span_id):
        request_id = span_request_id(trace_id, span_id)
    else:
        request_id = _string(attributes, RESPONSE_ID)
        if request_id is None:
            raise SpanRejected(
                f"no call: the record has no span context (trace_id and span_id) and no {RESPONSE_ID}"
            )
    tenant = _string(attributes, TENANT) or _string(resource, TENANT) or tenant_id
    # The observed time is when the SDK received the record: the next best to when it was made.
    unix_nano = record.time_unix_nano or record.observed_time_unix_nano
    return _evaluation(attributes, request_id, tenant, unix_nano, "time_unix_nano or observed_time_unix_nano")


def _evaluation(
    attributes: dict[str, Value], request_id: str, tenant: str | None, unix_nano: int, time_source: str
) -> LLMEvaluation:
    name = _string(attributes, EVALUATION_NAME)
    if name is None:
        raise SpanRejected(f"{EVALUATION_NAME} is required")
    score = _number(attributes, SCORE_VALUE)
    label = _string(attributes, SCORE_LABEL)
    if score is None and label is None:
        raise SpanRejected(f"neither {SCORE_VALUE} nor {SCORE_LABEL} is set")
    if tenant is None:
        raise SpanRejected(f"no tenant: without API keys an evaluation names its tenant in {TENANT}")
    if unix_nano == 0:
        raise SpanRejected(f"no time: {time_source} is required")
    fields = {
        "request_id": request_id,
        "tenant_id": tenant,
        "name": name,
        "timestamp": _instant(unix_nano),
        "score": score,
        "label": label,
        # The conventions have no attribute for who evaluated.
        "evaluator": None,
        "explanation": _string(attributes, EXPLANATION),
    }
    try:
        return msgspec.convert(fields, LLMEvaluation)
    except msgspec.ValidationError as error:
        raise SpanRejected(_with_source(str(error), _EVALUATION_SOURCES)) from None


# -- metadata -------------------------------------------------------------------------


def metadata(
    resource: dict[str, MetadataValue], span: dict[str, MetadataValue]
) -> dict[str, MetadataValue] | None:
    """A request's metadata from the scalars (:func:`_scalars`) of its resource and its span.

    The span's value wins over the resource's of the same name. Within the
    request's limits (:data:`METADATA_MAX_KEYS` keys, ``METADATA_MAX_BYTES``
    encoded) every attribute is kept; beyond them the names of
    :data:`METADATA_FIRST` come first and the others by name (code point order),
    each kept while it fits: an attribute that would go over the bytes is left
    out and the next ones are still tried. None when nothing is left.
    """
    merged = {**resource, **span}
    if not merged:
        return None
    if len(merged) <= METADATA_MAX_KEYS and len(_encoder.encode(merged)) <= METADATA_MAX_BYTES:
        return merged
    ordered = {name: merged[name] for name in METADATA_FIRST if name in merged}
    for name in sorted(merged):
        if name not in _METADATA_FIRST:
            ordered[name] = merged[name]
    kept: dict[str, MetadataValue] = {}
    size = 2  # {}
    for name, value in ordered.items():
        # "name":value, and a comma before all but the first.
        entry = len(_encoder.encode(name)) + 1 + len(_encoder.encode(value)) + (1 if kept else 0)
        if size + entry > METADATA_MAX_BYTES:
            continue
        kept[name] = value
        size += entry
        if len(kept) == METADATA_MAX_KEYS:
            break
    return kept


def _span_scalars(others: dict[str, KeyValue], attributes: dict[str, Value]) -> dict[str, MetadataValue]:
    """:func:`_scalars` of a span: ``others``, and its ``gen_ai.operation.name`` (a
    string, or the span was rejected), which :func:`_attributes` has already read."""
    found = _scalars(others)
    operation = attributes.get(OPERATION)
    if isinstance(operation, str):
        found[OPERATION] = operation[:VALUE_MAX_CHARS]
    return found


def _scalars(pairs: dict[str, KeyValue]) -> dict[str, MetadataValue]:
    """The attributes that may become metadata, as their values: see :func:`metadata_key`
    for the names; strings (cut to ``VALUE_MAX_CHARS``; an empty one too), booleans,
    integers and finite doubles. Arrays, key-value lists, bytes, attributes without a
    value, NaN and infinities are left out."""
    found: dict[str, MetadataValue] = {}
    for key, pair in pairs.items():
        verdict = _key_verdicts.get(key)
        if verdict is None:
            verdict = metadata_key(key)
            # Bounded: exports that make up a new name for every span must not grow it.
            if len(_key_verdicts) < _KEY_VERDICTS_MAX:
                _key_verdicts[key] = verdict
        if not verdict:
            continue
        value = pair.value
        # Most are strings, and a non-empty string can only be the member set: one
        # read instead of two, as in _attributes. A dimension shows no more of a
        # value, and one long value would otherwise take the room of many others.
        text = value.string_value
        if text:
            found[key] = text[:VALUE_MAX_CHARS]
            continue
        kind = value.WhichOneof("value")
        if kind == "string_value":
            found[key] = text
        elif kind == "bool_value":
            found[key] = value.bool_value
        elif kind == "int_value":  # int64: always within what JSON and msgpack hold
            found[key] = value.int_value
        elif kind == "double_value":
            number = value.double_value
            # JSON has no NaN or infinity: msgspec would write null, another value.
            if math.isfinite(number):
                found[key] = number
    return found


def metadata_key(key: str) -> bool:
    """Whether an attribute of this name may become a metadata key: 1-128 characters
    without control characters, and none of :data:`FIELD_ATTRIBUTES` or
    :data:`CONTENT_ATTRIBUTES`."""
    if not key or len(key) > METADATA_KEY_MAX_CHARS:
        return False
    if not (key.isascii() and key.isprintable()) and _CONTROL.search(key):
        return False
    if key in FIELD_ATTRIBUTES:
        return False
    return not (key.startswith("gen_ai.") and (key in CONTENT_ATTRIBUTES or key.startswith(_CONTENT_BELOW)))


# -- attribute values ---------------------------------------------------------------

# An attribute's value as Python: str, bool, int, float, bytes, the values of an
# array (a sequence of AnyValue), a KeyValueList, or None when no value is set.
Value = object
# The sequence type protobuf gives repeated messages, for naming an array's kind.
_Values = type(ArrayValue().values)
_KINDS: dict[type, str] = {
    str: "string", bool: "bool", int: "int", float: "double", bytes: "bytes", _Values: "array"
}  # fmt: skip


def _attributes(
    pairs: list[KeyValue], expected: dict[str, str], every: dict[str, KeyValue] | None = None
) -> dict[str, Value]:
    """The attributes named in ``expected`` as Python values, each read once from the protobuf;
    ``every`` receives the others by key, undecoded.

    Reading a field of a protobuf message costs far more than a dict lookup: a
    profile of ``POST /v1/traces`` spent a quarter of the server's time in this
    loop, each pair and value a new Python object, each field looked up by name.
    Asking ``WhichOneof`` and then reading the member it names was a third of
    it; so the member an attribute is expected in (``expected[key]``) is read
    first, one read instead of two: a non-empty string, a non-zero number or a
    non-empty array can only be the member that is set. Anything else (an empty
    string, a zero, another type, no value) is read as what it is. The last of
    repeated keys wins, as in the SDKs.
    """
    found: dict[str, Value] = {}
    for pair in pairs:
        key = pair.key
        member = expected.get(key)
        if member is None:
            if every is not None:
                every[key] = pair
            continue
        value = pair.value
        read = getattr(value, member) if member else value.array_value.values
        found[key] = read if read else _any_value(value)
    return found


def _any_value(value: AnyValue) -> Value:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return value.array_value.values
    return getattr(value, kind)


def _kind(value: Value) -> str:
    return _KINDS.get(type(value), "kvlist")


def _string(attributes: dict[str, Value], key: str) -> str | None:
    value = attributes.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    raise SpanRejected(f"{key}: expected a string, got {_kind(value)}")


def _number(attributes: dict[str, Value], key: str) -> float | None:
    value = attributes.get(key)
    if value is None or isinstance(value, float):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise SpanRejected(f"{key}: expected a number, got {_kind(value)}")


def _tokens(attributes: dict[str, Value], key: str, deprecated: str | None = None) -> int:
    """A token count: ``key``, else its ``deprecated`` name, else 0."""
    if key not in attributes and deprecated is not None:
        key = deprecated
    value = attributes.get(key)
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    # Some SDKs (JavaScript's among them) may send whole numbers as doubles.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise SpanRejected(f"{key}: expected an integer, got {_kind(value)}")


def _first_string(attributes: dict[str, Value], key: str) -> str | None:
    """The first of a string array (a plain string is taken as it is)."""
    value = attributes.get(key)
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, _Values):
        if not value:
            return None
        first: AnyValue = value[0]
        text = first.string_value
        if text or first.WhichOneof("value") == "string_value":
            return text or None
    raise SpanRejected(f"{key}: expected an array of strings, got {_kind(value)}")


# -- answers ------------------------------------------------------------------------


def _media_type(encoding: Encoding) -> str:
    return PROTOBUF if encoding == "protobuf" else JSON


def _encoded(message: Message, encoding: Encoding) -> bytes:
    if encoding == "protobuf":
        return message.SerializeToString()
    return json_format.MessageToJson(message, indent=None).encode()


def _first_problem(rejected: list[str]) -> str:
    more = f" (and {len(rejected) - 1} more)" if len(rejected) > 1 else ""
    return rejected[0] + more


def export_response(rejected: list[str], encoding: Encoding) -> Response:
    """200 with an ``ExportTraceServiceResponse``: ``partial_success`` names the first rejection."""
    answer = ExportTraceServiceResponse()
    if rejected:
        answer.partial_success.CopyFrom(
            ExportTracePartialSuccess(rejected_spans=len(rejected), error_message=_first_problem(rejected))
        )
    return Response(_encoded(answer, encoding), status_code=200, media_type=_media_type(encoding))


def logs_export_response(rejected: list[str], encoding: Encoding) -> Response:
    """200 with an ``ExportLogsServiceResponse``: ``partial_success`` names the first rejection."""
    answer = ExportLogsServiceResponse()
    if rejected:
        answer.partial_success.CopyFrom(
            ExportLogsPartialSuccess(
                rejected_log_records=len(rejected), error_message=_first_problem(rejected)
            )
        )
    return Response(_encoded(answer, encoding), status_code=200, media_type=_media_type(encoding))


# The gRPC code a ``google.rpc.Status`` carries for each HTTP status answered here.
_STATUS_CODES = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    413: code_pb2.RESOURCE_EXHAUSTED,
    429: code_pb2.RESOURCE_EXHAUSTED,
    415: code_pb2.INVALID_ARGUMENT,
    503: code_pb2.UNAVAILABLE,
}


def as_status(error: ApiError, encoding: Encoding) -> Response:
    """An error of :mod:`api.errors` as OTLP wants it: a ``google.rpc.Status`` in the
    request's encoding, with the HTTP status and headers the JSON answer would have."""
    status = status_pb2.Status(
        code=_STATUS_CODES.get(error.status, code_pb2.UNKNOWN), message=f"{error.code}: {error.detail}"
    )
    return Response(
        _encoded(status, encoding),
        status_code=error.status,
        headers=dict(error.headers),
        media_type=_media_type(encoding),
    )
