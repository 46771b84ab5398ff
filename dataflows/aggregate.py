"""What one window accumulates from its calls, and the row fields it yields.

Sums are kept in integers (tokens; latencies in nanoseconds; cost in 1e-12 USD)
so a window's row does not depend on the order its calls arrived in: several
workers, or a replay after a crash, fold the same calls in another order and
must give the same row.

The latency t-digest is built when a row is emitted, from a summary of the
latencies that does not depend on their order either: the values themselves up
to :data:`EXACT_UP_TO` of them (a digest of that many holds each value as its
own centroid, so percentiles of small windows lie between the nearest-rank
values around them), and beyond, a count per latency bucket 0.2 % wide. A digest
fed in arrival order would give other percentiles after a replay, or with
another number of workers.
"""

from __future__ import annotations

import math
import sys
from array import array
from itertools import repeat
from typing import Any

import numpy as np
from fastdigest import TDigest
from msgspec import Struct, field

from dataflows.batches import CallBatch
from dataflows.join import Call

# fastdigest's default size: up to about 850 values it keeps every value exactly;
# beyond, quantiles stay well within 1 % (see tests/bench/bench_tdigest.py), and
# the latency buckets below add at most 0.1 %.
MAX_CENTROIDS = 1000
EXACT_UP_TO = 850
# Past EXACT_UP_TO a latency counts in bucket floor(log(latency) / log(growth)),
# and stands for the bucket's geometric middle: at most 0.1 % from its value.
BUCKET_GROWTH = 1.002
_LOG_GROWTH = math.log(BUCKET_GROWTH)
_LOG_MAX = math.log(sys.float_info.max)
# Zero has no logarithm; no positive float's bucket is this low (about -372,000).
ZERO_BUCKET = -(10**9)

NANOS_PER_MS = 1_000_000
PICO_USD = 1_000_000_000_000
# From here on a float is a whole number: scaling it as an int is exact, and
# scaling it as a float could overflow (a valid latency may be up to 1.8e308 ms).
WHOLE_FLOATS = 2.0**53
COST_DECIMALS = 9


def new_digest() -> TDigest:
    return TDigest(max_centroids=MAX_CENTROIDS)


def latency_bucket(latency: float) -> int:
    """The bucket a latency (ms, ≥ 0) counts in once a window holds more than EXACT_UP_TO."""
    return math.floor(math.log(latency) / _LOG_GROWTH) if latency > 0 else ZERO_BUCKET


def bucket_latency(bucket: int) -> float:
    """The latency a bucket stands for: its geometric middle (never past the largest float)."""
    if bucket == ZERO_BUCKET:
        return 0.0
    return math.exp(min((bucket + 0.5) * _LOG_GROWTH, _LOG_MAX))


def call_latency_ms(call: Call) -> float:
    """The response's ``latency_ms``, else the time between the two timestamps (≥ 0)."""
    response = call.response
    assert response is not None
    if response.latency_ms is not None:
        return response.latency_ms
    gap = response.timestamp.timestamp() - call.request.timestamp.timestamp()
    return gap * 1000.0 if gap > 0 else 0.0


