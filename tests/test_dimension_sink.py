"""The sink's dimension rows, against a real Postgres and broker: a value merged into
"(other)" by a revision loses its row and gets a tombstone; a replayed older emission
changes nothing; a repeated one removes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from fastdigest import TDigest
from psycopg.rows import dict_row

from dataflows.sinks import RowsSink
from dataflows.windows import DimensionEmission, WindowRow
from deploy.stack import Broker
from schemas.metrics import DimensionRow, MetricsRow
from tests import dataflow_harness as h

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
KEY = ("acme", "/chat", "gpt-4o")


def _fields(requests: int) -> dict[str, Any]:
    return {
        "tenant_id": KEY[0],
        "route": KEY[1],
        "model": KEY[2],
        "window_start": START,
        "window_end": START + timedelta(minutes=1),
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


def emission(revision: int, values: dict[str | None, int], kept: list[str | None]) -> WindowRow:
    """One emission of the window: ``values`` (value -> calls) as its country rows."""
    digest = TDigest.from_values([100.0]).to_bytes()
    rows = [
        DimensionEmission(
            row=DimensionRow(**_fields(calls), revision=revision, dimension="metadata.country", value=value),
            digest=digest,
            ttft_count=0,
        )
        for value, calls in values.items()
    ]
    main = MetricsRow(**_fields(sum(values.values())), revision=revision)
    return WindowRow(
        row=main, digest=digest, ttft_count=0, dimension_rows=rows, kept={"metadata.country": kept}
    )


def stored(dsn: str) -> dict[str | None, tuple[int, int]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        rows = conn.execute("SELECT value, requests, revision FROM llm_dimension_metrics").fetchall()
    return {row["value"]: (row["requests"], row["revision"]) for row in rows}


def test_values_merged_into_other_leave_no_row_behind(broker: Broker, postgres_dsn: str) -> None:
    sink = RowsSink(postgres_dsn, broker.address).build("rows", 0, 1)
    try:
        first = emission(2, {"SE": 1, None: 1}, ["SE", None])
        sink.write_batch([first])
        assert stored(postgres_dsn) == {"SE": (1, 2), None: (1, 2)}
        # A revision: DE now leads, SE and no-value are merged into "(other)".
        second = emission(6, {"DE": 2, "(other)": 3}, ["DE", "(other)"])
        sink.write_batch([second])
        assert stored(postgres_dsn) == {"DE": (2, 6), "(other)": (3, 6)}
        # The first emission replayed (a resume repeats outputs since the last snapshot):
        # refused, nothing comes back. The second repeated: nothing removed.
        sink.write_batch([first])
        sink.write_batch([second])
        assert stored(postgres_dsn) == {"DE": (2, 6), "(other)": (3, 6)}
        # Both in one batch, in either order: the newer wins.
        sink.write_batch([emission(8, {"DE": 2, "SE": 2}, ["DE", "SE"]), second])
        assert stored(postgres_dsn) == {"DE": (2, 8), "SE": (2, 8)}
    finally:
        sink.close()
    # The topic, compacted, holds what Postgres holds: SE and no-value got tombstones
    # when they were merged, "(other)" when it went.
    records = h.read_topic(broker.address, h.DIMENSION_METRICS)
    tombstones = [key for key, value, _, _ in records if value is None]
    prefix = f"acme|/chat|gpt-4o|{START.isoformat()}|metadata.country|"
    assert sorted(tombstones) == sorted(f"{prefix}{v}".encode() for v in ("SE", "", "(other)"))
    latest = h.latest_dimension_metrics(broker.address)
    assert {(key[5], row["revision"]) for key, row in latest.items()} == {("DE", 8), ("SE", 8)}
