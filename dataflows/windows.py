"""Tumbling event-time windows by request time, per ``(tenant_id, route, model)``.

:class:`WindowShard` holds the open and recently emitted windows of many keys
and is driven by the Bytewax wiring in :mod:`dataflows.metrics`. It must pickle
(it is Bytewax state).

- A call belongs to the window holding its *request* timestamp: windows are
  ``[k·W, (k+1)·W)`` in Unix seconds, so a timestamp exactly on a boundary opens
  the next window.
- Event time here is the time a call became known: the later of its two
  timestamps, or request time + timeout for a timeout (``Call.completed_at``).
  A call cannot be known before then, so it is the honest measure of how late
  it is; the request time would make every slow call look late.
- A window is first emitted once event time reaches ``end + grace``, and again
  whenever calls were folded in since its last emission.
- A row's ``revision`` is its content's version: ``requests + answered calls``,
  i.e. one per timed-out call and two per answered call. Every change a window
  can undergo raises it (a call: +1 or +2; a timeout replaced by its answered
  call: +1), and it is a function of the calls in the window alone: not of when
  rows were emitted, of batching, of workers or of a replay after a crash. Since
  whether a request pairs depends on its events only, each call of a window can
  only move towards its final state (absent, timed out, answered), so the
  row holding all of a window's calls has a revision no row holding part of them
  reaches: the sinks keep the highest revision, and that is the final row. (Two
  partial rows may share a revision with other content: one answered call, or
  two timeouts. Readers of partial rows see the latest by offset.)
- A call whose window ended more than ``lateness`` before event time is a
  ``too_late`` dead letter; such windows are forgotten after their last emission.
- A call whose window would start or end outside the years 1-9999 (its row's
  times could not be represented) is an ``invalid`` dead letter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
from msgspec import Struct, field

from dataflows.aggregate import (
    SUM_COLUMNS,
    VALUE_BITS,
    CallStats,
    ValueStatistics,
    ValueSums,
    call_columns,
    group_sums,
)
from dataflows.batches import CallBatch
from dataflows.clock import Watermark
from dataflows.dimensions import DimensionPlan, StaticPlan, Value, from_response, ranked, reader
from dataflows.evaluations import ANSWERED, COUNTED, TIMED_OUT, CountedCalls, dimension_text
from dataflows.join import WAKEUP_MARGIN, Call, call_at, call_to_json
from dataflows.shards import WindowKey, window_key_of
from schemas.deadletter import DeadLetter, Reason
from schemas.dimensions import DEFAULT_VALUES, MAX_DIMENSIONS, OTHER
from schemas.events import LLMRequest, LLMResponse
from schemas.rows import VALUE_STATISTICS, DimensionRows, MetricsRow


class DimensionEmission(Struct, kw_only=True):
    """One dimension of one window's emission (docs/counting.md §12): its rows as columns,
    and per value what Postgres keeps beside a row."""

    rows: DimensionRows
    ttft_count: list[int]  # answered calls that reported time_to_first_token_ms
    latency_digest: list[bytes]


class WindowRow(Struct, kw_only=True):
    """One emission of one window: the row, plus what Postgres keeps beside it, and its
    dimensions' rows (docs/counting.md §12)."""

    row: MetricsRow
    digest: bytes  # the latency t-digest, serialized, for merging windows later
    ttft_count: int  # answered calls that reported time_to_first_token_ms
    dimensions: list[DimensionEmission] = field(default_factory=list)


class _Window(CallStats, gc=False):
    """One window of one key: its totals, and where its emissions stand."""

    revision: int = 0  # of the last emission; 0 before the first
    unsent: int = 0  # calls folded in since the last emission
    # The tenant's dimensions when the window opened (their values are in WindowShard._values).
    dimensions: tuple[str, ...] = ()


