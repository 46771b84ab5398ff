"""Requests and responses waiting in the join, and how they are kept.

A request waiting alone for its response, the usual in-flight state, is held as
one msgpack string of its fields and source (~110 bytes) rather than as a
:class:`Pending`, a struct, a datetime and a SourceRef (~550 bytes): packing and
unpacking cost ~2 µs a call. It was validated on arrival, so it is unpacked by
copying a template and setting the fields, without validating again. Anything
else waiting (a response before its request, a timed-out request kept for a late
response) is a :class:`Pending`.

Snapshots hold waiting events as plain tuples of their field values, the
timestamp as whole microseconds since the epoch (exact for every valid time):
pickling each Struct (a dict of fields, a datetime) costs several times as long
and more bytes, and Bytewax snapshots every shard at every epoch.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from sys import intern
from typing import TypeVar

import msgspec
from msgspec import Struct

from dataflows.batches import SourceRef
from schemas.events import LLMRequest, LLMResponse


class Pending(Struct, gc=False):
    """One request_id not counted yet: whichever sides have arrived."""

    request: LLMRequest | None = None
    request_source: SourceRef | None = None
    request_ts: float = 0.0
    response: LLMResponse | None = None
    response_source: SourceRef | None = None
    response_ts: float = 0.0
    # While the request is missing: the first responses of other tenants than
    # ``response``'s, as (response, source, timestamp), each with its own deadline.
    strays: list[tuple[LLMResponse, SourceRef, float]] | None = None
    # Set once both sides arrived and cannot pair: why, for the orphan's error.
    # From then on the entry only waits for its deadlines.
    unpaired: str | None = None
    # The request side timed out already (it is in ``_counted``). Its request is
    # kept until :meth:`dataflows.join.JoinShard.convertible_until` for a response to convert it.
    request_done: bool = False


_packer = msgspec.msgpack.Encoder()
_unpacker = msgspec.msgpack.Decoder()
_REQUEST_TEMPLATE = LLMRequest(
    request_id="-", tenant_id="-", route="-", model="-", timestamp=datetime(1970, 1, 1, tzinfo=UTC)
)


def lone_response(entry: Pending) -> bool:
    """The entry holds one response and nothing else: no request, no other tenant's."""
    return (
        entry.request is None
        and entry.response is not None
        and entry.strays is None
        and entry.unpaired is None
        and not entry.request_done
    )


def pack_request(request: LLMRequest, source: SourceRef) -> bytes | None:
    """The request and its source as one string; None when msgpack cannot hold a
    value (an integer in its metadata beyond 64 bits): it is then kept unpacked."""
    try:
        return _packer.encode(
            (
                source.topic,
                source.partition,
                source.offset,
                request.tenant_id,
                request.route,
                request.model,
                (request.timestamp - _EPOCH) // _MICROSECOND,
                request.prompt_tokens,
                request.provider,
                request.user_id_hash,
                request.metadata,
            )
        )
    except OverflowError:
        return None


def unpack_request(rid: str, packed: bytes) -> Pending:
    (
        topic,
        partition,
        offset,
        tenant_id,
        route,
        model,
        micros,
        prompt_tokens,
        provider,
        user_id_hash,
        metadata,
    ) = _unpacker.decode(packed)
    request = copy.copy(_REQUEST_TEMPLATE)
    request.request_id = rid
    request.tenant_id = intern(tenant_id)
    request.route = intern(route)
    request.model = intern(model)
    request.timestamp = _EPOCH + timedelta(microseconds=micros)
    request.prompt_tokens = prompt_tokens
    request.provider = provider if provider is None else intern(provider)
    request.user_id_hash = user_id_hash
    request.metadata = metadata
    # Exactly the arrival's ``timestamp.timestamp()``: both divide the same microseconds.
    return Pending(
        request=request, request_source=SourceRef(topic, partition, offset), request_ts=micros / 1_000_000
    )


