"""Shard keys: which shard of state a request id, or a window key, belongs to.

State is sharded by a stable hash (``zlib.crc32``; Python's ``hash()`` of a str
differs per process, so it could not route the same id to the same worker in every
process). One shard holds many request ids, or many ``(tenant_id, route, model)``
keys, in one object: Bytewax's per-key cost is paid per shard, not per id. Keys
are strings, as Bytewax wants them.

How many shards is a trade. Every shard cuts the batches a worker gets into
smaller pieces, and batches of a few hundred events lose what columns gain
(``bench_dataflow``: 64 shards on one process made 22-25k calls/s, 8 made
30-35k). But Bytewax places keys on workers by a hash of their name, so few keys
spread unevenly over several workers (8 keys on 2 workers: 6 and 2; 16: 10 and
6; 64: 33 and 27), and the busiest worker sets the pace: 16 shards on 2
processes ran the sustained benchmark with a join state 3.4 times as large and
RSS 840 MiB against 514 MiB with 64. Hence :func:`default_count`. The count is
fixed for the life of a recovery store: a request id must find its shard, and its
state, after a resume (``dataflows.run`` records it).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from operator import attrgetter
from typing import Any

WindowKey = tuple[str, str, str]  # tenant_id, route, model
# The window key of a request, read in C (it is read for every call, twice).
window_key_of: Callable[[Any], WindowKey] = attrgetter("tenant_id", "route", "model")

# A store made before the count was recorded used LEGACY_COUNT.
LEGACY_COUNT = 64
ONE_WORKER = 8
PER_WORKER = 32


class Shards:
    """``count`` join shards and as many window shards, named ``"0"`` … ``str(count - 1)``."""

    __slots__ = ("count", "names")

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"a shard count is at least 1, not {count}")
        self.count = count
        self.names: tuple[str, ...] = tuple(str(n) for n in range(count))

    def join_number(self, request_id: str) -> int:
        """The number of a request id's join shard."""
        return zlib.crc32(request_id.encode()) % self.count

    def join_key(self, request_id: str) -> str:
        """The join shard of a request id."""
        return self.names[self.join_number(request_id)]

    def window_key(self, key: WindowKey) -> str:
        """The window shard of a ``(tenant_id, route, model)`` key."""
        tenant_id, route, model = key
        return self.names[zlib.crc32(f"{tenant_id}\x00{route}\x00{model}".encode()) % self.count]

    def __repr__(self) -> str:
        return f"Shards({self.count})"


def default_count(workers: int) -> int:
    """The shard count for ``workers`` workers in all, when none is set: few for one
    worker, which holds them all; enough per worker that hashing spreads them evenly."""
    return ONE_WORKER if workers == 1 else max(LEGACY_COUNT, PER_WORKER * workers)


# One worker's shards: what a dataflow started without a count of its own uses.
DEFAULT = Shards(default_count(1))
