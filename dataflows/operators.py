"""The Bytewax side of the join and the windows: shard keys and the stateful logics.

State is sharded by a stable hash (``zlib.crc32``; Python's ``hash()`` of a str
differs per process, so it could not route the same id to the same worker in
every process). One shard holds many request ids, or many
``(tenant_id, route, model)`` keys, in one object: per-key overhead in Bytewax is
paid per shard, not per id.

Both logics ask to be woken at the shard's ``next_wakeup()``, so a quiet shard
still expires timeouts and closes windows as the wall clock advances event time.

With several processes, Bytewax pickles what crosses between them: raw records
into the join (see :mod:`dataflows.sources`) and calls into the windows. A call
pickles as one msgpack string (``Call.__reduce__``).
"""

from __future__ import annotations

import pickle
import time
import zlib
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from bytewax.operators import StatefulBatchLogic

from dataflows.clock import MAX_GAP, WorkingClock
from dataflows.join import Call, JoinShard, SourceRef
from dataflows.observability import BOARD, CALLS, SNAPSHOT_SECONDS
from dataflows.remembered import SegmentStore
from dataflows.sources import RawGroup, decode_record
from dataflows.windows import WindowRow, WindowShard
from schemas.deadletter import DeadLetter

WINDOW_SHARDS = 64
WINDOW_SHARD_NAMES: tuple[str, ...] = tuple(str(n) for n in range(WINDOW_SHARDS))

_new_tuple = tuple.__new__



def window_shard_key(call: Call) -> str:
    """The window shard of a call's ``(tenant_id, route, model)``."""
    request = call.request
    key = f"{request.tenant_id}\x00{request.route}\x00{request.model}"
    return WINDOW_SHARD_NAMES[zlib.crc32(key.encode()) % WINDOW_SHARDS]


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


class JoinLogic(StatefulBatchLogic[list[RawGroup], list[Call | DeadLetter], bytes]):
    """Drives one :class:`JoinShard`: groups of raw records in, one list of outputs out.

    Items are groups both ways (see :func:`dataflows.sources.decode_batches`): Bytewax
    then moves one item per shard and poll, not one per event. Records are decoded
    here, after they crossed to this shard's process; one that turns out invalid
    leaves as an ``invalid`` dead letter among the outputs.
    """

    def __init__(self, shard: JoinShard, clock: Callable[[], float] = time.time) -> None:
        self.shard = shard
        self.clock = clock  # the wall clock
        self.working = WorkingClock(lambda: self.clock())

    def on_batch(self, values: list[list[RawGroup]]
                 ) -> tuple[Iterable[list[Call | DeadLetter]], bool]:
        now = self.working()
        wall = self.clock()
        out: list[Call | DeadLetter] = []
        on_event = self.shard.on_event
        for groups in values:
            for topic, partition, records in groups:
                for offset, value in records:
                    event = decode_record(topic, partition, offset, value, wall)
                    if isinstance(event, DeadLetter):
                        out.append(event)
                        continue
                    # tuple.__new__ skips NamedTuple's Python-level __new__ (a third of a µs).
                    source = _new_tuple(SourceRef, (topic, partition, offset))
                    found = on_event(event, source, now)
                    if found:
                        out.extend(found)
        out.extend(self.shard.on_time(now))
        self._report()
        return ([out] if out else []), StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[Iterable[list[Call | DeadLetter]], bool]:
        out = self.shard.on_time(self.working())
        self._report()
        return ([out] if out else []), StatefulBatchLogic.RETAIN

    def _report(self) -> None:
        shard = self.shard
        BOARD.report_join(str(id(self)), shard.in_flight(), shard.remembered(),
                          shard.watermark.settled)

    def notify_at(self) -> datetime | None:
        return _wakeup(self.shard.next_wakeup(), self.working, self.clock)

    def snapshot(self) -> bytes:
        started = time.perf_counter()
        self.shard.seal()
        return _freeze(self.shard, "join", started)