class CallStats(Struct, gc=False):
    """Running totals of the calls folded into one window."""

    requests: int = 0
    errors: int = 0
    timeouts: int = 0
    answered: int = 0
    latency_ns: int = 0
    ttft_ns: int = 0
    ttft_count: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    reasoning_tokens: int = 0
    cost_pico_usd: int = 0
    unpriced: int = 0
    # Latencies (ms), while there are at most EXACT_UP_TO of them, as C doubles: 8
    # bytes each instead of a list slot and a float object (32). Windows wait out
    # LATENESS_SECONDS after they close; as lists, their latencies filled the CPU
    # caches and slowed every step as they accumulated (the sustained benchmark's
    # plain loop: 0.66-0.77 of its first quarter's calls/s in the last, 0.94-0.95
    # as arrays) ...
    latencies: array[float] = field(default_factory=lambda: array("d"))
    # ... then, instead, how many fell in each latency_bucket.
    buckets: dict[int, int] | None = None

    def add(self, call: Call) -> None:
        """Fold one priced call in. Timeouts count as requests and errors only; an
        answered call with ``replaces_timeout`` takes the place of its timeout."""
        if call.replaces_timeout:
            self.requests -= 1
            self.timeouts -= 1
            self.errors -= 1
        self.requests += 1
        response = call.response
        if response is None:
            self.timeouts += 1
            self.errors += 1
            return
        self.answered += 1
        if response.error:
            self.errors += 1
        request = call.request
        latency = response.latency_ms
        if latency is None:
            latency = call_latency_ms(call)
        self.latency_ns += (
            round(latency * NANOS_PER_MS) if latency < WHOLE_FLOATS else int(latency) * NANOS_PER_MS
        )
        buckets = self.buckets
        if buckets is None:
            latencies = self.latencies
            latencies.append(latency)
            if len(latencies) > EXACT_UP_TO:
                self._to_buckets()
        else:
            bucket = latency_bucket(latency)
            buckets[bucket] = buckets.get(bucket, 0) + 1
        ttft = response.time_to_first_token_ms
        if ttft is not None:
            self.ttft_ns += round(ttft * NANOS_PER_MS) if ttft < WHOLE_FLOATS else int(ttft) * NANOS_PER_MS
            self.ttft_count += 1
        prompt = request.prompt_tokens
        self.prompt_tokens += prompt
        self.completion_tokens += response.completion_tokens
        # The join clamps cache reads to the prompt; min() keeps the sums right
        # for a call built elsewhere too.
        cached = response.cache_read_tokens
        self.cache_read_tokens += cached if cached <= prompt else prompt
        self.reasoning_tokens += response.reasoning_tokens
        cost = call.cost_usd
        if cost is None:
            self.unpriced += 1
        else:
            self.cost_pico_usd += round(cost * PICO_USD) if cost < WHOLE_FLOATS else int(cost) * PICO_USD

    def merge_from(self, others: list[CallStats]) -> None:
        """Fold in the totals and latencies of ``others``: the same as adding their calls."""
        for other in others:
            for name in SUM_COLUMNS:
                setattr(self, name, getattr(self, name) + getattr(other, name))
            if other.buckets is None:
                if self.buckets is None:
                    self.latencies.extend(other.latencies)
                    if len(self.latencies) > EXACT_UP_TO:
                        self._to_buckets()
                    continue
                for latency in other.latencies:
                    bucket = latency_bucket(latency)
                    self.buckets[bucket] = self.buckets.get(bucket, 0) + 1
                continue
            if self.buckets is None:
                self._to_buckets()
            assert self.buckets is not None
            for bucket, count in other.buckets.items():
                self.buckets[bucket] = self.buckets.get(bucket, 0) + count

    def add_sums(self, sums: list[int], latencies: np.ndarray) -> None:
        """Fold in what many calls add (``sums`` in :data:`SUM_COLUMNS` order, from
        :func:`group_sums`) and their latencies: as :meth:`add` for each of them."""
        (
            requests,
            errors,
            timeouts,
            answered,
            latency_ns,
            ttft_ns,
            ttft_count,
            prompt,
            completion,
            cached,
            reasoning,
            cost_pico,
            unpriced,
        ) = sums
        self.requests += requests
        self.errors += errors
        self.timeouts += timeouts
        self.answered += answered
        self.latency_ns += latency_ns
        self.ttft_ns += ttft_ns
        self.ttft_count += ttft_count
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cache_read_tokens += cached
        self.reasoning_tokens += reasoning
        self.cost_pico_usd += cost_pico
        self.unpriced += unpriced
        if not len(latencies):
            return
        buckets = self.buckets
        if buckets is None:
            self.latencies.frombytes(latencies.astype(np.float64).tobytes())
            if len(self.latencies) > EXACT_UP_TO:
                self._to_buckets()
            return
        for latency in latencies.tolist():
            bucket = latency_bucket(latency)
            buckets[bucket] = buckets.get(bucket, 0) + 1

    def _to_buckets(self) -> None:
        buckets: dict[int, int] = {}
        for latency in self.latencies:
            bucket = latency_bucket(latency)
            buckets[bucket] = buckets.get(bucket, 0) + 1
        self.buckets = buckets
        self.latencies = array("d")

    def latency_digest(self) -> TDigest:
        """Every latency so far, as a new t-digest built in ascending order: the same
        calls give the same digest, whatever order they were added in."""
        digest = new_digest()
        if self.buckets is None:
            if self.latencies:
                digest.batch_update(sorted(self.latencies))
            return digest
        buckets = self.buckets
        ascending: list[float] = []
        for bucket in sorted(buckets):
            ascending.extend(repeat(bucket_latency(bucket), buckets[bucket]))
        digest.batch_update(ascending)
        return digest

    def row_fields(self, digest: TDigest) -> dict[str, Any]:
        """The statistics columns of a metrics row (all but key, times and revision);
        ``digest`` is :meth:`latency_digest`."""
        answered = self.answered
        if answered:
            p50: float | None = digest.quantile(0.5)
            p95: float | None = digest.quantile(0.95)
            p99: float | None = digest.quantile(0.99)
            avg_latency: float | None = self.latency_ns / (answered * NANOS_PER_MS)
            avg_prompt: float | None = self.prompt_tokens / answered
            avg_completion: float | None = self.completion_tokens / answered
        else:
            p50 = p95 = p99 = avg_latency = avg_prompt = avg_completion = None
        return {
            "requests": self.requests,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "avg_latency_ms": avg_latency,
            "p50_latency_ms": p50,
            "p95_latency_ms": p95,
            "p99_latency_ms": p99,
            "avg_time_to_first_token_ms": (
                self.ttft_ns / (self.ttft_count * NANOS_PER_MS) if self.ttft_count else None
            ),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "avg_prompt_tokens": avg_prompt,
            "avg_completion_tokens": avg_completion,
            "estimated_cost_usd": round(self.cost_pico_usd / PICO_USD, COST_DECIMALS),
            "unpriced_requests": self.unpriced,
        }


