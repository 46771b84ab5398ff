"""The join: a request and its response become one call, whichever arrives first.

:class:`JoinShard` holds the join state of one shard of ``request_id`` values and
is driven by the Bytewax wiring in :mod:`dataflows.metrics`. It must pickle (it
is Bytewax state).

Rules (docs/counting.md §1, decided in detail here):

- A request and a response pair only when ``response_ts - request_ts <= timeout``
  and the response's tenant (stamped at ingestion, when present) is the
  request's. Both are event-time facts, so whether a ``request_id`` pairs does
  not depend on which side arrives first.
- A response of another tenant than its request's is an ``orphan_response``
  dead letter as soon as both are known, and never takes the place of the
  request's own response: otherwise anyone who learns a ``request_id`` could
  turn the real call into a timeout. Until the request arrives the first
  response of each tenant waits, since any of them may be the right one.
- A request left unpaired becomes a timed-out call once the watermark passes
  ``request_ts + timeout``. That timeout is provisional: its request is kept
  until the call's window stops taking late calls (window end + lateness), and
  a matching response arriving meanwhile becomes a call with
  ``replaces_timeout`` set, which the windows fold in in place of the timeout.
  Whether a request_id pairs therefore depends on its events only, not on how
  late or in which order they arrive.
- A response left unpaired becomes an ``orphan_response`` dead letter once no
  request could still be counted for it: when the watermark passes the end of
  the window holding the response's timestamp + lateness (a request stamped no
  later than its response belongs to that window or an earlier one). An
  unpairable pair (too far apart) dead-letters the response at once and times
  the request out at its deadline.
- A response to a timed-out request whose window no longer takes late calls is
  a ``too_late`` dead letter.
- Before a call is counted the first request and the first response win; after
  it, repeats on either side are ignored (counted in :attr:`JoinShard.duplicates`)
  until the watermark passes ``counted_at + max(timeout, dedupe)``, where
  ``counted_at`` is the later of the two timestamps (the request's + timeout for
  a timed-out call). The
  exception: the first response to reach a request that already timed out is
  no repeat: it converts the timeout (above), or is dead-lettered. Nor is a
  response of another tenant a repeat: it is dead-lettered at any time.
- ``cache_read_tokens > prompt_tokens`` still counts the call, with the
  response's ``cache_read_tokens`` clamped to the request's ``prompt_tokens`` so
  that the sums and the cost downstream agree (counted in
  :attr:`JoinShard.cache_reads_clamped`).

Expiry bookkeeping is a dict of one-second buckets (``int(deadline)`` → ids, an
ordered set) plus a heap of the bucket numbers: one slot per deadline instead of
a heap tuple. A call's deadlines leave their buckets when it is counted; other
stale references are skipped when their bucket comes due.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import msgspec
from msgspec import Struct

from dataflows.batches import CallBatch, EventRun, SourceRef
from dataflows.clock import Watermark
from dataflows.pending import (
    Pending,
    lone_response,
    pack_request,
    pending_from_state,
    pending_state,
    share_strings,
    unpack_request,
)
from dataflows.remembered import Remembered, SegmentStore
from schemas.deadletter import DeadLetter
from schemas.events import LLMRequest, LLMResponse, check_cache_read, encoder

# next_wakeup lands this far past a deadline, so float rounding in the
# wall-clock/event-time conversion can never wake us just short of it.
WAKEUP_MARGIN = 0.001


class Call(Struct, kw_only=True):
    """A counted call: answered (``response`` set) or timed out (``response`` is None)."""

    request: LLMRequest
    response: LLMResponse | None
    # The record that completed the call (the later of the two, or the request on
    # timeout): a call that turns out too late is dead-lettered with it.
    source: SourceRef
    # USD, set by pricing between the join and the windows. None on an answered
    # call means its model has no known price (counted in unpriced_requests).
    cost_usd: float | None = None
    # Event time at which the call became known, in Unix seconds: the later of the
    # two timestamps, or request time + timeout for a timeout. Set by the join;
    # the windows advance their watermark with it. None: derive it from the events.
    completed_at: float | None = None
    # An answered call whose request was already counted as timed out: the windows
    # fold it in place of that timeout (docs/counting.md §1.1: timeouts are provisional).
    replaces_timeout: bool = False

    def __reduce__(self) -> tuple[object, tuple[bytes]]:
        # Calls cross between Bytewax processes pickled. Field by field a call takes
        # ~30 µs there and back (an aware datetime alone takes several); as one
        # msgpack string, a few.
        return _call_from_msgpack, (_call_encoder.encode(self),)


_call_encoder = msgspec.msgpack.Encoder()
_call_decoder = msgspec.msgpack.Decoder(Call)


def _call_from_msgpack(data: bytes) -> Call:
    return _call_decoder.decode(data)


def call_into(calls: CallBatch, call: Call) -> None:
    """Append a call counted one at a time (timeouts, conversions, the rare cases) to ``calls``."""
    request, response = call.request, call.response
    request_ts = request.timestamp.timestamp()
    response_ts = math.nan if response is None else response.timestamp.timestamp()
    completed = call.completed_at
    if completed is None:
        completed = request_ts if response is None else max(request_ts, response_ts)
    calls.add(request, response, call.source, request_ts, response_ts, completed, call.replaces_timeout)


def calls_of(found: Iterable[Call]) -> CallBatch:
    """Calls counted one at a time, with their prices, as one batch."""
    calls = CallBatch()
    for call in found:
        call_into(calls, call)
        calls.costs.append(call.cost_usd)
    return calls


def call_at(calls: CallBatch, index: int) -> Call:
    """The call at ``index`` of a batch, as one :class:`Call`."""
    return Call(
        request=calls.requests[index],
        response=calls.responses[index],
        source=calls.sources[index],
        cost_usd=calls.costs[index] if calls.costs else None,
        completed_at=calls.completed[index],
        replaces_timeout=calls.replaces[index],
    )


def call_to_json(call: Call) -> str:
    """The call as JSON (request and response), for a dead letter's payload."""
    return encoder.encode({"request": call.request, "response": call.response}).decode()


