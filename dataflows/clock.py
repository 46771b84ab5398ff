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
from collections.abc import Callable


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


# Longer than this between two looks at the clock, the worker was not idle but
# stalled (a sink waiting out an outage, a long pause): the rest is not event time.
MAX_GAP = 5.0


class WorkingClock:
    """The wall clock less the time the worker was stalled, for :class:`Watermark`.

    Event time idles forward with the wall clock so that quiet windows close. A
    worker blocked for minutes (a sink waiting for Postgres to come back) would
    otherwise return to event time advanced by the whole outage and find the calls
    of every open window too late. The logics look at the clock at least every
    ``MAX_GAP / 2`` (they ask to be woken that often), so a longer gap is a stall,
    and only ``MAX_GAP`` of it counts.
    """

    __slots__ = ("_last", "_wall", "stalled")

    def __init__(self, wall: Callable[[], float]) -> None:
        self._wall = wall
        self._last: float | None = None
        self.stalled = 0.0

    def __call__(self) -> float:
        now = self._wall()
        last = self._last
        if last is not None and now - last > MAX_GAP:
            self.stalled += now - last - MAX_GAP
        self._last = now
        return now - self.stalled

    def wall_time(self, working: float) -> float:
        """The wall-clock instant at which this clock will read ``working``."""
        return working + self.stalled