# -- many calls at once ---------------------------------------------------------------

# Sums a batch folds with 64-bit integers must stay below this; a batch whose scaled
# latencies or costs could come near it is summed with Python integers instead.
_SAFE_TOTAL = float(2**62)

_SAFE_INT = 2**62

# The columns :func:`group_sums` adds up per group, in :meth:`CallStats.add_sums` order.
SUM_COLUMNS = (
    "requests",
    "errors",
    "timeouts",
    "answered",
    "latency_ns",
    "ttft_ns",
    "ttft_count",
    "prompt_tokens",
    "completion_tokens",
    "cache_read_tokens",
    "reasoning_tokens",
    "cost_pico_usd",
    "unpriced",
)


def scaled_ints(values: np.ndarray, scale: int) -> np.ndarray:
    """``round(value * scale)`` of each value (``int(value) * scale`` from 2**53 on), exactly
    as :meth:`CallStats.add` scales one: as int64 when every sum of them fits, else as
    Python integers (an object array), which no sum can overflow."""
    if not len(values) or (float(values.max()) < WHOLE_FLOATS and float(values.sum()) * scale < _SAFE_TOTAL):
        return np.rint(values * scale).astype(np.int64)
    return np.array(
        [round(value * scale) if value < WHOLE_FLOATS else int(value) * scale for value in values.tolist()],
        dtype=object,
    )


