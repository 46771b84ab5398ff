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
from collections.abc import Callable
from itertools import repeat
from typing import Any

import numpy as np
from fastdigest import TDigest
from msgspec import Struct, field

from dataflows.batches import CallBatch
from dataflows.join import Call
from schemas.dimensions import MAX_DIMENSIONS

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

# A row key: (window number · MAX_DIMENSIONS + position of the dimension) · 2**32 + value number.
VALUE_BITS = 32


def row_key(window: int, position: int, value: int) -> int:
    """The key of the row of value number ``value`` of dimension ``position`` of window
    number ``window`` in a :class:`ValueSums`."""
    return ((window * MAX_DIMENSIONS + position) << VALUE_BITS) + value


class ValueSums:
    """What each value of each dimension of the windows starting at one time accumulates,
    as columns: the totals a :class:`CallStats` per (window, dimension, value) would hold
    (one row of :attr:`sums` each, in :data:`SUM_COLUMNS` order) and their latencies, kept
    exact per row up to :data:`EXACT_UP_TO` and in buckets beyond, as a window's are. One
    table for all the windows of a start: a batch folds in with a few array operations,
    whatever the number of windows, dimensions and values it touches
    (docs/counting.md §12).

    A row is known by an integer (:meth:`row_key`): the window's number here, the
    dimension's position among the window's dimensions (they are fixed when it opens),
    and the value's number here; so a batch finds its rows with one dictionary lookup
    per (window, dimension, value) and no tuples.
    """

    __slots__ = (
        "_changes",
        "_legacy",
        "_sorted",
        "buckets",
        "exact",
        "latencies",
        "latency_rows",
        "magnitude",
        "row_keys",
        "rows",
        "sums",
        "value_ids",
        "values",
        "window_ids",
    )

    def __init__(self) -> None:
        self.window_ids: dict[object, int] = {}  # window key -> its number here
        self.value_ids: dict[object, int] = {}  # value -> its number here
        self.values: list[object] = []  # number -> value
        self.rows: dict[int, int] = {}  # row_key -> row
        self.row_keys = array("q")  # row -> row_key
        self.sums = np.zeros((0, len(SUM_COLUMNS)), dtype=np.int64)
        self.latency_rows = array("q")  # the row of each exact latency below
        self.latencies = array("d")
        self.exact: list[int] = []  # exact latencies per row
        self.buckets: dict[int, dict[int, int]] = {}  # row -> latency bucket counts, past EXACT_UP_TO
        # A bound on every |sum| so far: past 2**62 the sums go on as Python integers.
        self.magnitude = 0
        self._changes = 0  # latencies moved to buckets so far
        self._sorted: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None
        # Rows of a snapshot made before rows had integer keys, until rekey() (see __setstate__).
        self._legacy: dict[tuple[object, str, object], int] | None = None

    def window_id(self, key: object) -> int:
        """The number of window ``key`` here."""
        return self.window_ids.setdefault(key, len(self.window_ids))

    def value_numbers(self, values: list[object]) -> list[int]:
        """The number of each of ``values`` here (new ones numbered as they come)."""
        get = self.value_ids.get
        numbers = [get(value, -1) for value in values]
        if -1 in numbers:
            for index, number in enumerate(numbers):
                if number < 0:
                    value = values[index]
                    number = numbers[index] = self.value_ids.setdefault(value, len(self.values))
                    if number == len(self.values):
                        self.values.append(value)
        return numbers

    def add(self, keys: np.ndarray, sums: np.ndarray, latencies: np.ndarray) -> None:
        """Fold in entries: each adds ``sums[i]`` (in :data:`SUM_COLUMNS` order) and, unless it
        is NaN, the latency ``latencies[i]`` to the row of ``keys[i]`` (:meth:`row_key`)."""
        if not len(keys):
            return
        unique, inverse = np.unique(keys, return_inverse=True)
        rows = self._rows_of(unique.tolist())
        order = np.argsort(inverse, kind="stable")
        bounds = np.flatnonzero(np.diff(inverse[order], prepend=-1))
        totals = np.add.reduceat(sums[order], bounds, axis=0)
        grow = len(self.row_keys) - len(self.sums)
        if grow > 0:
            self.sums = np.concatenate([self.sums, np.zeros((grow, len(SUM_COLUMNS)), dtype=self.sums.dtype)])
        if self.sums.dtype != object:
            self.magnitude += int(np.abs(totals).max(initial=0)) if totals.dtype != object else _SAFE_INT
            if self.magnitude >= _SAFE_INT:
                self.sums = self.sums.astype(object)  # as scaled_ints does, for sums beyond int64
        self.sums[rows] += totals
        answered = ~np.isnan(latencies)
        if answered.any():
            self._add_latencies(rows[inverse[answered]], latencies[answered])

    def _rows_of(self, keys: list[int]) -> np.ndarray:
        get = self.rows.get
        rows = [get(key) for key in keys]
        if None in rows:
            for index, row in enumerate(rows):
                if row is None:
                    row = rows[index] = self.rows[keys[index]] = len(self.row_keys)
                    self.row_keys.append(keys[index])
                    self.exact.append(0)
        return np.array(rows, dtype=np.int64)

    def _add_latencies(self, latency_rows: np.ndarray, latencies: np.ndarray) -> None:
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

    def dimension_rows(
        self, dimensions: list[tuple[int, int]]
    ) -> list[tuple[list[int], list[object], list[int]]]:
        """For each (window number, position of a dimension) of ``dimensions``: the rows of
        that dimension, their values and their calls (requests)."""
        keys = np.frombuffer(self.row_keys, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        lows = np.array([row_key(window, position, 0) for window, position in dimensions], dtype=np.int64)
        firsts = np.searchsorted(ordered, lows)
        counts = np.searchsorted(ordered, lows + (1 << VALUE_BITS)) - firsts
        starts = np.cumsum(counts) - counts
        taken = order[np.repeat(firsts - starts, counts) + np.arange(int(counts.sum()))]
        rows = taken.tolist()
        values = self.values
        numbers = (keys[taken] - np.repeat(lows, counts)).tolist()
        named = [values[number] for number in numbers]
        calls = self.sums[taken, 0].tolist()
        return [
            (rows[first : first + count], named[first : first + count], calls[first : first + count])
            for first, count in zip(starts.tolist(), counts.tolist(), strict=True)
        ]

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
        self._legacy = None
        if "by_dimension" in state:
            # A snapshot of a release whose rows were keyed by (window key, dimension name,
            # value): the rows keep their numbers, and rekey() gives them their keys once
            # the windows' dimensions are known (WindowShard.__setstate__).
            legacy = state.pop("rows")
            assert isinstance(legacy, dict)
            state.pop("by_dimension")
            state.pop("values")
            self._legacy = legacy
            state.update(
                window_ids={}, value_ids={}, values=[], rows={}, row_keys=array("q", bytes(8 * len(legacy)))
            )
        for name, value in state.items():
            setattr(self, name, value)

    def legacy(self) -> bool:
        """Whether the rows still wait for :meth:`rekey`."""
        return self._legacy is not None

    def rekey(self, dimensions_of: Callable[[Any], tuple[str, ...]]) -> None:
        """Give the rows of an older snapshot their keys; ``dimensions_of(window key)`` is the
        window's dimensions, in order."""
        assert self._legacy is not None
        for (key, name, value), row in self._legacy.items():
            number = self.value_numbers([value])[0]
            found = row_key(self.window_id(key), dimensions_of(key).index(name), number)
            self.rows[found] = row
            self.row_keys[row] = found
        self._legacy = None

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

    def statistics(self, outputs: list[list[int]]) -> ValueStatistics:
        """The row fields of each output, one :class:`CallStats` per output holding the calls
        of its rows (one row, or the rows merged into ``"(other)"``): what
        ``CallStats.row_fields`` gives for each, with its ``ttft_count`` and serialized
        latency digest, computed for all the outputs at once.

        Outputs whose latencies are all exact (no row in buckets, at most
        :data:`EXACT_UP_TO` in all) take the array path (:func:`exact_digests`); the others,
        as rare as windows of more than 850 calls, are summed one by one."""
        counts = np.fromiter(map(len, outputs), np.int64, len(outputs))
        sources = np.fromiter((row for rows in outputs for row in rows), np.int64, int(counts.sum()))
        firsts = np.cumsum(counts) - counts
        sums = self.sums[sources]
        if len(sources) > len(outputs):
            sums = np.add.reduceat(sums, firsts, axis=0)
        latency_rows, latencies = self._by_row()
        low = np.searchsorted(latency_rows, sources)
        lengths = np.searchsorted(latency_rows, sources, side="right") - low
        exact = np.add.reduceat(lengths, firsts) <= EXACT_UP_TO
        if self.buckets:
            bucketed = np.isin(sources, np.fromiter(self.buckets, np.int64, len(self.buckets)))
            exact &= ~np.add.reduceat(bucketed, firsts).astype(bool)
        # The exact latencies of each exact output, ascending within it.
        source_exact = np.repeat(exact, counts)
        taken = lengths * source_exact
        output_of = np.repeat(np.repeat(np.arange(len(outputs)), counts), taken)
        gathered = latencies[np.repeat(low - (np.cumsum(taken) - taken), taken) + np.arange(int(taken.sum()))]
        ascending = gathered[np.lexsort((gathered, output_of))]
        sizes = np.bincount(output_of, minlength=len(outputs))
        fields = _fields(sums)
        digests = exact_digests(ascending, sizes)
        quantiles = exact_quantiles(ascending, sizes, (0.5, 0.95, 0.99))
        answered = sums[:, SUM_COLUMNS.index("answered")].tolist()
        percentiles = ("p50_latency_ms", "p95_latency_ms", "p99_latency_ms")
        for column, values in zip(percentiles, quantiles, strict=True):
            fields[column] = [value if calls else None for value, calls in zip(values, answered, strict=True)]
        ttft_count = sums[:, SUM_COLUMNS.index("ttft_count")].tolist()
        for output in np.flatnonzero(~exact).tolist():
            merged = CallStats()
            merged.merge_from(self.stats(outputs[output]))
            digest = merged.latency_digest()
            for column, value in merged.row_fields(digest).items():
                fields[column][output] = value
            digests[output] = digest.to_bytes()
        return ValueStatistics(fields, [int(count) for count in ttft_count], digests)


class ValueStatistics(Struct):
    """Row fields of many outputs of a :class:`ValueSums`, as columns."""

    fields: dict[str, list[Any]]  # the keys of CallStats.row_fields
    ttft_count: list[int]
    digests: list[bytes]  # serialized latency t-digests


def _ratios(numerators: np.ndarray, denominators: np.ndarray) -> list[float | None]:
    """``n / d`` (None where ``d`` is 0), as Python divides integers: correctly rounded. As
    floats when both fit in 53 bits, which makes the float division the same."""
    if numerators.dtype != object and denominators.dtype != object:
        big = max(int(np.abs(numerators).max(initial=0)), int(denominators.max(initial=0)))
        if big < WHOLE_FLOATS:
            zero = denominators == 0
            quotients = numerators / np.where(zero, 1, denominators)
            values: list[float | None] = quotients.tolist()
            if zero.any():
                for index in np.flatnonzero(zero).tolist():
                    values[index] = None
            return values
    pairs = zip(numerators.tolist(), denominators.tolist(), strict=True)
    return [int(n) / int(d) if d else None for n, d in pairs]


def _fields(sums: np.ndarray) -> dict[str, list[Any]]:
    """The row fields computed from the sums alone (:meth:`CallStats.row_fields` but the
    percentiles), one list per field, for sums in :data:`SUM_COLUMNS` order."""
    column = {name: sums[:, index] for index, name in enumerate(SUM_COLUMNS)}
    answered = column["answered"]
    cost = _ratios(column["cost_pico_usd"], np.full(len(sums), PICO_USD, dtype=np.int64))

    def ints(name: str) -> list[int]:
        values = column[name].tolist()
        return [int(value) for value in values] if sums.dtype == object else values

    return {
        "requests": ints("requests"),
        "errors": ints("errors"),
        "timeouts": ints("timeouts"),
        "avg_latency_ms": _ratios(column["latency_ns"], answered * NANOS_PER_MS),
        "p50_latency_ms": [],
        "p95_latency_ms": [],
        "p99_latency_ms": [],
        "avg_time_to_first_token_ms": _ratios(column["ttft_ns"], column["ttft_count"] * NANOS_PER_MS),
        "prompt_tokens": ints("prompt_tokens"),
        "completion_tokens": ints("completion_tokens"),
        "cache_read_tokens": ints("cache_read_tokens"),
        "reasoning_tokens": ints("reasoning_tokens"),
        "avg_prompt_tokens": _ratios(column["prompt_tokens"], answered),
        "avg_completion_tokens": _ratios(column["completion_tokens"], answered),
        "estimated_cost_usd": [round(value or 0.0, COST_DECIMALS) for value in cost],
        "unpriced_requests": ints("unpriced"),
    }


# -- t-digests of exact latencies, many at once ------------------------------------------------
#
# A digest of at most EXACT_UP_TO values added in ascending order keeps each value as a
# centroid of weight 1 (tests/test_aggregate.py checks this against fastdigest itself),
# so its bytes and percentiles follow from the sorted values alone. Building them with
# arrays instead of one TDigest each is 3x faster for the small digests of dimension
# values (bench_dataflow, py-spy).

_DIGEST_HEADER = np.dtype(
    [
        ("magic", "S8"),
        ("version", "<u4"),
        ("centroids", "<u8"),
        ("max_centroids", "<u8"),
        ("mass", "<f8"),
        ("sum", "<f8"),
        ("min", "<f8"),
        ("max", "<f8"),
        ("count", "<u8"),
        ("count_high", "<u8"),
        ("padding", "V4"),
    ]
)
_EMPTY_DIGEST = new_digest().to_bytes()


def exact_digests(ascending: np.ndarray, sizes: np.ndarray) -> list[bytes]:
    """The serialized digest of each run of ``ascending`` (``sizes[i]`` values each, ascending
    within a run, at most :data:`EXACT_UP_TO`): ``TDigest.to_bytes`` of a digest fed them,
    byte for byte (fastdigest's format 1: an 80-byte header, then mean and weight per centroid)."""
    count = len(sizes)
    ends = np.cumsum(sizes)
    firsts = ends - sizes
    present = sizes > 0
    header = np.zeros(count, dtype=_DIGEST_HEADER)
    header["magic"] = b"FASTDIG~"
    header["version"] = 1
    header["centroids"] = sizes
    header["max_centroids"] = MAX_CENTROIDS
    header["mass"] = sizes
    header["count"] = sizes
    header["sum"] = _running_sums(ascending, sizes)
    padded = np.append(ascending, 0.0)  # an empty run's first and last lie beyond the values
    header["min"] = padded[firsts]
    header["max"] = padded[np.where(present, ends - 1, ends)]
    heads = header.tobytes()
    centroids = np.ones((len(ascending), 2))
    centroids[:, 0] = ascending + 0.0  # a centroid's mean is never -0.0 in fastdigest
    body = centroids.tobytes()
    runs = zip(firsts.tolist(), ends.tolist(), sizes.tolist(), strict=True)
    return [
        heads[80 * index : 80 * index + 80] + body[16 * first : 16 * end] if size else _EMPTY_DIGEST
        for index, (first, end, size) in enumerate(runs)
    ]


def _running_sums(ascending: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Each run's sum, added left to right as the digest adds its centroids (a pairwise sum
    could differ in the last bit)."""
    order = np.argsort(-sizes, kind="stable")
    longest = sizes[order]
    firsts = (np.cumsum(sizes) - sizes)[order]
    totals = np.zeros(len(sizes))
    for position in range(int(longest[0]) if len(longest) else 0):
        runs = int(np.searchsorted(-longest, -position, side="left"))  # the runs longer than position
        totals[:runs] += ascending[firsts[:runs] + position]
    out = np.zeros(len(sizes))
    out[order] = totals
    return out


def exact_quantiles(ascending: np.ndarray, sizes: np.ndarray, qs: tuple[float, ...]) -> list[list[float]]:
    """``TDigest.quantile(q)`` of each run's digest (see :func:`exact_digests`) for each of
    ``qs``: between the values of rank ⌈q·(n-1)⌉ - 1 and ⌈q·(n-1)⌉, interpolated with
    fastdigest's own float operations (0.0 where a run is empty)."""
    ends = np.cumsum(sizes)
    firsts = ends - sizes
    single = np.maximum(sizes - 1, 1).astype(np.float64)  # mass - 1 of each digest
    last = np.maximum(sizes - 1, 0)
    padded = np.append(ascending + 0.0, 0.0)  # the means: -0.0 is 0.0 there
    out = []
    for q in qs:
        # The first centroid k whose right edge k/(n-1) reaches q.
        k = np.minimum(np.ceil(q * single).astype(np.int64), last)
        for _ in range(2):
            k = np.where((k > 0) & ((k - 1) / single >= q), k - 1, k)
            k = np.where((k < last) & (k / single < q), k + 1, k)
        left_edge = (k - 1) / single
        fraction = (q - left_edge) / (k / single - left_edge)
        below = padded[np.where(k > 0, firsts + k - 1, firsts)]
        above = padded[firsts + k]
        values = np.where(k > 0, below * (1.0 - fraction) + above * fraction, above)
        values = np.where(sizes > 0, values, 0.0)
        out.append(values.tolist())
    return out