def add_call_values(table: ValueSums, key: WindowKey, names: tuple[str, ...], call: Call) -> None:
    """Fold one priced call into its value of each of ``names``, the dimensions of window
    ``key``, in ``table`` (that of the window's start): :func:`_add_values` for one call."""
    one = CallBatch()
    request, response = call.request, call.response
    request_time = request.timestamp.timestamp()
    response_time = math.nan if response is None else response.timestamp.timestamp()
    one.add(
        request, response, call.source, request_time, response_time, completed_at(call), call.replaces_timeout
    )
    one.costs = [call.cost_usd]
    columns, latency = call_columns(one, [0])
    _add_values(one, [0], [0], [(0, key)], [names], lambda _: table, columns, latency)


def completed_at(call: Call) -> float:
    """Event time at which the call became known (``Call.completed_at`` when set)."""
    if call.completed_at is not None:
        return call.completed_at
    request_ts = call.request.timestamp.timestamp()
    if call.response is None:
        return request_ts
    return max(request_ts, call.response.timestamp.timestamp())


# The first and last whole seconds a datetime can hold: a window must start and
# end within them. (datetime.max itself rounds up, out of range, as a float.)
FIRST_INSTANT = datetime.min.replace(tzinfo=UTC).timestamp()
LAST_INSTANT = datetime.max.replace(microsecond=0, tzinfo=UTC).timestamp()


def _iso(seconds: float) -> str:
    if seconds > LAST_INSTANT:
        return "after 9999-12-31T23:59:59Z"
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def _dead_letter(call: Call, reason: Reason, error: str) -> DeadLetter:
    """A call the windows cannot count, with the record that completed it."""
    source = call.source
    return DeadLetter(
        reason=reason,
        source_topic=source.topic,
        partition=source.partition,
        offset=source.offset,
        error=error,
        payload=call_to_json(call),
    )


