"""``GET /v1/evaluations`` (docs/evaluations.md): a tenant's evaluation rows, as stored or rolled up.

The parameters are those of ``/v1/metrics`` (:func:`api.params.parse_query`) plus
``name``, one evaluation name. Rows come newest first, then by route, model and name.

With ``dimension`` (and ``value``: one value, empty for the calls without one) the
rows are those per value of one of the tenant's dimensions (docs/dimensions.md), from the view
``llm_evaluation_dimension_metrics``, each with ``dimension`` and ``value``, ordered
as the main rows, then by value (null first).

A roll-up (``bucket`` and/or ``group_by``) merges the windows of each bucket, route
and model kept, name (and value): counts summed, the average weighted by how many
scores each window holds (from their exact sums), minimum and maximum, the
percentiles from the merged score digests, and the label counts added up, the 20 most
frequent kept by name and the rest under ``"(other)"``.

Retention (docs/retention.md): before the horizon (``retention_horizon``) an hour's windows are
replaced by one hour row (:mod:`schemas.evaluation_retention`). So ``1h`` and ``1d``
buckets are merged in two levels: each hour of each route, model, name (and value)
first, by :func:`schemas.evaluation_retention.hour_of` (the same merging that makes
the hour rows, so an hour answers the same from its windows or its hour row), then the
hours into the bucket in hour order: sums summed, the average the exact sums' ``fsum``
over the scores, the hours' digests merged (a lone one as it is). A dimension's value
there carries the revisions of its dimension's rows of each hour, whether or not a row
holds the value (what its hour row keeps). Those buckets read every row, hour rows
included, and a ``from`` or ``to`` cutting one before the horizon is refused; shorter
buckets and stored rows read only windows from the horizon on (the others are gone).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import psycopg
from fastdigest import TDigest
from msgspec import UNSET, Meta, UnsetType

from api.params import PARAMETERS, InvalidParameter, MetricsParameters, MetricsQuery, check_text, parse_query
from api.queries import Deadline, check_edges, merge_digests, retention_horizon
from schemas import rollups
from schemas.evaluation_retention import HOUR, Scores, hour_of
from schemas.events import EvaluationName
from schemas.rollups import merged_in_order
from schemas.rows import EvaluationDimensionRow, EvaluationRow, top_labels


class EvaluationParameters(MetricsParameters, kw_only=True):
    """The query string of ``GET /v1/evaluations`` as the OpenAPI document shows it: that of
    ``/v1/metrics``, then ``name`` (checked by :func:`parse_evaluation_query`)."""

    name: (
        Annotated[
            EvaluationName, Meta(description="One evaluation name (docs/evaluations.md): its rows only.")
        ]
        | UnsetType
    ) = UNSET


EVALUATION_PARAMETERS: tuple[str, ...] = tuple(
    field.encode_name for field in msgspec.structs.fields(EvaluationParameters)
)

_COLUMNS = (
    "tenant_id, route, model, window_start, window_end, name, evaluations, scores, score_sum, "
    "score_avg, score_min, score_max, score_p50, score_p90, labels, score_digest, revision"
)
# Where a dimension's rows have their dimension and value, after the columns above.
_DIMENSION_AT = 17


class EvaluationsPage(msgspec.Struct):
    evaluations: list[EvaluationRow]  # or EvaluationDimensionRow, with a dimension
    count: int


class EvaluationQuery(msgspec.Struct, frozen=True):
    query: MetricsQuery
    name: str | None


def parse_evaluation_query(params: Mapping[str, Sequence[str]]) -> EvaluationQuery:
    """Validate every parameter; raise :class:`InvalidParameter` for the first bad one."""
    unknown = sorted(set(params) - set(PARAMETERS) - {"name"})
    if unknown:
        raise InvalidParameter(
            f"{unknown[0]}: unknown parameter; expected {', '.join(EVALUATION_PARAMETERS)}"
        )
    rest = dict(params)
    names = rest.pop("name", None)
    query = parse_query(rest)
    name = None
    if names:
        if len(names) > 1:
            raise InvalidParameter(f"name: given {len(names)} times, expected once")
        name = check_text("name", names[0], EvaluationName, "name")
    return EvaluationQuery(query, name)


_COLUMN_NAMES = tuple(_COLUMNS.split(", "))
# Rows of time whose windows may be deleted are read by hourly and daily roll-ups only.
_FROM_HORIZON = f"window_start >= {rollups.HORIZON_VALUE_SQL}"


def _where(
    asked: EvaluationQuery, table: str = "", by_value: bool = True, whole: bool = False
) -> tuple[str, dict[str, Any]]:
    """The conditions of ``asked`` (columns of ``table`` if named; the value's only with
    ``by_value``); windows from the retention horizon on only, unless ``whole``."""
    query = asked.query
    prefix = f"{table}." if table else ""
    conditions = [f"{prefix}tenant_id = %(tenant_id)s"]
    values: dict[str, Any] = {"tenant_id": query.tenant_id}
    for column, value in (("route", query.route), ("model", query.model), ("name", asked.name)):
        if value is not None:
            conditions.append(f"{prefix}{column} = %({column})s")
            values[column] = value
    if query.start is not None:
        conditions.append(f"{prefix}window_start >= %(start)s")
        values["start"] = query.start
    if query.end is not None:
        conditions.append(f"{prefix}window_start < %(end)s")
        values["end"] = query.end
    if not whole:
        conditions.append(prefix + _FROM_HORIZON)
    if query.dimension is not None:
        conditions.append(f"{prefix}dimension = %(dimension)s")
        values["dimension"] = query.dimension
        if query.by_value and by_value:
            conditions.append(f"{prefix}value IS NOT DISTINCT FROM %(value)s")
            values["value"] = query.value
    return " AND ".join(conditions), values


_ORDER = 'ORDER BY window_start DESC, route COLLATE "C", model COLLATE "C", name COLLATE "C"'
_VALUE_ORDER = ', value COLLATE "C" NULLS FIRST'
_HOUR_BIN = "date_bin('1 hour', {0}window_start, timestamptz 'epoch')"


def by_hours(query: MetricsQuery) -> bool:
    """Whether the roll-up merges hours first: buckets of an hour or more (see the module)."""
    return query.bucket_seconds is not None and query.bucket_seconds >= HOUR.total_seconds()


def _select(asked: EvaluationQuery) -> str:
    """The statement reading the rows asked for (the main rows', or a dimension's). Hourly and
    daily roll-ups read every row, and a dimension's rows there with the revisions of the
    dimension's rows of their hour (its last column); the others read rows from the horizon
    on, ordered."""
    whole = by_hours(asked.query)
    where, _ = _where(asked, whole=whole)
    if asked.query.dimension is None:
        order = "" if whole else f" {_ORDER}"
        return f"SELECT {_COLUMNS} FROM llm_evaluation_metrics WHERE {where}{order}"
    if not whole:
        return (
            f"SELECT {_COLUMNS}, dimension, value FROM llm_evaluation_dimension_metrics "
            f"WHERE {where} {_ORDER}{_VALUE_ORDER}"
        )
    # Every value of an hour row has the revisions of all the hour's windows: so must each
    # value's hour merged from the windows, whether a window holds the value or not.
    hour_where, _ = _where(asked, by_value=False, whole=True)
    value_where, _ = _where(asked, "v", whole=True)
    columns = ", ".join(f"v.{name}" for name in (*_COLUMN_NAMES, "dimension", "value"))
    return f"""
        SELECT {columns}, h.revisions
        FROM llm_evaluation_dimension_metrics AS v
        JOIN (
            SELECT route, model, name, {_HOUR_BIN.format("")} AS hour, sum(revision) AS revisions
            FROM llm_evaluation_dimension_windows WHERE {hour_where}
            GROUP BY 1, 2, 3, 4
        ) AS h ON h.route = v.route AND h.model = v.model AND h.name = v.name
              AND h.hour = {_HOUR_BIN.format("v.")}
        WHERE {value_where}"""


def _row(record: Sequence[Any]) -> EvaluationRow:
    if len(record) > _DIMENSION_AT:
        return EvaluationDimensionRow(
            **msgspec.structs.asdict(_row(record[:_DIMENSION_AT])),
            dimension=record[_DIMENSION_AT],
            value=record[_DIMENSION_AT + 1],
        )
    (
        tenant_id,
        route,
        model,
        start,
        end,
        name,
        evaluations,
        scores,
        _,
        average,
        low,
        high,
        p50,
        p90,
        labels,
        _,
        revision,
    ) = record
    return EvaluationRow(
        tenant_id=tenant_id,
        route=route,
        model=model,
        window_start=start,
        window_end=end,
        name=name,
        evaluations=evaluations,
        scores=scores,
        score_avg=average,
        score_min=low,
        score_max=high,
        score_p50=p50,
        score_p90=p90,
        labels=labels,
        revision=revision,
    )


async def fetch_evaluations(
    conn: psycopg.AsyncConnection[Any], asked: EvaluationQuery, deadline: Deadline
) -> list[EvaluationRow]:
    """The rows ``asked`` for, within ``deadline``. Raises :class:`InvalidParameter` for a
    range that cuts an hourly or daily bucket before the retention horizon (its windows are
    deleted, only whole hours are kept there)."""
    query = asked.query
    _, values = _where(asked)
    async with conn.transaction():
        await conn.execute(deadline.statement_timeout())
        if not query.is_rollup:
            cursor = await conn.execute(f"{_select(asked)} LIMIT %(limit)s", {**values, "limit": query.limit})
            return [_row(record) for record in await cursor.fetchall()]
        if by_hours(query):
            check_edges(query, await retention_horizon(conn))
        cursor = await conn.execute(_select(asked), values)
        return rolled_up(query, await cursor.fetchall())


def _ordered(keys: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Bucket keys (start, route, model, name, value) in the documented order."""
    return sorted(
        keys, key=lambda key: (-key[0], key[1] or "", key[2] or "", key[3], key[4] is not None, key[4] or "")
    )


