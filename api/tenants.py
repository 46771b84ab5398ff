"""Tenants' settings (docs/dimensions.md) on the query API, and from a shell.

``GET /v1/tenants/{tenant_id}/dimensions`` takes a ``read`` or ``manage`` key of
the tenant; ``PUT`` the same path, with ``{"dimensions": [...]}``, a ``manage``
key. Both answer the tenant's setting: the latest stored change (or the
``DIMENSIONS`` default when it has none), the window boundary that change applies
from, and every change, oldest first. A change applies from a window boundary
chosen and recorded when it is made (:mod:`schemas.tenant_settings`); a second
change before that boundary replaces the first.

``python -m api.tenants dimensions TENANT [NAME ...]`` (``just dimensions``) sets
the tenant's dimensions in Postgres (``POSTGRES_DSN``), or shows them when no
name is given; ``--none`` turns them off.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import psycopg
import psycopg_pool
from msgspec import UNSET, Meta, Struct, UnsetType
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.auth import Principal, forbidden_tenant, principal_of, requires
from api.body import MiB, check_content_type, read_body
from api.errors import ApiError
from api.openapi import SECURITY, Spec
from schemas.config import Settings, load_or_exit
from schemas.database import ensure_schema
from schemas.dimensions import DimensionNames, DimensionSetting, InvalidDimension, check_names
from schemas.events import IDENTIFIER_RULE, Identifier, Timestamp
from schemas.tenant_settings import (
    Change,
    DefaultSetting,
    changes,
    changes_async,
    latest_default,
    latest_default_async,
    set_dimensions,
    set_dimensions_async,
)

logger = logging.getLogger("streamlens.tenants")

# A setting is a few hundred bytes; read_body states its limit in MiB.
BODY_LIMIT = MiB
# How the query API's Prometheus metrics label the database errors of these endpoints.
DATABASE_KIND = "tenants"
CONNECT_TIMEOUT_SECONDS = 5
INVALID_TENANT = f"tenant_id: expected {IDENTIFIER_RULE}"

_T = TypeVar("_T")

_encoder = msgspec.json.Encoder()
_setting_decoder = msgspec.json.Decoder(DimensionSetting)


class ChangeAnswer(Struct):
    dimensions: DimensionNames
    effective_from: Timestamp
    requested_at: Timestamp


class DimensionsAnswer(Struct):
    """What both endpoints answer."""

    tenant_id: str
    dimensions: DimensionNames
    # None with the DIMENSIONS default that has applied from the beginning.
    effective_from: Timestamp | None
    source: Literal["tenant", "default"]
    changes: list[ChangeAnswer]


def dimensions_answer(tenant_id: str, history: list[Change], default: DefaultSetting) -> DimensionsAnswer:
    """The answer for ``tenant_id``'s stored ``history`` (oldest first) and the ``DIMENSIONS`` default."""
    listed = [ChangeAnswer(c.dimensions, c.effective_from, c.requested_at) for c in history]
    if not history:
        return DimensionsAnswer(tenant_id, default.dimensions, default.effective_from, "default", listed)
    latest = history[-1]
    return DimensionsAnswer(tenant_id, latest.dimensions, latest.effective_from, "tenant", listed)


def valid_tenant(tenant_id: str) -> bool:
    try:
        msgspec.convert(tenant_id, Identifier)
    except msgspec.ValidationError:
        return False
    return True


def tenant_param(request: Request, principal: Principal, parameters: tuple[str, ...]) -> str:
    """The ``tenant_id`` asked for (the key's unless given), or the 400 or 403 raised;
    ``parameters`` are the query parameters the endpoint takes."""
    unknown = sorted(set(request.query_params) - set(parameters))
    if unknown:
        raise ApiError(
            400, "invalid_parameter", f"{unknown[0]}: unknown parameter; expected {', '.join(parameters)}"
        )
    for name in parameters:
        given = request.query_params.getlist(name)
        if len(given) > 1:
            raise ApiError(400, "invalid_parameter", f"{name}: given {len(given)} times, expected once")
    tenant_id = request.query_params.get("tenant_id", principal.tenant_id)
    if tenant_id is None:
        raise ApiError(400, "invalid_parameter", "tenant_id: required (the key names no tenant)")
    check_tenant(principal, tenant_id)
    return tenant_id