def share_strings(request: LLMRequest) -> None:
    """A waiting request holds one copy of each tenant, route, model and provider
    name instead of its own: a third of what an in-flight request costs."""
    request.tenant_id = intern(request.tenant_id)
    request.route = intern(request.route)
    request.model = intern(request.model)
    if request.provider is not None:
        request.provider = intern(request.provider)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

# An event in a snapshot: its field values in the order of its Struct, the
# timestamp as whole microseconds since the epoch.
EventValues = tuple


class PendingSnapshot(Struct, frozen=True, gc=False):
    """A :class:`Pending` as a snapshot holds it: the same fields, events as
    :data:`EventValues` and sources as plain tuples."""

    request: EventValues | None
    request_source: tuple[str, int, int] | None
    request_ts: float
    response: EventValues | None
    response_source: tuple[str, int, int] | None
    response_ts: float
    unpaired: str | None
    request_done: bool
    strays: list[tuple[EventValues, tuple[str, int, int], float]] | None


def _values(event: LLMRequest | LLMResponse) -> EventValues:
    values = list(msgspec.structs.astuple(event))
    index = _TIMESTAMP[type(event)]
    values[index] = (values[index] - _EPOCH) // _MICROSECOND
    return tuple(values)


_Event = TypeVar("_Event", LLMRequest, LLMResponse)


def _event(kind: type[_Event], values: EventValues) -> _Event:
    fields = dict(zip(kind.__struct_fields__, values, strict=True))
    fields["timestamp"] = _EPOCH + timedelta(microseconds=fields["timestamp"])
    return kind(**fields)


def _source(values: tuple[str, int, int] | None) -> tuple[str, int, int] | None:
    return None if values is None else (values[0], values[1], values[2])


def pending_state(rid: str, entry: Pending | bytes) -> tuple[str, PendingSnapshot | bytes]:
    """An entry of the join's pending ids as its snapshot holds it."""
    if isinstance(entry, bytes):
        return rid, entry
    return rid, PendingSnapshot(
        request=None if entry.request is None else _values(entry.request),
        request_source=_source(entry.request_source),
        request_ts=entry.request_ts,
        response=None if entry.response is None else _values(entry.response),
        response_source=_source(entry.response_source),
        response_ts=entry.response_ts,
        unpaired=entry.unpaired,
        request_done=entry.request_done,
        strays=None
        if entry.strays is None
        else [
            (_values(response), (source[0], source[1], source[2]), ts)
            for response, source, ts in entry.strays
        ],
    )


def pending_from_state(state: tuple) -> tuple[str, Pending | bytes]:
    """The entry :func:`pending_state` made, or a snapshot's older positional tuple
    (rid followed by the fields of :class:`PendingSnapshot` in order)."""
    if len(state) == 2 and isinstance(state[1], bytes):
        return state[0], state[1]
    if len(state) == 2:
        rid, kept = state
    else:
        rid, kept = state[0], PendingSnapshot(*state[1:])
    entry = Pending(
        request=None if kept.request is None else _event(LLMRequest, kept.request),
        request_source=None if kept.request_source is None else SourceRef(*kept.request_source),
        request_ts=kept.request_ts,
        response=None if kept.response is None else _event(LLMResponse, kept.response),
        response_source=None if kept.response_source is None else SourceRef(*kept.response_source),
        response_ts=kept.response_ts,
        unpaired=kept.unpaired,
        request_done=kept.request_done,
        strays=None
        if kept.strays is None
        else [
            (_event(LLMResponse, response), SourceRef(*source), ts) for response, source, ts in kept.strays
        ],
    )
    if entry.request is not None:
        share_strings(entry.request)
    return rid, entry


_TIMESTAMP = {
    LLMRequest: LLMRequest.__struct_fields__.index("timestamp"),
    LLMResponse: LLMResponse.__struct_fields__.index("timestamp"),
}
