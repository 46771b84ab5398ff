"""The SQL behind ``GET /v1/metrics`` and the merging of windows into roll-up buckets.

Values only ever travel as query parameters; the statement text is assembled
from the fixed column names of :data:`schemas.metrics.ROW_FIELDS`.

A roll-up lets Postgres do what it does well — sums, and averages weighted by
what each window averaged over — and keeps only the percentiles for Python:
they come from the windows' merged t-digests, never from averaging percentiles.

Merging is bounded. Postgres aggregates each key's share of a bucket (a *part*)
and, for ``1h`` and ``1d`` buckets the range covers whole, looks up the part's
merged digest in ``llm_metrics_rollup_digests``; a cached digest is used only
when the part's windows still have the count, revision sum and ``updated_at``
sum it was merged from (see ``schemas/llm_metrics.sql``), so it is never stale.
The other parts' window digests are fetched for the buckets that survive
``limit`` only, in chunks, merged in Rust (``fastdigest.merge_all``) and cached,
until a :class:`Deadline` passes: then the request stops with
:class:`RollupIncomplete` and what it merged so far stays cached, so a retry
goes on from there. Everything is read in one snapshot.

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

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from fastdigest import TDigest, merge_all
from psycopg.rows import dict_row
from starlette.concurrency import run_in_threadpool

from api.params import DIMENSIONS, MetricsQuery
from schemas.metrics import ROW_FIELDS, MetricsRow

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50_latency_ms", 0.50),
    ("p95_latency_ms", 0.95),
    ("p99_latency_ms", 0.99),
)

# Buckets at least this long keep their parts' merged digests; shorter ones merge
# at most 15 windows per part and are cheap enough to merge on every read.
CACHED_BUCKET_SECONDS = 3600
# Window digests fetched and merged per round trip (about 12 MB of digests):
# small enough that the deadline is checked often, large enough to stream.
CHUNK_WINDOWS = 20_000

# The aggregates a roll-up sums, and the averages it weights (column, weight).
_SUMMED: tuple[str, ...] = (
    "requests",
    "errors",
    "timeouts",
    "prompt_tokens",
    "completion_tokens",
    "cache_read_tokens",
    "reasoning_tokens",
    "unpriced_requests",
)
_ANSWERED = "(requests - timeouts)"
_WEIGHTED: tuple[tuple[str, str], ...] = (
    ("avg_latency_ms", _ANSWERED),
    ("avg_time_to_first_token_ms", "ttft_count"),
    ("avg_prompt_tokens", _ANSWERED),
    ("avg_completion_tokens", _ANSWERED),
)
_PERCENTILE_FIELDS = frozenset(name for name, _ in PERCENTILES)
# The bucket's own columns: the row without the percentiles, which come from digests.
_BUCKET_FIELDS: tuple[str, ...] = tuple(name for name in ROW_FIELDS if name not in _PERCENTILE_FIELDS)

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


class Deadline:
    """The time a request's database work and merging must finish by."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._at = clock() + seconds

    def remaining(self) -> float:
        return self._at - self._clock()

    def statement_timeout(self) -> str:
        """``SET LOCAL statement_timeout`` for what is left (at least 1 ms: 0 would mean none)."""
        return f"SET LOCAL statement_timeout = {max(1, int(self.remaining() * 1000))}"


class DeadlineExceeded(Exception):
    """The request's work did not fit its deadline; the message says what to do."""


class RollupIncomplete(DeadlineExceeded):
    """Merging stopped at the deadline; the parts merged so far are cached."""

    def __init__(self, seconds: float, merged: int, total: int) -> None:
        super().__init__(
            f"the roll-up needs more than {seconds:g} s: {merged} of {total} bucket parts"
            " were merged and kept, retry to go on from there"
        )


def cacheable(query: MetricsQuery) -> bool:
    return query.bucket_seconds is not None and query.bucket_seconds >= CACHED_BUCKET_SECONDS


