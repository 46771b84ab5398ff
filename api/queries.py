"""The SQL behind ``GET /v1/metrics`` and the merging of windows into roll-up buckets.

Values only ever travel as query parameters; the statement text is assembled
from the fixed column names of :data:`schemas.metrics.ROW_FIELDS`.

A roll-up lets Postgres do what it does well — sums, and averages weighted by
what each window averaged over — and keeps only the percentiles for Python:
they come from the windows' merged t-digests, never from averaging percentiles.
The digests are fetched for the buckets that survive ``limit`` only.

What a merged row reports:

- ``requests``, ``errors``, ``timeouts``, every token count, ``estimated_cost_usd``
  and ``unpriced_requests``: sums over the bucket's windows.
- ``avg_latency_ms``, ``avg_prompt_tokens``, ``avg_completion_tokens``: weighted by
  each window's answered calls (``requests - timeouts``);
  ``avg_time_to_first_token_ms`` by each window's ``ttft_count``. Null when
  nothing in the bucket had a value.
- ``p50/p95/p99_latency_ms``: from the merged digests; null when the bucket has none.
- ``window_start``: the bucket's start, aligned to the Unix epoch; ``window_end``:
  the bucket's end, or the latest end of its windows if a window is longer than
  the bucket.
- ``revision``: the highest revision among the bucket's windows, so a client
  polling a bucket sees it grow whenever any of its windows was updated.
- ``route`` / ``model``: null for a dimension left out of ``group_by``.

Windows are selected by ``from <= window_start < to`` before they are bucketed,
so a range not aligned to the bucket size yields partial buckets at its edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from fastdigest import TDigest

from api.params import DIMENSIONS, MetricsQuery
from schemas.metrics import ROW_FIELDS, MetricsRow

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50_latency_ms", 0.50),
    ("p95_latency_ms", 0.95),
    ("p99_latency_ms", 0.99),
)

# Code-point order, whatever the database's collation: the documented order of rows.
_ORDER = 'ORDER BY window_start DESC, route COLLATE "C", model COLLATE "C"'


def _filters(query: MetricsQuery, table: str = "") -> str:
    """The WHERE conditions of ``query``, with ``%(name)s`` placeholders."""
    prefix = f"{table}." if table else ""
    conditions = [f"{prefix}tenant_id = %(tenant_id)s"]
    if query.route is not None:
        conditions.append(f"{prefix}route = %(route)s")
    if query.model is not None:
        conditions.append(f"{prefix}model = %(model)s")
    if query.start is not None:
        conditions.append(f"{prefix}window_start >= %(start)s")
    if query.end is not None:
        conditions.append(f"{prefix}window_start < %(end)s")
    return " AND ".join(conditions)


def parameters(query: MetricsQuery) -> dict[str, Any]:
    return {
        "tenant_id": query.tenant_id,
        "route": query.route,
        "model": query.model,
        "start": query.start,
        "end": query.end,
        "limit": query.limit,
        "bucket": None if query.bucket_seconds is None else timedelta(seconds=query.bucket_seconds),
    }


def windows_sql(query: MetricsQuery) -> str:
    """Stored windows as they are: the plain query."""
    return f"SELECT {', '.join(ROW_FIELDS)} FROM llm_metrics WHERE {_filters(query)} {_ORDER} LIMIT %(limit)s"


def _weighted(column: str, weight: str) -> str:
    # Windows without a value for the average carry no weight either.
    return f"sum({column} * {weight}) / NULLIF(sum({weight}) FILTER (WHERE {column} IS NOT NULL), 0)"


def rollup_sql(query: MetricsQuery) -> str:
    """Buckets of merged windows, each with the array of its windows' digests.

    The aggregate runs over every selected window; the digests are fetched by a
    lateral subquery for the buckets left after ``LIMIT`` only.
    """
    kept = [name for name in DIMENSIONS if name in query.group_by]
    if query.bucket_seconds is None:
        bucket_start = "window_start"
        window_end = "max(window_end)"
        same_bucket = "w.window_start = b.window_start"
    else:
        bucket_start = "date_bin(%(bucket)s, window_start, timestamptz 'epoch')"
        window_end = "greatest(max(window_end), bucket_start + %(bucket)s)"
        same_bucket = "w.window_start >= b.window_start AND w.window_start < b.window_start + %(bucket)s"
    dimensions = [name if name in kept else f"NULL::text AS {name}" for name in DIMENSIONS]
    answered = "(requests - timeouts)"
    aggregate = f"""
        SELECT tenant_id, {", ".join(dimensions)},
            bucket_start AS window_start,
            {window_end} AS window_end,
            sum(requests)::bigint AS requests,
            sum(errors)::bigint AS errors,
            sum(timeouts)::bigint AS timeouts,
            {_weighted("avg_latency_ms", answered)} AS avg_latency_ms,
            {_weighted("avg_time_to_first_token_ms", "ttft_count")} AS avg_time_to_first_token_ms,
            sum(prompt_tokens)::bigint AS prompt_tokens,
            sum(completion_tokens)::bigint AS completion_tokens,
            sum(cache_read_tokens)::bigint AS cache_read_tokens,
            sum(reasoning_tokens)::bigint AS reasoning_tokens,
            {_weighted("avg_prompt_tokens", answered)} AS avg_prompt_tokens,
            {_weighted("avg_completion_tokens", answered)} AS avg_completion_tokens,
            sum(estimated_cost_usd) AS estimated_cost_usd,
            sum(unpriced_requests)::bigint AS unpriced_requests,
            max(revision) AS revision
        FROM (SELECT *, {bucket_start} AS bucket_start FROM llm_metrics
              WHERE {_filters(query)}) AS selected
        GROUP BY tenant_id, bucket_start{"".join(f", {name}" for name in kept)}
        ORDER BY bucket_start DESC{"".join(f', {name} COLLATE "C"' for name in kept)}
        LIMIT %(limit)s"""
    same_group = "".join(f" AND w.{name} = b.{name}" for name in kept)
    return f"""
        SELECT b.*, digests.blobs
        FROM ({aggregate}) AS b
        CROSS JOIN LATERAL (
            SELECT array_agg(w.latency_digest) FILTER (WHERE w.latency_digest IS NOT NULL)
                AS blobs
            FROM llm_metrics AS w
            WHERE {_filters(query, "w")} AND {same_bucket}{same_group}
        ) AS digests
        {_ORDER}"""


def merge_digests(blobs: Sequence[bytes] | None) -> TDigest | None:
    """One digest from the serialized digests of several windows; None when there are none."""
    if not blobs:
        return None
    merged = TDigest.from_bytes(blobs[0])
    for blob in blobs[1:]:
        merged.merge_inplace(TDigest.from_bytes(blob))
    return merged


def window_row(record: Sequence[Any]) -> MetricsRow:
    """A stored window, from a :func:`windows_sql` record."""
    return MetricsRow(**dict(zip(ROW_FIELDS, record, strict=True)))


def rollup_row(record: dict[str, Any]) -> MetricsRow:
    """A bucket, from a :func:`rollup_sql` record (a dict): the sums plus merged percentiles."""
    values = dict(record)
    digest = merge_digests(values.pop("blobs"))
    for name, quantile in PERCENTILES:
        values[name] = None if digest is None or digest.is_empty() else digest.quantile(quantile)
    return MetricsRow(**values)
