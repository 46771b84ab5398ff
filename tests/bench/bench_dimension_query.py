"""Query API latency for a dimension's rows (docs/dimensions.md): 30 days of 1-minute windows of one
key, a dimension of 5 values (one of them no value, one "(other)"): 216,000 value rows
in 43,200 packed rows (``llm_dimension_windows``), read through the view
``llm_dimension_metrics``.

Figures, through ``api.query`` served in this process, 5 requests each: a year-long
``bucket=1d`` roll-up (the default ``limit``, and ``limit=1000``), the same for one
value, ``bucket=1h`` (``limit=1000``) and the plain rows (``limit=1000``). Every
request must answer within ~2 s (else ``503 deadline_exceeded``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from fastdigest import TDigest

from api.query import create_app
from schemas.config import Settings
from schemas.database import ensure_schema
from tests.support import dimension_store
from tests.support.servers import serving
from tests.support.stacks import Postgres

START = datetime(2026, 1, 1, tzinfo=UTC)
DAYS = 30
VALUES = ("SE", "DE", "US", None, "(other)")
YEAR = {"from": "2025-06-01T00:00:00Z", "to": "2026-06-01T00:00:00Z"}
QUERIES: tuple[tuple[str, dict[str, str]], ...] = (
    ("a year, bucket=1d", {**YEAR, "bucket": "1d"}),
    ("a year, bucket=1d, limit=1000", {**YEAR, "bucket": "1d", "limit": "1000"}),
    ("a year, bucket=1d, value=SE", {**YEAR, "bucket": "1d", "value": "SE", "limit": "1000"}),
    ("bucket=1h, limit=1000", {"bucket": "1h", "limit": "1000"}),
    ("plain rows, limit=1000", {"limit": "1000"}),
)


def _rows() -> list[dict[str, Any]]:
    digest = TDigest.from_values([100.0, 200.0, 300.0]).to_bytes()
    statistics_ = {
        "requests": 3,
        "errors": 0,
        "timeouts": 0,
        "avg_latency_ms": 200.0,
        "p50_latency_ms": 200.0,
        "p95_latency_ms": 300.0,
        "p99_latency_ms": 300.0,
        "avg_time_to_first_token_ms": None,
        "ttft_count": 0,
        "prompt_tokens": 30,
        "completion_tokens": 3,
        "cache_read_tokens": 0,
        "reasoning_tokens": 0,
        "avg_prompt_tokens": 10.0,
        "avg_completion_tokens": 1.0,
        "estimated_cost_usd": 0.001,
        "unpriced_requests": 0,
        "latency_digest": digest,
        "revision": 5,
    }
    rows = []
    for minute in range(DAYS * 24 * 60):
        start = START + timedelta(minutes=minute)
        for value in VALUES:
            rows.append(
                {
                    "tenant_id": "acme",
                    "route": "/chat",
                    "model": "gpt-4o",
                    "window_start": start,
                    "window_end": start + timedelta(minutes=1),
                    "dimension": "metadata.country",
                    "value": value,
                    **statistics_,
                }
            )
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench_dimension_query_") as directory:
        server = Postgres(Path(directory) / "postgres").start()
        try:
            ensure_schema(server.dsn)
            rows = _rows()
            dimension_store.insert_dimension_rows(server.dsn, rows)
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE")
            print(f"  {len(rows):,} value rows of one key over {DAYS} days, {len(VALUES)} values a window")
            settings = Settings(postgres_dsn=server.dsn, auth=False, dimensions=("metadata.country",))
            with serving(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
                for label, params in QUERIES:
                    seconds, codes = [], []
                    for _ in range(5):
                        started = time.perf_counter()
                        answer = client.get(
                            "/v1/metrics",
                            params={"tenant_id": "acme", "dimension": "metadata.country", **params},
                        )
                        seconds.append(time.perf_counter() - started)
                        codes.append(answer.status_code)
                    print(
                        f"  {label}: median {statistics.median(seconds):.2f} s "
                        f"(min {min(seconds):.2f}, max {max(seconds):.2f}), answers {sorted(set(codes))}"
                    )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
