"""Retention of dimension rows (SPEC §8, §11): each hour of a key's dimension before the
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
from schemas.metrics import FLOAT_STATISTICS, VALUE_STATISTICS

# Key-hours retired per transaction.
HOURS_PER_BATCH = 20

_TO_RETIRE = """
    SELECT DISTINCT tenant_id, dimension, route, model,
        date_bin(interval '1 hour', window_start, timestamptz 'epoch') AS hour
    FROM llm_dimension_windows
    WHERE window_start < %(before)s AND window_end - window_start < interval '1 hour'
    ORDER BY 1, 2, 3, 4, 5
    LIMIT %(limit)s"""
_KEY = (
    "tenant_id = %(tenant_id)s AND dimension = %(dimension)s AND route = %(route)s AND model = %(model)s"
    " AND window_start >= %(hour)s AND window_start < %(hour)s + interval '1 hour'"
)
_HOUR_SQL = f"""
    SELECT value, {", ".join(rollups.hour_level_columns())}
    FROM llm_dimension_metrics WHERE {_KEY}
    GROUP BY value"""
_DELETE_SQL = f"DELETE FROM llm_dimension_windows WHERE {_KEY}"
_ARRAYS: dict[str, str] = {
    "values": "text[]",
    **{name: "double precision[]" if name in FLOAT_STATISTICS else "bigint[]" for name in VALUE_STATISTICS},
    "ttft_count": "bigint[]",
    "latency_digest": "bytea[]",
}
_INSERT_SQL = f"""
    INSERT INTO llm_dimension_windows (tenant_id, route, model, window_start, window_end, dimension,
        revision, {", ".join(f'"{name}"' for name in _ARRAYS)})
    VALUES (%(tenant_id)s, %(route)s, %(model)s, %(hour)s, %(hour)s + interval '1 hour', %(dimension)s,
        %(revision)s, {", ".join(f"%({name})s::{kind}" for name, kind in _ARRAYS.items())})"""

_PERCENTILES = (("p50_latency_ms", 0.5), ("p95_latency_ms", 0.95), ("p99_latency_ms", 0.99))


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
            if name in dict(_PERCENTILES):
                quantile = dict(_PERCENTILES)[name]
                columns[name].append(
                    None if merged is None or merged.is_empty() else merged.quantile(quantile)
                )
            else:
                columns[name].append(hour[name])
        columns["ttft_count"].append(hour["ttft_count"])
        columns["latency_digest"].append(digest)
    return {**key, "revision": max(hour["revision"] for hour in hours), **columns}


def retire_dimensions(conn: psycopg.Connection[Any], before: datetime, pause: Callable[[], None]) -> int:
    """Replace every hour of dimension windows before ``before`` by its hour row, a batch of
    :data:`HOURS_PER_BATCH` key-hours a transaction; how many windows' rows were replaced."""
    replaced = 0
    while True:
        with conn.cursor(row_factory=dict_row) as cursor:
            batch = cursor.execute(_TO_RETIRE, {"before": before, "limit": HOURS_PER_BATCH}).fetchall()
        if not batch:
            return replaced
        with conn.transaction(), conn.cursor(row_factory=dict_row) as cursor:
            for key in batch:
                hours = cursor.execute(_HOUR_SQL, key, binary=True).fetchall()
                replaced += cursor.execute(_DELETE_SQL, key).rowcount
                cursor.execute(_INSERT_SQL, hour_row(key, hours))
        pause()
