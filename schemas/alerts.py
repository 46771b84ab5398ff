"""Alert rules and budgets (docs/alerts.md): what a tenant asks to be told, checked field by field.

A rule watches one metric of a tenant's rows — optionally of one route, one model,
one value of one of its dimensions — either over ``span_seconds`` of windows merged
as the query API's roll-ups merge them (a multiple of ``WINDOW_SECONDS``, 60 s to a
day), or, as a **budget**, summed over a UTC ``period`` (``day`` or ``month``). It
fires after ``for_windows`` consecutive breaching windows holding at least
``min_calls`` calls, and resolves at the first window that does not breach; a
budget fires once a period, when the period's sum reaches the threshold.

Every constraint is declared once here: the types (:class:`RuleBody`), the rules
between fields (its ``__post_init__``), and those that depend on the deployment
(:func:`check_rule`: the window length, where webhooks may go). Errors name the
field, as msgspec's own do (``… - at `$.field```).

Pure rules: no Bytewax, Kafka or Postgres here.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from schemas.dimensions import VALUE_MAX_CHARS, DimensionName, InvalidDimension, check_name
from schemas.events import EVALUATION_NAME_MAX_CHARS, Identifier
from schemas.webhooks import URL_MAX_CHARS, AllowList, check_url

# Metrics of a window a rule may watch, beside ``score_avg:<evaluation name>``.
METRICS: tuple[str, ...] = (
    "calls",
    "errors",
    "error_rate",
    "timeouts",
    "timeout_rate",
    "p50_latency_ms",
    "p95_latency_ms",
    "p99_latency_ms",
    "avg_time_to_first_token_ms",
    "estimated_cost_usd",
    "prompt_tokens",
    "completion_tokens",
)
SCORE_PREFIX = "score_avg:"
# What a budget may add up over its period: sums, not rates or percentiles.
BUDGET_METRICS: tuple[str, ...] = (
    "calls",
    "errors",
    "timeouts",
    "estimated_cost_usd",
    "prompt_tokens",
    "completion_tokens",
)
SPAN_MIN_SECONDS = 60
SPAN_MAX_SECONDS = 86_400
MAX_FOR_WINDOWS = 1_440
REPEAT_MIN_SECONDS = 60
REPEAT_MAX_SECONDS = 30 * 86_400
SECRET_MIN_CHARS = 16
SECRET_MAX_CHARS = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Op = Literal[">", ">=", "<", "<="]
Period = Literal["day", "month"]
# A rule's name has the limits of an identifier.
RuleName = Identifier
MetricName = Annotated[str, Meta(min_length=1, max_length=len(SCORE_PREFIX) + EVALUATION_NAME_MAX_CHARS)]
SpanSeconds = Annotated[int, Meta(ge=SPAN_MIN_SECONDS, le=SPAN_MAX_SECONDS)]
ForWindows = Annotated[int, Meta(ge=1, le=MAX_FOR_WINDOWS)]
MinCalls = Annotated[int, Meta(ge=0, le=1_000_000_000)]
RepeatSeconds = Annotated[int, Meta(ge=REPEAT_MIN_SECONDS, le=REPEAT_MAX_SECONDS)]
WebhookUrl = Annotated[str, Meta(min_length=1, max_length=URL_MAX_CHARS)]
WebhookSecret = Annotated[str, Meta(min_length=SECRET_MIN_CHARS, max_length=SECRET_MAX_CHARS)]
DimensionValue = Annotated[str, Meta(max_length=VALUE_MAX_CHARS)]


class InvalidRule(ValueError):
    """A rule that breaks a rule; the message names the field."""


def _error(field: str, message: str) -> InvalidRule:
    return InvalidRule(f"{message} - at `$.{field}`")


class RuleBody(Struct, forbid_unknown_fields=True, kw_only=True):
    """A rule as ``POST /v1/alerts/rules`` takes it (and ``PATCH`` once merged)."""

    tenant_id: Identifier
    name: RuleName
    metric: MetricName
    op: Op
    threshold: float
    webhook_url: WebhookUrl
    route: Identifier | None = None
    model: Identifier | None = None
    dimension: DimensionName | None = None
    # With a dimension: the value whose rows count; null for the calls without one.
    value: DimensionValue | UnsetType | None = UNSET
    span_seconds: SpanSeconds | None = None
    period: Period | None = None
    for_windows: ForWindows = 1
    min_calls: MinCalls = 1
    repeat_seconds: RepeatSeconds | None = None
    # Signs each delivery; stored, never returned.
    webhook_secret: WebhookSecret | None = None

    def __post_init__(self) -> None:
        check_metric(self.metric)
        if not math.isfinite(self.threshold):
            raise _error("threshold", "Expected a finite number")
        if (self.span_seconds is None) == (self.period is None):
            raise _error(
                "span_seconds",
                "Expected either span_seconds (windows merged over that span) or period (a budget)",
            )
        if self.period is not None:
            if self.metric not in BUDGET_METRICS:
                raise _error("metric", f"A budget adds up one of {', '.join(BUDGET_METRICS)}")
            if self.op not in (">", ">="):
                raise _error("op", "A budget fires when its period's sum reaches the threshold: > or >=")
            if self.for_windows != 1:
                raise _error("for_windows", "A budget fires once a period: for_windows does not apply")
        if self.dimension is not None:
            try:
                check_name(self.dimension)
            except InvalidDimension as error:
                raise _error("dimension", str(error)) from None
            if self.value is UNSET:
                raise _error("value", "Expected the value whose rows count (null for calls without one)")
        elif self.value is not UNSET:
            raise _error("value", "A value needs its dimension")
        if isinstance(self.value, str) and _CONTROL.search(self.value):
            raise _error("value", "Expected no control characters, as no stored value has")


def evaluation_name(metric: str) -> str | None:
    """The evaluation whose scores a ``score_avg:<name>`` metric averages; None for the others."""
    return metric[len(SCORE_PREFIX) :] if metric.startswith(SCORE_PREFIX) else None


def check_metric(metric: str) -> None:
    if metric in METRICS:
        return
    name = evaluation_name(metric)
    if name is not None:
        if 0 < len(name) <= EVALUATION_NAME_MAX_CHARS and not _CONTROL.search(name):
            return
        raise _error(
            "metric", f"Expected {SCORE_PREFIX}<evaluation name of 1-{EVALUATION_NAME_MAX_CHARS} characters>"
        )
    raise _error("metric", f"Expected one of {', '.join(METRICS)}, or {SCORE_PREFIX}<evaluation name>")


def check_rule(rule: RuleBody, window_seconds: int, allow: AllowList) -> None:
    """What depends on the deployment: a span of whole windows; a webhook that resolves to
    addresses it may reach (:mod:`schemas.webhooks`)."""
    if rule.span_seconds is not None and rule.span_seconds % window_seconds:
        raise _error("span_seconds", f"Expected a multiple of WINDOW_SECONDS ({window_seconds})")
    try:
        check_url(rule.webhook_url, allow)
    except ValueError as error:
        raise _error("webhook_url", str(error)) from None


class AlertRule(Struct, kw_only=True):
    """A stored rule, as the API answers it: the body without its secret."""

    id: str
    tenant_id: str
    name: str
    metric: str
    op: Op
    threshold: float
    webhook_url: str
    route: str | None
    model: str | None
    dimension: str | None
    value: str | None
    span_seconds: int | None
    period: Period | None
    for_windows: int
    min_calls: int
    repeat_seconds: int | None
    webhook_secret_set: bool
    created_at: datetime
    updated_at: datetime


class AlertTransition(Struct, kw_only=True):
    """A transition of a rule as ``GET /v1/alerts`` shows it: what was told and where its
    delivery stands (``pending`` until ``next_attempt_at``, ``delivered``, ``failed``, or
    ``cancelled`` with its rule)."""

    id: str  # the Idempotency-Key of its deliveries
    state: Literal["firing", "resolved"]
    window_start: datetime
    window_end: datetime
    value: float | None
    threshold: float
    at: datetime
    delivery: Literal["pending", "delivered", "failed", "cancelled"]
    attempts: int
    delivered_at: datetime | None
    next_attempt_at: datetime | None
    last_error: str | None


class RuleAlerts(Struct, kw_only=True):
    """A rule's state (``firing`` or ``ok``, since the window of its last transition; a
    budget is ``firing`` in the UTC day or month it was reached in) and its latest
    transitions, newest first."""

    rule_id: str
    rule_name: str
    metric: str
    op: Op
    threshold: float
    route: str | None
    model: str | None
    period: Period | None  # a budget's
    state: Literal["firing", "ok"]
    since: datetime | None
    transitions: list[AlertTransition]


def decode_body(data: bytes) -> RuleBody:
    """A rule from JSON; msgspec.ValidationError or InvalidRule naming the field."""
    try:
        return msgspec.json.decode(data, type=RuleBody)
    except msgspec.ValidationError as error:
        raise InvalidRule(str(error)) from None


def merged(stored: RuleBody, patch: dict[str, object]) -> RuleBody:
    """``stored`` with the fields of ``patch`` replaced (``PATCH``), checked as a whole;
    ``tenant_id`` cannot change."""
    if "tenant_id" in patch and patch["tenant_id"] != stored.tenant_id:
        raise _error("tenant_id", "A rule stays with its tenant")
    fields = {name: value for name, value in msgspec.structs.asdict(stored).items() if value is not UNSET}
    fields.update(patch)
    if "dimension" in patch and patch["dimension"] is None and "value" not in patch:
        fields.pop("value", None)  # no dimension, no value
    try:
        return msgspec.convert(fields, RuleBody)
    except msgspec.ValidationError as error:
        raise InvalidRule(str(error)) from None
