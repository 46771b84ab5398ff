"""How far in event time each input partition has been read: no partition reads far ahead.

Event time in the join and the windows is the newest timestamp they have seen.
Reading a backlog in which one partition (or one whole topic) runs ahead of
another would close windows and time out requests whose other half is still
unread. So the partitions of a process read in step: a partition hands over a
record only while its timestamp is at most ``read_ahead`` seconds past where the
busy partition furthest behind stands; the rest of its poll waits in the
partition (its offset not yet counted as read) until the others catch up.

A partition that delivers nothing for a while is idle (caught up, nothing
arriving) and holds nobody back. How long "a while" is depends on what it last
delivered: records appended to Kafka just now mean it was reading live traffic,
so an empty poll means it caught up (``IDLE_AFTER``); records appended long ago
(a backlog), or none yet since the start, mean an empty poll is more likely a
fetch still on its way, so it must stay empty for ``BACKLOG_IDLE_AFTER`` — unless
the consumer says it has reached the end of the partition (:meth:`ReadProgress.reached_end`):
then nothing is on its way, and it is idle at once. That is what an empty
partition says on its first fetch (an empty ``llm.evaluations``, say), which
would otherwise hold every other partition back for ``BACKLOG_IDLE_AFTER`` at
each start. A timestamp further ahead of the wall clock than the ingestion API
allows is not progress (such a record is an invalid dead letter).

This aligns the partitions one process reads; with several processes each
aligns its own.
"""

from __future__ import annotations

import math
import threading

Part = tuple[str, int]  # topic, partition

# Without records this long, a partition reading live traffic is caught up ...
IDLE_AFTER = 0.5
# ... and one reading a backlog (or not read yet) this long.
BACKLOG_IDLE_AFTER = 2.0
# Records appended to the topic longer ago than this make a backlog.
BACKLOG_AGE = 2.0


class _Partition:
    __slots__ = ("frontier", "idle_from", "live")

    def __init__(self, now: float, backlog_idle_after: float) -> None:
        # The timestamp of the next record it would hand over when it holds one,
        # else the newest it handed over: what it holds others back with.
        self.frontier = -math.inf
        # From when on it counts as idle unless it delivers records again.
        self.idle_from = now + backlog_idle_after
        # Whether its last records were appended just now (live traffic).
        self.live = False


class ReadProgress:
    """Where each partition of this process stands in event time, and how far it may read."""

    def __init__(
        self,
        read_ahead: float,
        idle_after: float = IDLE_AFTER,
        backlog_idle_after: float = BACKLOG_IDLE_AFTER,
    ) -> None:
        self.read_ahead = read_ahead
        self.idle_after = idle_after
        self.backlog_idle_after = backlog_idle_after
        self._parts: dict[Part, _Partition] = {}
        self._lock = threading.Lock()

    def register(self, part: Part, now: float) -> None:
        with self._lock:
            self._parts.setdefault(part, _Partition(now, self.backlog_idle_after))

    def polled(self, part: Part, appended: float | None, now: float) -> None:
        """A poll of ``part`` returned records, the last appended to Kafka at wall-clock
        ``appended``, or nothing (None)."""
        if appended is not None:
            state = self._parts[part]
            state.live = now - appended <= BACKLOG_AGE
            state.idle_from = now + (self.idle_after if state.live else self.backlog_idle_after)

    def reached_end(self, part: Part, now: float) -> None:
        """``part``'s consumer reached the end of the partition, and ``part`` has handed over
        every record it read: unless it was reading live traffic (whose next records may be
        appended any moment, and keep ``IDLE_AFTER``), no fetch is on its way and it is idle now."""
        state = self._parts[part]
        if not state.live:
            state.idle_from = min(state.idle_from, now)

    def stands_at(self, part: Part, frontier: float) -> None:
        """``part`` holds a record stamped ``frontier`` next, or handed over up to it."""
        self._parts[part].frontier = frontier

    def limit(self, part: Part, now: float) -> float:
        """The newest timestamp ``part`` may hand over now: ``read_ahead`` past the busy
        partition standing furthest behind (infinite when no other is busy).

        Partitions that hold records stand at their next record, not at what they
        handed over, so the one holding the earliest record can always go on.
        """
        with self._lock:
            others = [state for key, state in self._parts.items() if key != part]
        behind = min((state.frontier for state in others if state.idle_from > now), default=math.inf)
        return behind + self.read_ahead