def _bucket_start(query: MetricsQuery) -> str:
    if query.bucket_seconds is None:
        return "window_start"
    return "date_bin(%(bucket)s, window_start, timestamptz 'epoch')"


def _in_bucket(query: MetricsQuery, window: str, bucket_start: str) -> str:
    if query.bucket_seconds is None:
        return f"{window}.window_start = {bucket_start}"
    return f"{window}.window_start >= {bucket_start} AND {window}.window_start < {bucket_start} + %(bucket)s"


def rollup_sql(query: MetricsQuery) -> str:
    """Buckets of merged windows, each with the parallel arrays of its parts.

    ``parts`` aggregates every selected window once per key and bucket, with the
    part's fingerprint (``windows``, ``revisions``, ``updates``); ``buckets``
    merges parts across the dimensions left out and keeps ``limit``; the parts
    of the buckets kept come back as arrays, with the cached digest of each when
    one matches. Weighted averages go through the parts as (total, weight).
    """
    kept = [name for name in DIMENSIONS if name in query.group_by]
    part_columns = [f"sum({name}) AS {name}" for name in _SUMMED]
    part_columns += [
        # Windows without a value for the average carry no weight either.
        f"sum({column} * {weight}) AS {column}_total, "
        f"sum({weight}) FILTER (WHERE {column} IS NOT NULL) AS {column}_weight"
        for column, weight in _WEIGHTED
    ]
    parts = f"""
        SELECT tenant_id, route, model, {_bucket_start(query)} AS bucket_start,
            max(window_end) AS window_end,
            {", ".join(part_columns)},
            sum(estimated_cost_usd) AS estimated_cost_usd,
            max(revision) AS revision,
            count(*) AS windows, sum(revision) AS revisions,
            sum(extract(epoch FROM updated_at)) AS updates
        FROM llm_metrics WHERE {_filters(query)}
        GROUP BY 1, 2, 3, 4"""
    if query.bucket_seconds is None:
        window_end = "max(window_end)"
    else:
        window_end = "greatest(max(window_end), bucket_start + %(bucket)s)"
    dimensions = [name if name in kept else f"NULL::text AS {name}" for name in DIMENSIONS]
    bucket_columns = [f"sum({name})::bigint AS {name}" for name in _SUMMED]
    bucket_columns += [
        f"sum({column}_total) / NULLIF(sum({column}_weight), 0) AS {column}" for column, _ in _WEIGHTED
    ]
    buckets = f"""
        SELECT tenant_id, {", ".join(dimensions)},
            bucket_start AS window_start, {window_end} AS window_end,
            {", ".join(bucket_columns)},
            sum(estimated_cost_usd) AS estimated_cost_usd,
            max(revision) AS revision
        FROM parts
        GROUP BY tenant_id, bucket_start{"".join(f", {name}" for name in kept)}
        ORDER BY bucket_start DESC{"".join(f', {name} COLLATE "C"' for name in kept)}
        LIMIT %(limit)s"""
    same_group = "".join(f" AND p.{name} = b.{name}" for name in kept)
    if cacheable(query):
        # Only a bucket the range covers whole matches what was cached for it.
        complete = (
            "(%(start)s::timestamptz IS NULL OR b.window_start >= %(start)s)"
            " AND (%(end)s::timestamptz IS NULL OR b.window_start + %(bucket)s <= %(end)s)"
        )
        cache_join = f"""
            LEFT JOIN llm_metrics_rollup_digests AS c
              ON c.tenant_id = p.tenant_id AND c.route = p.route AND c.model = p.model
             AND c.bucket_seconds = %(bucket_seconds)s AND c.bucket_start = p.bucket_start
             AND c.windows = p.windows AND c.revisions = p.revisions AND c.updates = p.updates
             AND {complete}"""
        cached, digest = "c.bucket_start IS NOT NULL", "c.digest"
    else:
        complete, cache_join, cached, digest = "false", "", "false", "NULL::bytea"
    order = 'ORDER BY p.route COLLATE "C", p.model COLLATE "C"'
    arrays = {
        "part_routes": "p.route",
        "part_models": "p.model",
        "part_windows": "p.windows",
        "part_revisions": "p.revisions",
        "part_updates": "p.updates",
        "part_cached": cached,
        "part_digests": digest,
    }
    return f"""
        WITH parts AS MATERIALIZED ({parts}), buckets AS ({buckets})
        SELECT * FROM (
            SELECT {", ".join(f"b.{name}" for name in _BUCKET_FIELDS)},
                bool_and({complete}) AS complete,
                {", ".join(f"array_agg({value} {order}) AS {name}" for name, value in arrays.items())}
            FROM buckets AS b
            JOIN parts AS p ON p.bucket_start = b.window_start{same_group}
            {cache_join}
            GROUP BY {", ".join(f"b.{name}" for name in _BUCKET_FIELDS)}
        ) AS rolled
        {_ORDER}"""


