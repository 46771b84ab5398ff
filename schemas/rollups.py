"""Hourly and daily parts of ``llm_metrics``, kept current as windows are written.

A *part* is one key's windows in one bucket, merged: sums, the totals and weights
of its averages, and its latency digest (``llm_metrics_rollups``). Roll-ups of
an hour or more are made of parts, so a year of daily buckets reads 365 rows
per key, not half a million windows.

- An **hour** is merged from its windows: integer sums, float sums in window
  order, the windows' digests merged in window order.
- A **day** is merged from its 24 hours the same way (hour order), never from
  the windows directly: so a day answers the same whether its windows are still
  stored or already deleted by retention (:mod:`schemas.retention`), to the last bit.

The dataflow's sink hands the windows it wrote to a keeper thread
(:class:`dataflows.sinks.PartKeeper`), which calls :func:`keep` for their hours
about a second later. Every part carries the fingerprint of the windows it was
merged from (count, revision sum, ``updated_at`` sum); the query API uses a part
only while its windows still have that fingerprint, and keeps again the parts of
windows written some other way (or whose keeping a crash lost). Parts of buckets
older than the retention horizon are sealed: never merged again, since their
windows are (being) deleted.

SQL text and merging are defined once here; :func:`keep` (psycopg, sync) and
:func:`keep_async` only run them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from fastdigest import TDigest, merge_all
from psycopg.rows import dict_row

HOUR_SECONDS = 3600
DAY_SECONDS = 86400
KEPT_BUCKETS = (HOUR_SECONDS, DAY_SECONDS)

# The aggregates a roll-up sums, and the averages it weights (column, weight).
SUMMED: tuple[str, ...] = (
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
WEIGHTED: tuple[tuple[str, str], ...] = (
    ("avg_latency_ms", _ANSWERED),
    ("avg_time_to_first_token_ms", "ttft_count"),
    ("avg_prompt_tokens", _ANSWERED),
    ("avg_completion_tokens", _ANSWERED),
)
# A part's merged values, as merging computes them and llm_metrics_rollups keeps them.
PART_FIELDS: tuple[str, ...] = (
    "window_end",
    *SUMMED,
    *(f"{column}_{kind}" for column, _ in WEIGHTED for kind in ("total", "weight")),
    "estimated_cost_usd",
    "revision",
)
FINGERPRINT: tuple[str, ...] = ("windows", "revisions", "updates")

# A part is (tenant_id, route, model, bucket_start).
PartKey = tuple[str, str, str, datetime]


def merge_digests(blobs: Sequence[bytes] | None) -> TDigest | None:
    """One digest from serialized digests, merged in the order given; None when there are none."""
    if not blobs:
        return None
    return merge_all([TDigest.from_bytes(blob) for blob in blobs])


def merged_blob(blobs: Sequence[bytes] | None) -> bytes | None:
    digest = merge_digests(blobs)
    return None if digest is None else digest.to_bytes()


def window_columns(order: str = "window_start") -> list[str]:
    """What merging windows yields: the fingerprint, :data:`PART_FIELDS` and ``blobs``.

    Float sums run in ``order`` so the same windows always add up to the same bits.
    """
    return [
        "count(*) AS windows",
        "sum(revision) AS revisions",
        "sum(updated_at - timestamptz 'epoch') AS updates",
        "max(window_end) AS window_end",
        *(f"sum({name})::bigint AS {name}" for name in SUMMED),
        *(
            # Windows without a value for the average carry no weight either.
            f"sum({column} * {weight} ORDER BY {order}) AS {column}_total, "
            f"(sum({weight}) FILTER (WHERE {column} IS NOT NULL))::bigint AS {column}_weight"
            for column, weight in WEIGHTED
        ),
        f"sum(estimated_cost_usd ORDER BY {order}) AS estimated_cost_usd",
        "max(revision) AS revision",
        f"array_agg(latency_digest ORDER BY {order}) FILTER (WHERE latency_digest IS NOT NULL) AS blobs",
    ]


def _hour_columns() -> list[str]:
    """What merging hours into a day yields: as :func:`window_columns`, from parts."""
    return [
        "sum(windows)::bigint AS windows",
        "sum(revisions)::bigint AS revisions",
        "sum(updates) AS updates",
        "max(window_end) AS window_end",
        *(f"sum({name})::bigint AS {name}" for name in SUMMED),
        *(
            f"sum({column}_total ORDER BY bucket_start) AS {column}_total, "
            f"sum({column}_weight)::bigint AS {column}_weight"
            for column, _ in WEIGHTED
        ),
        "sum(estimated_cost_usd ORDER BY bucket_start) AS estimated_cost_usd",
        "max(revision) AS revision",
        "array_agg(digest ORDER BY bucket_start) FILTER (WHERE digest IS NOT NULL) AS blobs",
    ]


_PARTS = """
    unnest(%(tenants)s::text[], %(routes)s::text[], %(models)s::text[], %(starts)s::timestamptz[])
        WITH ORDINALITY AS m(tenant_id, route, model, bucket_start, number)"""
# Buckets before the horizon are sealed (their windows are deleted, or being deleted).
_OPEN = "m.bucket_start >= %(horizon)s"

# The horizon, locked for share until the transaction ends: retention moves it only when no
# writer that read it is still writing (schemas/retention.py), so a part is never merged
# again after it was sealed.
HORIZON_SQL = "SELECT windows_before FROM retention_horizon FOR SHARE"
# The horizon inside a statement (the same snapshot as the rest of it): where reads of
# windows as they are start, and before which only hours and days are kept.
HORIZON_VALUE_SQL = "coalesce((SELECT windows_before FROM retention_horizon), '-infinity')"

# The latency percentiles a row reports, each from its (merged) digest.
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50_latency_ms", 0.50),
    ("p95_latency_ms", 0.95),
    ("p99_latency_ms", 0.99),
)
# Before any window; a day after the smallest date, so no session time zone turns it into year 0.
NO_HORIZON = datetime(1, 1, 2, tzinfo=UTC)

# Each hour merged from its windows (one range of the primary key each).
HOURS_SQL = f"""
    SELECT m.tenant_id, m.route, m.model, m.bucket_start, merged.*
    FROM {_PARTS}
    CROSS JOIN LATERAL (
        SELECT {", ".join(window_columns())}
        FROM llm_metrics AS w
        WHERE w.tenant_id = m.tenant_id AND w.route = m.route AND w.model = m.model
          AND w.window_start >= m.bucket_start AND w.window_start < m.bucket_start + interval '1 hour'
    ) AS merged
    WHERE {_OPEN}
    ORDER BY m.number"""

# Each day merged from its kept hours.
DAYS_SQL = f"""
    SELECT m.tenant_id, m.route, m.model, m.bucket_start, merged.*
    FROM {_PARTS}
    CROSS JOIN LATERAL (
        SELECT {", ".join(_hour_columns())}
        FROM llm_metrics_rollups AS h
        WHERE h.tenant_id = m.tenant_id AND h.route = m.route AND h.model = m.model
          AND h.bucket_seconds = {HOUR_SECONDS}
          AND h.bucket_start >= m.bucket_start AND h.bucket_start < m.bucket_start + interval '1 day'
    ) AS merged
    WHERE {_OPEN}
    ORDER BY m.number"""

# Each kept column and its type, for one INSERT of every part as parallel arrays.
_KEPT_COLUMNS: dict[str, str] = {
    "tenant_id": "text",
    "route": "text",
    "model": "text",
    "bucket_seconds": "integer",
    "bucket_start": "timestamptz",
    "windows": "bigint",
    "revisions": "bigint",
    "updates": "interval",
    "window_end": "timestamptz",
    **dict.fromkeys(SUMMED, "bigint"),
    **{f"{column}_total": "double precision" for column, _ in WEIGHTED},
    **{f"{column}_weight": "bigint" for column, _ in WEIGHTED},
    "estimated_cost_usd": "double precision",
    "revision": "integer",
    "digest": "bytea",
}
KEEP_SQL = f"""
    INSERT INTO llm_metrics_rollups ({", ".join(_KEPT_COLUMNS)})
    SELECT * FROM unnest({", ".join(f"%({name})s::{kind}[]" for name, kind in _KEPT_COLUMNS.items())})
    ON CONFLICT (tenant_id, route, model, bucket_seconds, bucket_start) DO UPDATE SET
        {", ".join(f"{name} = EXCLUDED.{name}" for name in list(_KEPT_COLUMNS)[5:])}, merged_at = now()
