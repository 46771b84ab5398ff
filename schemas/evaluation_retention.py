"""Retention of evaluation rows (docs/retention.md): windows before the horizon become hour rows.

Hourly and daily roll-ups of ``/v1/evaluations`` must answer the same, to the last
bit, before and after the windows of retired time are deleted. Evaluation rows
have no separate table of parts: an hour's windows are replaced, in place, by one
*hour row* of the same table (``window_start`` the hour's start, ``window_end``
an hour later), merged by :func:`hour_of`:

- ``evaluations``, ``scores`` and ``revision`` summed; ``score_sum`` the
  ``math.fsum`` of the windows' exact sums (null without scores), ``score_avg``
  that sum over ``scores``; ``score_min``/``score_max`` over the windows with scores;
- ``labels`` added up, *not* cut to the 20 most frequent, so that merging hours
  later stays exact (the query API cuts them when it answers);
- ``score_digest`` the windows' digests merged in ``window_start`` order
  (``fastdigest.merge_all``; a lone digest as it is), the percentiles read from it;
- an hour holding exactly one row is that row's values as they are, digest bytes included.

The query API (:mod:`api.evaluations`) merges ``1h`` and ``1d`` buckets in two
levels, hours first with the same :func:`hour_of`, then the hours into the bucket:
so an hour answers the same from its windows or from its hour row.

A dimension's packed rows (``llm_evaluation_dimension_windows``) are replaced the
same way, one hour row per ``(tenant, dimension, route, model, name)``: its values
are the union of the windows' (null first, then code-point order), each value's
statistics merged by :func:`hour_of` (:func:`hour_of_values`), its ``revision`` the
sum of the windows' revisions (every value of a packed row carries the row's).

:func:`retire_evaluations` does the replacing, each batch of hours (delete the
windows, insert the hour rows) in one short transaction of its own: a crash loses
at most that batch's work, and a run over hours already replaced changes nothing.
The hour function is pure (no database here but in :func:`retire_evaluations`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from schemas.database import tenants_sql
from schemas.rollups import floor_to, merged_in_order

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger("streamlens.retention")

HOUR = timedelta(hours=1)
# Hours (one key's rows of one hour) replaced per transaction.
HOURS_PER_BATCH = 50


class Scores(NamedTuple):
    """One evaluation row's statistics: a window's, an hour's, or one value's in a packed row.
    The fields are those of ``llm_evaluation_metrics`` from ``evaluations`` on, in its order."""

    evaluations: int
    scores: int
    score_sum: float | None
    score_avg: float | None
    score_min: float | None
    score_max: float | None
    score_p50: float | None
    score_p90: float | None
    labels: dict[str, int]
    score_digest: bytes | None
    revision: int


def hour_of(rows: Sequence[Scores]) -> Scores:
    """An hour's statistics from its rows (at least one), given in ``window_start`` order:
    see the module. One row is returned as it is."""
    if len(rows) == 1:
        return rows[0]
    scored = [row for row in rows if row.scores]
    scores = sum(row.scores for row in rows)
    labels: dict[str, int] = {}
    for row in rows:
        for label, count in row.labels.items():
            labels[label] = labels.get(label, 0) + count
    blobs = [row.score_digest for row in scored if row.score_digest is not None]
    digest = merged_in_order(blobs)
    if len(blobs) == 1:
        blob: bytes | None = blobs[0]
    else:
        blob = None if digest is None else digest.to_bytes()
    score_sum = math.fsum(row.score_sum for row in scored if row.score_sum is not None) if scored else None
    return Scores(
        evaluations=sum(row.evaluations for row in rows),
        scores=scores,
        score_sum=score_sum,
        score_avg=score_sum / scores if score_sum is not None and scores else None,
        score_min=min((row.score_min for row in scored if row.score_min is not None), default=None),
        score_max=max((row.score_max for row in scored if row.score_max is not None), default=None),
        score_p50=digest.quantile(0.5) if digest is not None and scores else None,
        score_p90=digest.quantile(0.9) if digest is not None and scores else None,
        labels=labels,
        score_digest=blob,
        revision=sum(row.revision for row in rows),
    )


def value_order(value: str | None) -> tuple[bool, str]:
    """The order of a dimension's values: null (calls without one) first, then code points."""
    return value is not None, value or ""


