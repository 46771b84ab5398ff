"""The events applications send: a request when an LLM call starts, a response when it ends,
and an evaluation (a score or a label about a call) whenever one is made (docs/evaluations.md).

Every rule of the contract is enforced while decoding, so a value of these types
is valid by construction. Decoding errors are :class:`msgspec.ValidationError`
whose message names the field (``... - at `$.timestamp```).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

# Patterns that mean the same in Python (msgspec, the query API's checks) and in ECMAScript
# (JSON Schema's ``pattern``, in the query API's OpenAPI document): ``(?![\s\S])`` is the end
# of the text in both, where Python's ``$`` also matches before a final newline and
# ECMAScript has no ``\Z``. ``^`` and ``(?![\s\S])`` bound the whole text: msgspec and
# JSON Schema search for a pattern anywhere in it.
NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f]*(?![\s\S])"
# What Postgres text cannot hold, so no stored route, model or value does.
NO_NUL_PATTERN = r"^[^\x00]*(?![\s\S])"

# Identifiers end up in Kafka keys, Postgres keys and log lines: control
# characters would corrupt all three.
IDENTIFIER_MAX_CHARS = 128
NAME_MAX_CHARS = 255
# What an identifier must be, as error messages say it.
IDENTIFIER_RULE = f"1-{IDENTIFIER_MAX_CHARS} characters without control characters"
# The events check the pattern in ``__post_init__`` instead (:func:`_check_identifier`):
# msgspec runs a Python regex search per field, two thirds of an event's decoding time.
_IdentifierText = Annotated[str, Meta(min_length=1, max_length=IDENTIFIER_MAX_CHARS)]
Identifier = Annotated[_IdentifierText, Meta(pattern=NO_CONTROL_PATTERN)]
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
Name = Annotated[str, Meta(min_length=1, max_length=NAME_MAX_CHARS)]
# A route or model as the query API is asked for one: as rows hold it, so without NUL.
StoredName = Annotated[Name, Meta(pattern=NO_NUL_PATTERN)]
Timestamp = Annotated[datetime, Meta(tz=True)]
# A billion tokens is far beyond any context window, and keeps window sums far
# from overflowing Postgres bigint.
MAX_TOKENS = 1_000_000_000
TokenCount = Annotated[int, Meta(ge=0, le=MAX_TOKENS)]
Milliseconds = Annotated[float, Meta(ge=0)]
MetadataValue = str | int | float | bool | None
Metadata = Annotated[dict[str, MetadataValue], Meta(max_length=64)]

METADATA_MAX_BYTES = 8 * 1024
BATCH_MAX_EVENTS = 1000


def _field_error(field: str, message: str) -> ValueError:
    # Same shape as msgspec's own messages, so every error names its field alike.
    return ValueError(f"{message} - at `$.{field}`")


def _check_identifier(field: str, value: str) -> None:
    # A printable text (nearly every identifier) has no control character: no regex needed.
    if not value.isprintable() and _CONTROL.search(value):
        raise _field_error(field, f"Expected `str` matching regex {NO_CONTROL_PATTERN!r}")


def _utc(timestamp: datetime) -> datetime:
    # msgspec decodes a "Z" or "+00:00" offset as UTC itself: nothing to convert.
    if timestamp.tzinfo is UTC:
        return timestamp
    # Near year 1 or 9999 the UTC time does not exist; that must be a
    # ValidationError like any broken rule, not an OverflowError escaping the decoder.
    try:
        return timestamp.astimezone(UTC)
    except OverflowError:
        raise _field_error("timestamp", "Expected a time within years 1-9999 in UTC") from None


class LLMRequest(Struct, tag="request", tag_field="type", kw_only=True):
    """A call started."""

    request_id: _IdentifierText
    tenant_id: _IdentifierText
    route: Name
    model: Name
    timestamp: Timestamp
    prompt_tokens: TokenCount = 0
    provider: str | None = None
    user_id_hash: Annotated[str, Meta(max_length=128)] | None = None
    metadata: Metadata | None = None

    def __post_init__(self) -> None:
        _check_identifier("request_id", self.request_id)
        _check_identifier("tenant_id", self.tenant_id)
        self.timestamp = _utc(self.timestamp)
        if self.metadata is not None and len(msgspec.json.encode(self.metadata)) > METADATA_MAX_BYTES:
            raise _field_error("metadata", f"Expected at most {METADATA_MAX_BYTES} bytes encoded")


class LLMResponse(Struct, tag="response", tag_field="type", kw_only=True):
    """A call ended, successfully or not."""

    request_id: _IdentifierText
    timestamp: Timestamp
    # Not sent by applications: the ingestion API stamps the tenant of the API key
    # that sent the response, so the join never pairs it with another tenant's request.
    tenant_id: _IdentifierText | None = None
    latency_ms: Milliseconds | None = None
    completion_tokens: TokenCount = 0
    cache_read_tokens: TokenCount = 0
    reasoning_tokens: TokenCount = 0
    time_to_first_token_ms: Milliseconds | None = None
    finish_reason: Annotated[str, Meta(max_length=64)] | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        _check_identifier("request_id", self.request_id)
        if self.tenant_id is not None:
            _check_identifier("tenant_id", self.tenant_id)
        self.timestamp = _utc(self.timestamp)
        if self.reasoning_tokens > self.completion_tokens:
            raise _field_error("reasoning_tokens", "Expected `int` <= completion_tokens (a subset of them)")

    @property
    def failed(self) -> bool:
        """An empty error string does not mark a failure; only a non-empty one does."""
        return bool(self.error)


# An evaluation's limits (docs/evaluations.md).
EVALUATION_NAME_MAX_CHARS = 64
LABEL_MAX_CHARS = 64
EVALUATOR_MAX_CHARS = 128
EXPLANATION_MAX_BYTES = 4 * 1024
# As for identifiers, events check the pattern in ``__post_init__``.
_EvaluationNameText = Annotated[str, Meta(min_length=1, max_length=EVALUATION_NAME_MAX_CHARS)]
# An evaluation name as the query API is asked for one: none holds a control character.
EvaluationName = Annotated[_EvaluationNameText, Meta(pattern=NO_CONTROL_PATTERN)]


class LLMEvaluation(Struct, tag="evaluation", tag_field="type", kw_only=True):
    """A score and/or a label about a call, made when its evaluator made it: often minutes
    or hours after the call. ``explanation`` is kept with it, not aggregated."""

    request_id: _IdentifierText
    tenant_id: _IdentifierText
    name: _EvaluationNameText
    timestamp: Timestamp
    score: float | None = None
    label: Annotated[str, Meta(min_length=1, max_length=LABEL_MAX_CHARS)] | None = None
    evaluator: Annotated[str, Meta(max_length=EVALUATOR_MAX_CHARS)] | None = None
    explanation: str | None = None

    def __post_init__(self) -> None:
        _check_identifier("request_id", self.request_id)
        _check_identifier("tenant_id", self.tenant_id)
        # The name and label key rows and the evaluator tells repeats apart: control
        # characters would corrupt the keys and the dashboards alike.
        _check_identifier("name", self.name)
        if self.label is not None:
            _check_identifier("label", self.label)
        if self.evaluator:
            _check_identifier("evaluator", self.evaluator)
        self.timestamp = _utc(self.timestamp)
        if self.score is None and self.label is None:
            raise _field_error("score", "Expected a `score`, a `label` or both")
        if self.score is not None and not math.isfinite(self.score):
            raise _field_error("score", "Expected a finite number")
        if self.explanation is not None and len(self.explanation.encode()) > EXPLANATION_MAX_BYTES:
            raise _field_error("explanation", f"Expected at most {EXPLANATION_MAX_BYTES} bytes encoded")


Event = LLMRequest | LLMResponse
EventType = Literal["request", "response"]
# What the ingestion API takes: the events of calls, and evaluations of them.
IngestEvent = LLMRequest | LLMResponse | LLMEvaluation


class EventBatch(Struct):
    """``POST /v1/llm/events``: events are kept raw so each is judged on its own."""

    events: Annotated[list[msgspec.Raw], Meta(max_length=BATCH_MAX_EVENTS)]


request_decoder = msgspec.json.Decoder(LLMRequest)
response_decoder = msgspec.json.Decoder(LLMResponse)
event_decoder = msgspec.json.Decoder(Event)
evaluation_decoder = msgspec.json.Decoder(LLMEvaluation)
ingest_decoder = msgspec.json.Decoder(IngestEvent)
batch_decoder = msgspec.json.Decoder(EventBatch)
encoder = msgspec.json.Encoder()


def check_cache_read(request: LLMRequest, response: LLMResponse) -> str | None:
    """The one rule that spans both events: cache-read tokens are part of the prompt."""
    if response.cache_read_tokens > request.prompt_tokens:
        return (
            f"cache_read_tokens ({response.cache_read_tokens}) exceeds the request's "
            f"prompt_tokens ({request.prompt_tokens}) - at `$.cache_read_tokens`"
        )
    return None


# Event time in the dataflow is the newest timestamp seen and never goes back: one
# timestamp far ahead would close windows and time out requests in flight early,
# for good. Two minutes leaves room for clients' clock skew.
MAX_FUTURE_SECONDS = 120


def check_not_future(event: IngestEvent, now: float) -> str | None:
    """The error when ``event`` is more than :data:`MAX_FUTURE_SECONDS` ahead of
    ``now`` (the server's clock, Unix seconds); None otherwise."""
    ahead = event.timestamp.timestamp() - now
    if ahead <= MAX_FUTURE_SECONDS:
        return None
    return (
        f"Expected a time at most {MAX_FUTURE_SECONDS} s ahead of the server clock, "
        f"it is ahead of it by {ahead:.3f} s - at `$.timestamp`"
    )