def rolled_up(query: MetricsQuery, records: Sequence[Sequence[Any]]) -> list[EvaluationRow]:
    """Stored rows merged per bucket, kept route and model, name (and a dimension's value);
    the newest ``limit``. Hourly and daily buckets merge hours first (:func:`by_hours`)."""
    if by_hours(query):
        return _hours_rolled_up(query, records)
    size = query.bucket_seconds
    groups: dict[tuple[Any, ...], list[Sequence[Any]]] = {}
    per_value = query.dimension is not None
    for record in records:
        start = record[3].timestamp()
        bucket = start if size is None else math.floor(start / size) * size
        route = record[1] if "route" in query.group_by else None
        model = record[2] if "model" in query.group_by else None
        value = record[_DIMENSION_AT + 1] if per_value else None
        groups.setdefault((bucket, route, model, record[5], value), []).append(record)
    ordered = _ordered(list(groups))[: query.limit]
    merged = []
    for key in ordered:
        records_of = groups[key]
        parts = [_scores(record) for record in records_of]
        digest = merge_digests(
            [part.score_digest for part in parts if part.scores and part.score_digest is not None]
        )
        end = (
            max(record[4] for record in records_of)
            if size is None
            else datetime.fromtimestamp(key[0] + size, UTC)
        )
        merged.append(_merged(query, key, parts, end, digest))
    return _with_values(query, merged, ordered)


