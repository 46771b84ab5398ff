"""The join: a request and its response become one call, whichever arrives first.

INTERFACE CONTRACT (bodies to be written): :class:`JoinShard` holds the join
state of one shard of ``request_id`` values and is driven by the Bytewax wiring
in :mod:`dataflows.metrics`. It must pickle (it is Bytewax state).
"""

from __future__ import annotations

from typing import NamedTuple

from msgspec import Struct

from schemas.deadletter import DeadLetter
from schemas.events import LLMRequest, LLMResponse


class SourceRef(NamedTuple):
    """Where a record came from, for the dead-letter topic."""

    topic: str
    partition: int
    offset: int


class Call(Struct, kw_only=True):
    """A counted call: answered (``response`` set) or timed out (``response`` is None)."""

    request: LLMRequest
    response: LLMResponse | None
    # The record that completed the call (the later of the two, or the request on
    # timeout): a call that turns out too late is dead-lettered with it.
    source: SourceRef
    # USD, set by pricing between the join and the windows. None on an answered
    # call means its model has no known price (counted in unpriced_requests).
    cost_usd: float | None = None


class JoinShard:
    """Join state for one shard of request_ids.

    ``now`` is wall-clock Unix seconds. Event time comes from a
    :class:`dataflows.clock.Watermark` kept in this state.
    """

    def __init__(self, timeout_seconds: float, dedupe_seconds: float) -> None:
        raise NotImplementedError

    def on_event(
        self, event: LLMRequest | LLMResponse, source: SourceRef, now: float
    ) -> list[Call | DeadLetter]:
        """Add one decoded event; return the calls it completes (and nothing else)."""
        raise NotImplementedError

    def on_time(self, now: float) -> list[Call | DeadLetter]:
        """Expire what the watermark has passed: timed-out calls, orphan responses
        (dead letters with reason ``orphan_response``), forgotten dedupe entries."""
        raise NotImplementedError

    def next_wakeup(self) -> float | None:
        """Wall-clock Unix seconds at which ``on_time`` may have work; None when empty."""
        raise NotImplementedError
