"""Ingestion quotas (docs/quotas.md): how many events a tenant may send, as a token bucket.

A tenant's bucket holds at most ``burst`` events (at least one) and fills at
``events_per_second``; each accepted event takes one. A rate of 0 means no limit.
The bucket a deployment shares lives in Postgres (``quota_buckets``, ``quota_lease``
in schemas/quotas.sql); each ingestion process takes events from it in small leases
(:func:`lease_size`), so that it asks Postgres a few times a second at most, and the
leases held unused by all processes together are a small part of a second's rate.

Pure rules: no Postgres here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

# A process leases this share of a second's rate at a time (at least one event).
LEASE_SECONDS = 0.05


class Limits(NamedTuple):
    """A tenant's limits: events a second and how many may come at once; rate 0 is none."""

    events_per_second: float
    burst: int

    @property
    def limited(self) -> bool:
        return self.events_per_second > 0

    @property
    def capacity(self) -> float:
        """What the bucket holds when full: the burst, and never less than one event."""
        return float(max(self.burst, 1))


def lease_size(limits: Limits, need: float) -> float:
    """How many events a process asks for when it needs ``need`` more: a twentieth of a
    second's rate, but what the request needs if that is more."""
    return max(need, limits.events_per_second * LEASE_SECONDS, 1.0)


def retry_after(short: float, limits: Limits) -> int:
    """Whole seconds until the bucket holds ``short`` more events (at least 1)."""
    return max(1, math.ceil(short / limits.events_per_second))


class LocalBucket:
    """A token bucket of this process alone: what a process goes on with while the shared
    one cannot be reached (the last known limits, per process)."""

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.tokens = limits.capacity
        self.at = now

    def take(self, count: int, now: float) -> float:
        """Take ``count`` events if the bucket holds them: 0.0; else how many it is short."""
        limits = self.limits
        self.tokens = min(limits.capacity, self.tokens + limits.events_per_second * max(0.0, now - self.at))
        self.at = now
        if self.tokens >= count:
            self.tokens -= count
            return 0.0
        return count - self.tokens