def hour_of_values(windows: Sequence[Mapping[str | None, Scores]], revision: int) -> dict[str | None, Scores]:
    """A packed hour row's values from its windows' (each ``{value: statistics}``, in
    ``window_start`` order): every value any window has, in :func:`value_order`, its
    statistics merged by :func:`hour_of` with the hour's ``revision`` (its windows' summed)."""
    by_value: dict[str | None, list[Scores]] = {}
    for window in windows:
        for value, scores in window.items():
            by_value.setdefault(value, []).append(scores)
    return {
        value: hour_of(by_value[value])._replace(revision=revision)
        for value in sorted(by_value, key=value_order)
    }


# -- the compaction ----------------------------------------------------------------------------

_STATISTICS = (
    "evaluations, scores, score_sum, score_avg, score_min, score_max, score_p50, score_p90, "
    "labels, score_digest"
)
# Rows that are no hour row: what an hour still to replace holds.
_NOT_AN_HOUR = (
    "(window_start <> date_bin('1 hour', window_start, timestamptz 'epoch')"
    " OR window_end <> window_start + interval '1 hour')"
)


class _Table(NamedTuple):
    """What differs between the two tables: the name, the key columns beside tenant_id and
    window_start, and how an hour row is inserted."""

    name: str
    key: tuple[str, ...]
    insert: str


_MAIN = _Table(
    "llm_evaluation_metrics",
    ("route", "model", "name"),
    "INSERT INTO llm_evaluation_metrics (tenant_id, route, model, name, window_start, window_end, "
    f"{_STATISTICS}, revision) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
    "%s::jsonb, %s, %s)",
)
_PACKED = _Table(
    "llm_evaluation_dimension_windows",
    ("dimension", "route", "model", "name"),
    "INSERT INTO llm_evaluation_dimension_windows (tenant_id, dimension, route, model, name, window_start,"
    ' window_end, "values", evaluations, scores, score_sum, score_avg, score_min, score_max, score_p50,'
    " score_p90, labels, score_digest, revision) VALUES (%s, %s, %s, %s, %s, %s, %s, %s::text[],"
    " %s::bigint[], %s::bigint[], %s::float8[], %s::float8[], %s::float8[], %s::float8[], %s::float8[],"
    " %s::float8[], %s::jsonb, %s::bytea[], %s)",
)


def _hours_sql(table: _Table) -> str:
    """A tenant's hours in ``[%(since)s, %(before)s)`` holding a row that is no hour row."""
    key = ", ".join(table.key)
    return f"""
        SELECT DISTINCT {key}, date_bin('1 hour', window_start, timestamptz 'epoch') AS hour
        FROM {table.name}
        WHERE tenant_id = %(tenant)s AND window_start >= %(since)s AND window_start < %(before)s
          AND {_NOT_AN_HOUR}
        ORDER BY {", ".join(str(n + 1) for n in range(len(table.key) + 1))}"""


def _read_sql(table: _Table, columns: str) -> str:
    """The rows of chosen hours (parallel arrays of key and hour), locked, by hour then window."""
    arrays = ", ".join(f"%({name})s::text[]" for name in table.key)
    same_key = " AND ".join(f"w.{name} = m.{name}" for name in table.key)
    return f"""
        SELECT m.number, r.*
        FROM unnest({arrays}, %(hour)s::timestamptz[])
            WITH ORDINALITY AS m({", ".join(table.key)}, hour, number)
        CROSS JOIN LATERAL (
            SELECT w.window_start, w.window_end, {columns}
            FROM {table.name} AS w
            WHERE w.tenant_id = %(tenant)s AND {same_key}
              AND w.window_start >= m.hour AND w.window_start < m.hour + interval '1 hour'
            FOR UPDATE
        ) AS r
        ORDER BY m.number, r.window_start"""


def _delete_sql(table: _Table) -> str:
    """Delete rows by key (parallel arrays of the key columns and ``start``)."""
    arrays = ", ".join(f"%({name})s::text[]" for name in table.key)
    same_key = " AND ".join(f"w.{name} = d.{name}" for name in (*table.key, "window_start"))
    return f"""
        DELETE FROM {table.name} AS w
        USING unnest({arrays}, %(start)s::timestamptz[]) AS d({", ".join(table.key)}, window_start)
        WHERE w.tenant_id = %(tenant)s AND {same_key}"""


_MAIN_COLUMNS = f"w.{_STATISTICS.replace(', ', ', w.')}, w.revision"
_PACKED_COLUMNS = (
    'w.revision, w."values", w.evaluations, w.scores, w.score_sum, w.score_avg, w.score_min,'
    " w.score_max, w.score_p50, w.score_p90, w.labels, w.score_digest"
)

# An hour to replace: its key (the table's key columns) and its start.
_Hour = tuple[Any, ...]