def check_tenant(principal: Principal, tenant_id: str) -> None:
    """The 400 or 403, raised, for a ``tenant_id`` this key may not use."""
    if not valid_tenant(tenant_id):
        raise ApiError(400, "invalid_parameter", INVALID_TENANT)
    refusal = forbidden_tenant(principal, tenant_id)
    if refusal is not None:
        raise ApiError(403, "forbidden", refusal)


async def _setting(request: Request) -> tuple[str, ...]:
    """The names in the body, checked, or the 400, 413 or 415 saying what is wrong."""
    check_content_type(request)
    body = await read_body(request, BODY_LIMIT)
    try:
        setting = _setting_decoder.decode(body)
    except msgspec.ValidationError as error:
        raise ApiError(400, "invalid_body", str(error)) from None
    except msgspec.DecodeError as error:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {error}") from None
    except UnicodeDecodeError as error:
        # msgspec checks UTF-8 only in the strings it keeps, and then raises this.
        raise ApiError(
            400, "invalid_json", f"the body is not valid JSON: a string is not UTF-8 (byte {error.start})"
        ) from None
    try:
        return check_names(setting.dimensions)
    except InvalidDimension as error:
        raise ApiError(400, "invalid_body", f"{error} - at `$.dimensions`") from None


async def in_database(request: Request, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]]) -> _T:
    """``work``'s result on one of the app's connections, bounded as ``/v1/metrics`` is;
    the 503 raised when Postgres does not answer in time."""
    # api.query mounts these routes, so it imports this module first; its helpers
    # are taken once a request needs them.
    from api import query as query_api

    async def run() -> _T:
        pool: psycopg_pool.AsyncConnectionPool = request.app.state.pool
        async with pool.connection(timeout=query_api.QUERY_SECONDS) as conn:
            return await work(conn)

    try:
        result = await query_api.bounded(run(), query_api.DATABASE_TIMEOUT_SECONDS)
    except (psycopg.Error, psycopg_pool.PoolTimeout, query_api.DatabaseTimeout) as error:
        raise query_api.unavailable(request, error, DATABASE_KIND) from None
    request.app.state.postgres.back()
    return result


def _default(recorded: DefaultSetting | None, settings: Settings) -> DefaultSetting:
    """The ``DIMENSIONS`` the dataflow recorded; before it first started, this process's."""
    return recorded or DefaultSetting(list(settings.dimensions), None)


def _answer(tenant_id: str, read: tuple[list[Change], DefaultSetting | None], request: Request) -> Response:
    history, recorded = read
    answer = dimensions_answer(tenant_id, history, _default(recorded, request.app.state.settings))
    return Response(_encoder.encode(answer), media_type="application/json")


def _tenant(request: Request) -> str:
    """The path's tenant when the key may act on it; else the 400 or 403 raised."""
    tenant_id: str = request.path_params["tenant_id"]
    check_tenant(principal_of(request), tenant_id)
    return tenant_id


@requires("read")
async def get_dimensions(request: Request) -> Response:
    tenant_id = _tenant(request)

    async def read(conn: psycopg.AsyncConnection[Any]) -> tuple[list[Change], DefaultSetting | None]:
        return await changes_async(conn, tenant_id), await latest_default_async(conn)

    found = await in_database(request, read)
    return _answer(tenant_id, found, request)


@requires("manage")
async def put_dimensions(request: Request) -> Response:
    tenant_id = _tenant(request)
    names = await _setting(request)
    window_seconds: int = request.app.state.settings.window_seconds

    async def store(conn: psycopg.AsyncConnection[Any]) -> tuple[list[Change], DefaultSetting | None]:
        change = await set_dimensions_async(conn, tenant_id, names, window_seconds)
        logger.info(
            "tenant %r: dimensions %s from %s",
            tenant_id,
            ", ".join(change.dimensions) or "none",
            change.effective_from.isoformat(),
        )
        return await changes_async(conn, tenant_id), await latest_default_async(conn)

    found = await in_database(request, store)
    return _answer(tenant_id, found, request)


# ``path``: a tenant id may hold a slash (sent as %2F).
ROUTES = [
    Route("/v1/tenants/{tenant_id:path}/dimensions", get_dimensions, methods=["GET"]),
    Route("/v1/tenants/{tenant_id:path}/dimensions", put_dimensions, methods=["PUT"]),
]


class TenantParameters(Struct, kw_only=True):
    """The query parameter of the endpoints that read :func:`tenant_param`, as the OpenAPI
    document shows it; an endpoint's parameters Struct adds its own to it."""

    tenant_id: Annotated[Identifier, Meta(description="The key's tenant unless given.")] | UnsetType = UNSET


