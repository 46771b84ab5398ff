"""The query API's roll-up cache: what ``llm_metrics_rollups`` holds (:func:`cached_parts`), and
roll-ups made to run out of time, one chunk of merging a request (:func:`slow_merging`)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import api.queries
import api.query
from api.queries import Deadline
from schemas import rollups
from tests.support.metric_windows import rfc3339


def cached_parts(dsn: str) -> dict[tuple, int]:
    """What llm_metrics_rollups holds: (route, model, bucket_seconds, start) -> windows."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT route, model, bucket_seconds, bucket_start, windows FROM llm_metrics_rollups"
        ).fetchall()
    return {
        (route, model, seconds, rfc3339(start)): windows for route, model, seconds, start, windows in rows
    }


def slow_merging(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every chunk of keeping or merging (and every bucket merged straight from its windows) takes
    one second of a clock only merging moves, and a request's deadline is 1.5 s of that
    clock: each request merges one chunk."""
    now = [0.0]
    merge = api.queries._merge_parts

    def merge_taking_a_second(*args: Any) -> None:
        merge(*args)
        now[0] += 1.0

    monkeypatch.setattr(api.queries, "_merge_parts", merge_taking_a_second)
    keep = rollups.keep_async

    async def keep_taking_a_second(*args: Any) -> int:
        kept = await keep(*args)
        now[0] += 1.0
        return kept

    monkeypatch.setattr(rollups, "keep_async", keep_taking_a_second)
    direct = api.queries.direct_row

    def direct_taking_a_second(*args: Any) -> Any:
        now[0] += 1.0
        return direct(*args)

    monkeypatch.setattr(api.queries, "direct_row", direct_taking_a_second)
    by_hours = api.queries.bucket_of_hours

    def hours_taking_a_second(*args: Any) -> Any:
        now[0] += 1.0
        return by_hours(*args)

    monkeypatch.setattr(api.queries, "bucket_of_hours", hours_taking_a_second)
    monkeypatch.setattr(api.query, "Deadline", lambda seconds: Deadline(1.5, clock=lambda: now[0]))
    monkeypatch.setattr(api.queries, "CHUNK_WINDOWS", 1)  # one part per chunk