def part_digests_sql(query: MetricsQuery) -> str:
    """The window digests of chosen parts, given as parallel arrays; one row per part."""
    return f"""
        SELECT m.number,
            array_agg(w.latency_digest ORDER BY w.window_start)
                FILTER (WHERE w.latency_digest IS NOT NULL) AS blobs
        FROM unnest(%(routes)s::text[], %(models)s::text[], %(starts)s::timestamptz[])
            WITH ORDINALITY AS m(route, model, bucket_start, number)
        JOIN llm_metrics AS w
          ON w.route = m.route AND w.model = m.model AND {_in_bucket(query, "w", "m.bucket_start")}
        WHERE {_filters(query, "w")}
        GROUP BY m.number"""


KEEP_DIGEST_SQL = """
    INSERT INTO llm_metrics_rollup_digests
        (tenant_id, route, model, bucket_seconds, bucket_start, windows, revisions, updates, digest)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (tenant_id, route, model, bucket_seconds, bucket_start) DO UPDATE SET
        windows = EXCLUDED.windows, revisions = EXCLUDED.revisions, updates = EXCLUDED.updates,
        digest = EXCLUDED.digest, merged_at = now()
"""


@dataclass
class Part:
    """One key's windows in one bucket, and their merged digest once known."""

    route: str
    model: str
    bucket_start: datetime
    windows: int
    revisions: int
    updates: Decimal
    # Whether the merged digest is known: cached, or merged by this request.
    merged: bool
    # The merged digest, serialized (None: no window of the part had one).
    blob: bytes | None
    # Whether the merged digest may be cached (the range covers the whole bucket).
    keep: bool


def merge_digests(blobs: Sequence[bytes] | None) -> TDigest | None:
    """One digest from the serialized digests of several windows; None when there are none."""
    if not blobs:
        return None
    return merge_all([TDigest.from_bytes(blob) for blob in blobs])


def _merge_parts(parts: Sequence[Part], blobs: dict[int, list[bytes]]) -> None:
    """Each part's window digests (``blobs`` by 1-based position) merged into its ``blob``."""
    for number, part in enumerate(parts, 1):
        digest = merge_digests(blobs.get(number))
        part.blob = None if digest is None else digest.to_bytes()
        part.merged = True


def window_row(record: Sequence[Any]) -> MetricsRow:
    """A stored window, from a :func:`windows_sql` record."""
    return MetricsRow(**dict(zip(ROW_FIELDS, record, strict=True)))


def _row(record: dict[str, Any], parts: Sequence[Part]) -> MetricsRow:
    """A bucket: its sums from ``record``, its percentiles from its parts' merged digests."""
    values = {name: record[name] for name in _BUCKET_FIELDS}
    digest = merge_digests([part.blob for part in parts if part.blob is not None])
    for name, quantile in PERCENTILES:
        values[name] = None if digest is None or digest.is_empty() else digest.quantile(quantile)
    return MetricsRow(**values)


