"""Tumbling event-time windows by request time, per ``(tenant_id, route, model)``.

INTERFACE CONTRACT (bodies to be written): :class:`WindowShard` holds the open
and recently emitted windows of many keys and is driven by the Bytewax wiring in
:mod:`dataflows.metrics`. It must pickle (it is Bytewax state).
"""

from __future__ import annotations

from msgspec import Struct

from dataflows.join import Call
from schemas.deadletter import DeadLetter
from schemas.metrics import MetricsRow


class WindowRow(Struct, kw_only=True):
    """One emission of one window: the row, plus what Postgres keeps beside it."""

    row: MetricsRow
    digest: bytes  # the latency t-digest, serialized, for merging windows later
    ttft_count: int  # answered calls that reported time_to_first_token_ms


class WindowShard:
    def __init__(self, window_seconds: int, grace_seconds: int, lateness_seconds: int) -> None:
        raise NotImplementedError

    def on_call(self, call: Call, now: float) -> list[DeadLetter]:
        """Fold one priced call into its window; a call beyond lateness comes back as a
        dead letter with reason ``too_late``."""
        raise NotImplementedError

    def on_time(self, now: float) -> list[WindowRow]:
        """Rows due now: windows whose end + grace the watermark passed (revision 1), and
        emitted windows that received calls since (revision + 1 per call received).
        Forgets windows past end + lateness."""
        raise NotImplementedError

    def next_wakeup(self) -> float | None:
        """Wall-clock Unix seconds at which ``on_time`` may have work; None when empty."""
        raise NotImplementedError
