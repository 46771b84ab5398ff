"""Retention of dimension rows (docs/retention.md): each hour of a key's dimension before the
horizon becomes one packed row of that hour.

A retired hour holds, for every value, exactly what the query API computes for that hour
of that value from its windows (:func:`schemas.rollups.hour_level_columns`, the digest by
:func:`schemas.rollups.hour_digest`), and the API's hourly and daily buckets of a dimension
are merged from those hours: so they answer the same before and after. An hour row is
told from a window by its length (an hour), so a second run leaves it alone; each batch
of hours is deleted and written in one transaction, so a crash leaves every hour either
whole or retired.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg
from fastdigest import TDigest
from psycopg.rows import dict_row

from schemas import rollups
from schemas.database import tenants_sql
from schemas.rows import FLOAT_STATISTICS, VALUE_STATISTICS

# Key-hours retired per transaction.
HOURS_PER_BATCH = 20

# The dimensions of a tenant: a loose scan of the primary key (tenant_id, dimension, …).
_DIMENSIONS_SQL = """
    WITH RECURSIVE dimensions AS (
        (SELECT dimension FROM llm_dimension_windows WHERE tenant_id = %(tenant)s ORDER BY dimension LIMIT 1)
        UNION ALL
        SELECT (SELECT w.dimension FROM llm_dimension_windows AS w
                WHERE w.tenant_id = %(tenant)s AND w.dimension > d.dimension ORDER BY w.dimension LIMIT 1)
        FROM dimensions AS d WHERE d.dimension IS NOT NULL
    )
    SELECT dimension FROM dimensions WHERE dimension IS NOT NULL"""
# The key-hours of one tenant's dimension in [since, before) still holding windows: one range
# of the primary key.
_TO_RETIRE = """
    SELECT DISTINCT tenant_id, dimension, route, model,
        date_bin(interval '1 hour', window_start, timestamptz 'epoch') AS hour
    FROM llm_dimension_windows
    WHERE tenant_id = %(tenant)s AND dimension = %(dimension)s
      AND window_start >= %(since)s AND window_start < %(before)s
      AND window_end - window_start < interval '1 hour'
    ORDER BY 5, 3, 4"""
_KEY = (
    "tenant_id = %(tenant_id)s AND dimension = %(dimension)s AND route = %(route)s AND model = %(model)s"
    " AND window_start >= %(hour)s AND window_start < %(hour)s + interval '1 hour'"
)
_HOUR_SQL = f"""
    SELECT value, {", ".join(rollups.hour_level_columns())}
    FROM llm_dimension_metrics WHERE {_KEY}
    GROUP BY value"""
_DELETE_SQL = f"DELETE FROM llm_dimension_windows WHERE {_KEY}"
# The hour's rows locked first: a write to them waits, and is never deleted unmerged.
_LOCK_SQL = f"SELECT 1 FROM llm_dimension_windows WHERE {_KEY} FOR UPDATE"
_ARRAYS: dict[str, str] = {
    "values": "text[]",
    **{name: "double precision[]" if name in FLOAT_STATISTICS else "bigint[]" for name in VALUE_STATISTICS},
    "ttft_count": "bigint[]",
    "latency_digest": "bytea[]",
}
# Each percentile column's quantile, read from an hour's merged digest.
_QUANTILES: dict[str, float] = dict(rollups.PERCENTILES)
_INSERT_SQL = f"""
    INSERT INTO llm_dimension_windows (tenant_id, route, model, window_start, window_end, dimension,
        revision, {", ".join(f'"{name}"' for name in _ARRAYS)})
    VALUES (%(tenant_id)s, %(route)s, %(model)s, %(hour)s, %(hour)s + interval '1 hour', %(dimension)s,
        %(revision)s, {", ".join(f"%({name})s::{kind}" for name, kind in _ARRAYS.items())})"""


def hour_row(key: dict[str, Any], hours: list[dict[str, Any]]) -> dict[str, Any]:
    """The packed row of one key's hour of a dimension from its values' hour levels: values
    null first, then in code-point order, as the table keeps them."""
    hours = sorted(hours, key=lambda hour: (hour["value"] is not None, hour["value"] or ""))
    columns: dict[str, Any] = {name: [] for name in _ARRAYS}
    for hour in hours:
        digest = rollups.hour_digest(hour["blobs"])
        merged = None if digest is None else TDigest.from_bytes(digest)
        columns["values"].append(hour["value"])
        for name in VALUE_STATISTICS:
            if name in _QUANTILES:
                quantile = _QUANTILES[name]
                columns[name].append(
                    None if merged is None or merged.is_empty() else merged.quantile(quantile)
                )
            else:
                columns[name].append(hour[name])
        columns["ttft_count"].append(hour["ttft_count"])
        columns["latency_digest"].append(digest)
    return {**key, "revision": max(hour["revision"] for hour in hours), **columns}


def retire_dimensions(
    conn: psycopg.Connection[Any], since: datetime, before: datetime, pause: Callable[[], None]
) -> int:
    """Replace every hour of dimension windows in ``[since, before)`` by its hour row, a batch of
    :data:`HOURS_PER_BATCH` key-hours a transaction; how many windows' rows were replaced."""
    replaced = 0
    for tenant in [row[0] for row in conn.execute(tenants_sql("llm_dimension_windows"))]:
        dimensions = [row[0] for row in conn.execute(_DIMENSIONS_SQL, {"tenant": tenant})]
        for dimension in dimensions:
            with conn.cursor(row_factory=dict_row) as cursor:
                hours = cursor.execute(
                    _TO_RETIRE, {"tenant": tenant, "dimension": dimension, "since": since, "before": before}
                ).fetchall()
            for first in range(0, len(hours), HOURS_PER_BATCH):
                with conn.transaction(), conn.cursor(row_factory=dict_row) as cursor:
                    for key in hours[first : first + HOURS_PER_BATCH]:
                        cursor.execute(_LOCK_SQL, key)
                        rows = cursor.execute(_HOUR_SQL, key, binary=True).fetchall()
                        if not rows:
                            continue
                        replaced += cursor.execute(_DELETE_SQL, key).rowcount
                        cursor.execute(_INSERT_SQL, hour_row(key, rows))
                pause()
    return replaced
