"""Tenants' dimension settings in Postgres (``schemas/dimensions.sql``), for the APIs and the dataflow.

A change takes effect from a window boundary chosen when it is made: the first
after both the moment it is made and the latest window the dataflow has already
decided for the tenant (``dimension_horizons``). The dataflow raises that
horizon, and reads the settings, in one transaction before it opens a later
window (:func:`decide`); :func:`set_dimensions` locks the same row. Whichever
comes first, no window is ever opened under a setting that a change could still
replace, and the boundary, once chosen, is stored: every replay, in any number
of processes, applies the same setting to the same window.

The setting of tenants without one, ``DIMENSIONS``, is recorded the same way when
the dataflow starts with another value than the last one recorded
(:func:`record_default`): from the first boundary after now and after every
tenant's horizon, taken while no horizon can be raised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import psycopg
from msgspec import Struct

# A setting as the dataflow uses it: (effective from, Unix seconds; dimension names),
# ascending by time.
History = list[tuple[float, tuple[str, ...]]]


class Change(Struct, frozen=True):
    """One stored change: the tenant's dimensions from ``effective_from`` on."""

    tenant_id: str
    dimensions: list[str]
    effective_from: datetime
    requested_at: datetime


def first_boundary_after(seconds: float, window_seconds: int) -> int:
    """The first window boundary strictly after ``seconds`` (Unix seconds)."""
    return (int(seconds // window_seconds) + 1) * window_seconds


# The statements of set_dimensions and set_dimensions_async, in this order, in one transaction.
_OPEN_HORIZON = (
    "INSERT INTO dimension_horizons (tenant_id, decided_through) VALUES (%s, '-infinity') "
    "ON CONFLICT (tenant_id) DO NOTHING"
)
_LOCK_HORIZON = (
    "SELECT extract(epoch FROM decided_through)::float8, "
    "extract(epoch FROM clock_timestamp())::float8 "
    "FROM dimension_horizons WHERE tenant_id = %s FOR UPDATE"
)
_STORE_CHANGE = (
    "INSERT INTO tenant_dimensions (tenant_id, effective_from, dimensions, requested_at) "
    "VALUES (%s, to_timestamp(%s), %s, clock_timestamp()) "
    "ON CONFLICT (tenant_id, effective_from) DO UPDATE "
    "SET dimensions = EXCLUDED.dimensions, requested_at = EXCLUDED.requested_at "
    "RETURNING tenant_id, dimensions, effective_from, requested_at"
)
_CHANGES = (
    "SELECT tenant_id, dimensions, effective_from, requested_at FROM tenant_dimensions "
    "WHERE tenant_id = %s ORDER BY effective_from"
)


def _boundary(locked: tuple[Any, ...] | None, window_seconds: int) -> int:
    """Where a change applies from: the first window boundary after both now and the
    horizon (``locked``: the row of _LOCK_HORIZON)."""
    assert locked is not None
    horizon, now = locked
    return first_boundary_after(max(now, horizon), window_seconds)


def _change(row: tuple[Any, ...]) -> Change:
    return Change(row[0], list(row[1]), row[2].astimezone(UTC), row[3].astimezone(UTC))


def set_dimensions(
    conn: psycopg.Connection[Any], tenant_id: str, dimensions: tuple[str, ...], window_seconds: int
) -> Change:
    """Store a change of ``tenant_id``'s dimensions (already checked) and return it, with
    the window boundary it applies from. A change whose boundary is not reached yet is
    replaced by the next one made before it."""
    with conn.transaction():
        conn.execute(_OPEN_HORIZON, (tenant_id,))
        boundary = _boundary(conn.execute(_LOCK_HORIZON, (tenant_id,)).fetchone(), window_seconds)
        stored = conn.execute(_STORE_CHANGE, (tenant_id, boundary, list(dimensions))).fetchone()
    assert stored is not None
    return _change(stored)


async def set_dimensions_async(
    conn: psycopg.AsyncConnection[Any], tenant_id: str, dimensions: tuple[str, ...], window_seconds: int
) -> Change:
    """:func:`set_dimensions`, for the APIs."""
    async with conn.transaction():
        await conn.execute(_OPEN_HORIZON, (tenant_id,))
        row = await (await conn.execute(_LOCK_HORIZON, (tenant_id,))).fetchone()
        boundary = _boundary(row, window_seconds)
        stored = await (await conn.execute(_STORE_CHANGE, (tenant_id, boundary, list(dimensions)))).fetchone()
    assert stored is not None
    return _change(stored)


def changes(conn: psycopg.Connection[Any], tenant_id: str) -> list[Change]:
    """Every stored change of ``tenant_id``, oldest first."""
    return [_change(row) for row in conn.execute(_CHANGES, (tenant_id,)).fetchall()]


async def changes_async(conn: psycopg.AsyncConnection[Any], tenant_id: str) -> list[Change]:
    """:func:`changes`, for the APIs."""
    cursor = await conn.execute(_CHANGES, (tenant_id,))
    return [_change(row) for row in await cursor.fetchall()]


class Decided(Struct, frozen=True):
    """What :func:`decide` read: each tenant's changes, and those of ``DIMENSIONS``."""

    histories: dict[str, History]
    default: History


_DEFAULTS = (
    "SELECT extract(epoch FROM effective_from)::float8, dimensions FROM default_dimensions "
    "ORDER BY effective_from"
)


def record_default(
    conn: psycopg.Connection[Any], dimensions: tuple[str, ...], window_seconds: int
) -> float | None:
    """For the dataflow at its start: record ``DIMENSIONS`` if it differs from the last value
    recorded, and return the window boundary it applies from (``-inf`` for the first one
    recorded); None when it was already in force."""
    with conn.transaction():
        # No horizon may be raised between reading them and storing the change.
        conn.execute("LOCK TABLE dimension_horizons IN SHARE ROW EXCLUSIVE MODE")
        conn.execute("LOCK TABLE default_dimensions IN SHARE ROW EXCLUSIVE MODE")
        history = [(seconds, tuple(names)) for seconds, names in conn.execute(_DEFAULTS).fetchall()]
        if history and history[-1][1] == dimensions:
            return None
        if history:
            row = conn.execute(
                "SELECT coalesce(extract(epoch FROM max(decided_through))::float8, '-infinity'), "
                "extract(epoch FROM clock_timestamp())::float8 FROM dimension_horizons"
            ).fetchone()
            boundary: float = _boundary(row, window_seconds)
        else:
            boundary = -math.inf
        conn.execute(
            "INSERT INTO default_dimensions (effective_from, dimensions) VALUES (to_timestamp(%s), %s) "
            "ON CONFLICT (effective_from) DO UPDATE SET dimensions = EXCLUDED.dimensions",
            (boundary, list(dimensions)),
        )
    return boundary


class DefaultSetting(Struct, frozen=True):
    """The latest ``DIMENSIONS`` the dataflow recorded, and the window boundary it applies
    from (None: from the beginning, the first one recorded)."""

    dimensions: list[str]
    effective_from: datetime | None


# Ordered by the table's column: the CASE's output takes its name, and NULL sorts first.
_LATEST_DEFAULT = (
    "SELECT dimensions, CASE WHEN effective_from = '-infinity' THEN NULL ELSE effective_from END "
    "FROM default_dimensions ORDER BY default_dimensions.effective_from DESC LIMIT 1"
)


def _default_setting(row: tuple[Any, ...] | None) -> DefaultSetting | None:
    if row is None:
        return None
    return DefaultSetting(list(row[0]), None if row[1] is None else row[1].astimezone(UTC))


def latest_default(conn: psycopg.Connection[Any]) -> DefaultSetting | None:
    """The latest ``DIMENSIONS`` recorded; None before the dataflow first started."""
    return _default_setting(conn.execute(_LATEST_DEFAULT).fetchone())


async def latest_default_async(conn: psycopg.AsyncConnection[Any]) -> DefaultSetting | None:
    """:func:`latest_default`, for the APIs."""
    return _default_setting(await (await conn.execute(_LATEST_DEFAULT)).fetchone())


def decide(conn: psycopg.Connection[Any], through: Mapping[str, float]) -> Decided:
    """For the dataflow: raise each tenant's horizon to ``through[tenant]`` (a window start,
    Unix seconds) and return each one's changes, and those of ``DIMENSIONS``. Every change
    that can apply to a window up to the horizon is among them, now and in every later call."""
    tenants = sorted(through)  # one lock order for every process
    with conn.transaction():
        conn.execute(
            "INSERT INTO dimension_horizons (tenant_id, decided_through) "
            "SELECT tenant, to_timestamp(seconds) "
            "FROM unnest(%s::text[], %s::float8[]) AS t(tenant, seconds) "
            "ORDER BY tenant "
            "ON CONFLICT (tenant_id) DO UPDATE SET decided_through = "
            "greatest(dimension_horizons.decided_through, EXCLUDED.decided_through)",
            (tenants, [float(through[tenant]) for tenant in tenants]),
        )
        rows = conn.execute(
            "SELECT tenant_id, extract(epoch FROM effective_from)::float8, dimensions FROM tenant_dimensions "
            "WHERE tenant_id = ANY(%s) ORDER BY tenant_id, effective_from",
            (tenants,),
        ).fetchall()
        default = [(seconds, tuple(names)) for seconds, names in conn.execute(_DEFAULTS).fetchall()]
    histories: dict[str, History] = {tenant: [] for tenant in tenants}
    for tenant, seconds, names in rows:
        histories[tenant].append((seconds, tuple(names)))
    return Decided(histories, default)
