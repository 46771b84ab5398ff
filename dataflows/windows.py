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

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import numpy as np
from msgspec import Struct, field

from dataflows.aggregate import SUM_COLUMNS, CallStats, ValueSums, call_columns, group_sums
from dataflows.batches import CallBatch
from dataflows.clock import Watermark
from dataflows.dimensions import DimensionPlan, StaticPlan, Value, from_response, ranked, reader
from dataflows.join import WAKEUP_MARGIN, Call, call_at, call_to_json
from dataflows.shards import WindowKey
from schemas.deadletter import DeadLetter, Reason
from schemas.dimensions import DEFAULT_VALUES, OTHER
from schemas.metrics import VALUE_STATISTICS, DimensionRows, MetricsRow


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
    ``key``, in ``table`` (that of the window's start)."""
    request, response = call.request, call.response
    for name in names:
        value = reader(name)(request, response)
        one = CallStats()
        if call.replaces_timeout and value is not None and from_response(name):
            table.take_back_timeout(table.row(key, name, None))
            one.add(msgspec.structs.replace(call, replaces_timeout=False))
        else:
            one.add(call)
        totals = [getattr(one, column) for column in SUM_COLUMNS]
        kind = object if max(map(abs, totals)) >= 2**62 else np.int64
        latencies = np.array(one.latencies, dtype=np.float64)
        row = table.row(key, name, value)
        table.add(np.array([row]), np.array([totals], dtype=kind), np.full(len(latencies), row), latencies)


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
        key = (request.tenant_id, request.route, request.model)
        state = self._taking(start, key, 1)
        state.add(call)
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
        numbers = np.fromiter(
            (
                groups.setdefault(
                    (int(starts[i]), (requests[i].tenant_id, requests[i].route, requests[i].model)),
                    len(groups),
                )
                for i in indexes
            ),
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
        if any(state.dimensions for state in windows):
            _add_values(
                calls, indexes, numbers.tolist(), list(groups), windows, self._table, columns, latency
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
            for key in sorted(self._unsent.pop(start)):
                state = group[key]
                if state.timeouts < 0:
                    # A timeout's replacement overtook the timeout itself: the row
                    # would be wrong until the timeout arrives, so it waits for it.
                    held.add(key)
                    continue
                state.revision = state.requests + state.answered
                state.unsent = 0
                rows.append(self._row(start, key, state))
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
        emission = WindowRow(row=row, digest=digest.to_bytes(), ttft_count=state.ttft_count)
        if state.dimensions:
            self._dimension_rows(row, self._values[start], key, state, emission)
        return emission

    def _dimension_rows(
        self, row: MetricsRow, table: ValueSums, key: WindowKey, state: _Window, emission: WindowRow
    ) -> None:
        """Every row of the window's dimensions (docs/counting.md §12)."""
        values, sums = table.values, table.sums
        for name in state.dimensions:
            rows = table.by_dimension.get((key, name))
            if rows is None:
                continue
            # A value whose only timeout moved to another value holds no call any more.
            counted = [
                (values[r], calls) for r, calls in zip(rows, sums[rows, 0].tolist(), strict=True) if calls
            ]
            own, merged = ranked(counted, self.value_limit)
            stats = table.stats([table.rows[key, name, value] for value in own])
            if merged:
                other = CallStats()
                other.merge_from(table.stats([table.rows[key, name, value] for value in merged]))
                own.append(OTHER)
                stats.append(other)
            emission.dimensions.append(_dimension_emission(row, name, own, stats))

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
        del state["plan"]  # settings live in Postgres: a restored shard is attached to them again
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        state.setdefault("value_limit", DEFAULT_VALUES)  # snapshots made before dimensions
        state.setdefault("_values", {})
        self.__dict__.update(state)
        self.plan = StaticPlan()


def _dimension_emission(
    row: MetricsRow, name: str, values: list[Value], stats: list[CallStats]
) -> DimensionEmission:
    columns: dict[str, list[Any]] = {column: [] for column in VALUE_STATISTICS}
    ttft_counts: list[int] = []
    digests: list[bytes] = []
    for one in stats:
        digest = one.latency_digest()
        for column, value in one.row_fields(digest).items():
            columns[column].append(value)
        ttft_counts.append(one.ttft_count)
        digests.append(digest.to_bytes())
    rows = DimensionRows(
        tenant_id=row.tenant_id,
        route=row.route or "",
        model=row.model or "",
        window_start=row.window_start,
        window_end=row.window_end,
        revision=row.revision,
        dimension=name,
        values=values,
        **columns,
    )
    return DimensionEmission(rows=rows, ttft_count=ttft_counts, latency_digest=digests)


def _add_values(
    calls: CallBatch,
    indexes: list[int],
    numbers: list[int],
    windows_at: list[tuple[int, WindowKey]],
    windows: list[_Window],
    table_of: Callable[[int], ValueSums],
    columns: list[np.ndarray],
    latency: np.ndarray,
) -> None:
    """Fold the counted calls (``indexes``, each in window ``numbers[i]``: ``windows[n]``,
    starting at and keyed by ``windows_at[n]``; ``columns`` and ``latency`` from
    :func:`call_columns`) into their values of each window's dimensions, with array
    operations: :func:`add_call_values` for each call in turn.

    Each call counts once per dimension of its window, in the group of its (window,
    dimension, value); the groups' sums are taken at once, then added to the table of
    each window start (:class:`ValueSums`, usually one or two a batch).
    """
    requests, responses, replaces = calls.requests, calls.responses, calls.replaces
    members: list[int] = []  # positions in indexes, once per dimension of the call's window
    numbered: list[int] = []  # the (window, dimension, value) group of each member
    groups: dict[tuple[int, str, Value], int] = {}
    moved: list[tuple[int, int]] = []  # (position, group): a timeout that moves to another value
    moved_from: list[int] = []  # ... and the group of no value it leaves
    for position, (index, number) in enumerate(zip(indexes, numbers, strict=True)):
        names = windows[number].dimensions
        if not names:
            continue
        request, response = requests[index], responses[index]
        for name in names:
            value = reader(name)(request, response)
            group = groups.setdefault((number, name, value), len(groups))
            if replaces[index] and value is not None and from_response(name):
                moved.append((position, group))
                moved_from.append(groups.setdefault((number, name, None), len(groups)))
                continue
            members.append(position)
            numbered.append(group)
    if not groups:
        return
    chosen = np.array(members, dtype=np.int64)
    matrix = np.stack([column[chosen] for column in columns], axis=1)
    group_of = np.array(numbered, dtype=np.int64)
    if moved:
        # The answered call counts under its value as a call of its own, and takes its
        # timeout back from no value: requests, errors and timeouts move.
        positions = np.array([position for position, _ in moved], dtype=np.int64)
        taken = np.stack([column[positions] for column in columns], axis=1)
        back = np.zeros_like(taken)
        back[:, :3] = -1
        taken[:, :3] += 1
        matrix = np.concatenate([matrix, taken, back])
        group_of = np.concatenate([group_of, [group for _, group in moved], moved_from])
        chosen = np.concatenate([chosen, positions, np.full(len(moved), -1)])
    order = np.argsort(group_of, kind="stable")
    sorted_groups = group_of[order]
    starts = np.flatnonzero(np.diff(sorted_groups, prepend=-1))
    sums = np.add.reduceat(matrix[order], starts, axis=0)
    present = sorted_groups[starts]  # the group of each line of sums
    # Latencies: of the answered calls among the members (a timeout's take-back has none).
    with_latency = chosen[order] >= 0
    latencies = np.where(with_latency, latency[np.maximum(chosen[order], 0)], np.nan)
    answered = ~np.isnan(latencies)
    latency_groups = sorted_groups[answered]
    latencies = latencies[answered]
    keys = list(groups)
    by_start: dict[int, tuple[list[int], list[int]]] = {}  # start -> its lines, their rows
    row_of_group = np.zeros(len(groups), dtype=np.int64)
    start_of_group = np.zeros(len(groups), dtype=np.int64)
    starts_seen: dict[int, int] = {}
    for line, group in enumerate(present.tolist()):
        number, name, value = keys[group]
        start, key = windows_at[number]
        row = table_of(start).row(key, name, value)
        found = by_start.get(start)
        if found is None:
            found = by_start[start] = ([], [])
        found[0].append(line)
        found[1].append(row)
        row_of_group[group] = row
        start_of_group[group] = starts_seen.setdefault(start, len(starts_seen))
    latency_starts = start_of_group[latency_groups]
    latency_order = np.argsort(latency_starts, kind="stable")
    latency_starts = latency_starts[latency_order]
    latency_rows = row_of_group[latency_groups][latency_order]
    latencies = latencies[latency_order]
    bounds = np.searchsorted(latency_starts, np.arange(len(starts_seen) + 1))
    for start, (lines, rows) in by_start.items():
        number = starts_seen[start]
        low, high = bounds[number], bounds[number + 1]
        table_of(start).add(
            np.array(rows, dtype=np.int64), sums[lines], latency_rows[low:high], latencies[low:high]
        )
