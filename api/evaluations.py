"""``GET /v1/evaluations`` (SPEC §9, §4): a tenant's evaluation rows, as stored or rolled up.

The parameters are those of ``/v1/metrics`` (:func:`api.params.parse_query`) plus
``name``, one evaluation name. Rows come newest first, then by route, model and name.

With ``dimension`` (and ``value``: one value, empty for the calls without one) the
rows are those per value of one of the tenant's dimensions (SPEC §8), from the view
``llm_evaluation_dimension_metrics``, each with ``dimension`` and ``value``, ordered
as the main rows, then by value (null first).

A roll-up (``bucket`` and/or ``group_by``) merges the windows of each bucket, route
and model kept, name (and value): counts summed, the average weighted by how many
scores each window holds (from their exact sums), minimum and maximum, the
percentiles from the merged score digests, and the label counts added up, the 20 most
frequent kept by name and the rest under ``"(other)"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg

from api.params import PARAMETERS, InvalidParameter, MetricsQuery, parse_query
from api.queries import Deadline, merge_digests
from schemas.events import EVALUATION_NAME_MAX_CHARS
from schemas.metrics import EvaluationDimensionRow, EvaluationRow, top_labels

EVALUATION_PARAMETERS = (*PARAMETERS, "name")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

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
        name = names[0]
        if not name:
            raise InvalidParameter("name: must not be empty")
        if len(name) > EVALUATION_NAME_MAX_CHARS:
            raise InvalidParameter(f"name: longer than {EVALUATION_NAME_MAX_CHARS} characters, as no name is")
        if _CONTROL.search(name):
            raise InvalidParameter("name: contains a control character, as no name does")
    return EvaluationQuery(query, name)


def _where(asked: EvaluationQuery) -> tuple[str, dict[str, Any]]:
    query = asked.query
    conditions = ["tenant_id = %(tenant_id)s"]
    values: dict[str, Any] = {"tenant_id": query.tenant_id}
    for column, value in (("route", query.route), ("model", query.model), ("name", asked.name)):
        if value is not None:
            conditions.append(f"{column} = %({column})s")
            values[column] = value
    if query.start is not None:
        conditions.append("window_start >= %(start)s")
        values["start"] = query.start
    if query.end is not None:
        conditions.append("window_start < %(end)s")
        values["end"] = query.end
    if query.dimension is not None:
        conditions.append("dimension = %(dimension)s")
        values["dimension"] = query.dimension
        if query.by_value:
            conditions.append("value IS NOT DISTINCT FROM %(value)s")
            values["value"] = query.value
    return " AND ".join(conditions), values


_ORDER = 'ORDER BY window_start DESC, route COLLATE "C", model COLLATE "C", name COLLATE "C"'
_VALUE_ORDER = ', value COLLATE "C" NULLS FIRST'


def _select(asked: EvaluationQuery) -> str:
    """The statement reading the rows asked for (the main rows', or a dimension's), ordered."""
    where, _ = _where(asked)
    if asked.query.dimension is None:
        return f"SELECT {_COLUMNS} FROM llm_evaluation_metrics WHERE {where} {_ORDER}"
    return (
        f"SELECT {_COLUMNS}, dimension, value FROM llm_evaluation_dimension_metrics "
        f"WHERE {where} {_ORDER}{_VALUE_ORDER}"
    )


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
    """The rows ``asked`` for, within ``deadline``."""
    query = asked.query
    _, values = _where(asked)
    async with conn.transaction():
        await conn.execute(deadline.statement_timeout())
        if not query.is_rollup:
            cursor = await conn.execute(f"{_select(asked)} LIMIT %(limit)s", {**values, "limit": query.limit})
            return [_row(record) for record in await cursor.fetchall()]
        cursor = await conn.execute(_select(asked), values)
        return rolled_up(query, await cursor.fetchall())


def rolled_up(query: MetricsQuery, records: Sequence[Sequence[Any]]) -> list[EvaluationRow]:
    """Stored rows merged per bucket, kept route and model, name (and a dimension's value);
    the newest ``limit``."""
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
    ordered = sorted(
        groups,
        key=lambda key: (-key[0], key[1] or "", key[2] or "", key[3], key[4] is not None, key[4] or ""),
    )
    merged = [_merged(query, key, groups[key]) for key in ordered[: query.limit]]
    if not per_value:
        return merged
    return [
        EvaluationDimensionRow(**msgspec.structs.asdict(row), dimension=query.dimension, value=key[4])
        for row, key in zip(merged, ordered[: query.limit], strict=True)
    ]


def _merged(query: MetricsQuery, key: tuple[Any, ...], records: list[Sequence[Any]]) -> EvaluationRow:
    bucket, route, model, name, _ = key
    size = query.bucket_seconds
    start = datetime.fromtimestamp(bucket, UTC)
    end = max(record[4] for record in records) if size is None else datetime.fromtimestamp(bucket + size, UTC)
    scores = sum(record[7] for record in records)
    scored = [record for record in records if record[7]]
    labels: dict[str, int] = {}
    for record in records:
        for label, count in record[14].items():
            labels[label] = labels.get(label, 0) + count
    digest = merge_digests([record[15] for record in scored if record[15] is not None])
    return EvaluationRow(
        tenant_id=query.tenant_id,
        route=route,
        model=model,
        window_start=start,
        window_end=end,
        name=name,
        evaluations=sum(record[6] for record in records),
        scores=scores,
        score_avg=math.fsum(record[8] for record in scored) / scores if scores else None,
        score_min=min((record[10] for record in scored), default=None),
        score_max=max((record[11] for record in scored), default=None),
        score_p50=digest.quantile(0.5) if digest is not None and scores else None,
        score_p90=digest.quantile(0.9) if digest is not None and scores else None,
        labels=top_labels(labels),
        revision=sum(record[16] for record in records),
    )