def call_columns(calls: CallBatch, indexes: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
    """What each call at ``indexes`` adds to its window, one array per :data:`SUM_COLUMNS`
    entry, and each call's latency (nan for a timeout): :meth:`CallStats.add`, for many
    calls at once."""
    requests = [calls.requests[i] for i in indexes]
    responses = [calls.responses[i] for i in indexes]
    replaces = np.array([calls.replaces[i] for i in indexes], dtype=np.int64)
    timeout = np.array([response is None for response in responses], dtype=np.int64)
    answered = 1 - timeout
    failed = np.array(
        [response is not None and bool(response.error) for response in responses], dtype=np.int64
    )
    gaps = (
        np.array([calls.response_times[i] for i in indexes])
        - np.array([calls.request_times[i] for i in indexes])
    ) * 1000.0
    given = np.array(
        [
            math.nan if response is None or response.latency_ms is None else response.latency_ms
            for response in responses
        ]
    )
    # The response's latency_ms, else the time between the two timestamps (≥ 0).
    latency = np.where(np.isnan(given), np.where(gaps > 0, gaps, 0.0), given)
    latency[timeout == 1] = math.nan
    ttft = np.array(
        [
            math.nan
            if response is None or response.time_to_first_token_ms is None
            else response.time_to_first_token_ms
            for response in responses
        ]
    )
    has_ttft = ~np.isnan(ttft)
    prompt = np.array([request.prompt_tokens for request in requests], dtype=np.int64) * answered
    completion = np.array(
        [0 if response is None else response.completion_tokens for response in responses], dtype=np.int64
    )
    cached = np.array(
        [0 if response is None else response.cache_read_tokens for response in responses], dtype=np.int64
    )
    reasoning = np.array(
        [0 if response is None else response.reasoning_tokens for response in responses], dtype=np.int64
    )
    costs = [calls.costs[i] for i in indexes]
    unpriced = np.array([cost is None for cost in costs], dtype=np.int64) * answered
    cost = np.array([0.0 if cost is None else cost for cost in costs]) * answered
    answered_latency = np.where(answered == 1, latency, 0.0)
    latency_ns = scaled_ints(answered_latency, NANOS_PER_MS)
    ttft_ns = scaled_ints(np.where(has_ttft, ttft, 0.0), NANOS_PER_MS)
    cost_pico = scaled_ints(cost, PICO_USD)
    columns = [
        1 - replaces,
        timeout + failed - replaces,
        timeout - replaces,
        answered,
        latency_ns,
        ttft_ns,
        has_ttft.astype(np.int64),
        prompt,
        completion,
        np.minimum(cached, prompt),
        reasoning,
        cost_pico,
        unpriced,
    ]
    return columns, latency


def group_sums(columns: list[np.ndarray], order: np.ndarray, starts: np.ndarray) -> list[list[int]]:
    """Each column summed per group: ``order`` sorts the calls by group, ``starts`` are where
    each group begins in that order. Python integers, one list per column."""
    return [np.add.reduceat(column[order], starts).tolist() for column in columns]


# -- the dimensions of the windows of one start, per value -------------------------------------------


class ValueSums:
    """What each value of each dimension of the windows starting at one time accumulates,
    as columns: the totals a :class:`CallStats` per (window, dimension, value) would hold
    (one row of :attr:`sums` each, in :data:`SUM_COLUMNS` order) and their latencies, kept
    exact per row up to :data:`EXACT_UP_TO` and in buckets beyond, as a window's are. One
    table for all the windows of a start: a batch folds in with a few array operations,
    whatever the number of windows, dimensions and values it touches
    (docs/counting.md §12).
    """

    __slots__ = (
        "_changes",
        "_sorted",
        "buckets",
        "by_dimension",
        "exact",
        "latencies",
        "latency_rows",
        "magnitude",
        "rows",
        "sums",
        "values",
    )

    def __init__(self) -> None:
        self.rows: dict[tuple[object, str, object], int] = {}  # (window key, dimension, value) -> row
        self.by_dimension: dict[tuple[object, str], list[int]] = {}  # (window key, dimension) -> rows
        self.values: list[object] = []  # row -> value
        self.sums = np.zeros((0, len(SUM_COLUMNS)), dtype=np.int64)
        self.latency_rows = array("q")  # the row of each exact latency below
        self.latencies = array("d")
        self.exact: list[int] = []  # exact latencies per row
        self.buckets: dict[int, dict[int, int]] = {}  # row -> latency bucket counts, past EXACT_UP_TO
        # A bound on every |sum| so far: past 2**62 the sums go on as Python integers.
        self.magnitude = 0
        self._changes = 0  # latencies moved to buckets so far
        self._sorted: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None

    def row(self, key: object, name: str, value: object) -> int:
        """The row of ``value`` in window ``key``'s dimension ``name``."""
        found = self.rows.get((key, name, value))
        if found is None:
            found = self.rows[key, name, value] = len(self.values)
            self.values.append(value)
            self.exact.append(0)
            rows = self.by_dimension.get((key, name))
            if rows is None:
                self.by_dimension[key, name] = [found]
            else:
                rows.append(found)
        return found

    def add(
        self, rows: np.ndarray, sums: np.ndarray, latency_rows: np.ndarray, latencies: np.ndarray
    ) -> None:
        """Fold in ``sums`` (one line per row of ``rows``, which repeat no row) and the
        ``latencies`` of ``latency_rows``."""
        grow = len(self.values) - len(self.sums)
        if grow > 0:
            self.sums = np.concatenate([self.sums, np.zeros((grow, len(SUM_COLUMNS)), dtype=self.sums.dtype)])
        if self.sums.dtype != object:
            self.magnitude += int(np.abs(sums).max(initial=0)) if sums.dtype != object else _SAFE_INT
            if self.magnitude >= _SAFE_INT:
                self.sums = self.sums.astype(object)  # as scaled_ints does, for sums beyond int64
        self.sums[rows] += sums
        if not len(latencies):
            return
        buckets = self.buckets
        if buckets:
            to_buckets = np.isin(latency_rows, np.fromiter(buckets, np.int64, len(buckets)))
            for row, latency in zip(
                latency_rows[to_buckets].tolist(), latencies[to_buckets].tolist(), strict=True
            ):
                counts = buckets[row]
                bucket = latency_bucket(latency)
                counts[bucket] = counts.get(bucket, 0) + 1
            latency_rows, latencies = latency_rows[~to_buckets], latencies[~to_buckets]
        self.latency_rows.frombytes(latency_rows.astype(np.int64).tobytes())
        self.latencies.frombytes(latencies.astype(np.float64).tobytes())
        exact = self.exact
        for row, count in zip(*np.unique(latency_rows, return_counts=True), strict=True):
            exact[row] += int(count)
            if exact[row] > EXACT_UP_TO:
                self._to_buckets(int(row))

    def take_back_timeout(self, row: int) -> None:
        """A timeout counted in ``row`` turned out to be a call counted in another (a
        ``finish_reason`` dimension: the timeout had no value, its answer has one)."""
        self.add(
            np.array([row]),
            np.array([[-1, -1, -1] + [0] * (len(SUM_COLUMNS) - 3)], dtype=np.int64),
            np.zeros(0, np.int64),
            np.zeros(0),
        )

    def _to_buckets(self, row: int) -> None:
        rows = np.frombuffer(self.latency_rows, dtype=np.int64)
        mine = rows == row
        counts: dict[int, int] = {}
        for latency in np.frombuffer(self.latencies, dtype=np.float64)[mine].tolist():
            bucket = latency_bucket(latency)
            counts[bucket] = counts.get(bucket, 0) + 1
        self.buckets[row] = counts
        self._changes += 1
        self.latency_rows = array("q", rows[~mine].tobytes())
        kept = np.frombuffer(self.latencies, dtype=np.float64)[~mine]
        self.latencies = array("d", kept.tobytes())
        self.exact[row] = 0

    def __getstate__(self) -> dict[str, object]:
        state = {name: getattr(self, name) for name in self.__slots__}
        state["_sorted"] = None  # made again when needed: not worth its bytes in a snapshot
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def _by_row(self) -> tuple[np.ndarray, np.ndarray]:
        """The exact latencies sorted by row, made once for all the windows emitted together
        (kept until a latency comes or goes)."""
        count = len(self.latencies)
        if self._sorted is None or self._sorted[0] != (count, self._changes):
            rows = np.frombuffer(self.latency_rows, dtype=np.int64)
            order = np.argsort(rows, kind="stable")
            self._sorted = (
                (count, self._changes),
                rows[order],
                np.frombuffer(self.latencies, dtype=np.float64)[order],
            )
        return self._sorted[1], self._sorted[2]

    def stats(self, rows: list[int]) -> list[CallStats]:
        """Each of ``rows`` as the :class:`CallStats` of its value's calls."""
        latency_rows, latencies = self._by_row()
        starts = np.searchsorted(latency_rows, rows)
        ends = np.searchsorted(latency_rows, rows, side="right")
        sums = self.sums[rows].tolist()
        found = []
        for row, totals, start, end in zip(rows, sums, starts.tolist(), ends.tolist(), strict=True):
            stats = CallStats(*(int(total) for total in totals))
            buckets = self.buckets.get(row)
            if buckets is None:
                stats.latencies = array("d", latencies[start:end].tobytes())
            else:
                stats.buckets = dict(buckets)
            found.append(stats)
        return found
