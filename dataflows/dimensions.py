"""Dimensions in the windows (docs/dimensions.md, docs/counting.md §12): which apply, and each call's value.

Which dimensions a window of a tenant has is decided when the window opens, from
the tenant's settings: each change applies from the window boundary recorded
with it (:mod:`schemas.tenant_settings`), and tenants without a setting use
``DIMENSIONS``. A :class:`DimensionPlan` answers that question; before the
windows open windows they call :meth:`DimensionPlan.prepare` with the latest
window start of each tenant at hand, which lets a plan backed by Postgres raise
the tenant's horizon first (so no change can still land before it).

A call's value is the request's (a timed-out call has one too), except
``finish_reason``, which only a response has: a timeout counts under no value,
and its answered call, should it replace the timeout, moves to its own.

Which values get rows of their own (:func:`ranked`): the ``limit`` with the most
calls, ties by value with no value (None) first; the rest are merged into
``"(other)"``, as is a value that is itself ``"(other)"``. That depends on the
window's content only.

Pure rules: no Bytewax, Kafka or Postgres here.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from schemas.dimensions import METADATA_PREFIX, OTHER, value_text
from schemas.events import LLMRequest, LLMResponse
from schemas.tenant_settings import History

Value = str | None


class DimensionPlan(Protocol):
    def prepare(self, through: Mapping[str, float]) -> None:
        """Windows up to ``through[tenant]`` (a window start) are about to open."""

    def names(self, tenant_id: str, window_start: float) -> tuple[str, ...]:
        """The dimensions of ``tenant_id``'s windows starting at ``window_start``
        (prepared with :meth:`prepare` first)."""


class StaticPlan:
    """Dimensions from settings held in memory: ``histories`` (a tenant's changes, each
    applying from its window start on) and ``default`` for tenants without any."""

    def __init__(self, default: tuple[str, ...] = (), histories: Mapping[str, History] | None = None) -> None:
        self.default = default
        self.histories: dict[str, History] = dict(histories or {})

    def prepare(self, through: Mapping[str, float]) -> None:
        return None

    def names(self, tenant_id: str, window_start: float) -> tuple[str, ...]:
        return names_at(self.histories.get(tenant_id), self.default, window_start)


def names_at(history: History | None, default: tuple[str, ...], window_start: float) -> tuple[str, ...]:
    """The dimensions in force at ``window_start``: the latest change applying from it or
    before; ``default`` before the first change, or without any."""
    if not history:
        return default
    index = bisect.bisect_right(history, window_start, key=lambda change: change[0])
    return default if index == 0 else history[index - 1][1]


# name -> how to read a call's value: from its request, or (finish_reason) its response.
Reader = Callable[[LLMRequest, LLMResponse | None], Value]


def _metadata_reader(key: str) -> Reader:
    def read(request: LLMRequest, response: LLMResponse | None) -> Value:
        metadata = request.metadata
        return None if metadata is None else value_text(metadata.get(key))

    return read


def _provider(request: LLMRequest, response: LLMResponse | None) -> Value:
    return value_text(request.provider)


def _user(request: LLMRequest, response: LLMResponse | None) -> Value:
    return value_text(request.user_id_hash)


def _finish_reason(request: LLMRequest, response: LLMResponse | None) -> Value:
    return None if response is None else value_text(response.finish_reason)


_FIXED: dict[str, Reader] = {"provider": _provider, "user": _user, "finish_reason": _finish_reason}
_readers: dict[str, Reader] = {}


def reader(name: str) -> Reader:
    """How a call's value for dimension ``name`` is read (names checked by schemas.dimensions)."""
    found = _readers.get(name)
    if found is None:
        if name in _FIXED:
            found = _FIXED[name]
        elif name.startswith(METADATA_PREFIX):
            found = _metadata_reader(name[len(METADATA_PREFIX) :])
        else:
            raise ValueError(f"unknown dimension {name!r}")
        _readers[name] = found
    return found


def from_response(name: str) -> bool:
    """Whether the value comes from the response (so a timeout and its replacement differ)."""
    return name == "finish_reason"


def _rank_key(item: tuple[Value, int]) -> tuple[int, bool, str]:
    value, calls = item
    return (-calls, value is not None, value or "")


def ranked(calls_per_value: Iterable[tuple[Value, int]], limit: int) -> tuple[list[Value], list[Value]]:
    """Which values get a row of their own, in rank order, and which are merged into
    ``"(other)"`` (see the module's docstring)."""
    items = list(calls_per_value)
    ordered = sorted((item for item in items if item[0] != OTHER), key=_rank_key)
    own = [value for value, _ in ordered[:limit]]
    merged = [value for value, _ in ordered[limit:]]
    if len(ordered) < len(items):
        merged.append(OTHER)
    return own, merged
