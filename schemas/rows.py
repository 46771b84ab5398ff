"""The per-window metrics row: the same fields in Postgres, in ``llm.metrics`` and in the query API."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import msgspec
from msgspec import Struct

from schemas.dimensions import OTHER


class MetricsRow(Struct, kw_only=True):
    """One window of one ``(tenant_id, route, model)``.

    In query-API roll-ups ``route`` or ``model`` is ``None`` when merged across.
    """

    tenant_id: str
    route: str | None
    model: str | None
    window_start: datetime
    window_end: datetime
    requests: int
    errors: int
    timeouts: int
    avg_latency_ms: float | None
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    p99_latency_ms: float | None
    avg_time_to_first_token_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    cache_read_tokens: int
    reasoning_tokens: int
    avg_prompt_tokens: float | None
    avg_completion_tokens: float | None
    estimated_cost_usd: float
    unpriced_requests: int
    revision: int

    def kafka_key(self) -> bytes:
        """``tenant|route|model|window_start``: one key per window, so compaction keeps the latest."""
        return (f"{self.tenant_id}|{self.route}|{self.model}|{self.window_start.isoformat()}").encode()


class DimensionRow(MetricsRow, kw_only=True):
    """One value of one dimension (docs/dimensions.md) in one window of one key: every field of the
    main row, over the calls with that value. ``value`` is None for calls without one,
    ``"(other)"`` for the values merged beyond the window's most frequent."""

    dimension: str
    value: str | None

    def kafka_key(self) -> bytes:
        """``tenant|route|model|window_start|dimension|value`` (an empty value for null)."""
        value = "" if self.value is None else self.value
        return f"{super().kafka_key().decode()}|{self.dimension}|{value}".encode()


class DimensionRows(Struct, kw_only=True):
    """One dimension of one window: its rows (:class:`DimensionRow`) as columns, index i of
    every list being one value. What ``llm.dimension-metrics`` carries, one record per
    window, key and dimension, so that a value merged into ``"(other)"`` by a revision
    leaves no record of its own behind in the compacted topic."""

    tenant_id: str
    route: str
    model: str
    window_start: datetime
    window_end: datetime
    revision: int
    dimension: str
    values: list[str | None]
    requests: list[int]
    errors: list[int]
    timeouts: list[int]
    avg_latency_ms: list[float | None]
    p50_latency_ms: list[float | None]
    p95_latency_ms: list[float | None]
    p99_latency_ms: list[float | None]
    avg_time_to_first_token_ms: list[float | None]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cache_read_tokens: list[int]
    reasoning_tokens: list[int]
    avg_prompt_tokens: list[float | None]
    avg_completion_tokens: list[float | None]
    estimated_cost_usd: list[float]
    unpriced_requests: list[int]

    def kafka_key(self) -> bytes:
        """``tenant|route|model|window_start|dimension``."""
        start = self.window_start.isoformat()
        return f"{self.tenant_id}|{self.route}|{self.model}|{start}|{self.dimension}".encode()


# The statistics of a row, each a column of DimensionRows.
VALUE_STATISTICS: tuple[str, ...] = DimensionRows.__struct_fields__[8:]
# Those of them that are floats (the others are counts): Postgres keeps them as double precision.
FLOAT_STATISTICS: frozenset[str] = frozenset(
    field.name for field in msgspec.structs.fields(MetricsRow) if field.type in (float, float | None)
)

ROW_FIELDS: tuple[str, ...] = MetricsRow.__struct_fields__
DIMENSION_ROW_FIELDS: tuple[str, ...] = DimensionRow.__struct_fields__

row_encoder = msgspec.json.Encoder()
row_decoder = msgspec.json.Decoder(MetricsRow)


# Labels an evaluation row names; the rest are summed under "(other)".
LABELS_KEPT = 20


def top_labels(counts: Mapping[str, int], kept: int = LABELS_KEPT) -> dict[str, int]:
    """The ``kept`` most frequent labels (ties in code-point order), the rest (and any count
    already under ``"(other)"``) summed under ``"(other)"``: the same from one window's
    labels or from rows merged."""
    ordered = sorted(((label, n) for label, n in counts.items() if label != OTHER), key=_label_rank)
    top = dict(ordered[:kept])
    rest = sum(n for _, n in ordered[kept:]) + counts.get(OTHER, 0)
    if rest:
        top[OTHER] = rest
    return top


def _label_rank(item: tuple[str, int]) -> tuple[int, str]:
    return -item[1], item[0]


class EvaluationRow(Struct, kw_only=True):
    """The evaluations (docs/evaluations.md) of one ``name`` counted toward the calls of one window of one
    ``(tenant_id, route, model)``. ``labels`` holds the 20 most frequent labels, the rest
    under ``"(other)"``; ``revision`` is how many evaluations the row holds.

    In query-API roll-ups ``route`` or ``model`` is ``None`` when merged across.
    """

    tenant_id: str
    route: str | None
    model: str | None
    window_start: datetime
    window_end: datetime
    name: str
    evaluations: int
    scores: int
    score_avg: float | None
    score_min: float | None
    score_max: float | None
    score_p50: float | None
    score_p90: float | None
    labels: dict[str, int]
    revision: int

    def kafka_key(self) -> bytes:
        """``tenant|route|model|window_start|name``: compaction keeps each row's latest revision."""
        return (
            f"{self.tenant_id}|{self.route}|{self.model}|{self.window_start.isoformat()}|{self.name}"
        ).encode()


class EvaluationDimensionRow(EvaluationRow, kw_only=True):
    """An evaluation row of the calls of one value of one of the window's dimensions (docs/dimensions.md,
    §9): ``value`` null for calls without one, ``"(other)"`` for the values merged beyond
    the ``DIMENSION_VALUES`` most evaluated. ``revision`` is that of the dimension's rows."""

    dimension: str
    value: str | None


class EvaluationDimensionRows(Struct, kw_only=True):
    """The ``llm.evaluation-dimension-metrics`` record of one window, key, evaluation name and
    dimension: its rows, one per value. A revision replaces them whole."""

    tenant_id: str
    route: str
    model: str
    window_start: datetime
    window_end: datetime
    name: str
    dimension: str
    revision: int
    rows: list[EvaluationDimensionRow]

    def kafka_key(self) -> bytes:
        """``tenant|route|model|window_start|name|dimension``."""
        return (
            f"{self.tenant_id}|{self.route}|{self.model}|{self.window_start.isoformat()}|"
            f"{self.name}|{self.dimension}"
        ).encode()
