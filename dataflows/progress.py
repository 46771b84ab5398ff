"""How far in event time each input partition has been read: no partition reads far ahead.

Event time in the join and the windows is the newest timestamp they have seen.
Reading a backlog in which one partition (or one whole topic) runs ahead of
another would close windows and time out requests whose other half is still
unread. So the partitions of a process read in step: a partition hands over a
record only while its timestamp is at most ``read_ahead`` seconds past where the
busy partition furthest behind stands; the rest of its poll waits in the
partition (its offset not yet counted as read) until the others catch up.

A partition counts as busy while it has delivered records within the last
``idle_after`` seconds of wall clock, or has never been polled long enough to
know; an idle partition (caught up, nothing arriving) holds nobody back. A
timestamp further ahead of the wall clock than the ingestion API allows is not
progress (such a record is an invalid dead letter).

This aligns the partitions one process reads; with several processes each
aligns its own.
"""

from __future__ import annotations

import math
import threading

Part = tuple[str, int]  # topic, partition

# Without records this long, a partition is caught up and holds nobody back.
IDLE_AFTER = 0.5


class _Partition:
    __slots__ = ("frontier", "last_records")

    def __init__(self, now: float) -> None:
        # The timestamp of the next record it would hand over when it holds one,
        # else the newest it handed over: what it holds others back with.
        self.frontier = -math.inf
        self.last_records = now


class ReadProgress:
    """Where each partition of this process stands in event time, and how far it may read."""

    def __init__(self, read_ahead: float, idle_after: float = IDLE_AFTER) -> None:
        self.read_ahead = read_ahead
        self.idle_after = idle_after
        self._parts: dict[Part, _Partition] = {}
        self._lock = threading.Lock()

    def register(self, part: Part, now: float) -> None:
        with self._lock:
            self._parts.setdefault(part, _Partition(now))

    def polled(self, part: Part, got_records: bool, now: float) -> None:
        """A poll of ``part`` returned records, or nothing (caught up, for now)."""
        if got_records:
            self._parts[part].last_records = now

    def stands_at(self, part: Part, frontier: float) -> None:
        """``part`` holds a record stamped ``frontier`` next, or handed over up to it."""
        self._parts[part].frontier = frontier

    def limit(self, part: Part, now: float) -> float:
        """The newest timestamp ``part`` may hand over now: ``read_ahead`` past the busy
        partition standing furthest behind (infinite when no other is busy).

        Partitions that hold records stand at their next record, not at what they
        handed over, so the one holding the earliest record can always go on.
        """
        idle_since = now - self.idle_after
        with self._lock:
            others = [state for key, state in self._parts.items() if key != part]
        behind = min((state.frontier for state in others if state.last_records > idle_since),
                     default=math.inf)
        return behind + self.read_ahead