class _TenantPath(Struct):
    tenant_id: Annotated[Identifier, Meta(description="The tenant (the key's own).")]


def openapi(spec: Spec) -> dict[str, Any]:
    """These endpoints in the query API's OpenAPI document (:mod:`api.openapi`)."""
    answer = spec.answer(
        "The tenant's setting: the latest change (or, when it has none, the "
        "`DIMENSIONS` default the dataflow recorded, with `effective_from` its window boundary, "
        "null for the first value recorded) and every change, oldest first.",
        spec.schema(DimensionsAnswer),
    )
    tenant = spec.parameters(_TenantPath, "path")
    unavailable = spec.error("Postgres did not answer in time.")
    unauthorized = spec.error("No valid API key (`Authorization: Bearer`).")
    return {
        "/v1/tenants/{tenant_id}/dimensions": {
            "get": {
                "summary": "The tenant's dimensions and their changes",
                "security": SECURITY,
                "parameters": tenant,
                "responses": {
                    "200": answer,
                    "400": spec.error("`tenant_id` is malformed."),
                    "401": unauthorized,
                    "403": spec.error("The key is not a `read` or `manage` key of this tenant."),
                    "503": unavailable,
                },
            },
            "put": {
                "summary": "Change the tenant's dimensions, from the next window boundary on",
                "description": "The change applies from a window boundary no later than "
                "`WINDOW_SECONDS` after it is made, recorded so that every replay uses it. "
                "A change before that boundary replaces the previous one. `[]`: no dimensions.",
                "security": SECURITY,
                "parameters": tenant,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": spec.written_out(DimensionSetting)}},
                },
                "responses": {
                    "200": answer,
                    "400": spec.error("The body or `tenant_id` breaks a rule; `detail` names it."),
                    "401": unauthorized,
                    "403": spec.error("The key is not a `manage` key of this tenant."),
                    "413": spec.error(f"The body is over {BODY_LIMIT // MiB} MiB."),
                    "415": spec.error("The body is not JSON."),
                    "503": unavailable,
                },
            },
        }
    }


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"


def _show(tenant_id: str, history: list[Change], default: DefaultSetting) -> None:
    if not history:
        since = "" if default.effective_from is None else f" from {_when(default.effective_from)}"
        print(f"{tenant_id}: {_listed(default.dimensions)}{since} (the DIMENSIONS default; none of its own)")
        return
    latest = history[-1]
    print(f"{tenant_id}: {_listed(latest.dimensions)} from {_when(latest.effective_from)}")
    for change in history:
        print(
            f"  from {_when(change.effective_from)}  {_listed(change.dimensions)}"
            f"  (requested {_when(change.requested_at)})"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m api.tenants", description="Tenants' settings.")
    commands = parser.add_subparsers(dest="command", required=True)
    dimensions = commands.add_parser(
        "dimensions",
        help="set a tenant's dimensions (from the next window boundary), or show them without NAME",
    )
    dimensions.add_argument("tenant", metavar="TENANT")
    dimensions.add_argument(
        "names", metavar="NAME", nargs="*", help="metadata.<key>, provider, finish_reason or user"
    )
    dimensions.add_argument("--none", action="store_true", help="set no dimensions")
    return parser


def _fail(message: str, status: int) -> int:
    print(f"streamlens: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not valid_tenant(args.tenant):
        return _fail(f"invalid tenant {args.tenant!r}: expected {IDENTIFIER_RULE}", 2)
    if args.none and args.names:
        return _fail("--none sets no dimensions: give it without names", 2)
    try:
        names = check_names(args.names)
    except InvalidDimension as error:
        return _fail(str(error), 2)
    settings = load_or_exit()
    try:
        ensure_schema(settings.postgres_dsn)
        with psycopg.connect(
            settings.postgres_dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS
        ) as conn:
            if names or args.none:
                change = set_dimensions(conn, args.tenant, names, settings.window_seconds)
                print(
                    f"{args.tenant}: {_listed(change.dimensions)} from {_when(change.effective_from)},"
                    " the window boundary the change applies from"
                )
            else:
                _show(args.tenant, changes(conn, args.tenant), _default(latest_default(conn), settings))
    except psycopg.OperationalError as error:
        return _fail(f"cannot reach Postgres (POSTGRES_DSN): {error}", 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
