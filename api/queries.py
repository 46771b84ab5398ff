"""The SQL behind ``GET /v1/metrics`` and the merging of windows into roll-up buckets.

Values only ever travel as query parameters; the statement text is assembled
from the fixed column names of :data:`schemas.rows.ROW_FIELDS`.

A roll-up is made of *parts*: one key's windows in one bucket. Postgres sums
each part's windows (averages as total and weight, so they can be weighted
again across parts) and Python merges its windows' t-digests in Rust
(``fastdigest.merge_all``); a bucket is then its parts added up, with
percentiles from the merged digests, never from averaging percentiles.

The work is bounded. The parts of the buckets that survive ``limit`` are found
from the windows' fingerprints alone (count, revision sum and ``updated_at``
sum per part, read from a covering index, not the wide rows). For ``1h`` and
``1d`` buckets the range covers whole, the parts are those the dataflow keeps
in ``llm_metrics_rollups`` as it writes the windows (:mod:`schemas.rollups`: an
hour from its windows, a day from its hours), each used only while its
fingerprint still matches, so a kept part is never stale. Parts that do not
match (windows written around the dataflow, or kept a second ago) are merged
again in chunks, and kept, until a :class:`Deadline` passes: the request then
stops with :class:`RollupIncomplete` and what it merged stays kept, so a retry
goes on from there. Before the retention horizon (:mod:`schemas.retention`)
the sealed parts are all there is, and are taken as they are. Buckets the
range cuts are merged from their windows in the range, not kept.

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

Dimensions (docs/dimensions.md): with ``dimension`` the rows come from
``llm_dimension_metrics`` (a view of the packed rows), one per window, key and value, each with
``dimension`` and ``value``; ordered as the main rows, then by value (null
first). A roll-up merges them the same way within each value: the value is
always part of the grouping. Their parts are never kept: buckets under an hour
are merged straight from the windows (:func:`direct_rollup_sql`); ``1h`` and
``1d`` buckets from each key's hours of the value (:func:`hourly_sql`, one row
as it is), which is what retention leaves of an hour, so they answer the same
before and after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
import psycopg
from psycopg.rows import dict_row
from starlette.concurrency import run_in_threadpool

from api.params import DIMENSIONS, InvalidParameter, MetricsQuery
from schemas import rollups
from schemas.rows import DIMENSION_ROW_FIELDS, ROW_FIELDS, DimensionRow, MetricsRow

PERCENTILES = rollups.PERCENTILES

# Buckets at least this long keep their parts' merged digests; shorter ones merge
# at most 15 windows per part and are cheap enough to merge on every read.
CACHED_BUCKET_SECONDS = 3600
# Window digests fetched and merged per round trip (about 6 MB of digests):
# small enough that the deadline is checked often, large enough to stream.
CHUNK_WINDOWS = 10_000
# Merging stops this long before the deadline: writing the parts merged (about
# 15 kB each) and answering take the rest.
KEEP_RESERVE_SECONDS = 0.6

_SUMMED = rollups.SUMMED
_WEIGHTED = rollups.WEIGHTED
_PERCENTILE_FIELDS = frozenset(name for name, _ in PERCENTILES)
# The bucket's own columns: the row without the percentiles, which come from digests.
_BUCKET_FIELDS: tuple[str, ...] = tuple(name for name in ROW_FIELDS if name not in _PERCENTILE_FIELDS)


def _collated(names: Sequence[str]) -> str:
    """``, name COLLATE "C"`` for each of ``names``: code-point order, whatever the database's
    collation, as documented; a null value (calls without one) first."""
    return "".join(f', {name} COLLATE "C"' + (" NULLS FIRST" if name == "value" else "") for name in names)


def _order(query: MetricsQuery) -> str:
    """The documented order of rows: newest first, then route and model (then value)."""
    return f"ORDER BY window_start DESC{_collated(_grouping(query, DIMENSIONS))}"


def _grouping(query: MetricsQuery, group_by: Sequence[str]) -> list[str]:
    """The columns whose values keep rows apart: ``group_by``'s, and a dimension's value."""
    kept = [name for name in DIMENSIONS if name in group_by]
    return kept if query.dimension is None else [*kept, "value"]


def _table(query: MetricsQuery) -> str:
    return "llm_metrics" if query.dimension is None else "llm_dimension_metrics"


def _fields(query: MetricsQuery) -> tuple[str, ...]:
    return ROW_FIELDS if query.dimension is None else DIMENSION_ROW_FIELDS


_HORIZON = rollups.HORIZON_VALUE_SQL


def _filters(query: MetricsQuery, table: str = "") -> str:
    """The WHERE conditions of ``query``, with ``%(name)s`` placeholders."""
    prefix = f"{table}." if table else ""
    conditions = [f"{prefix}tenant_id = %(tenant_id)s"]
    if query.dimension is not None:
        conditions.append(f"{prefix}dimension = %(dimension)s")
        if query.by_value:
            conditions.append(f"{prefix}value " + ("IS NULL" if query.value is None else "= %(value)s"))
    if query.route is not None:
        conditions.append(f"{prefix}route = %(route)s")
    if query.model is not None:
        conditions.append(f"{prefix}model = %(model)s")
    if query.dimension is not None and not cacheable(query):
        # Before the retention horizon a value's windows are replaced by hour rows, which only
        # hourly and daily roll-ups read.
        conditions.append(f"{prefix}window_start >= {_HORIZON}")
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
        "dimension": query.dimension,
        "value": query.value,
    }


def windows_sql(query: MetricsQuery) -> str:
    """Stored windows (or a dimension's rows) as they are: the plain query."""
    return (
        f"SELECT {', '.join(_fields(query))} FROM {_table(query)} WHERE {_filters(query)}"
        f" {_order(query)} LIMIT %(limit)s"
    )


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


_NARROW = (
    "the roll-up needs more than {seconds:g} s of work; ask for a shorter range,"
    " one route or model, or a larger bucket"
)


class DeadlineExceeded(Exception):
    """The request's work did not fit its deadline; the message says what to do."""


class RollupIncomplete(DeadlineExceeded):
    """Merging stopped at the deadline; the parts merged so far are kept."""

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


_FINGERPRINT = rollups.FINGERPRINT
PART_FIELDS = rollups.PART_FIELDS


def parts_sql(query: MetricsQuery) -> str:
    """The parts of the buckets that survive ``limit``, with their kept merge if it still holds.

    Reads only the fingerprint index of ``llm_metrics`` (count, revision and
    ``updated_at`` per key and bucket) and ``llm_metrics_rollups``; one row per
    part, with the kept values when ``cached``. Before the retention horizon (read in the
    same statement) the kept parts are all there is: they are taken as they are.
    """
    kept = [name for name in DIMENSIONS if name in query.group_by]
    # Only a bucket the range covers whole matches what was kept for it.
    complete = (
        "(%(start)s::timestamptz IS NULL OR {0}bucket_start >= %(start)s)"
        " AND (%(end)s::timestamptz IS NULL OR {0}bucket_start + %(bucket)s <= %(end)s)"
    )
    sealed_filters = "".join(
        f" AND {name} = %({name})s" for name in DIMENSIONS if getattr(query, name) is not None
    )
    prints = f"""
        SELECT route, model, {_bucket_start(query)} AS bucket_start,
            count(*) AS windows, sum(revision) AS revisions,
            sum(updated_at - timestamptz 'epoch') AS updates
        FROM llm_metrics WHERE {_filters(query)} AND window_start >= {_HORIZON}
        GROUP BY 1, 2, 3
        UNION ALL
        SELECT route, model, bucket_start, windows, revisions, updates
        FROM llm_metrics_rollups
        WHERE tenant_id = %(tenant_id)s{sealed_filters} AND bucket_seconds = %(bucket_seconds)s
          AND bucket_start < {_HORIZON} AND {complete.format("")}"""
    # The buckets that survive ``limit``, by rank rather than by joining a list of them
    # back: the planner, with no statistics yet on a freshly written table, answered
    # that join with a nested loop over every part (seconds for 20,000 parts).
    ranked = f"""
        SELECT *, dense_rank() OVER (
            ORDER BY bucket_start DESC{"".join(f', {name} COLLATE "C"' for name in kept)}) AS bucket_rank
        FROM prints"""
    values = ", ".join(f"c.{name}" for name in (*PART_FIELDS, "digest"))
    return f"""
        WITH prints AS MATERIALIZED ({prints}), ranked AS MATERIALIZED ({ranked})
        SELECT p.route, p.model, p.bucket_start, p.windows, p.revisions, p.updates,
            {complete.format("p.")} AS complete, c.bucket_start IS NOT NULL AS cached, {values}
        FROM ranked AS p
        LEFT JOIN llm_metrics_rollups AS c
          ON c.tenant_id = %(tenant_id)s AND c.route = p.route AND c.model = p.model
         AND c.bucket_seconds = %(bucket_seconds)s AND c.bucket_start = p.bucket_start
         AND c.windows = p.windows AND c.revisions = p.revisions AND c.updates = p.updates
         AND {complete.format("p.")}
        WHERE p.bucket_rank <= %(limit)s"""


def merge_sql(query: MetricsQuery) -> str:
    """Chosen parts (parallel arrays) merged from their windows; one row per part, by number:
    for buckets the range cuts, which are not kept.

    Lateral, so each part is one range of the primary key rather than a join
    the planner might answer by scanning every window of the tenant.
    """
    return f"""
        SELECT m.number, merged.*
        FROM unnest(%(routes)s::text[], %(models)s::text[], %(starts)s::timestamptz[])
            WITH ORDINALITY AS m(route, model, bucket_start, number)
        CROSS JOIN LATERAL (
            SELECT {", ".join(rollups.window_columns())}
            FROM llm_metrics AS w
            WHERE {_filters(query, "w")} AND w.route = m.route AND w.model = m.model
              AND {_in_bucket(query, "w", "m.bucket_start")}
        ) AS merged"""


def direct_rollup_sql(query: MetricsQuery) -> str:
    """Buckets merged straight from their windows, each with its windows' digests, in one
    statement: for roll-ups whose parts are never kept (buckets under an hour, and a
    dimension's roll-ups).

    Their parts are many and small (often one window each): grouping in Postgres
    and fetching the digests of the buckets left after ``LIMIT`` only (a lateral
    range per bucket) costs a fraction of handling every part.
    """
    kept = _grouping(query, query.group_by)
    if query.bucket_seconds is None:
        window_end = "max(window_end)"
        same_bucket = "w.window_start = b.window_start"
    else:
        window_end = "greatest(max(window_end), bucket_start + %(bucket)s)"
        same_bucket = "w.window_start >= b.window_start AND w.window_start < b.window_start + %(bucket)s"
    dimensions = [name if name in kept else f"NULL::text AS {name}" for name in DIMENSIONS]
    if query.dimension is not None:
        dimensions += ["%(dimension)s::text AS dimension", "value"]

    def weighted(column: str, weight: str) -> str:
        # Windows without a value for the average carry no weight either.
        return f"sum({column} * {weight}) / NULLIF(sum({weight}) FILTER (WHERE {column} IS NOT NULL), 0)"

    averages = ", ".join(f"{weighted(column, weight)} AS {column}" for column, weight in _WEIGHTED)
    aggregate = f"""
        SELECT tenant_id, {", ".join(dimensions)}, bucket_start AS window_start,
            {window_end} AS window_end,
            {", ".join(f"sum({name})::bigint AS {name}" for name in _SUMMED)},
            {averages},
            sum(estimated_cost_usd) AS estimated_cost_usd, max(revision) AS revision
        FROM (SELECT *, {_bucket_start(query)} AS bucket_start FROM {_table(query)}
              WHERE {_filters(query)}) AS selected
        GROUP BY tenant_id, bucket_start{"".join(f", {name}" for name in kept)}
        ORDER BY bucket_start DESC{_collated(kept)}
        LIMIT %(limit)s"""
    same_group = "".join(f" AND w.{name} = b.{name}" for name in kept if name != "value")
    windows = f"{_table(query)} AS w WHERE {_filters(query, 'w')} AND {same_bucket}{same_group}"
    if query.dimension is not None:
        # A null value is a value of its own (calls without one). Two branches rather than
        # IS NOT DISTINCT FROM, which no index serves: each is a range of the table's key,
        # where a filter would fetch every other value's row of the bucket too.
        windows = f"""(
            SELECT w.latency_digest FROM {windows} AND w.value = b.value
            UNION ALL
            SELECT w.latency_digest FROM {windows} AND w.value IS NULL AND b.value IS NULL
        ) AS w"""
    return f"""
        SELECT b.*, digests.blobs
        FROM ({aggregate}) AS b
        CROSS JOIN LATERAL (
            SELECT array_agg(w.latency_digest) FILTER (WHERE w.latency_digest IS NOT NULL) AS blobs
            FROM {windows}
        ) AS digests
        {_order(query)}"""


_HOUR_BIN = "date_bin(interval '1 hour', window_start, timestamptz 'epoch')"


def hourly_sql(query: MetricsQuery) -> str:
    """A dimension's hours (:func:`schemas.rollups.hour_level_columns`), per key and value, oldest
    first: what its hourly and daily buckets are merged from."""
    # The revision of each key's hour, over all its rows whatever their values (an hour row
    # keeps one for all of them): from the packed rows, without the value's condition.
    every_value = msgspec.structs.replace(query, by_value=False, value=None)
    kept = _grouping(query, query.group_by)
    # Only the time of the buckets that survive ``limit`` (found without reading a digest):
    # the newest, so everything from the oldest of them on.
    since = "window_start >= (SELECT min(bucket_start) FROM chosen)"
    value = ""
    if query.by_value:  # from the packed rows, unnesting their values only
        value = " AND v.value " + ("IS NULL" if query.value is None else "= %(value)s")
    return f"""
        WITH chosen AS MATERIALIZED (
            SELECT * FROM (
                SELECT DISTINCT {_bucket_start(query)} AS bucket_start{"".join(f", {name}" for name in kept)}
                FROM llm_dimension_windows AS w CROSS JOIN LATERAL unnest(w."values") AS v(value)
                WHERE {_filters(every_value, "w")}{value}
            ) AS groups
            ORDER BY bucket_start DESC{_collated(kept)}
            LIMIT %(limit)s
        )
        SELECT h.*, r.hour_revision
        FROM (
            SELECT route, model, value, {_HOUR_BIN} AS hour, {", ".join(rollups.hour_level_columns())}
            FROM llm_dimension_metrics WHERE {_filters(query)} AND {since}
            GROUP BY route, model, value, hour
        ) AS h
        JOIN (
            SELECT route, model, {_HOUR_BIN} AS hour, max(revision) AS hour_revision
            FROM llm_dimension_windows WHERE {_filters(every_value)} AND {since}
            GROUP BY route, model, hour
        ) AS r USING (route, model, hour)
        ORDER BY h.hour"""


def bucket_of_hours(
    query: MetricsQuery, key: tuple[Any, ...], hours: Sequence[dict[str, Any]]
) -> DimensionRow:
    """One bucket of a dimension's value from its hours (oldest first): one hour as it is;
    several with sums summed, averages weighted by the hours' weights and the hours'
    digests merged, in hour order."""
    assert query.bucket_seconds is not None
    start, route, model, value = key
    values: dict[str, Any] = {
        "tenant_id": query.tenant_id,
        "route": route,
        "model": model,
        "dimension": query.dimension,
        "value": value,
        "window_start": start,
        "window_end": max(
            max(hour["window_end"] for hour in hours), start + timedelta(seconds=query.bucket_seconds)
        ),
        "estimated_cost_usd": sum(hour["estimated_cost_usd"] for hour in hours),
        "revision": max(hour["hour_revision"] for hour in hours),
    }
    for name in _SUMMED:
        values[name] = sum(hour[name] for hour in hours)
    for column, _ in _WEIGHTED:
        if len(hours) == 1:
            values[column] = hours[0][column]
            continue
        present = [hour for hour in hours if hour[column] is not None]
        weight = sum(rollups.weight_of(column, hour) for hour in present)
        total = sum(hour[column] * rollups.weight_of(column, hour) for hour in present)
        values[column] = total / weight if weight else None
    blobs = [blob for blob in (rollups.hour_digest(hour["blobs"]) for hour in hours) if blob is not None]
    digest = rollups.merged_in_order(blobs)
    for name, quantile in PERCENTILES:
        values[name] = None if digest is None or digest.is_empty() else digest.quantile(quantile)
    return DimensionRow(**values)


def buckets_of_hours(
    query: MetricsQuery, hours: Sequence[dict[str, Any]], deadline: Deadline
) -> list[MetricsRow]:
    """The newest ``limit`` buckets of a dimension's hours, in the documented order."""
    assert query.bucket_seconds is not None
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for hour in hours:
        key = (
            rollups.floor_to(hour["hour"], query.bucket_seconds),
            hour["route"] if "route" in query.group_by else None,
            hour["model"] if "model" in query.group_by else None,
            hour["value"],
        )
        groups.setdefault(key, []).append(hour)
    for members in groups.values():  # one order, as for the main rows' parts (see _group)
        members.sort(key=lambda hour: (hour["hour"], hour["route"], hour["model"]))
    # Python compares str by code point, as the API's order does; a null value first.
    ordered = sorted(groups, key=lambda key: (key[1] or "", key[2] or "", key[3] is not None, key[3] or ""))
    ordered.sort(key=lambda key: key[0], reverse=True)
    rows: list[MetricsRow] = []
    for key in ordered[: query.limit]:
        if deadline.remaining() <= 0:
            raise DeadlineExceeded(_narrow(query, deadline))
        rows.append(bucket_of_hours(query, key, groups[key]))
    return rows


def _narrow(query: MetricsQuery, deadline: Deadline) -> str:
    """What to ask for instead when a roll-up does not fit ``deadline``."""
    narrow = _NARROW.format(seconds=deadline.seconds)
    if query.dimension is not None:
        narrow = narrow.replace("one route or model", "one route, model or value")
    return narrow


async def _records(
    conn: psycopg.AsyncConnection[Any], sql: str, params: dict[str, Any], deadline: Deadline, narrow: str
) -> list[dict[str, Any]]:
    """``sql``'s records within ``deadline`` (binary: digests parse faster than hex), or
    :class:`DeadlineExceeded` saying ``narrow``."""
    try:
        async with conn.transaction():
            await conn.execute(deadline.statement_timeout())
            async with conn.cursor(row_factory=dict_row) as cursor:
                await cursor.execute(sql, params, binary=True)
                return await cursor.fetchall()
    except psycopg.errors.QueryCanceled:
        raise DeadlineExceeded(narrow) from None


async def _hourly_rollup(
    conn: psycopg.AsyncConnection[Any], query: MetricsQuery, params: dict[str, Any], deadline: Deadline
) -> list[MetricsRow]:
    hours = await _records(conn, hourly_sql(query), params, deadline, _narrow(query, deadline))
    return await run_in_threadpool(buckets_of_hours, query, hours, deadline)


def direct_row(record: dict[str, Any]) -> MetricsRow:
    """A bucket from a :func:`direct_rollup_sql` record: its sums plus merged percentiles."""
    values = dict(record)
    digest = merge_digests(values.pop("blobs"))
    for name, quantile in PERCENTILES:
        values[name] = None if digest is None or digest.is_empty() else digest.quantile(quantile)
    return DimensionRow(**values) if "dimension" in values else MetricsRow(**values)


@dataclass
class Part:
    """One key's windows in one bucket: fingerprint, then merged values once known."""

    route: str
    model: str
    bucket_start: datetime
    windows: int
    revisions: int
    updates: timedelta
    # Whether ``values`` and ``blob`` are known: kept, or merged by this request.
    merged: bool
    # Whether the merge may be kept (a long bucket the range covers whole).
    keep: bool
    values: dict[str, Any]
    # The merged digest, serialized (None: no window of the part had one).
    blob: bytes | None


merge_digests = rollups.merge_digests


def _part(record: dict[str, Any]) -> Part:
    return Part(
        route=record["route"],
        model=record["model"],
        bucket_start=record["bucket_start"],
        windows=record["windows"],
        revisions=record["revisions"],
        updates=record["updates"],
        merged=record["cached"],
        keep=record["complete"],
        values={name: record[name] for name in PART_FIELDS},
        blob=record["digest"],
    )


def _merge_parts(parts: Sequence[Part], records: dict[int, dict[str, Any]]) -> None:
    """Each part's values and merged digest, from its :func:`merge_sql` record (by 1-based number)."""
    for number, part in enumerate(parts, 1):
        record = records[number]
        digest = merge_digests(record["blobs"])
        part.values = {name: record[name] for name in PART_FIELDS}
        part.blob = None if digest is None else digest.to_bytes()
        part.merged = True


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


def window_row(record: Sequence[Any]) -> MetricsRow:
    """A stored window (or a dimension's row: its two more fields), from a :func:`windows_sql` record."""
    if len(record) == len(DIMENSION_ROW_FIELDS):
        return DimensionRow(**dict(zip(DIMENSION_ROW_FIELDS, record, strict=True)))
    return MetricsRow(**dict(zip(ROW_FIELDS, record, strict=True)))


def _total(parts: Sequence[Part], name: str) -> Any:
    present = [part.values[name] for part in parts if part.values[name] is not None]
    return sum(present) if present else None


def bucket_row(query: MetricsQuery, parts: Sequence[Part]) -> MetricsRow:
    """One bucket from its parts: sums summed, averages weighted, percentiles from the merged digests."""
    first = parts[0]
    values: dict[str, Any] = {
        "tenant_id": query.tenant_id,
        "route": first.route if "route" in query.group_by else None,
        "model": first.model if "model" in query.group_by else None,
        "window_start": first.bucket_start,
        "window_end": max(part.values["window_end"] for part in parts),
        "estimated_cost_usd": sum(part.values["estimated_cost_usd"] for part in parts),
        "revision": max(part.values["revision"] for part in parts),
    }
    if query.bucket_seconds is not None:
        values["window_end"] = max(
            values["window_end"], first.bucket_start + timedelta(seconds=query.bucket_seconds)
        )
    for name in _SUMMED:
        values[name] = sum(part.values[name] for part in parts)
    for column, _ in _WEIGHTED:
        total, weight = _total(parts, f"{column}_total"), _total(parts, f"{column}_weight")
        values[column] = total / weight if weight else None
    digest = merge_digests([part.blob for part in parts if part.blob is not None])
    for name, quantile in PERCENTILES:
        values[name] = None if digest is None or digest.is_empty() else digest.quantile(quantile)
    return MetricsRow(**values)


def _group(query: MetricsQuery, parts: Sequence[Part]) -> list[list[Part]]:
    """Parts by bucket, in the documented order: newest first, then route and model."""
    kept = [name for name in DIMENSIONS if name in query.group_by]
    groups: dict[tuple[Any, ...], list[Part]] = {}
    # Each bucket's parts in one order, whatever order the plan read them in: float sums
    # depend on it, and a bucket must add up to the same bits from windows or sealed parts.
    for part in sorted(parts, key=lambda part: (part.route, part.model)):
        key = (part.bucket_start, *(getattr(part, name) for name in kept))
        groups.setdefault(key, []).append(part)
    # Python compares str by code point, as the API's order does.
    ordered = sorted(groups, key=lambda key: key[1:])
    ordered.sort(key=lambda key: key[0], reverse=True)
    return [groups[key] for key in ordered]


async def _direct_rollup(
    conn: psycopg.AsyncConnection[Any], query: MetricsQuery, params: dict[str, Any], deadline: Deadline
) -> list[MetricsRow]:
    narrow = _narrow(query, deadline)
    records = await _records(conn, direct_rollup_sql(query), params, deadline, narrow)

    def rows() -> list[MetricsRow]:
        out = []
        for record in records:
            if deadline.remaining() <= 0:  # nothing of it can be kept: say what to ask instead
                raise DeadlineExceeded(narrow)
            out.append(direct_row(record))
        return out

    return await run_in_threadpool(rows)


async def retention_horizon(conn: psycopg.AsyncConnection[Any]) -> datetime | None:
    cursor = await conn.execute("SELECT windows_before FROM retention_horizon")
    found = await cursor.fetchone()
    return None if found is None else found[0]


def check_edges(query: MetricsQuery, horizon: datetime | None) -> None:
    """:class:`InvalidParameter` when ``from`` or ``to`` cuts a bucket whose windows are deleted:
    only the whole bucket is kept there."""
    if horizon is None or query.bucket_seconds is None:
        return
    for name, moment in (("from", query.start), ("to", query.end)):
        if moment is None or rollups.floor_to(moment, query.bucket_seconds) >= horizon:
            continue
        if rollups.floor_to(moment, query.bucket_seconds) != moment:
            raise InvalidParameter(
                f"{name}: windows before {horizon.isoformat()} are deleted (RETENTION_DAYS) and only"
                f" their whole {query.bucket_seconds} s buckets are kept: give a {name} on a bucket boundary"
            )


async def _read_parts(
    conn: psycopg.AsyncConnection[Any], query: MetricsQuery, params: dict[str, Any], deadline: Deadline
) -> list[Part]:
    """The parts of the answer, each with its kept merge when it matches its windows."""
    async with conn.transaction():
        await conn.execute(deadline.statement_timeout())
        async with conn.cursor(row_factory=dict_row) as cursor:
            # Binary results: a bytea array in text form is hex that costs more to parse
            # than the digests cost to merge.
            await cursor.execute(parts_sql(query), params, binary=True)
            return [_part(record) for record in await cursor.fetchall()]


def _hours_to_keep(query: MetricsQuery, tenant_id: str, parts: Sequence[Part]) -> list[rollups.PartKey]:
    """The hours whose merging keeps ``parts`` again: each part's own, every hour of a day."""
    assert query.bucket_seconds is not None
    hours = query.bucket_seconds // rollups.HOUR_SECONDS
    return [
        (tenant_id, part.route, part.model, part.bucket_start + timedelta(hours=hour))
        for part in parts
        for hour in range(hours)
    ]


async def _keep_again(
    conn: psycopg.AsyncConnection[Any], query: MetricsQuery, stale: Sequence[Part], deadline: Deadline
) -> int:
    """Merge and keep ``stale`` parts (windows written around the dataflow's sink, or before
    parts were kept) in chunks, each committed, until ``deadline``; how many were kept."""
    done = 0
    for number, chunk in enumerate(_chunks(stale)):
        # The first chunk is merged whenever time is left at all, so a retry always gets
        # further than the request before it.
        if deadline.remaining() <= (KEEP_RESERVE_SECONDS if number else 0):
            break
        try:
            async with conn.transaction():
                await conn.execute(deadline.statement_timeout())
                await rollups.keep_async(conn, _hours_to_keep(query, query.tenant_id, chunk))
        except psycopg.errors.QueryCanceled:
            break
        done += len(chunk)
    return done


async def _merge_cut(
    conn: psycopg.AsyncConnection[Any],
    query: MetricsQuery,
    params: dict[str, Any],
    cut: Sequence[Part],
    deadline: Deadline,
) -> None:
    """Merge the parts of buckets the range cuts, from their windows in the range (not kept)."""
    try:
        async with conn.transaction(), conn.cursor(row_factory=dict_row) as cursor:
            for chunk in _chunks(cut):
                await cursor.execute(deadline.statement_timeout())
                await cursor.execute(
                    merge_sql(query),
                    params
                    | {
                        "routes": [part.route for part in chunk],
                        "models": [part.model for part in chunk],
                        "starts": [part.bucket_start for part in chunk],
                    },
                    binary=True,
                )
                records = {record["number"]: record for record in await cursor.fetchall()}
                await run_in_threadpool(_merge_parts, chunk, records)
    except psycopg.errors.QueryCanceled:
        raise DeadlineExceeded(_NARROW.format(seconds=deadline.seconds)) from None


async def fetch_rollup(
    conn: psycopg.AsyncConnection[Any], query: MetricsQuery, deadline: Deadline
) -> list[MetricsRow]:
    """The roll-up's rows: hourly and daily buckets from their kept parts, the others merged
    from their windows, until ``deadline``.

    Raises :class:`DeadlineExceeded` (a statement ran out of time) or
    :class:`RollupIncomplete` (keeping parts again did), :class:`InvalidParameter` for a
    range that cuts a bucket whose windows are deleted, ``psycopg.Error`` when Postgres fails.
    """
    params = parameters(query) | {"bucket_seconds": query.bucket_seconds}
    if not cacheable(query):
        return await _direct_rollup(conn, query, params, deadline)
    horizon = await retention_horizon(conn)
    check_edges(query, horizon)
    if query.dimension is not None:
        return await _hourly_rollup(conn, query, params, deadline)
    try:
        parts = await _read_parts(conn, query, params, deadline)
        stale = [part for part in parts if part.keep and not part.merged]
        if stale:
            done = await _keep_again(conn, query, stale, deadline)
            if done < len(stale):
                raise RollupIncomplete(deadline.seconds, done, len(stale))
            parts = await _read_parts(conn, query, params, deadline)
            if any(part.keep and not part.merged for part in parts):  # written to meanwhile
                raise RollupIncomplete(deadline.seconds, done, len(stale))
    except psycopg.errors.QueryCanceled:
        raise DeadlineExceeded(_NARROW.format(seconds=deadline.seconds)) from None
    cut = [part for part in parts if not part.merged]
    if cut:
        await _merge_cut(conn, query, params, cut, deadline)
    groups = _group(query, parts)
    return await run_in_threadpool(lambda: [bucket_row(query, group) for group in groups])
