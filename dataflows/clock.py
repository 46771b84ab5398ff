"""Event time for one shard of state: the watermark.

The watermark is the largest event time the shard has seen. While no event
arrives it keeps advancing with the wall clock, so quiet windows still close
and timed-out requests still expire. It never goes back.

Only the event-time part is snapshotted, never a wall-clock instant: after a
restart the idle clock starts again from the moment of resume, so a crash's
downtime never jumps event time forward (replayed input then moves the
watermark exactly as it did the first time).
"""

from __future__ import annotations

import math


class Watermark:
    """Picklable; ``now`` is wall-clock Unix seconds, passed in so tests control it."""

    __slots__ = ("_quiet_since", "settled")

    def __init__(self) -> None:
        # Event time as of the last arrival (or resume): the newest timestamp seen,
        # or further if the clock had idled past it.
        self.settled: float = -math.inf
        self._quiet_since: float | None = None

    def observe(self, event_time: float, now: float) -> None:
        """An event arrived: event time is at least its timestamp; quiet time restarts."""
        # current(now), inlined: this runs twice per call (join and windows).
        settled = self.settled
        quiet_since = self._quiet_since
        if quiet_since is not None and now > quiet_since:
            settled += now - quiet_since
        self.settled = settled if settled >= event_time else event_time
        self._quiet_since = now

    def current(self, now: float) -> float:
        """Event time now: where it stood at the last arrival plus the wall-clock time since."""
        if self._quiet_since is None:
            # Nothing arrived since start or resume: idle time counts from here.
            self._quiet_since = now
        return self.settled + max(0.0, now - self._quiet_since)

    def __getstate__(self) -> float:
        return self.settled

    def __setstate__(self, state: float) -> None:
        self.settled = state
        self._quiet_since = None
