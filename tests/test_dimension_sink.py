"""The sink's dimension rows, against a real Postgres and broker: a window's rows per value
are replaced whole by a newer emission (a value merged into "(other)" leaves no row
behind), a replayed older emission changes nothing, and the topic carries the same."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from fastdigest import TDigest
from psycopg.rows import dict_row

from dataflows.sinks import RowsSink
from dataflows.windows import DimensionEmission, WindowRow
from schemas.rows import VALUE_STATISTICS, DimensionRows, MetricsRow
from tests.support import dataflow as h
from tests.support.stacks import Broker

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
KEY = {"tenant_id": "acme", "route": "/chat", "model": "gpt-4o"}
WINDOW = {**KEY, "window_start": START, "window_end": START + timedelta(minutes=1)}


def _statistics(requests: int) -> dict[str, Any]:
    return {
        "requests": requests,
        "errors": 0,
        "timeouts": 0,
        "avg_latency_ms": 100.0,
        "p50_latency_ms": 100.0,
        "p95_latency_ms": 100.0,
        "p99_latency_ms": 100.0,
        "avg_time_to_first_token_ms": None,
        "prompt_tokens": 10 * requests,
        "completion_tokens": requests,
        "cache_read_tokens": 0,
        "reasoning_tokens": 0,
        "avg_prompt_tokens": 10.0,
        "avg_completion_tokens": 1.0,
        "estimated_cost_usd": 0.001 * requests,
        "unpriced_requests": 0,
    }


def emission(revision: int, values: dict[str | None, int]) -> WindowRow:
    """One emission of the window: ``values`` (value -> calls) as its country rows."""
    digest = TDigest.from_values([100.0]).to_bytes()
    per_value = [_statistics(calls) for calls in values.values()]
    rows = DimensionRows(
        **WINDOW,
        revision=revision,
        dimension="metadata.country",
        values=list(values),
        **{name: [one[name] for one in per_value] for name in VALUE_STATISTICS},
    )
    main = MetricsRow(**WINDOW, revision=revision, **_statistics(sum(values.values())))
    return WindowRow(
        row=main,
        digest=digest,
        ttft_count=0,
        dimensions=[
            DimensionEmission(rows=rows, ttft_count=[0] * len(values), latency_digest=[digest] * len(values))
        ],
    )


def stored(dsn: str) -> dict[str | None, tuple[int, int]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        rows = conn.execute(
            "SELECT value, requests, revision, latency_digest FROM llm_dimension_metrics"
        ).fetchall()
    assert all(row["latency_digest"] for row in rows)
    return {row["value"]: (row["requests"], row["revision"]) for row in rows}


def test_a_newer_emission_replaces_the_rows_and_an_older_one_changes_nothing(
    broker: Broker, postgres_dsn: str
) -> None:
    sink = RowsSink(postgres_dsn, broker.address).build("rows", 0, 1)
    try:
        first = emission(2, {"SE": 1, None: 1})
        sink.write_batch([first])
        assert stored(postgres_dsn) == {"SE": (1, 2), None: (1, 2)}
        # A revision: DE now leads, SE and no value are merged into "(other)".
        second = emission(6, {"DE": 2, "(other)": 3})
        sink.write_batch([second])
        assert stored(postgres_dsn) == {"DE": (2, 6), "(other)": (3, 6)}
        # The first emission replayed (a resume repeats outputs since the last snapshot):
        # refused, nothing comes back. The second repeated: the same rows.
        sink.write_batch([first])
        sink.write_batch([second])
        assert stored(postgres_dsn) == {"DE": (2, 6), "(other)": (3, 6)}
        # Two in one batch, the newer first: the newer wins.
        sink.write_batch([emission(8, {"DE": 2, "SE": 2}), second])
        assert stored(postgres_dsn) == {"DE": (2, 8), "SE": (2, 8)}
    finally:
        sink.close()
    # The topic: one record per emission Postgres took, keyed by window and dimension, so
    # that compaction keeps the latest, which holds what Postgres holds.
    records = h.dimension_records(broker.address)
    prefix = f"acme|/chat|gpt-4o|{START.isoformat()}|metadata.country".encode()
    assert list(records) == [prefix]
    assert [(r["revision"], r["values"]) for r in records[prefix]] == [
        (2, ["SE", None]),
        (6, ["DE", "(other)"]),
        (6, ["DE", "(other)"]),
        (8, ["DE", "SE"]),
    ]
    latest = h.latest_dimension_metrics(broker.address)
    assert {(key[5], row["requests"], row["revision"]) for key, row in latest.items()} == {
        ("DE", 2, 8),
        ("SE", 2, 8),
    }


def test_values_and_numbers_of_every_kind_come_back_as_written(broker: Broker, postgres_dsn: str) -> None:
    """Arrays travel as literals: quotes, backslashes, braces, commas, a "NULL" text, unicode;
    floats of every magnitude; digests of any bytes."""
    values: list[str | None] = ['a "quoted", {braced} value', "back\\slash\\", "NULL", "", "ünï ✓", None]
    floats = [1e-05, 1e20, -0.0, 2891.329288482666, 0.1 + 0.2, None]
    digests = [bytes(range(256)), b"", b"\\x00", b'"', b"{}", b"\x00\xff"]
    item = emission(3, dict.fromkeys(values, 1))
    (dimension,) = item.dimensions
    dimension.rows.avg_latency_ms = floats
    dimension.rows.estimated_cost_usd = [2.5e-9, 1.0, 0.0, 123456.789, 1e-12, 3.0]
    dimension.latency_digest = digests
    sink = RowsSink(postgres_dsn, broker.address).build("rows", 0, 1)
    try:
        sink.write_batch([item])
    finally:
        sink.close()
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute(
            "SELECT value, avg_latency_ms, estimated_cost_usd, latency_digest FROM llm_dimension_metrics"
        ).fetchall()
    assert sorted(rows, key=str) == sorted(
        zip(values, floats, dimension.rows.estimated_cost_usd, digests, strict=True), key=str
    )
