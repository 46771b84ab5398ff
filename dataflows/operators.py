"""The Bytewax side of the join and the windows: the stateful logics and the step between.

State is sharded (:mod:`dataflows.shards`). Items are batches both ways: the join
takes the runs of events of its shard (:class:`~dataflows.batches.EventRun`) and
gives one :class:`~dataflows.batches.CallBatch` of the calls they complete;
:func:`route_to_windows` prices the calls of every join shard at hand and splits
them by window shard; each window shard folds its batch with array operations.

Both logics ask to be woken at the shard's ``next_wakeup()``, so a quiet shard
still expires timeouts and closes windows as the wall clock advances event time.

With several processes, Bytewax pickles what crosses between them: runs into the
join and call batches into the windows, each as one msgpack string.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from bytewax.operators import StatefulBatchLogic

from dataflows.batches import CallBatch, EventRun
from dataflows.clock import MAX_GAP, WorkingClock
from dataflows.dimensions import DimensionPlan, StaticPlan
from dataflows.evaluations import (
    CountedCalls,
    EvaluationDimensionEmission,
    EvaluationEmission,
    EvaluationJoin,
    EvaluationWindows,
    Matched,
    Moved,
)
from dataflows.join import Call, JoinShard, call_into
from dataflows.observability import BOARD, CALLS, SNAPSHOT_SECONDS
from dataflows.remembered import SegmentStore
from dataflows.shards import DEFAULT, Shards, WindowKey, window_key_of
from dataflows.windows import WindowRow, WindowShard
from schemas.deadletter import DeadLetter
from schemas.dimensions import DEFAULT_VALUES

# A join shard's output: the calls it counted, and its dead letters.
JoinOutput = tuple[CallBatch, list[DeadLetter]]


def _wakeup(seconds: float | None, clock: WorkingClock, wall: Callable[[], float]) -> datetime | None:
    """When Bytewax should call ``on_notify``: when the shard has work, and at least every
    ``MAX_GAP / 2`` seconds while it holds anything, so that a longer gap means a stall."""
    if seconds is None:
        return None
    due = min(clock.wall_time(seconds), wall() + MAX_GAP / 2)
    # Bytewax compares notification times against the system clock in UTC.
    return datetime.fromtimestamp(due, UTC)


def _freeze(state: object, step: str, started: float | None = None) -> bytes:
    # Bytewax wants an immutable snapshot; the shard keeps changing after this call.
    if started is None:
        started = time.perf_counter()
    frozen = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    SNAPSHOT_SECONDS.labels(step).observe(time.perf_counter() - started)
    return frozen


class JoinLogic(StatefulBatchLogic[list[EventRun], JoinOutput, bytes]):
    """Drives one :class:`JoinShard`: runs of decoded events in, one batch of calls (and
    the dead letters) out per activation."""

    def __init__(self, shard: JoinShard, clock: Callable[[], float] = time.time) -> None:
        self.shard = shard
        self.clock = clock  # the wall clock
        self.working = WorkingClock(lambda: self.clock())

    def on_batch(self, values: list[list[EventRun]]) -> tuple[Iterable[JoinOutput], bool]:
        now = self.working()
        calls = CallBatch()
        runs = values[0] if len(values) == 1 else [run for runs in values for run in runs]
        letters = self.shard.on_runs(runs, now, calls)
        return self._expire(now, calls, letters), StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[Iterable[JoinOutput], bool]:
        return self._expire(self.working(), CallBatch(), []), StatefulBatchLogic.RETAIN

    def _expire(self, now: float, calls: CallBatch, letters: list[DeadLetter]) -> list[JoinOutput]:
        for found in self.shard.on_time(now):
            if type(found) is Call:
                call_into(calls, found)
            else:
                assert isinstance(found, DeadLetter)
                letters.append(found)
        shard = self.shard
        BOARD.report_join(str(id(self)), shard.in_flight(), shard.remembered(), shard.watermark.settled)
        return [(calls, letters)] if len(calls) or letters else []

    def notify_at(self) -> datetime | None:
        return _wakeup(self.shard.next_wakeup(), self.working, self.clock)

    def snapshot(self) -> bytes:
        started = time.perf_counter()
        self.shard.seal()
        return _freeze(self.shard, "join", started)


def route_to_windows(
    price: Callable[[CallBatch], None], shards: Shards = DEFAULT
) -> Callable[[list[tuple[str, JoinOutput]]], list[DeadLetter | tuple[str, CallBatch]]]:
    """After the join: price the calls and split them by window shard; dead letters pass.

    For :func:`bytewax.operators.flat_map_batch`: the outputs of every join shard at
    hand are priced as one batch and regrouped, so the windows get one item per window
    shard.
    """
    shard_of: dict[WindowKey, str] = {}

    def route(items: list[tuple[str, JoinOutput]]) -> list[DeadLetter | tuple[str, CallBatch]]:
        out: list[DeadLetter | tuple[str, CallBatch]] = []
        batches: list[CallBatch] = []
        for _, (calls, letters) in items:
            out.extend(letters)
            if len(calls):
                batches.append(calls)
        if not batches:
            return out
        calls = batches[0] if len(batches) == 1 else CallBatch.concat(batches)
        price(calls)
        _count_outcomes(calls)
        if len(shard_of) > 100_000:
            shard_of.clear()  # keys come from clients: never let this grow without bound
        by_shard: dict[str, list[int]] = {}
        for index, key in enumerate(map(window_key_of, calls.requests)):
            shard = shard_of.get(key)
            if shard is None:
                shard = shard_of[key] = shards.window_key(key)
            members = by_shard.get(shard)
            if members is None:
                by_shard[shard] = [index]
            else:
                members.append(index)
        if len(by_shard) == 1:
            out.append((next(iter(by_shard)), calls))
        else:
            out.extend((shard, calls.take(members)) for shard, members in by_shard.items())
        return out

    return route


def _count_outcomes(calls: CallBatch) -> None:
    """Prometheus counts of the calls by outcome (answered, timed out, timeout replaced)."""
    timed_out = calls.responses.count(None)
    replaced = sum(calls.replaces)
    for outcome, count in (
        ("answered", len(calls) - timed_out - replaced),
        ("timed_out", timed_out),
        ("replaced_timeout", replaced),
    ):
        if count:
            CALLS.labels(outcome).inc(count)


# A window shard's output: rows, too-late calls, and the calls it counted (for the
# evaluations' call directory, when it keeps one).
WindowOutput = WindowRow | DeadLetter | CountedCalls


class WindowLogic(StatefulBatchLogic[CallBatch, WindowOutput, bytes]):
    """Drives one :class:`WindowShard`: batches of priced calls in, rows and too-late calls
    out, and the calls it counted."""

    def __init__(self, shard: WindowShard, clock: Callable[[], float] = time.time) -> None:
        self.shard = shard
        self.clock = clock  # the wall clock
        self.working = WorkingClock(lambda: self.clock())

    def on_batch(self, values: list[CallBatch]) -> tuple[Iterable[WindowOutput], bool]:
        now = self.working()
        out: list[WindowOutput] = []
        for calls in values:
            out.extend(self.shard.on_calls(calls, now))
        counted = self.shard.counted
        if counted is not None and counted.request_ids:
            out.append(counted)
            self.shard.counted = CountedCalls.empty()
        out.extend(self.shard.on_time(now))
        self._report()
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[Iterable[WindowOutput], bool]:
        rows = self.shard.on_time(self.working())
        self._report()
        return rows, StatefulBatchLogic.RETAIN

    def _report(self) -> None:
        BOARD.report_windows(str(id(self)), len(self.shard), self.shard.watermark.settled)

    def notify_at(self) -> datetime | None:
        return _wakeup(self.shard.next_wakeup(), self.working, self.clock)

    def snapshot(self) -> bytes:
        return _freeze(self.shard, "windows")


def join_builder(
    timeout_seconds: float,
    dedupe_seconds: float,
    window_seconds: int,
    lateness_seconds: float,
    store: SegmentStore | None = None,
    shards: Shards = DEFAULT,
) -> Callable[[bytes | None], JoinLogic]:
    """A builder for :func:`bytewax.operators.stateful_batch`: a new shard, or the resumed
    one; with ``store``, where their remembered ids' segments are kept, under the name
    of their shard of ``shards``."""

    def build(resume: bytes | None) -> JoinLogic:
        if resume is None:
            shard = JoinShard(timeout_seconds, dedupe_seconds, window_seconds, lateness_seconds)
        else:
            shard = pickle.loads(resume)
        if store is not None:
            shard.attach(store, shards.join_key)
        elif shard.needs_store():
            raise ValueError("this join state keeps its remembered ids in a segment store")
        return JoinLogic(shard)

    return build


def window_builder(
    window_seconds: int,
    grace_seconds: int,
    lateness_seconds: int,
    plan: Callable[[], DimensionPlan] = StaticPlan,
    value_limit: int = DEFAULT_VALUES,
    counted: bool = False,
) -> Callable[[bytes | None], WindowLogic]:
    """A builder for :func:`bytewax.operators.stateful_batch`: a new shard, or the resumed one,
    deciding the dimensions of the windows it opens with ``plan()`` (called in the worker's
    thread) and keeping ``value_limit`` values a window, key and dimension; with ``counted``,
    emitting the calls it counts (:class:`~dataflows.evaluations.CountedCalls`)."""

    def build(resume: bytes | None) -> WindowLogic:
        if resume is None:
            shard = WindowShard(window_seconds, grace_seconds, lateness_seconds, plan(), value_limit)
        else:
            shard = pickle.loads(resume)
            shard.attach(plan())
            shard.value_limit = value_limit
        shard.counted = CountedCalls.empty() if counted else None
        return WindowLogic(shard)

    return build


# -- evaluations ---------------------------------------------------------------------------

# The call directory's input: runs of evaluations, or calls the windows counted.
DirectoryInput = list[EventRun] | CountedCalls
# Its output: the evaluations that found their call, with the answered timeouts whose
# evaluations move (in the order they happened), and dead letters.
DirectoryOutput = tuple[list[Matched | Moved], list[DeadLetter]]
# Evaluations (and moves) for one window shard.
MatchedGroup = tuple[str, list[Matched | Moved]]


def route_counted(shards: Shards = DEFAULT) -> Callable[[list[CountedCalls]], list[tuple[str, CountedCalls]]]:
    """For :func:`bytewax.operators.flat_map_batch`: the calls the window shards counted,
    split by join shard of their request ids (the call directory's shards)."""

    def route(items: list[CountedCalls]) -> list[tuple[str, CountedCalls]]:
        by_shard: dict[str, CountedCalls] = {}
        join_key = shards.join_key
        for counted in items:
            for rid, key, start, at, dimensions in zip(*counted, strict=True):
                shard = join_key(rid)
                into = by_shard.get(shard)
                if into is None:
                    into = by_shard[shard] = CountedCalls.empty()
                into.add(rid, key, start, at, dimensions)
        return list(by_shard.items())

    return route


def route_matched(
    shards: Shards = DEFAULT,
) -> Callable[[list[tuple[str, DirectoryOutput]]], list[DeadLetter | MatchedGroup]]:
    """For :func:`bytewax.operators.flat_map_batch`: the directory's matched evaluations by
    window shard of their call's key; dead letters pass."""

    def route(items: list[tuple[str, DirectoryOutput]]) -> list[DeadLetter | MatchedGroup]:
        out: list[DeadLetter | MatchedGroup] = []
        by_shard: dict[str, list[Matched | Moved]] = {}
        for _, (matched, letters) in items:
            out.extend(letters)
            for item in matched:
                by_shard.setdefault(shards.window_key(item.key), []).append(item)
        out.extend(by_shard.items())
        return out

    return route


class DirectoryLogic(StatefulBatchLogic[DirectoryInput, DirectoryOutput, bytes]):
    """Drives one :class:`~dataflows.evaluations.EvaluationJoin`."""

    def __init__(self, shard: EvaluationJoin, clock: Callable[[], float] = time.time) -> None:
        self.shard = shard
        self.clock = clock
        self.working = WorkingClock(lambda: self.clock())

    def on_batch(self, values: list[DirectoryInput]) -> tuple[Iterable[DirectoryOutput], bool]:
        now = self.working()
        found: list[Matched | Moved | DeadLetter] = []
        for value in values:
            if type(value) is CountedCalls:
                found.extend(self.shard.on_counted(value, now))
            else:
                assert isinstance(value, list)
                found.extend(self.shard.on_runs(value, now))
        found.extend(self.shard.on_time(now))
        return self._output(found), StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[Iterable[DirectoryOutput], bool]:
        return self._output(list(self.shard.on_time(self.working()))), StatefulBatchLogic.RETAIN

    @staticmethod
    def _output(found: list[Matched | Moved | DeadLetter]) -> list[DirectoryOutput]:
        if not found:
            return []
        matched = [item for item in found if type(item) is not DeadLetter]
        letters = [item for item in found if type(item) is DeadLetter]
        return [(matched, letters)]

    def notify_at(self) -> datetime | None:
        return _wakeup(self.shard.next_wakeup(), self.working, self.clock)

    def snapshot(self) -> bytes:
        started = time.perf_counter()
        self.shard.seal()
        return _freeze(self.shard, "evaluation_join", started)


def directory_builder(
    window_seconds: int,
    grace_seconds: int,
    lateness_seconds: int,
    evaluation_lateness_seconds: int,
    store: SegmentStore | None = None,
    shards: Shards = DEFAULT,
) -> Callable[[bytes | None], DirectoryLogic]:
    """A builder for the call directory's :func:`bytewax.operators.stateful_batch`; with
    ``store``, where its sealed calls are kept."""

    def build(resume: bytes | None) -> DirectoryLogic:
        if resume is None:
            shard = EvaluationJoin(
                window_seconds, grace_seconds, lateness_seconds, evaluation_lateness_seconds
            )
        else:
            shard = pickle.loads(resume)
            shard.evaluation_lateness = evaluation_lateness_seconds
        if store is not None:
            shard.attach(store, shards.join_key)
        elif shard.needs_store():
            raise ValueError("this call directory keeps its calls in a segment store")
        return DirectoryLogic(shard)

    return build


EvaluationOutput = EvaluationEmission | EvaluationDimensionEmission | DeadLetter


class EvaluationWindowLogic(StatefulBatchLogic[list[Matched | Moved], EvaluationOutput, bytes]):
    """Drives one :class:`~dataflows.evaluations.EvaluationWindows`."""

    def __init__(self, shard: EvaluationWindows, clock: Callable[[], float] = time.time) -> None:
        self.shard = shard
        self.clock = clock
        self.working = WorkingClock(lambda: self.clock())

    def on_batch(self, values: list[list[Matched | Moved]]) -> tuple[Iterable[EvaluationOutput], bool]:
        now = self.working()
        out: list[EvaluationOutput] = []
        for matched in values:
            out.extend(self.shard.on_matched(matched, now))
        out.extend(self.shard.on_time(now))
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[Iterable[EvaluationOutput], bool]:
        return list(self.shard.on_time(self.working())), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return _wakeup(self.shard.next_wakeup(), self.working, self.clock)

    def snapshot(self) -> bytes:
        return _freeze(self.shard, "evaluation_windows")


def evaluation_window_builder(
    window_seconds: int,
    grace_seconds: int,
    lateness_seconds: int,
    evaluation_lateness_seconds: int,
    value_limit: int = DEFAULT_VALUES,
) -> Callable[[bytes | None], EvaluationWindowLogic]:
    """A builder for the evaluation windows' :func:`bytewax.operators.stateful_batch`, keeping
    ``value_limit`` values a window, key, name and dimension."""

    def build(resume: bytes | None) -> EvaluationWindowLogic:
        if resume is None:
            return EvaluationWindowLogic(
                EvaluationWindows(
                    window_seconds, grace_seconds, lateness_seconds, evaluation_lateness_seconds, value_limit
                )
            )
        shard = pickle.loads(resume)
        shard.value_limit = value_limit
        return EvaluationWindowLogic(shard)

    return build
