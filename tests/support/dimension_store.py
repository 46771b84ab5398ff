"""Dimension rows written into Postgres as the dataflow's sink writes them: packed, one row
per window, key and dimension (``schemas/dimensions.sql``), read back one per value
through the view ``llm_dimension_metrics``."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

from dataflows.sinks import UPSERT_DIMENSIONS_SQL, packed_values_of
from dataflows.windows import DimensionEmission
from schemas.rows import FLOAT_STATISTICS, VALUE_STATISTICS, DimensionRows
from tests.support.metric_windows import RawCall, Window

WINDOW = ("tenant_id", "route", "model", "window_start", "window_end", "dimension")


def split_by(
    window: Window, dimension: str, values: Sequence[str | None], rnd: random.Random
) -> list[Window]:
    """A window's rows of ``dimension`` as the dataflow writes them: its calls shared out
    among ``values`` (one ``rnd.choice`` a call), one row per value that got any, each at
    its window's revision."""
    parts: dict[str | None, list[RawCall]] = defaultdict(list)
    for call in window.calls:
        parts[rnd.choice(values)].append(call)
    return [
        Window(
            window.tenant_id,
            window.route,
            window.model,
            window.start,
            calls,
            revision=window.revision,
            extra={"dimension": dimension, "value": value, "window_revision": window.revision},
        )
        for value, calls in parts.items()
    ]


def _column(members: list[Mapping[str, Any]], name: str) -> list[Any]:
    # Postgres arrays hold one type: these are double precision, whatever Python has.
    if name in FLOAT_STATISTICS:
        return [None if row[name] is None else float(row[name]) for row in members]
    return [row[name] for row in members]


def insert_dimension_rows(dsn: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` (each the columns of one value's row: those of ``llm_metrics`` plus
    ``dimension`` and ``value``); the rows of one window and dimension become one packed
    row, whose revision is the highest of theirs."""
    packed: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        packed.setdefault(tuple(row[name] for name in WINDOW), []).append(row)
    emissions: list[DimensionEmission] = []
    for key, members in packed.items():
        tenant_id, route, model, window_start, window_end, dimension = key
        rows = DimensionRows(
            tenant_id=tenant_id,
            route=route,
            model=model,
            window_start=window_start,
            window_end=window_end,
            revision=max(row["revision"] for row in members),
            dimension=dimension,
            values=[row["value"] for row in members],
            **{name: _column(members, name) for name in VALUE_STATISTICS},
        )
        emissions.append(
            DimensionEmission(
                rows=rows,
                ttft_count=[row.get("ttft_count", 0) for row in members],
                latency_digest=[row.get("latency_digest") for row in members],
            )
        )
    with psycopg.connect(dsn) as conn, conn.cursor() as cursor:
        cursor.executemany(UPSERT_DIMENSIONS_SQL, packed_values_of(emissions))
