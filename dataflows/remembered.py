"""Counted request ids, remembered so that repeats are ignored: about 35 bytes each.

The join remembers every counted ``request_id`` for ``DEDUPE_SECONDS`` (an hour by
default), with the event time until which it is remembered and the request's
tenant. At a steady 5,000 calls/s that is 18 million ids: as a dict of strings
(several hundred bytes an entry) it would not fit in memory, and every snapshot
would pickle all of it.

So ids counted recently stay in a small dict, and at every snapshot, every
``SEAL_SECONDS`` of event time and once ``SEAL_AT`` are waiting, they are sealed
into a *segment*: three sorted arrays of a 64-bit digest of each id (BLAKE2b,
keyed by a random key of the shard's own, so nobody can aim at a collision), its
expiry (float64 Unix seconds, exact) and its tenant. Lookups search two merged
sets of arrays, a small one that every seal merges into and a large one that the
small one joins when it reaches a quarter of its size: a sorted merge of two runs
is linear, so each id is copied a few times in all, and a lookup is two binary
searches.

With a :class:`SegmentStore` attached (Postgres, in the dataflow), each segment
is written once, when sealed, and a snapshot holds only the ids counted since
the last seal and the numbers of the live segments: what a snapshot pickles grows
with what changed since the last one, not with what is remembered. A resumed shard
reads its segments back. Segments are numbered per shard; one is deleted from
the store three snapshots after every id in it expired (the resume epoch is the
last one all workers completed, never older), and on resume those the restored
state does not know (written after its snapshot) are deleted. Without a store
(unit tests) the arrays are pickled with the rest.

An expired id counts as forgotten at once, and leaves the arrays at a seal once
the expired are an eighth of them (copying the arrays for a few would cost a
copy of everything remembered at every seal). Two different ids share a digest with odds of about n / 2^64 for
each new id against n remembered ones: with 18 million remembered ids, one in a
trillion calls; the cost of one would be a new call taken for a repeat and not
counted.
"""

from __future__ import annotations

import hashlib
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable
from operator import itemgetter
from typing import NamedTuple, Protocol

import numpy as np
from numpy.typing import NDArray

# Seal what was counted this long ago (event time), or once this many are waiting.
# Snapshots seal too, every epoch: in a backlog, where minutes of event time pass in
# an epoch, this keeps the writes to the store to about one a shard and epoch.
SEAL_SECONDS = 300.0
SEAL_AT = 50_000
# The small arrays join the large ones beyond this share of their size (or count).
MERGE_SHARE = 4
MERGE_AT_LEAST = 4_096
# A seal copies a part without its expired ids once they are this share of it (1/8);
# until then they stay, answered as forgotten.
DROP_SHARE = 8
# A segment whose ids all expired is deleted from the store this many snapshots later.
KEEP_SNAPSHOTS = 3
# The list of tenants is rebuilt with only those the arrays still name once it is twice
# as long as when last rebuilt, and this long at least: a call directory's "tenants"
# are keys with their dimension values, and values such as users keep coming.
COMPACT_TENANTS_AT = 4_096


_first, _second = itemgetter(0), itemgetter(1)


class Segment(NamedTuple):
    """Ids sealed together, sorted by digest; ``tenant`` indexes ``tenants``."""

    digests: NDArray[np.int64]
    expiry: NDArray[np.float64]
    tenant: NDArray[np.uint32]
    tenants: list[str]

    @classmethod
    def empty(cls) -> Segment:
        return cls(np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.uint32), [])

    def until(self) -> float:
        """The latest expiry in it: after this event time it holds nothing."""
        return float(self.expiry.max()) if len(self.expiry) else float("-inf")


class SegmentStore(Protocol):
    """Where sealed segments live outside the snapshots (:mod:`dataflows.segments`)."""

    def save(self, shard: str, number: int, segment: Segment) -> bool:
        """Write segment ``number`` of ``shard`` durably (number 0 starts the shard
        afresh); False when it could not be written."""

    def load(self, shard: str, low: int, high: int) -> list[Segment]:
        """Segments ``low`` ≤ n < ``high`` of ``shard``; raises when one is missing."""

    def forget(self, shard: str, below: int, from_: int | None = None) -> bool:
        """Delete the shard's segments numbered below ``below`` (and from ``from_`` on);
        False when they could not be deleted (a later call deletes them)."""


