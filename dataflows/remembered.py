"""Counted request ids, remembered so that repeats are ignored: about 20 bytes each.

The join remembers every counted ``request_id`` for ``DEDUPE_SECONDS`` (an hour by
default), with the event time until which it is remembered and the request's
tenant. At a steady 5,000 calls/s that is 18 million ids: as a dict of strings
(several hundred bytes an entry) it would not fit in memory, and every snapshot
would pickle all of it.

So ids counted recently stay in a small dict, and every ``SEAL_SECONDS`` of event
time (or every ``SEAL_AT`` ids) they are sealed into three sorted arrays: a 64-bit
digest of the id (BLAKE2b, keyed by a random key of the shard's own, so nobody
can aim at a collision), the expiry (float64 Unix seconds, exact) and the tenant
(an index into the shard's list of tenants). An expired id counts as forgotten at
once and leaves the arrays at the next seal. Arrays pickle as single buffers.

Two different ids share a digest with odds of about n / 2^64 for each new id
against n remembered ones: with 18 million remembered ids, one in a trillion
calls; the cost of one would be a new call taken for a repeat and not counted.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

# Seal what was counted this long ago (event time), or once this many are waiting.
SEAL_SECONDS = 60.0
SEAL_AT = 50_000


class Remembered:
    """``request_id`` → (event time until which it is remembered, tenant)."""

    def __init__(self) -> None:
        self._key = os.urandom(16)
        self._recent: dict[str, tuple[float, str]] = {}
        self._digests = np.empty(0, dtype=np.int64)
        self._expiry = np.empty(0, dtype=np.float64)
        self._tenant = np.empty(0, dtype=np.uint32)
        self._tenants: list[str] = []
        self._tenant_index: dict[str, int] = {}
        self._next_seal: float | None = None

    def _digest(self, rid: str) -> int:
        return int.from_bytes(hashlib.blake2b(rid.encode(), digest_size=8, key=self._key).digest(),
                              "little", signed=True)

    def get(self, rid: str, watermark: float) -> tuple[float, str] | None:
        """The id's expiry and tenant while it is remembered at ``watermark``; None after."""
        found = self._recent.get(rid)
        if found is None:
            digests = self._digests
            if not len(digests):
                return None
            digest = self._digest(rid)
            index = int(digests.searchsorted(digest))
            if index == len(digests) or digests[index] != digest:
                return None
            found = (float(self._expiry[index]), self._tenants[int(self._tenant[index])])
        return found if found[0] >= watermark else None

    def add(self, rid: str, expiry: float, tenant: str) -> None:
        self._recent[rid] = (expiry, tenant)

    def maintain(self, watermark: float) -> None:
        """Seal the recent ids when due, dropping every expired one."""
        due = self._next_seal
        if due is not None and watermark < due and len(self._recent) < SEAL_AT:
            return
        self._next_seal = watermark + SEAL_SECONDS
        keep = self._expiry >= watermark
        recent = [(rid, value) for rid, value in self._recent.items() if value[0] >= watermark]
        index = self._tenant_index
        tenants = [index.get(tenant) for _, (_, tenant) in recent]
        for position, (_, (_, tenant)) in enumerate(recent):
            if tenants[position] is None:
                tenants[position] = index[tenant] = len(self._tenants)
                self._tenants.append(tenant)
        digests = np.concatenate([self._digests[keep],
                                  np.fromiter((self._digest(rid) for rid, _ in recent), np.int64,
                                              len(recent))])
        expiry = np.concatenate([self._expiry[keep],
                                 np.fromiter((value[0] for _, value in recent), np.float64, len(recent))])
        tenant = np.concatenate([self._tenant[keep], np.array(tenants, dtype=np.uint32)])
        order = np.argsort(digests, kind="stable")
        self._digests, self._expiry, self._tenant = digests[order], expiry[order], tenant[order]
        self._recent = {}

    def __len__(self) -> int:
        return len(self._recent) + len(self._digests)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Remembered):
            return NotImplemented
        return (
            (self._key, self._recent, self._tenants, self._next_seal)
            == (other._key, other._recent, other._tenants, other._next_seal)
            and all(np.array_equal(a, b) for a, b in ((self._digests, other._digests),
                                                       (self._expiry, other._expiry),
                                                       (self._tenant, other._tenant)))
        )

