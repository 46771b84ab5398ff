"""The Bytewax side of the join and the windows: shard keys and the stateful logics.

State is sharded by a stable hash (``zlib.crc32``; Python's ``hash()`` of a str
differs per process, so it could not route the same id to the same worker in
every process). One shard holds many request ids, or many
``(tenant_id, route, model)`` keys, in one object: per-key overhead in Bytewax is
paid per shard, not per id.

Both logics ask to be woken at the shard's ``next_wakeup()``, so a quiet shard
still expires timeouts and closes windows as the wall clock advances event time.
"""

from __future__ import annotations

import pickle
import time
import zlib
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from bytewax.operators import StatefulBatchLogic

from dataflows.join import Call, JoinShard, SourceRef
from dataflows.windows import WindowRow, WindowShard
from schemas.deadletter import DeadLetter
from schemas.events import LLMRequest, LLMResponse

JOIN_SHARDS = 64
WINDOW_SHARDS = 64


def join_shard_key(request_id: str) -> str:
    """The join shard of a request id (a str: Bytewax keys are strings)."""
    return str(zlib.crc32(request_id.encode()) % JOIN_SHARDS)


def window_shard_key(call: Call) -> str:
    """The window shard of a call's ``(tenant_id, route, model)``."""
    request = call.request
    key = f"{request.tenant_id}\x00{request.route}\x00{request.model}"
    return str(zlib.crc32(key.encode()) % WINDOW_SHARDS)


def _wakeup(seconds: float | None) -> datetime | None:
    # Bytewax compares notification times against the system clock in UTC.
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def _freeze(state: object) -> bytes:
    # Bytewax wants an immutable snapshot; the shard keeps changing after this call.
    return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)


class JoinLogic(StatefulBatchLogic[
    tuple[LLMRequest | LLMResponse, SourceRef], Call | DeadLetter, bytes
]):
    """Drives one :class:`JoinShard`: events in, calls and orphan responses out."""

    def __init__(self, shard: JoinShard, clock: Callable[[], float] = time.time) -> None:
        self.shard = shard
        self.clock = clock

    def on_batch(
        self, values: list[tuple[LLMRequest | LLMResponse, SourceRef]]
    ) -> tuple[Iterable[Call | DeadLetter], bool]:
        now = self.clock()
        out: list[Call | DeadLetter] = []
        on_event = self.shard.on_event
        for event, source in values:
            out.extend(on_event(event, source, now))
        out.extend(self.shard.on_time(now))
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[Iterable[Call | DeadLetter], bool]:
        return self.shard.on_time(self.clock()), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return _wakeup(self.shard.next_wakeup())

    def snapshot(self) -> bytes:
        return _freeze(self.shard)


class WindowLogic(StatefulBatchLogic[Call, WindowRow | DeadLetter, bytes]):
    """Drives one :class:`WindowShard`: priced calls in, rows and too-late calls out."""

    def __init__(self, shard: WindowShard, clock: Callable[[], float] = time.time) -> None:
        self.shard = shard
        self.clock = clock

    def on_batch(self, values: list[Call]) -> tuple[Iterable[WindowRow | DeadLetter], bool]:
        now = self.clock()
        out: list[WindowRow | DeadLetter] = []
        on_call = self.shard.on_call
        for call in values:
            out.extend(on_call(call, now))
        out.extend(self.shard.on_time(now))
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[Iterable[WindowRow | DeadLetter], bool]:
        return self.shard.on_time(self.clock()), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return _wakeup(self.shard.next_wakeup())

    def snapshot(self) -> bytes:
        return _freeze(self.shard)


def join_builder(timeout_seconds: float, dedupe_seconds: float
                 ) -> Callable[[bytes | None], JoinLogic]:
    """A builder for :func:`bytewax.operators.stateful_batch`: a new shard, or the resumed one."""

    def build(resume: bytes | None) -> JoinLogic:
        if resume is None:
            return JoinLogic(JoinShard(timeout_seconds, dedupe_seconds))
        return JoinLogic(pickle.loads(resume))

    return build


def window_builder(window_seconds: int, grace_seconds: int, lateness_seconds: int
                   ) -> Callable[[bytes | None], WindowLogic]:
    """A builder for :func:`bytewax.operators.stateful_batch`: a new shard, or the resumed one."""

    def build(resume: bytes | None) -> WindowLogic:
        if resume is None:
            return WindowLogic(WindowShard(window_seconds, grace_seconds, lateness_seconds))
        return WindowLogic(pickle.loads(resume))

    return build