def route_to_windows(price: Callable[[Call], Call]
                     ) -> Callable[[list[tuple[str, list[Call | DeadLetter]]]],
                                   list[DeadLetter | tuple[str, list[Call]]]]:
    """After the join: price each call and group the calls by window shard; dead letters pass.

    For :func:`bytewax.operators.flat_map_batch`: the outputs of every join shard at
    hand are regrouped together, so the windows get one item per window shard,
    not one per (join shard, window shard) pair (mostly a single call each).
    """

    def route(items: list[tuple[str, list[Call | DeadLetter]]]
              ) -> list[DeadLetter | tuple[str, list[Call]]]:
        out: list[DeadLetter | tuple[str, list[Call]]] = []
        groups: dict[str, list[Call]] = {}
        outcomes = {"answered": 0, "timed_out": 0, "replaced_timeout": 0}
        for _, outputs in items:
            for found in outputs:
                if not isinstance(found, Call):
                    out.append(found)
                    continue
                outcomes[_outcome(found)] += 1
                call = price(found)
                shard = window_shard_key(call)
                group = groups.get(shard)
                if group is None:
                    groups[shard] = group = []
                group.append(call)
        out.extend(groups.items())
        for outcome, count in outcomes.items():
            if count:
                CALLS.labels(outcome).inc(count)
        return out

    return route


def _outcome(call: Call) -> str:
    if call.response is None:
        return "timed_out"
    return "replaced_timeout" if call.replaces_timeout else "answered"


class WindowLogic(StatefulBatchLogic[list[Call], WindowRow | DeadLetter, bytes]):
    """Drives one :class:`WindowShard`: groups of priced calls in, rows and too-late calls out."""

    def __init__(self, shard: WindowShard, clock: Callable[[], float] = time.time) -> None:
        self.shard = shard
        self.clock = clock  # the wall clock
        self.working = WorkingClock(lambda: self.clock())

    def on_batch(self, values: list[list[Call]]
                 ) -> tuple[Iterable[WindowRow | DeadLetter], bool]:
        now = self.working()
        out: list[WindowRow | DeadLetter] = []
        on_call = self.shard.on_call
        for group in values:
            for call in group:
                late = on_call(call, now)
                if late:
                    out.extend(late)
        out.extend(self.shard.on_time(now))
        self._report()
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[Iterable[WindowRow | DeadLetter], bool]:
        rows = self.shard.on_time(self.working())
        self._report()
        return rows, StatefulBatchLogic.RETAIN

    def _report(self) -> None:
        BOARD.report_windows(str(id(self)), len(self.shard), self.shard.watermark.settled)

    def notify_at(self) -> datetime | None:
        return _wakeup(self.shard.next_wakeup(), self.working, self.clock)

    def snapshot(self) -> bytes:
        return _freeze(self.shard, "windows")


def join_builder(timeout_seconds: float, dedupe_seconds: float, window_seconds: int,
                 lateness_seconds: float, store: SegmentStore | None = None
                 ) -> Callable[[bytes | None], JoinLogic]:
    """A builder for :func:`bytewax.operators.stateful_batch`: a new shard, or the resumed
    one; with ``store``, where their remembered ids' segments are kept."""

    def build(resume: bytes | None) -> JoinLogic:
        if resume is None:
            shard = JoinShard(timeout_seconds, dedupe_seconds, window_seconds, lateness_seconds)
        else:
            shard = pickle.loads(resume)
        if store is not None:
            shard.attach(store)
        elif shard.needs_store():
            raise ValueError("this join state keeps its remembered ids in a segment store")
        return JoinLogic(shard)

    return build


def window_builder(window_seconds: int, grace_seconds: int, lateness_seconds: int
                   ) -> Callable[[bytes | None], WindowLogic]:
    """A builder for :func:`bytewax.operators.stateful_batch`: a new shard, or the resumed one."""

    def build(resume: bytes | None) -> WindowLogic:
        if resume is None:
            return WindowLogic(WindowShard(window_seconds, grace_seconds, lateness_seconds))
        return WindowLogic(pickle.loads(resume))

    return build