def _is_hour(rows: Sequence[Sequence[Any]], hour: datetime) -> bool:
    """Whether an hour's rows (window_start, window_end first) are one hour row already."""
    return len(rows) == 1 and rows[0][0] == hour and rows[0][1] == hour + HOUR


def _main_row(tenant: str, key: _Hour, rows: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
    *names, hour = key
    merged = hour_of([Scores(*row[2:]) for row in rows])
    return (
        tenant,
        *names,
        hour,
        hour + HOUR,
        *merged[:8],
        json.dumps(merged.labels),
        merged.score_digest,
        merged.revision,
    )


def _packed_row(tenant: str, key: _Hour, rows: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
    *names, hour = key
    windows = []
    for row in rows:
        revision, values, *columns = row[2:]
        windows.append(
            {
                value: Scores(*(column[place] for column in columns), revision=revision)
                for place, value in enumerate(values)
            }
        )
    merged = hour_of_values(windows, sum(row[2] for row in rows))
    stats = list(merged.values())
    return (
        tenant,
        *names,
        hour,
        hour + HOUR,
        list(merged),
        *([getattr(scores, field) for scores in stats] for field in Scores._fields[:8]),
        json.dumps([scores.labels for scores in stats]),
        [scores.score_digest for scores in stats],
        sum(row[2] for row in rows),
    )


def _replace(
    conn: psycopg.Connection[Any],
    table: _Table,
    tenant: str,
    hours: Sequence[_Hour],
    columns: str,
    merge: Callable[[str, _Hour, Sequence[Sequence[Any]]], tuple[Any, ...]],
) -> int:
    """Replace the rows of ``hours`` by hour rows in one transaction; how many rows were replaced."""
    selection: dict[str, Any] = {"tenant": tenant, "hour": [hour[-1] for hour in hours]}
    for number, name in enumerate(table.key):
        selection[name] = [hour[number] for hour in hours]
    with conn.transaction(), conn.cursor() as cursor:
        cursor.execute(_read_sql(table, columns), selection)
        found: dict[int, list[Sequence[Any]]] = {}
        for number, *row in cursor.fetchall():
            found.setdefault(number, []).append(row)
        # Hours replaced meanwhile (another run) are left alone: they are hour rows already.
        chosen = [
            (hour, found[number])
            for number, hour in enumerate(hours, 1)
            if number in found and not _is_hour(found[number], hour[-1])
        ]
        if not chosen:
            return 0
        gone: dict[str, Any] = {"tenant": tenant, "start": []}
        for name in table.key:
            gone[name] = []
        for hour, rows in chosen:
            for row in rows:
                for number, name in enumerate(table.key):
                    gone[name].append(hour[number])
                gone["start"].append(row[0])
        deleted = cursor.execute(_delete_sql(table), gone).rowcount
        if deleted != len(gone["start"]):  # the rows are locked: never, unless something is wrong
            raise RuntimeError(f"{table.name}: deleted {deleted} rows of {len(gone['start'])} read")
        cursor.executemany(table.insert, [merge(tenant, hour, rows) for hour, rows in chosen])
    return deleted


def retire_evaluations(
    conn: psycopg.Connection[Any], since: datetime, before: datetime, pause: Callable[[], None]
) -> int:
    """Replace the windows of every hour in ``[since, before)``, in ``llm_evaluation_metrics``
    and ``llm_evaluation_dimension_windows``, by hour rows (see the module); how many window
    rows were replaced. ``conn`` is in autocommit: each batch of :data:`HOURS_PER_BATCH`
    hours is its own transaction, with ``pause`` called between them. Hours that are one
    hour row already are left alone, so a second run replaces nothing."""
    # Only whole hours: an hour straddling ``before`` keeps its windows.
    before = floor_to(before, int(HOUR.total_seconds()))
    replaced = 0
    for table, columns, merge in ((_MAIN, _MAIN_COLUMNS, _main_row), (_PACKED, _PACKED_COLUMNS, _packed_row)):
        tenants = [row[0] for row in conn.execute(tenants_sql(table.name))]
        for tenant in tenants:
            hours: list[_Hour] = [
                tuple(row)
                for row in conn.execute(
                    _hours_sql(table), {"tenant": tenant, "since": since, "before": before}
                )
            ]
            for first in range(0, len(hours), HOURS_PER_BATCH):
                replaced += _replace(
                    conn, table, tenant, hours[first : first + HOURS_PER_BATCH], columns, merge
                )
                pause()
    if replaced:
        logger.info("evaluation rows before %s: %d windows replaced by hour rows", before, replaced)
    return replaced