def _scores(record: Sequence[Any]) -> Scores:
    return Scores(*record[6:_DIMENSION_AT])


def _hours_rolled_up(query: MetricsQuery, records: Sequence[Sequence[Any]]) -> list[EvaluationRow]:
    """Two levels: each hour of each route, model, name and value merged by :func:`hour_of`
    (its rows in time order), then the hours of each bucket in hour order."""
    size = query.bucket_seconds
    assert size is not None
    per_value = query.dimension is not None
    hour_seconds = HOUR.total_seconds()
    # bucket key -> hour key (hour, route, model) -> its rows
    buckets: dict[tuple[Any, ...], dict[tuple[Any, ...], list[Sequence[Any]]]] = {}
    for record in records:
        start = record[3].timestamp()
        hour = math.floor(start / hour_seconds) * hour_seconds
        bucket = math.floor(start / size) * size
        route = record[1] if "route" in query.group_by else None
        model = record[2] if "model" in query.group_by else None
        value = record[_DIMENSION_AT + 1] if per_value else None
        hours = buckets.setdefault((bucket, route, model, record[5], value), {})
        hours.setdefault((hour, record[1], record[2]), []).append(record)
    ordered = _ordered(list(buckets))[: query.limit]
    merged = []
    for key in ordered:
        hours = buckets[key]
        parts = []
        for hour in sorted(hours):
            rows = sorted(hours[hour], key=lambda record: record[3])
            part = hour_of([_scores(record) for record in rows])
            if per_value:  # the revisions of the dimension's rows of that hour
                part = part._replace(revision=rows[0][_DIMENSION_AT + 2])
            parts.append(part)
        digest = merged_in_order(
            [part.score_digest for part in parts if part.scores and part.score_digest is not None]
        )
        merged.append(_merged(query, key, parts, datetime.fromtimestamp(key[0] + size, UTC), digest))
    return _with_values(query, merged, ordered)


def _with_values(
    query: MetricsQuery, merged: list[EvaluationRow], ordered: Sequence[tuple[Any, ...]]
) -> list[EvaluationRow]:
    if query.dimension is None:
        return merged
    return [
        EvaluationDimensionRow(**msgspec.structs.asdict(row), dimension=query.dimension, value=key[4])
        for row, key in zip(merged, ordered, strict=True)
    ]


def _merged(
    query: MetricsQuery, key: tuple[Any, ...], parts: Sequence[Scores], end: datetime, digest: TDigest | None
) -> EvaluationRow:
    """One bucket from its parts (windows, or hours): counts summed, the average the exact
    sums' ``fsum`` over the scores, percentiles from ``digest`` (the parts' merged)."""
    bucket, route, model, name, _ = key
    scores = sum(part.scores for part in parts)
    scored = [part for part in parts if part.scores]
    labels: dict[str, int] = {}
    for part in parts:
        for label, count in part.labels.items():
            labels[label] = labels.get(label, 0) + count
    return EvaluationRow(
        tenant_id=query.tenant_id,
        route=route,
        model=model,
        window_start=datetime.fromtimestamp(bucket, UTC),
        window_end=end,
        name=name,
        evaluations=sum(part.evaluations for part in parts),
        scores=scores,
        score_avg=math.fsum(part.score_sum for part in scored) / scores if scores else None,
        score_min=min((part.score_min for part in scored), default=None),
        score_max=max((part.score_max for part in scored), default=None),
        score_p50=digest.quantile(0.5) if digest is not None and scores else None,
        score_p90=digest.quantile(0.9) if digest is not None and scores else None,
        labels=top_labels(labels),
        revision=sum(part.revision for part in parts),
    )