"""
# Parts whose windows are all gone (only a test or an operator deletes windows of open time).
FORGET_SQL = f"""
    DELETE FROM llm_metrics_rollups AS r USING {_PARTS}
    WHERE r.tenant_id = m.tenant_id AND r.route = m.route AND r.model = m.model
      AND r.bucket_seconds = %(bucket_seconds)s AND r.bucket_start = m.bucket_start"""


def floor_to(moment: datetime, seconds: int) -> datetime:
    """The start of the epoch-aligned bucket of ``seconds`` holding ``moment``."""
    epoch = moment.timestamp()
    return moment - timedelta(seconds=epoch % seconds)


def hours_of(windows: Iterable[PartKey]) -> list[PartKey]:
    """The hours holding windows (tenant, route, model, window_start), sorted: parts are
    always written in one order, so two writers never wait on each other in a cycle."""
    return sorted({(t, r, m, floor_to(start, HOUR_SECONDS)) for t, r, m, start in windows})


def days_of(hours: Iterable[PartKey]) -> list[PartKey]:
    return sorted({(t, r, m, floor_to(start, DAY_SECONDS)) for t, r, m, start in hours})


def selection(parts: Sequence[PartKey]) -> dict[str, list[Any]]:
    """:data:`HOURS_SQL` and :data:`DAYS_SQL`'s parameters for ``parts``."""
    return {
        "tenants": [part[0] for part in parts],
        "routes": [part[1] for part in parts],
        "models": [part[2] for part in parts],
        "starts": [part[3] for part in parts],
    }