class JoinShard:
    """Join state for one shard of request_ids.

    ``now`` is wall-clock Unix seconds. Event time comes from a
    :class:`dataflows.clock.Watermark` kept in this state.
    """

    def __init__(
        self, timeout_seconds: float, dedupe_seconds: float, window_seconds: int, lateness_seconds: float
    ) -> None:
        self.timeout = float(timeout_seconds)
        self.window = int(window_seconds)
        self.lateness = float(lateness_seconds)
        # How long a counted request_id is remembered, from the event time at which
        # it was counted: repeats are ignored for at least DEDUPE_SECONDS after.
        self.remember = float(max(timeout_seconds, dedupe_seconds))
        self.watermark = Watermark()
        # A request waiting alone for its response is held packed (see pack_request).
        self._pending: dict[str, Pending | bytes] = {}
        # Counted request_id -> (event time until which repeats are ignored, the
        # request's tenant: a response of another tenant is no repeat), compactly.
        self._counted = Remembered()
        # Counted as timed out and no response seen yet -> the request's timestamp:
        # its first response converts the timeout or is dead-lettered, never ignored.
        self._timed_out: dict[str, float] = {}
        # request_id -> tenants whose response to it was dead-lettered for not
        # being the request's: their repeats are ignored like any repeat. Kept
        # while the request_id is pending or remembered as counted.
        self._mismatched: dict[str, set[str]] = {}
        self._buckets: dict[int, dict[str, None]] = {}
        self._bucket_heap: list[int] = []
        # Wall clock minus event time at the last call, valid while event time
        # idles with the wall clock. Not snapshotted: unknown until the next call.
        self._offset: float | None = None
        # Observability counters (snapshotted with the state).
        self.duplicates = 0
        self.cache_reads_clamped = 0

    # -- input ---------------------------------------------------------------

    def on_event(
        self, event: LLMRequest | LLMResponse, source: SourceRef, now: float
    ) -> list[Call | DeadLetter]:
        """Add one decoded event; return the calls it completes.

        The only other outputs are ``orphan_response`` dead letters: the first
        response to reach a request that has already timed out, and responses of
        another tenant than their request's, as soon as the request is known.
        """
        ts = event.timestamp.timestamp()
        watermark = self.watermark
        watermark.observe(ts, now)
        self._offset = now - watermark.settled
        if type(event) is LLMRequest:
            return self._on_request(event, source, ts)
        assert isinstance(event, LLMResponse)
        return self._on_response(event, source, ts)

    def _on_request(self, request: LLMRequest, source: SourceRef, ts: float) -> list[Call | DeadLetter]:
        rid = request.request_id
        if self._counted.get(rid, self.watermark.settled) is not None:
            self.duplicates += 1
            return []
        entry = self._pending.get(rid)
        if entry is None:
            self._hold_request(rid, request, source, ts)
            return []
        if isinstance(entry, bytes) or entry.request is not None:
            self.duplicates += 1
            return []
        entry.request, entry.request_source, entry.request_ts = request, source, ts
        out: list[Call | DeadLetter] = []
        if not self._settle_responses(entry, out):
            # Every waiting response was another tenant's: wait for the right one.
            share_strings(request)
            self._schedule(ts + self.timeout, rid)
            return out
        return self._pair(rid, entry, source, out)

    def _hold_request(self, rid: str, request: LLMRequest, source: SourceRef, ts: float) -> None:
        """A new request waits alone for its response, packed, until its deadline."""
        packed = pack_request(request, source)
        if packed is None:
            share_strings(request)
            self._pending[rid] = Pending(request=request, request_source=source, request_ts=ts)
        else:
            self._pending[rid] = packed
        self._schedule(ts + self.timeout, rid)

    def _hold_response(self, rid: str, response: LLMResponse, source: SourceRef, ts: float) -> None:
        """A response new to the shard waits for its request until no request could
        still be counted for it."""
        self._pending[rid] = Pending(response=response, response_source=source, response_ts=ts)
        self._schedule(self.orphan_after(ts), rid)

    def on_runs(self, runs: list[EventRun], now: float, calls: CallBatch) -> list[DeadLetter]:
        """Add the runs' events, in order; append the calls they complete to ``calls`` and
        return the dead letters.

        The outcome is exactly that of :meth:`on_event` for each event in turn (the
        differential tests hold it to that): the usual cases are handled inline, without
        the per-event objects and bookkeeping, and every other event goes through the
        same handlers as :meth:`on_event`. A request new to the shard is kept aside
        unpacked until the end of the runs (``fresh``), so a response later in the same
        runs pairs with it at the cost of a dict lookup; the requests still waiting are
        packed and scheduled at the end, as :meth:`on_event` would have at once.
        """
        letters: list[DeadLetter] = []
        first = next((run.times[0] for run in runs if run.times), None)
        if first is None:
            return letters
        watermark = self.watermark
        watermark.observe(first, now)  # the idle time since the last call, once
        settled = watermark.settled
        pending, counted = self._pending, self._counted
        timeout = self.timeout
        pairs_inline = self._pairs_inline
        fresh: dict[str, tuple[LLMRequest, float, EventRun, int]] = {}
        # Responses new to the shard whose request has not come yet: kept aside the same
        # way, so a request later in the same runs pairs with one at a dict lookup.
        early: dict[str, tuple[LLMResponse, float, EventRun, int]] = {}
        recent = counted.recent()

        def slow(found: list[Call | DeadLetter]) -> None:
            for item in found:
                if type(item) is Call:
                    call_into(calls, item)
                else:
                    assert isinstance(item, DeadLetter)
                    letters.append(item)

        def release(rid: str) -> None:
            # What on_event would have done with the fresh request on its arrival.
            request, request_ts, run, index = fresh.pop(rid)
            self._hold_request(rid, request, run.source(index), request_ts)

        def release_early(rid: str) -> None:
            # What on_event would have done with the early response on its arrival.
            response, response_ts, run, index = early.pop(rid)
            self._hold_response(rid, response, run.source(index), response_ts)

        for run in runs:
            times = run.times
            if run.kind is LLMRequest:
                # Ids counted before these runs: looked up for the whole run at once.
                sealed = counted.sealed_among([request.request_id for request in run.events])
                for index, request in enumerate(run.events):
                    ts = times[index]
                    if ts > settled:
                        settled = ts
                    rid = request.request_id
                    if rid in fresh:
                        self.duplicates += 1
                    elif rid in early:
                        # Its response came first in these runs, and was not counted.
                        response, response_ts = early[rid][0], early[rid][1]
                        assert type(request) is LLMRequest
                        if pairs_inline(rid, request, response, ts, response_ts):
                            del early[rid]
                            self._count_pair(
                                calls, rid, request, response, run.source(index), ts, response_ts
                            )
                            continue
                        release_early(rid)
                        watermark.settled = settled
                        slow(self._on_request(request, run.source(index), ts))
                    elif rid not in pending:
                        if (rid not in recent and rid not in sealed) or counted.get(rid, settled) is None:
                            assert type(request) is LLMRequest
                            fresh[rid] = (request, ts, run, index)
                        else:
                            self.duplicates += 1
                    else:
                        assert type(request) is LLMRequest
                        held = pending[rid]
                        if type(held) is Pending and lone_response(held):
                            # Its response came in earlier runs and waits alone (so the id
                            # is not counted): what _on_request then does, inline.
                            response, response_ts = held.response, held.response_ts
                            assert response is not None
                            if pairs_inline(rid, request, response, ts, response_ts):
                                del pending[rid]
                                self._unschedule(self.orphan_after(response_ts), rid)
                                self._count_pair(
                                    calls, rid, request, response, run.source(index), ts, response_ts
                                )
                                continue
                        watermark.settled = settled
                        slow(self._on_request(request, run.source(index), ts))
                continue
            # The ids new to the shard as this run starts, and those of them counted
            # before (an id pending now may be counted already: a timed-out request).
            unknown = {
                response.request_id
                for response in run.events
                if response.request_id not in fresh and response.request_id not in pending
            }
            sealed = counted.sealed_among(list(unknown))
            for index, response in enumerate(run.events):
                ts = times[index]
                if ts > settled:
                    settled = ts
                rid = response.request_id
                assert type(response) is LLMResponse
                waiting = fresh.get(rid)
                if waiting is not None:
                    request, request_ts = waiting[0], waiting[1]
                    if pairs_inline(rid, request, response, request_ts, ts):
                        del fresh[rid]
                        self._count_pair(calls, rid, request, response, run.source(index), request_ts, ts)
                        continue
                    release(rid)
                else:
                    held = pending.get(rid)
                    if type(held) is bytes:
                        entry = unpack_request(rid, held)
                        request = entry.request
                        assert request is not None and entry.request_source is not None
                        request_ts = entry.request_ts
                        if pairs_inline(rid, request, response, request_ts, ts):
                            del pending[rid]
                            self._unschedule(request_ts + timeout, rid)
                            self._count_pair(calls, rid, request, response, run.source(index), request_ts, ts)
                            continue
                        pending[rid] = entry
                    elif (
                        held is None
                        and rid in unknown
                        and rid not in early
                        and rid not in recent
                        and rid not in sealed
                    ):
                        early[rid] = (response, ts, run, index)  # new, and not counted before
                        continue
                    elif rid in early:
                        release_early(rid)
                watermark.settled = settled
                slow(self._on_response(response, run.source(index), ts))
        watermark.settled = settled
        for rid in list(fresh):
            release(rid)
        for rid in list(early):
            release_early(rid)
        self._offset = now - settled
        return letters

    def _pairs_inline(
        self, rid: str, request: LLMRequest, response: LLMResponse, request_ts: float, response_ts: float
    ) -> bool:
        """The request and response of ``rid``, nothing else waiting under it, pair at
        once: the response is of the request's tenant (or of none), within the timeout,
        and no other tenant's response came for the id (what :meth:`_settle_responses`
        and :meth:`_pair` then decide, the slow way)."""
        tenant = response.tenant_id
        return (
            (tenant is None or tenant == request.tenant_id)
            and response_ts - request_ts <= self.timeout
            and rid not in self._mismatched
        )

    def _count_pair(
        self,
        calls: CallBatch,
        rid: str,
        request: LLMRequest,
        response: LLMResponse,
        source: SourceRef,
        request_ts: float,
        response_ts: float,
    ) -> None:
        """Count a request and its response that pair (what :meth:`_pair` does for a
        pair with nothing else pending under its id), into ``calls``."""
        response = self._clamped(request, response)
        completed = request_ts if request_ts > response_ts else response_ts
        self._counted.add(rid, completed + self.remember, request.tenant_id)
        calls.add(request, response, source, request_ts, response_ts, completed)

    def _on_response(self, response: LLMResponse, source: SourceRef, ts: float) -> list[Call | DeadLetter]:
        rid = response.request_id
        tenant_id = response.tenant_id
        held = self._pending.get(rid)
        entry: Pending | None
        if isinstance(held, bytes):
            # A request waiting alone (the usual case) is not counted: no lookup among
            # the counted ids, which costs a digest and two binary searches.
            self._pending[rid] = entry = unpack_request(rid, held)
        else:
            counted = self._counted.get(rid, self.watermark.settled)
            if counted is not None:
                if tenant_id not in (None, counted[1]):
                    return self._mismatch(response, source, counted[1], counted[0])
                if rid in self._timed_out:
                    return self._after_timeout(response, source, ts)
                self.duplicates += 1
                return []
            entry = held
        if entry is None:
            self._hold_response(rid, response, source, ts)
            return []
        if entry.request is not None:
            if tenant_id not in (None, entry.request.tenant_id):
                return self._mismatch(response, source, entry.request.tenant_id)
            if entry.response is not None or entry.unpaired is not None:
                self.duplicates += 1
                return []
            entry.response, entry.response_source, entry.response_ts = response, source, ts
            return self._pair(rid, entry, source, [])
        # No request yet: keep the first response of each tenant.
        strays = entry.strays or []
        if (entry.response is not None and entry.response.tenant_id == tenant_id) or any(
            stray[0].tenant_id == tenant_id for stray in strays
        ):
            self.duplicates += 1
            return []
        if entry.response is None:
            entry.response, entry.response_source, entry.response_ts = response, source, ts
        else:
            entry.strays = [*strays, (response, source, ts)]
        self._schedule(self.orphan_after(ts), rid)
        return []

    def _pair(
        self, rid: str, entry: Pending, source: SourceRef, out: list[Call | DeadLetter]
    ) -> list[Call | DeadLetter]:
        """Both sides of ``rid`` are known (``source`` completed it): the call, or the
        response dead-lettered for being too far from its request."""
        request, response = entry.request, entry.response
        assert request is not None and response is not None
        request_ts, response_ts = entry.request_ts, entry.response_ts
        if response_ts - request_ts > self.timeout:
            # Final: the response is reported now, the request times out at its
            # deadline, and later responses are repeats (the first one won).
            entry.unpaired = self._too_far(response_ts - request_ts)
            response_source = entry.response_source
            assert response_source is not None
            out.append(self._orphan(response, response_source, entry.unpaired))
            entry.response = entry.response_source = None
            self._schedule(request_ts + self.timeout, rid)
            return out

        del self._pending[rid]
        self._unschedule(request_ts + self.timeout, rid)
        self._unschedule(self.orphan_after(response_ts), rid)
        call = self._call(request, response, source, request_ts, response_ts)
        expiry = max(request_ts, response_ts) + self.remember
        self._counted.add(rid, expiry, request.tenant_id)
        if rid in self._mismatched:
            self._schedule(expiry, rid)  # forgotten with the counted id
        out.append(call)
        return out

    def _entry(self, rid: str) -> Pending | None:
        """The pending entry of ``rid``, a packed lone request unpacked (and kept so)."""
        entry = self._pending.get(rid)
        if isinstance(entry, bytes):
            self._pending[rid] = entry = unpack_request(rid, entry)
        return entry

    def _no_request(self) -> str:
        return (
            "no request with this request_id arrived while one could still be counted (until the "
            f"end of the response's window + LATENESS_SECONDS ({self.lateness:g} s) of event time)"
        )

    def _too_far(self, gap: float) -> str:
        return f"its request came {gap:g} s earlier, beyond JOIN_TIMEOUT_SECONDS ({self.timeout:g} s)"

    def _after_timeout(self, response: LLMResponse, source: SourceRef, ts: float) -> list[Call | DeadLetter]:
        """The first response to a request counted as timed out: the answered call
        replacing the timeout, or a dead letter when it cannot be."""
        rid = response.request_id
        request_ts = self._timed_out.pop(rid)
        if ts - request_ts > self.timeout:
            return [self._orphan(response, source, self._too_far(ts - request_ts))]
        entry = self._entry(rid)
        if entry is None or entry.request is None:
            end = _window_end(request_ts, self.window)
            return [
                DeadLetter(
                    reason="too_late",
                    source_topic=source.topic,
                    partition=source.partition,
                    offset=source.offset,
                    error=f"response {rid!r} answers a request counted as timed out, whose window "
                    f"[{_iso(end - self.window)}, {_iso(end)}) took late calls only until "
                    f"{_iso(end + self.lateness)} (LATENESS_SECONDS {self.lateness:g})",
                    payload=encoder.encode(response).decode(),
                )
            ]
        request = entry.request
        del self._pending[rid]
        return [self._call(request, response, source, request_ts, ts, replaces_timeout=True)]

    def _call(
        self,
        request: LLMRequest,
        response: LLMResponse,
        source: SourceRef,
        request_ts: float,
        response_ts: float,
        *,
        replaces_timeout: bool = False,
    ) -> Call:
        """The answered call of a request and its response (cache reads clamped)."""
        return Call(
            request=request,
            response=self._clamped(request, response),
            source=source,
            completed_at=request_ts if request_ts > response_ts else response_ts,
            replaces_timeout=replaces_timeout,
        )

    def _clamped(self, request: LLMRequest, response: LLMResponse) -> LLMResponse:
        """The response, its cache reads clamped to the request's prompt (counted)."""
        if check_cache_read(request, response) is None:
            return response
        self.cache_reads_clamped += 1
        return msgspec.structs.replace(response, cache_read_tokens=request.prompt_tokens)

    def orphan_after(self, response_ts: float) -> float:
        """Event time after which no request could still be counted for a response
        stamped ``response_ts``: its window's end + lateness."""
        return _window_end(response_ts, self.window) + self.lateness

    def convertible_until(self, request_ts: float) -> float:
        """Event time until which a timed-out request can still become an answered call."""
        return _window_end(request_ts, self.window) + self.lateness

    def _settle_responses(self, entry: Pending, out: list[Call | DeadLetter]) -> bool:
        """The request just arrived: dead-letter the waiting responses of other
        tenants into ``out`` and keep the first of its own in ``entry.response``
        (later ones of its own are repeats). False when none is left."""
        request = entry.request
        assert request is not None
        waiting: list[tuple[LLMResponse, SourceRef, float]] = []
        if entry.response is not None:
            assert entry.response_source is not None
            waiting.append((entry.response, entry.response_source, entry.response_ts))
        waiting += entry.strays or []
        entry.response, entry.response_source, entry.strays = None, None, None
        for response, source, ts in waiting:
            if response.tenant_id not in (None, request.tenant_id):
                out += self._mismatch(response, source, request.tenant_id)
            elif entry.response is None:
                entry.response, entry.response_source, entry.response_ts = response, source, ts
            else:
                self.duplicates += 1
        return entry.response is not None

    def _mismatch(
        self, response: LLMResponse, source: SourceRef, tenant_id: str, counted_until: float | None = None
    ) -> list[Call | DeadLetter]:
        """A response of another tenant than the request's (``tenant_id``): its
        dead letter, or nothing for a repeat of one already dead-lettered.
        ``counted_until``: the request is counted and remembered until then."""
        assert response.tenant_id is not None
        if counted_until is not None and response.request_id not in self._mismatched:
            self._schedule(counted_until, response.request_id)  # forgotten with the counted id
        tenants = self._mismatched.setdefault(response.request_id, set())
        if response.tenant_id in tenants:
            self.duplicates += 1
            return []
        tenants.add(response.tenant_id)
        why = (
            f"tenant mismatch: the response was sent for tenant {response.tenant_id!r} "
            f"but its request belongs to tenant {tenant_id!r}"
        )
        return [self._orphan(response, source, why)]

    # -- time ----------------------------------------------------------------

    def on_time(self, now: float) -> list[Call | DeadLetter]:
        """Expire what the watermark has passed: timed-out calls, orphan responses
        (dead letters with reason ``orphan_response``), forgotten dedupe entries."""
        watermark = self.watermark.current(now)
        self._offset = now - watermark
        out: list[Call | DeadLetter] = []
        heap, buckets = self._bucket_heap, self._buckets
        while heap and heap[0] < watermark:
            second = heapq.heappop(heap)
            # In the order of the ids, not of their scheduling: the batch path schedules
            # a batch's new requests at its end, and the order in which timeouts reach
            # the windows moves their event time (and may decide what is too late).
            ids = sorted(buckets.pop(second))
            keep = [rid for rid in ids if self._expire(rid, watermark, second, out)]
            if keep:
                # The watermark is inside this second: the rest are not due yet.
                # (Expiring may have scheduled more into this very second.)
                scheduled = buckets.get(second)
                if scheduled is None:
                    buckets[second] = dict.fromkeys(keep)
                    heapq.heappush(heap, second)
                else:
                    scheduled.update(dict.fromkeys(keep))
                break
        self._counted.maintain(watermark)
        return out

    def _expire(self, rid: str, watermark: float, second: int, out: list[Call | DeadLetter]) -> bool:
        """Handle every deadline of ``rid`` the watermark passed; True when one
        of its deadlines is still due within ``second``."""
        pending_again = False
        entry = self._entry(rid)
        if entry is not None:
            if entry.request is not None and not entry.request_done:
                deadline = entry.request_ts + self.timeout
                if deadline < watermark:
                    self._time_out(rid, entry, deadline, out)
                elif int(deadline) == second:
                    pending_again = True
            if entry.request is not None and entry.request_done:
                deadline = self.convertible_until(entry.request_ts)
                if deadline < watermark:
                    entry.request = entry.request_source = None
                elif int(deadline) == second:
                    pending_again = True
            if entry.response is not None:
                deadline = self.orphan_after(entry.response_ts)
                if deadline < watermark:
                    assert entry.response_source is not None
                    out.append(self._orphan(entry.response, entry.response_source, self._no_request()))
                    entry.response = None
                elif int(deadline) == second:
                    pending_again = True
            if entry.strays is not None:
                strays = []
                for stray in entry.strays:
                    deadline = self.orphan_after(stray[2])
                    if deadline < watermark:
                        out.append(self._orphan(stray[0], stray[1], self._no_request()))
                    else:
                        strays.append(stray)
                        pending_again = pending_again or int(deadline) == second
                entry.strays = strays or None
            if entry.response is None and entry.strays is None and entry.request is None:
                del self._pending[rid]
                if self._counted.get(rid, watermark) is None:
                    # Forgotten already (DEDUPE_SECONDS < 2 x timeout, the far
                    # response outlived it): nothing else would drop this.
                    self._mismatched.pop(rid, None)
        if rid in self._timed_out or rid in self._mismatched:
            # What is kept beside a counted id goes when it is forgotten (the id
            # itself leaves Remembered's arrays at its next seal).
            counted = self._counted.get(rid, watermark)
            if counted is None:
                if rid not in self._pending:
                    self._timed_out.pop(rid, None)
                    self._mismatched.pop(rid, None)
            elif int(counted[0]) == second:
                pending_again = True
        return pending_again

    def _time_out(self, rid: str, entry: Pending, deadline: float, out: list[Call | DeadLetter]) -> None:
        request = entry.request
        assert request is not None and entry.request_source is not None
        out.append(
            Call(
                request=request,
                response=None,
                source=entry.request_source,
                completed_at=deadline,
            )
        )
        entry.request_done = True
        # Remembered at least while a response can still convert it, or a late
        # response would pair with the kept request as a new call.
        expiry = max(deadline + self.remember, self.convertible_until(entry.request_ts))
        self._counted.add(rid, expiry, request.tenant_id)
        self._schedule(expiry, rid)
        if entry.unpaired is None:
            # No response yet: the first one to come converts the timeout.
            self._timed_out[rid] = entry.request_ts
            self._schedule(self.convertible_until(entry.request_ts), rid)
        else:
            # Its response came and could not pair: nothing can convert it.
            entry.request = entry.request_source = None

    def _orphan(self, response: LLMResponse, source: SourceRef, why: str) -> DeadLetter:
        return DeadLetter(
            reason="orphan_response",
            source_topic=source.topic,
            partition=source.partition,
            offset=source.offset,
            error=f"response {response.request_id!r} has no request to join: {why}",
            payload=encoder.encode(response).decode(),
        )

    def _schedule(self, deadline: float, rid: str) -> None:
        second = int(deadline)  # deadlines are after 1970: int() is floor()
        ids = self._buckets.get(second)
        if ids is None:
            self._buckets[second] = {rid: None}
            heapq.heappush(self._bucket_heap, second)
        else:
            ids[rid] = None

    def _unschedule(self, deadline: float, rid: str) -> None:
        # A counted call's deadlines are moot: dropping them now, rather than when
        # they come due, keeps its id out of memory and out of every snapshot
        # until then (up to the end of its window + LATENESS_SECONDS).
        ids = self._buckets.get(int(deadline))
        if ids is not None:
            ids.pop(rid, None)

    def next_wakeup(self) -> float | None:
        """Wall-clock Unix seconds at which ``on_time`` may have work; None when empty.

        Assumes event time advances with the wall clock from the last call. Right
        after a restore that relation is unknown, so the answer is "now" (0.0): the
        ``on_time`` call it prompts learns it.
        """
        if not self._bucket_heap:
            return None
        if self._offset is None:
            return 0.0
        # Every deadline in a bucket is below its next second.
        return self._bucket_heap[0] + 1 + self._offset + WAKEUP_MARGIN

    # -- inspection and snapshots ----------------------------------------------

    def __len__(self) -> int:
        """request_ids held: waiting for their other side, or remembered as counted."""
        both = sum(
            1 for entry in self._pending.values() if not isinstance(entry, bytes) and entry.request_done
        )
        return len(self._pending) + len(self._counted) - both

    def in_flight(self) -> int:
        """request_ids waiting for their other side (or, timed out, for a late response)."""
        return len(self._pending)

    def remembered(self) -> int:
        """Counted request_ids remembered so that repeats are ignored."""
        return len(self._counted)

    def attach(self, store: SegmentStore, shard_of: Callable[[str], str]) -> None:
        """Keep the remembered ids' segments in ``store`` under the name of their shard,
        ``shard_of`` any of its ids (a resumed shard reads its own back)."""
        self._counted.attach(store, shard_of)

    def needs_store(self) -> bool:
        """Restored from a snapshot whose remembered ids are in a store not attached yet."""
        return self._counted.needs_store()

    def seal(self) -> None:
        """Before a snapshot: seal the ids counted since the last one, so that the
        snapshot holds what changed, not what is remembered."""
        self._counted.seal(self.watermark.settled, snapshot=True)

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_offset"] = None
        state["_pending"] = [pending_state(rid, entry) for rid, entry in self._pending.items()]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        pending = state["_pending"]
        assert isinstance(pending, list)
        state["_pending"] = dict(pending_from_state(item) for item in pending)
        self.__dict__.update(state)


def _window_end(ts: float, window: int) -> float:
    """The end of the epoch-aligned window of ``window`` seconds holding ``ts``."""
    return (ts // window + 1) * window


def _iso(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat()
    except (OverflowError, ValueError, OSError):
        return f"{seconds:.0f} s after the epoch"
