"""Shard keys: which shard of state a request id, or a window key, belongs to.

State is sharded by a stable hash (``zlib.crc32``; Python's ``hash()`` of a str
differs per process, so it could not route the same id to the same worker in every
process). One shard holds many request ids, or many ``(tenant_id, route, model)``
keys, in one object: Bytewax's per-key cost is paid per shard, not per id. Keys
are strings, as Bytewax wants them.
"""

from __future__ import annotations

import zlib

JOIN_SHARDS = 64
JOIN_SHARD_NAMES: tuple[str, ...] = tuple(str(n) for n in range(JOIN_SHARDS))
WINDOW_SHARDS = 64
WINDOW_SHARD_NAMES: tuple[str, ...] = tuple(str(n) for n in range(WINDOW_SHARDS))

WindowKey = tuple[str, str, str]  # tenant_id, route, model


def join_shard_number(request_id: str) -> int:
    return zlib.crc32(request_id.encode()) % JOIN_SHARDS


def join_shard_key(request_id: str) -> str:
    """The join shard of a request id."""
    return JOIN_SHARD_NAMES[join_shard_number(request_id)]


def window_shard_key(key: WindowKey) -> str:
    """The window shard of a ``(tenant_id, route, model)`` key."""
    tenant_id, route, model = key
    return WINDOW_SHARD_NAMES[zlib.crc32(f"{tenant_id}\x00{route}\x00{model}".encode()) % WINDOW_SHARDS]