def _parts(record: dict[str, Any], keep: bool) -> list[Part]:
    return [
        Part(
            route=route,
            model=model,
            bucket_start=record["window_start"],
            windows=windows,
            revisions=revisions,
            updates=updates,
            merged=cached,
            blob=blob,
            keep=keep and record["complete"],
        )
        for route, model, windows, revisions, updates, cached, blob in zip(
            record["part_routes"],
            record["part_models"],
            record["part_windows"],
            record["part_revisions"],
            record["part_updates"],
            record["part_cached"],
            record["part_digests"],
            strict=True,
        )
    ]


def _chunks(parts: Sequence[Part]) -> Iterator[list[Part]]:
    chunk: list[Part] = []
    windows = 0
    for part in parts:
        if chunk and windows + part.windows > CHUNK_WINDOWS:
            yield chunk
            chunk, windows = [], 0
        chunk.append(part)
        windows += part.windows
    if chunk:
        yield chunk


async def fetch_rollup(
    conn: psycopg.AsyncConnection[Any], query: MetricsQuery, deadline: Deadline
) -> list[MetricsRow]:
    """The roll-up's rows, merging what the cache lacks until ``deadline``.

    Raises :class:`DeadlineExceeded` (a statement ran out of time) or
    :class:`RollupIncomplete` (merging did), ``psycopg.Error`` when Postgres fails.
    """
    params = parameters(query) | {"bucket_seconds": query.bucket_seconds}
    keep = cacheable(query)
    records: list[dict[str, Any]] | None = None
    missing: list[Part] = []
    buckets: list[tuple[dict[str, Any], list[Part]]] = []
    try:
        # One snapshot: sums, fingerprints and window digests agree, so a part
        # merged here may be cached under the fingerprint read here.
        async with conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            await conn.execute(deadline.statement_timeout())
            async with conn.cursor(row_factory=dict_row) as cursor:
                # Binary results: a bytea array in text form is hex that costs
                # more to parse than the digests cost to merge.
                await cursor.execute(rollup_sql(query), params, binary=True)
                records = await cursor.fetchall()
            buckets = [(record, _parts(record, keep)) for record in records]
            missing = [part for _, parts in buckets for part in parts if not part.merged]
            for chunk in _chunks(missing):
                if deadline.remaining() <= 0:
                    break
                await conn.execute(deadline.statement_timeout())
                cursor = await conn.execute(
                    part_digests_sql(query),
                    params
                    | {
                        "routes": [part.route for part in chunk],
                        "models": [part.model for part in chunk],
                        "starts": [part.bucket_start for part in chunk],
                    },
                    binary=True,
                )
                blobs = {number: found for number, found in await cursor.fetchall()}
                await run_in_threadpool(_merge_parts, chunk, blobs)
    except psycopg.errors.QueryCanceled:
        # A chunk that ran out of time ends merging; what was merged before it is kept below.
        if records is None:
            raise DeadlineExceeded(
                f"the roll-up needs more than {deadline.seconds:g} s of database work;"
                " ask for a shorter range, one route or model, or a larger bucket"
            ) from None
    fresh = [part for part in missing if part.merged and part.keep]
    if fresh:
        async with conn.cursor() as cursor:
            await cursor.executemany(
                KEEP_DIGEST_SQL,
                [
                    (
                        query.tenant_id,
                        part.route,
                        part.model,
                        query.bucket_seconds,
                        part.bucket_start,
                        part.windows,
                        part.revisions,
                        part.updates,
                        part.blob,
                    )
                    for part in fresh
                ],
            )
    done = sum(part.merged for part in missing)
    if done < len(missing):
        raise RollupIncomplete(deadline.seconds, done, len(missing))
    return await run_in_threadpool(lambda: [_row(record, parts) for record, parts in buckets])