class Remembered:
    """``request_id`` → (event time until which it is remembered, tenant)."""

    def __init__(self) -> None:
        self._key = os.urandom(16)
        self._keyed: hashlib.blake2b | None = None  # keyed with it; not pickled
        self._recent: dict[str, tuple[float, str]] = {}
        self._small = Segment.empty()
        self._large = Segment.empty()
        self._views: list[_Views] = []  # of the non-empty ones of the two, for lookups
        self._tenants: list[str] = []  # what the arrays' tenant indexes name
        self._tenant_index: dict[str, int] = {}
        self._tenants_kept = 0  # how many the last rebuild of the list kept
        self._next_seal: float | None = None
        # Segments in the store: numbers low ≤ n < high, with the latest expiry of each.
        self._name: str | None = None
        self._low = 0
        self._high = 0
        self._untils: list[float] = []
        self._lows: list[int] = []  # self._low at the last snapshots, oldest first
        self._store: SegmentStore | None = None
        self._shard_of: Callable[[str], str] | None = None  # the shard name of an id
        # Restored from a snapshot that left the arrays in the store: empty until attached.
        self._stored = False

    # -- lookups ----------------------------------------------------------------

    def _hash(self) -> hashlib.blake2b:
        """The hash keyed with the shard's key, to copy: a third cheaper than keying a new
        hash each time."""
        keyed = self._keyed
        if keyed is None:
            self._keyed = keyed = hashlib.blake2b(digest_size=8, key=self._key)
        return keyed

    def _digest(self, rid: str) -> int:
        hasher = self._hash().copy()
        hasher.update(rid.encode())
        return int.from_bytes(hasher.digest(), "little", signed=True)

    def _digests(self, rids: Iterable[str]) -> NDArray[np.int64]:
        """:meth:`_digest` of each of ``rids``, as one array: the digests' bytes joined and
        read as little-endian integers, not one int each."""
        copy = self._hash().copy
        parts: list[bytes] = []
        append = parts.append
        for rid in rids:
            hasher = copy()
            hasher.update(rid.encode())
            append(hasher.digest())
        return np.frombuffer(b"".join(parts), dtype="<i8").astype(np.int64)

    def get(self, rid: str, watermark: float) -> tuple[float, str] | None:
        """The id's expiry and tenant while it is remembered at ``watermark``; None after."""
        found = self._recent.get(rid)
        if found is None:
            views = self._views
            if not views:
                return None
            digest = self._digest(rid)
            for part in views:
                found = _find(part, digest, self._tenants)
                if found is not None:
                    break
            else:
                return None
        return found if found[0] >= watermark else None

    def recent(self) -> dict[str, tuple[float, str]]:
        """The ids counted since the last seal (the very dict :meth:`add` adds to)."""
        return self._recent

    def sealed_among(self, rids: list[str]) -> set[str]:
        """Those of ``rids`` whose digest the sealed arrays hold, expired or not: besides
        :meth:`recent`, the only ids :meth:`get` can find. One vectorised search for a
        batch of ids, where :meth:`get` pays two binary searches an id."""
        parts = [part for part in (self._small, self._large) if len(part.digests)]
        if not parts or not rids:
            return set()
        digests = self._digests(rids)
        hit = np.zeros(len(rids), bool)
        for part in parts:
            index = np.searchsorted(part.digests, digests)
            index[index == len(part.digests)] = 0
            hit |= part.digests[index] == digests
        return {rids[i] for i in np.flatnonzero(hit).tolist()}

    def add(self, rid: str, expiry: float, tenant: str) -> None:
        self._recent[rid] = (expiry, tenant)

    # -- sealing ------------------------------------------------------------------

    def maintain(self, watermark: float) -> None:
        """Seal the recent ids when due."""
        due = self._next_seal
        if due is not None and watermark < due and len(self._recent) < SEAL_AT:
            return
        self.seal(watermark)

    def seal(self, watermark: float, *, snapshot: bool = False) -> None:
        """Seal the recent ids that have not expired into a segment (written to the
        store, when one is attached) and merge it into the lookup arrays.

        ``snapshot``: called for a snapshot, which then holds no recent id, and
        counts towards deleting the segments that expired. When the store cannot
        be written the recent ids stay as they are, and are snapshotted.
        """
        self._next_seal = watermark + SEAL_SECONDS
        segment = self._segment(self._recent, watermark)
        if len(segment.digests):
            if self._store is not None:
                if self._name is None:
                    # The join shard every id of this state is routed to: the segments' name.
                    assert self._shard_of is not None
                    self._name = self._shard_of(next(iter(self._recent)))
                if not self._store.save(self._name, self._high, _local(segment, self._tenants)):
                    return  # kept as recent ids, in the snapshot, until a seal can write them
                self._untils.append(segment.until())
                self._high += 1
            self._small = merge_sorted(self._small, segment)
        self._recent = {}
        # Nothing stays past its expiry beyond a seal: a pass over the expiries, and a
        # copy of the arrays only when some expired.
        self._small = _drop_expired(self._small, watermark)
        self._large = _drop_expired(self._large, watermark)
        if len(self._small.digests) > max(len(self._large.digests) // MERGE_SHARE, MERGE_AT_LEAST):
            self._large = merge_sorted(self._large, self._small)
            self._small = Segment.empty()
        if len(self._tenants) > max(COMPACT_TENANTS_AT, 2 * self._tenants_kept):
            self._compact_tenants()
        self._look_up()
        while self._untils and self._untils[0] < watermark:
            self._untils.pop(0)
            self._low += 1
        if snapshot and self._store is not None and self._name is not None:
            self._lows.append(self._low)
            if len(self._lows) > KEEP_SNAPSHOTS:
                below = self._lows.pop(0)
                if below > 0:
                    self._store.forget(self._name, below)

    def _compact_tenants(self) -> None:
        """Keep only the tenants the arrays name, renumbered (recent ids hold their own)."""
        small, large = self._small, self._large
        used = np.unique(np.concatenate([small.tenant, large.tenant]))
        tenants = [self._tenants[i] for i in used.tolist()]
        renumbered = np.zeros(len(self._tenants), np.uint32)
        renumbered[used] = np.arange(len(used), dtype=np.uint32)
        self._tenants, self._tenant_index = tenants, {tenant: i for i, tenant in enumerate(tenants)}
        self._tenants_kept = len(tenants)
        self._small = Segment(small.digests, small.expiry, renumbered[small.tenant], tenants)
        self._large = Segment(large.digests, large.expiry, renumbered[large.tenant], tenants)

    def _look_up(self) -> None:
        """Lookups from now on search the arrays as they are."""
        self._views = [_views(part) for part in (self._small, self._large) if len(part.digests)]

    def _tenant_number(self, tenant: str) -> int:
        """The index of ``tenant`` in the arrays' list of tenants, added when new."""
        found = self._tenant_index.get(tenant)
        if found is None:
            found = self._tenant_index[tenant] = len(self._tenants)
            self._tenants.append(tenant)
        return found

    def _segment(self, recent: dict[str, tuple[float, str]], watermark: float) -> Segment:
        """The ``recent`` ids not expired at ``watermark``, sealed (sorted by digest).

        Columns first, with C-level ``map``s: at every snapshot this runs for each id
        counted since the last one, twice a call (the join and the call directory), and
        a Python step per id here was a tenth of the processor's time in a sustained run.
        """
        rids = list(recent)
        values = list(recent.values())
        expiry = np.fromiter(map(_first, values), np.float64, len(values))
        tenants = list(map(_second, values))
        live = expiry >= watermark
        if not live.all():
            kept = np.flatnonzero(live).tolist()
            rids = [rids[i] for i in kept]
            tenants = [tenants[i] for i in kept]
            expiry = expiry[live]
        # Each distinct tenant numbered once, in the order first seen (as one by one).
        numbers = dict.fromkeys(tenants, 0)
        for tenant in numbers:
            numbers[tenant] = self._tenant_number(tenant)
        tenant = np.fromiter(map(numbers.__getitem__, tenants), np.uint32, len(tenants))
        digests = self._digests(rids)
        order = np.argsort(digests, kind="stable")
        return Segment(digests[order], expiry[order], tenant[order], self._tenants)

    # -- the store ----------------------------------------------------------------

    def attach(self, store: SegmentStore, shard_of: Callable[[str], str]) -> None:
        """Keep segments in ``store`` from now on, named by ``shard_of`` an id; a restored
        state reads its own back and deletes those it does not know (written after its
        snapshot)."""
        if self._store is not None:
            return
        self._shard_of = shard_of
        if not self._stored and (len(self._small.digests) or len(self._large.digests)):
            raise ValueError("a store is attached before the first seal or on resume, not later")
        self._store = store
        if not self._stored or self._name is None:
            self._stored = False
            return
        loaded = Segment.empty()
        for segment in store.load(self._name, self._low, self._high):
            loaded = merge_sorted(loaded, self._adopt(segment))
        self._small, self._large = Segment.empty(), loaded
        self._look_up()
        self._stored = False
        store.forget(self._name, self._low, self._high)

    def needs_store(self) -> bool:
        """Restored from a snapshot whose arrays are in a store not attached yet."""
        return self._stored

    def _adopt(self, segment: Segment) -> Segment:
        """A segment read back, its tenant indexes made this shard's."""
        mapping = np.fromiter(
            (self._tenant_number(tenant) for tenant in segment.tenants), np.uint32, len(segment.tenants)
        )
        return Segment(segment.digests, segment.expiry, mapping[segment.tenant], self._tenants)

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_lows"] = list(self._lows)
        if self._store is not None:
            # The arrays are in the store: the state names their segments only.
            del state["_small"], state["_large"], state["_tenants"], state["_tenant_index"]
            state["_stored"] = True
        state["_store"] = None
        state["_shard_of"] = None
        state["_keyed"] = None
        del state["_views"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        state.setdefault("_tenants_kept", 0)  # snapshots made before it
        self.__dict__.update(state)
        self._shard_of = None  # set again by attach()
        if self._stored:
            self._small, self._large = Segment.empty(), Segment.empty()
            self._tenants, self._tenant_index = [], {}
        self._look_up()

    # -- inspection ---------------------------------------------------------------

    def __len__(self) -> int:
        """Ids held: the recent ones, and those in the arrays (an expired one leaves
        them at the next seal)."""
        return len(self._recent) + len(self._small.digests) + len(self._large.digests)

    def segments(self) -> int:
        """Segments in the store that the state refers to."""
        return self._high - self._low

    def answers(self) -> dict[int, tuple[float, str]]:
        """Every id held in the arrays as digest → (expiry, tenant): for comparing states."""
        out: dict[int, tuple[float, str]] = {}
        for part in (self._large, self._small):
            for digest, expiry, tenant in zip(
                part.digests.tolist(), part.expiry.tolist(), part.tenant.tolist(), strict=True
            ):
                out[digest] = (expiry, self._tenants[tenant])
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Remembered):
            return NotImplemented
        return (self._key, self._recent, self._next_seal, self._low, self._high) == (
            other._key,
            other._recent,
            other._next_seal,
            other._low,
            other._high,
        ) and self.answers() == other.answers()


_Views = tuple[memoryview, memoryview, memoryview]


def _views(part: Segment) -> _Views:
    return part.digests.data, part.expiry.data, part.tenant.data


def _find(views: _Views, digest: int, tenants: list[str]) -> tuple[float, str] | None:
    # bisect over memoryviews kept beside the arrays: half the cost of a lookup with
    # numpy's searchsorted and scalars, which pay for array machinery on every call.
    digests, expiry, tenant = views
    index = bisect_left(digests, digest)
    if index == len(digests) or digests[index] != digest:
        return None
    return expiry[index], tenants[tenant[index]]


def merge_sorted(first: Segment, second: Segment) -> Segment:
    """Both segments as one, sorted, ``first``'s ids before equal ones of ``second`` (their
    tenant indexes index the same list)."""
    if not len(first.digests):
        return second
    if not len(second.digests):
        return first
    digests = np.concatenate([first.digests, second.digests])
    # Stable sort of two sorted runs: timsort merges them in linear time. (Placing the
    # second's ids by binary search instead was slower: 1.2 s against 0.8 s for 12.5 M.)
    order = np.argsort(digests, kind="stable")
    return Segment(
        digests[order],
        np.concatenate([first.expiry, second.expiry])[order],
        np.concatenate([first.tenant, second.tenant])[order],
        first.tenants,
    )


def _drop_expired(part: Segment, watermark: float) -> Segment:
    """The part without its expired ids, once they are 1/DROP_SHARE of it: a copy at every
    seal that found a few expired would copy everything remembered, again and again."""
    expired = part.expiry < watermark
    count = int(np.count_nonzero(expired))
    if not count or count * DROP_SHARE < len(expired):
        return part
    keep = ~expired
    return Segment(part.digests[keep], part.expiry[keep], part.tenant[keep], part.tenants)


def _local(segment: Segment, tenants: list[str]) -> Segment:
    """The segment with its own list of the tenants it names, for the store."""
    used, local = np.unique(segment.tenant, return_inverse=True)
    return Segment(segment.digests, segment.expiry, local.astype(np.uint32), [tenants[int(n)] for n in used])