class WindowShard:
    def __init__(
        self,
        window_seconds: int,
        grace_seconds: int,
        lateness_seconds: int,
        plan: DimensionPlan | None = None,
        value_limit: int = DEFAULT_VALUES,
    ) -> None:
        self.window = window_seconds
        self.grace = grace_seconds
        self.lateness = lateness_seconds
        # Which dimensions a window opening now gets; not snapshotted (attach()).
        self.plan: DimensionPlan = plan or StaticPlan()
        self.value_limit = value_limit
        self.watermark = Watermark()
        # window start (Unix seconds) -> key -> window
        self._windows: dict[int, dict[WindowKey, _Window]] = {}
        # window start -> keys with calls not emitted yet
        self._unsent: dict[int, set[WindowKey]] = {}
        # window start -> the values of its windows' dimensions
        self._values: dict[int, ValueSums] = {}
        # Wall clock minus event time at the last call; not snapshotted.
        self._offset: float | None = None
        # The calls counted, for the evaluations' call directory, while it is set (by
        # the wiring, which takes them after every batch); not snapshotted.
        self.counted: CountedCalls | None = None

    def on_call(self, call: Call, now: float) -> list[DeadLetter]:
        """Fold one priced call into its window; a call beyond lateness comes back as a
        dead letter with reason ``too_late``."""
        request = call.request
        window = self.window
        start = int(request.timestamp.timestamp() // window) * window
        if not FIRST_INSTANT <= start <= LAST_INSTANT - window:
            return [self._unstorable(call, start)]
        watermark = self.watermark
        known = call.completed_at
        watermark.observe(completed_at(call) if known is None else known, now)
        event_time = watermark.settled
        self._offset = now - event_time
        if start + window + self.lateness < event_time:
            return [self._too_late(call, start, event_time)]
        self.plan.prepare({request.tenant_id: start})
        key = window_key_of(request)
        state = self._taking(start, key, 1)
        state.add(call)
        if self.counted is not None:
            dimensions = counted_dimensions(
                state.dimensions, call.request, call.response, call.replaces_timeout
            )
            if dimensions is not None:
                self.counted.add(request.request_id, key, start, event_time, dimensions)
        if state.dimensions:
            add_call_values(self._table(start), key, state.dimensions, call)
        return []

    def _table(self, start: int) -> ValueSums:
        table = self._values.get(start)
        if table is None:
            table = self._values[start] = ValueSums()
        return table

    def attach(self, plan: DimensionPlan) -> None:
        """Use ``plan`` for the windows that open from now on (after a restore, say)."""
        self.plan = plan

    def _taking(self, start: int, key: WindowKey, calls: int) -> _Window:
        """The window of ``key`` starting at ``start``, about to take ``calls`` more calls
        (made when new; marked as having calls not sent yet)."""
        group = self._windows.get(start)
        if group is None:
            group = self._windows[start] = {}
        state = group.get(key)
        if state is None:
            state = group[key] = _Window(dimensions=self.plan.names(key[0], start))
        if not state.unsent:
            unsent = self._unsent.get(start)
            if unsent is None:
                self._unsent[start] = {key}
            else:
                unsent.add(key)
        state.unsent += calls
        return state

    def on_calls(self, calls: CallBatch, now: float) -> list[DeadLetter]:
        """Fold a batch of priced calls into their windows; calls beyond lateness come back
        as ``too_late`` dead letters, those no row could hold as ``invalid``.

        Exactly :meth:`on_call` for each call in turn, with array operations: event time
        runs through the batch as a running maximum, and each window's sums are added
        once per batch (all sums are integers, and latencies are summarised the same
        way whatever the order, so the grouping changes nothing).
        """
        count = len(calls)
        if not count:
            return []
        window = self.window
        starts = np.floor_divide(np.array(calls.request_times), window) * window
        storable = (starts >= FIRST_INSTANT) & (starts <= LAST_INSTANT - window)
        completed = np.where(storable, np.array(calls.completed), -np.inf)
        letters: list[DeadLetter] = []
        first = np.flatnonzero(storable)
        if not len(first):
            return [self._unstorable(call_at(calls, i), int(starts[i])) for i in range(count)]
        watermark = self.watermark
        watermark.observe(float(completed[first[0]]), now)  # the idle time since the last call, once
        event_time = np.maximum(np.maximum.accumulate(completed), watermark.settled)
        watermark.settled = float(event_time[-1])
        self._offset = now - watermark.settled
        late = storable & (starts + window + self.lateness < event_time)
        for index in np.flatnonzero(~storable | late).tolist():
            call = call_at(calls, index)
            start = int(starts[index])
            if storable[index]:
                letters.append(self._too_late(call, start, float(event_time[index])))
            else:
                letters.append(self._unstorable(call, start))
        counted = np.flatnonzero(storable & ~late)
        if not len(counted):
            return letters
        indexes = counted.tolist()
        requests = calls.requests
        groups: dict[tuple[int, WindowKey], int] = {}
        # Python ints read once, and keys built by attrgetter: this runs for every call.
        start_of = starts.astype(np.int64).tolist()
        numbers = np.fromiter(
            (groups.setdefault((start_of[i], window_key_of(requests[i])), len(groups)) for i in indexes),
            np.int64,
            len(indexes),
        )
        columns, latency = call_columns(calls, indexes)
        order = np.argsort(numbers, kind="stable")
        sorted_numbers = numbers[order]
        bounds = np.flatnonzero(np.diff(sorted_numbers, prepend=-1))
        sums = group_sums(columns, order, bounds)
        sorted_latency = latency[order]
        answered = ~np.isnan(sorted_latency)
        answered_latency = sorted_latency[answered]
        answered_bounds = np.searchsorted(sorted_numbers[answered], np.arange(len(groups) + 1))
        calls_per_group = np.diff(np.append(bounds, len(indexes))).tolist()
        through: dict[str, float] = {}
        for start, key in groups:
            if through.get(key[0], -np.inf) < start:
                through[key[0]] = start
        self.plan.prepare(through)
        windows: list[_Window] = []
        for number, ((start, key), calls_in) in enumerate(zip(groups, calls_per_group, strict=True)):
            state = self._taking(start, key, calls_in)
            state.add_sums(
                [column[number] for column in sums],
                answered_latency[answered_bounds[number] : answered_bounds[number + 1]],
            )
            windows.append(state)
        if self.counted is not None:
            _note_counted(self.counted, calls, indexes, numbers.tolist(), list(groups), windows)
        if any(state.dimensions for state in windows):
            _add_values(
                calls,
                indexes,
                numbers.tolist(),
                list(groups),
                [state.dimensions for state in windows],
                self._table,
                columns,
                latency,
            )
        return letters

    def _too_late(self, call: Call, start: int, event_time: float) -> DeadLetter:
        end = start + self.window
        return _dead_letter(
            call,
            "too_late",
            f"call {call.request.request_id!r} belongs to the window "
            f"[{_iso(start)}, {_iso(end)}), closed for good at {_iso(end + self.lateness)} "
            f"(LATENESS_SECONDS {self.lateness}); event time was already {_iso(event_time)}",
        )

    def _unstorable(self, call: Call, start: int) -> DeadLetter:
        return _dead_letter(
            call,
            "invalid",
            f"call {call.request.request_id!r}: its request timestamp "
            f"{call.request.timestamp.isoformat()} falls in a window that starts or ends "
            f"outside the years 1-9999, which a row cannot hold - at `$.timestamp`",
        )

    def on_time(self, now: float) -> list[WindowRow]:
        """Rows due now: windows whose end + grace the watermark passed with calls not
        emitted yet. Forgets windows past end + lateness."""
        event_time = self.watermark.current(now)
        self._offset = now - event_time
        window = self.window
        rows: list[WindowRow] = []
        for start in sorted(self._unsent):
            if start + window + self.grace > event_time:
                break
            group = self._windows[start]
            held: set[WindowKey] = set()
            sliced: list[tuple[WindowKey, _Window, WindowRow]] = []
            for key in sorted(self._unsent.pop(start)):
                state = group[key]
                if state.timeouts < 0:
                    # A timeout's replacement overtook the timeout itself: the row
                    # would be wrong until the timeout arrives, so it waits for it.
                    held.add(key)
                    continue
                state.revision = state.requests + state.answered
                state.unsent = 0
                emission = self._row(start, key, state)
                rows.append(emission)
                if state.dimensions:
                    sliced.append((key, state, emission))
            if sliced:
                self._dimension_rows(self._values[start], sliced)
            if held:
                self._unsent[start] = held
        for start in sorted(self._windows):
            if start + window + self.lateness >= event_time:
                break
            if start not in self._unsent:
                del self._windows[start]
                self._values.pop(start, None)
        return rows

    def _row(self, start: int, key: WindowKey, state: _Window) -> WindowRow:
        digest = state.latency_digest()
        tenant_id, route, model = key
        row = MetricsRow(
            tenant_id=tenant_id,
            route=route,
            model=model,
            window_start=datetime.fromtimestamp(start, UTC),
            window_end=datetime.fromtimestamp(start + self.window, UTC),
            revision=state.revision,
            **state.row_fields(digest),
        )
        return WindowRow(row=row, digest=digest.to_bytes(), ttft_count=state.ttft_count)

    def _dimension_rows(self, table: ValueSums, emitted: list[tuple[WindowKey, _Window, WindowRow]]) -> None:
        """Every row of the dimensions of windows emitted together, all of the same start
        (docs/counting.md §12), their statistics computed at once."""
        wanted: list[tuple[int, int]] = []  # (window number, position of the dimension)
        named: list[tuple[WindowRow, str]] = []
        for key, state, emission in emitted:
            window = table.window_ids.get(key)
            if window is not None:
                for place, name in enumerate(state.dimensions):
                    wanted.append((window, place))
                    named.append((emission, name))
        outputs: list[list[int]] = []  # the table rows of each dimension row
        parts: list[tuple[WindowRow, str, list[Value]]] = []
        for (emission, name), (rows, values, calls) in zip(named, table.dimension_rows(wanted), strict=True):
            if not rows:
                continue
            # A value whose only timeout moved to another value holds no call any more.
            counted = [(value, count) for value, count in zip(values, calls, strict=True) if count]
            own, merged = ranked(counted, self.value_limit)
            row_of = dict(zip(values, rows, strict=True))
            outputs.extend([row_of[value]] for value in own)
            if merged:
                outputs.append([row_of[value] for value in merged])
                own.append(OTHER)
            parts.append((emission, name, own))
        statistics = table.statistics(outputs)
        first = 0
        for emission, name, own in parts:
            last = first + len(own)
            emission.dimensions.append(_dimension_emission(emission.row, name, own, statistics, first, last))
            first = last

    def next_wakeup(self) -> float | None:
        """Wall-clock Unix seconds at which ``on_time`` may have work; None when empty.

        Assumes event time advances with the wall clock from the last call; right
        after a restore that is unknown and the answer is "now" (0.0).
        """
        due: list[float] = []
        # Windows whose every unsent key waits for a timeout (see on_time) are not due.
        ready = [
            start
            for start, keys in self._unsent.items()
            if any(self._windows[start][key].timeouts >= 0 for key in keys)
        ]
        if ready:
            due.append(min(ready) + self.window + self.grace)
        if self._windows:
            due.append(min(self._windows) + self.window + self.lateness)
        if not due:
            return None
        if self._offset is None:
            return 0.0
        return min(due) + self._offset + WAKEUP_MARGIN

    def __len__(self) -> int:
        """Windows held (emitted or not)."""
        return sum(len(group) for group in self._windows.values())

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_offset"] = None
        state["counted"] = None
        del state["plan"]  # settings live in Postgres: a restored shard is attached to them again
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        state.setdefault("value_limit", DEFAULT_VALUES)  # snapshots made before dimensions
        state.setdefault("_values", {})
        state.setdefault("counted", None)
        self.__dict__.update(state)
        self.plan = StaticPlan()
        for start, table in self._values.items():
            if table.legacy():
                windows = self._windows[start]
                table.rekey(lambda key, windows=windows: windows[key].dimensions)


def _note_counted(
    counted: CountedCalls,
    calls: CallBatch,
    indexes: list[int],
    numbers: list[int],
    groups: list[tuple[int, WindowKey]],
    windows: list[_Window],
) -> None:
    """Add the calls at ``indexes`` (of windows ``groups[numbers[i]]``, ``windows[numbers[i]]``)
    to ``counted``, as :func:`counted_dimensions` says."""
    requests, responses, replaces, completed = (
        calls.requests,
        calls.responses,
        calls.replaces,
        calls.completed,
    )
    for index, number in zip(indexes, numbers, strict=True):
        request = requests[index]
        dimensions = counted_dimensions(
            windows[number].dimensions, request, responses[index], replaces[index]
        )
        if dimensions is not None:
            start, key = groups[number]
            counted.add(request.request_id, key, start, completed[index], dimensions)


def counted_dimensions(
    names: tuple[str, ...], request: LLMRequest, response: LLMResponse | None, replaces_timeout: bool
) -> str | None:
    """What the call directory is told of a counted call: its values of its window's
    dimensions ``names`` (:func:`~dataflows.evaluations.dimension_text`). An answered call
    replacing its timeout was told as the timeout already: None, unless a dimension read
    from the response gave the answer a value, which moves it (ANSWERED)."""
    if replaces_timeout:
        if not any(from_response(name) for name in names):
            return None
        values = [reader(name)(request, response) for name in names]
        moved = any(
            value is not None for name, value in zip(names, values, strict=True) if from_response(name)
        )
        return dimension_text(ANSWERED, names, values) if moved else None
    if not names:
        return ""
    values = [reader(name)(request, response) for name in names]
    return dimension_text(COUNTED if response is not None else TIMED_OUT, names, values)


def _dimension_emission(
    row: MetricsRow, name: str, values: list[Value], statistics: ValueStatistics, first: int, last: int
) -> DimensionEmission:
    """Dimension ``name`` of the window of ``row``: its ``values`` have the outputs ``first``
    to ``last`` (excluded) of ``statistics``."""
    fields = statistics.fields
    rows = DimensionRows(
        tenant_id=row.tenant_id,
        route=row.route or "",
        model=row.model or "",
        window_start=row.window_start,
        window_end=row.window_end,
        revision=row.revision,
        dimension=name,
        values=values,
        **{column: fields[column][first:last] for column in VALUE_STATISTICS},
    )
    return DimensionEmission(
        rows=rows,
        ttft_count=statistics.ttft_count[first:last],
        latency_digest=statistics.digests[first:last],
    )


# What a timeout replaced by its answered call adds to the first three sums (requests,
# errors, timeouts) of its value of a dimension read from the response; see _add_values.
_RESTORED = np.array([1, 1, 1] + [0] * (len(SUM_COLUMNS) - 3), dtype=np.int64)


def _add_values(
    calls: CallBatch,
    indexes: list[int],
    numbers: list[int],
    windows_at: list[tuple[int, WindowKey]],
    dimensions: list[tuple[str, ...]],
    table_of: Callable[[int], ValueSums],
    columns: list[np.ndarray],
    latency: np.ndarray,
) -> None:
    """Fold the counted calls (``indexes``, each in window ``numbers[i]``, starting at and
    keyed by ``windows_at[n]``, with dimensions ``dimensions[n]``; ``columns`` and
    ``latency`` from :func:`call_columns`) into their values of each window's dimensions,
    in the table of the window's start (:class:`ValueSums`).

    Each call adds what it adds to its window to one row per dimension: an entry each,
    the entries of a start folded at once. A timeout replaced by its answered call adds
    (requests, errors and timeouts) -1 each to the window; under a dimension read from the
    response the timeout had no value and the answer may have one, so that value gets the
    whole answered call (+1 each more) and no value takes the timeout back (-1 each).
    """
    window_numbers = np.array(numbers, dtype=np.int64)
    calls_at = np.array(indexes, dtype=np.int64)
    matrix = np.stack(columns, axis=1)
    # (start, dimensions) -> its windows (numbers)
    kinds: dict[tuple[int, tuple[str, ...]], list[int]] = {}
    window_ids = np.zeros(len(windows_at), dtype=np.int64)
    for number, ((start, key), names) in enumerate(zip(windows_at, dimensions, strict=True)):
        if names:
            window_ids[number] = table_of(start).window_id(key)
            kinds.setdefault((start, names), []).append(number)
    entries: dict[int, tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]] = {}
    requests, responses, replaces = calls.requests, calls.responses, calls.replaces
    for (start, names), members in kinds.items():
        table = table_of(start)
        positions = np.flatnonzero(np.isin(window_numbers, members))
        at = calls_at[positions].tolist()
        pairs = [(requests[i], responses[i]) for i in at]
        bases = window_ids[window_numbers[positions]] * MAX_DIMENSIONS
        keys, sums, latencies = entries.setdefault(start, ([], [], []))
        for place, name in enumerate(names):
            read = reader(name)
            values = [read(request, response) for request, response in pairs]
            dimension = (bases + place) << VALUE_BITS
            keys.append(dimension + np.array(table.value_numbers(values), dtype=np.int64))
            sums.append(matrix[positions])
            latencies.append(latency[positions])
            if from_response(name):
                moved = np.flatnonzero(
                    [replaces[i] and value is not None for i, value in zip(at, values, strict=True)]
                )
                if len(moved):
                    keys.append(keys[-1][moved])
                    keys.append(dimension[moved] + table.value_numbers([None])[0])
                    sums.append(np.broadcast_to(_RESTORED, (len(moved), len(SUM_COLUMNS))))
                    sums.append(np.broadcast_to(-_RESTORED, (len(moved), len(SUM_COLUMNS))))
                    latencies.append(np.full(2 * len(moved), math.nan))
    for start, (keys, sums, latencies) in entries.items():
        table_of(start).add(np.concatenate(keys), np.concatenate(sums), np.concatenate(latencies))