def kept_columns(bucket_seconds: int, records: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """:data:`KEEP_SQL`'s parameters: the merged ``records`` (with ``blobs``), their digests
    merged, as columns."""
    columns: dict[str, list[Any]] = {
        name: [record[name] for record in records]
        for name in _KEPT_COLUMNS
        if name not in ("bucket_seconds", "digest")
    }
    columns["bucket_seconds"] = [bucket_seconds] * len(records)
    columns["digest"] = [merged_blob(record["blobs"]) for record in records]
    return {name: columns[name] for name in _KEPT_COLUMNS}


def _levels(windows: Iterable[PartKey]) -> list[tuple[int, str, list[PartKey]]]:
    """What :func:`keep` merges, in order: the hours holding ``windows``, then their days."""
    hours = hours_of(windows)
    return [(HOUR_SECONDS, HOURS_SQL, hours), (DAY_SECONDS, DAYS_SQL, days_of(hours))]


def _split(records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[PartKey]]:
    """Records of parts that have windows, and the keys of those that have none left."""
    present = [record for record in records if record["windows"]]
    gone = [(r["tenant_id"], r["route"], r["model"], r["bucket_start"]) for r in records if not r["windows"]]
    return present, gone


def horizon(cursor: psycopg.Cursor[Any]) -> datetime:
    """The retention horizon, locked for share (:data:`HORIZON_SQL`); :data:`NO_HORIZON` if none.
    A writer reads it first in its transaction and writes no window before it."""
    found = cursor.execute(HORIZON_SQL).fetchone()
    return NO_HORIZON if found is None else found[0]


def keep(cursor: psycopg.Cursor[Any], windows: Iterable[PartKey], before: datetime) -> int:
    """Merge again the hours holding ``windows`` (tenant, route, model, window_start) and the
    days holding those hours, in the caller's transaction, all but those before ``before``
    (the :func:`horizon` the caller read); how many parts were written."""
    written = 0
    for bucket_seconds, sql, parts in _levels(windows):
        if not parts:
            continue
        with cursor.connection.cursor(row_factory=dict_row) as reader:
            reader.execute(sql, selection(parts) | {"horizon": before}, binary=True)
            present, gone = _split(reader.fetchall())
        if present:
            cursor.execute(KEEP_SQL, kept_columns(bucket_seconds, present), binary=True)
            written += len(present)
        if gone:
            cursor.execute(FORGET_SQL, selection(gone) | {"bucket_seconds": bucket_seconds})
    return written


async def keep_async(conn: psycopg.AsyncConnection[Any], windows: Iterable[PartKey]) -> int:
    """:func:`keep` on an async connection, in its current transaction, after reading the
    horizon as :func:`horizon` does."""
    found = await (await conn.execute(HORIZON_SQL)).fetchone()
    before = NO_HORIZON if found is None else found[0]
    written = 0
    for bucket_seconds, sql, parts in _levels(windows):
        if not parts:
            continue
        async with conn.cursor(row_factory=dict_row) as reader:
            await reader.execute(sql, selection(parts) | {"horizon": before}, binary=True)
            present, gone = _split(await reader.fetchall())
        if present:
            # Merging digests takes milliseconds a part: off the event loop.
            columns = await asyncio.to_thread(kept_columns, bucket_seconds, present)
            await conn.execute(KEEP_SQL, columns, binary=True)
            written += len(present)
        if gone:
            await conn.execute(FORGET_SQL, selection(gone) | {"bucket_seconds": bucket_seconds})
    return written


# Dimension rows (docs/dimensions.md) keep no parts: an hour or a day of one value is merged on each
# read, from the hour level below. Retention replaces an hour's windows of a value by one
# row of that hour holding exactly these values (schemas/dimension_retention.py), so an
# hour reads the same before and after: one row is taken as it is.
def hour_level_columns(order: str = "window_start") -> list[str]:
    """One hour of one key's value from its rows (windows, or the one hour row retention left):
    sums, averages weighted by their windows, the digests to merge (``blobs``). Its
    ``revision`` is that of the packed rows holding the value; the query API reports the
    highest of all the hour's rows, which an hour row keeps."""
    averages = [
        f"CASE WHEN count(*) = 1 THEN max({column}) ELSE sum({column} * {weight} ORDER BY {order})"
        f" / NULLIF(sum({weight}) FILTER (WHERE {column} IS NOT NULL), 0) END AS {column}"
        for column, weight in WEIGHTED
    ]
    return [
        "max(window_end) AS window_end",
        *(f"sum({name})::bigint AS {name}" for name in SUMMED),
        "sum(ttft_count)::bigint AS ttft_count",
        *averages,
        f"sum(estimated_cost_usd ORDER BY {order}) AS estimated_cost_usd",
        "max(revision) AS revision",
        f"array_agg(latency_digest ORDER BY {order}) FILTER (WHERE latency_digest IS NOT NULL) AS blobs",
    ]


def merged_in_order(blobs: Sequence[bytes] | None) -> TDigest | None:
    """Serialized digests merged in the order given, a lone one as it is; None without any.
    What merges the hour level below hourly and daily buckets, and hours into them."""
    if not blobs:
        return None
    if len(blobs) == 1:
        return TDigest.from_bytes(blobs[0])
    return merge_all([TDigest.from_bytes(blob) for blob in blobs])


def hour_digest(blobs: Sequence[bytes] | None) -> bytes | None:
    """An hour's digest from its rows' digests: one as it is (its bytes), several merged in order."""
    if blobs and len(blobs) == 1:
        return blobs[0]
    merged = merged_in_order(blobs)
    return None if merged is None else merged.to_bytes()


def weight_of(column: str, values: dict[str, Any]) -> int:
    """The weight of an hour's average ``column``: its answered calls, or those with a time to
    first token."""
    if column == "avg_time_to_first_token_ms":
        return values["ttft_count"]
    return values["requests"] - values["timeouts"]
