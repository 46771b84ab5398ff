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
from typing import Any, Literal, TypeVar

import msgspec
import psycopg
import psycopg_pool
from msgspec import Struct
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.auth import Principal, Scope, authenticate, forbidden_tenant
from api.body import BodyError, MiB, check_content_type, read_body
from api.errors import error_response
from schemas.config import Settings, load_or_exit
from schemas.database import ensure_schema
from schemas.dimensions import DimensionSetting, InvalidDimension, check_names
from schemas.events import Identifier
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
INVALID_TENANT = "tenant_id: expected 1-128 characters without control characters"

_T = TypeVar("_T")

_encoder = msgspec.json.Encoder()
_setting_decoder = msgspec.json.Decoder(DimensionSetting)


class ChangeAnswer(Struct):
    dimensions: list[str]
    effective_from: datetime
    requested_at: datetime


class DimensionsAnswer(Struct):
    """What both endpoints answer."""

    tenant_id: str
    dimensions: list[str]
    # None with the DIMENSIONS default that has applied from the beginning.
    effective_from: datetime | None
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


def tenant_param(request: Request, principal: Principal, parameters: tuple[str, ...]) -> str | Response:
    """The ``tenant_id`` asked for (the key's unless given), or the 400 or 403 to answer;
    ``parameters`` are the query parameters the endpoint takes."""
    unknown = sorted(set(request.query_params) - set(parameters))
    if unknown:
        return error_response(
            400, "invalid_parameter", f"{unknown[0]}: unknown parameter; expected {', '.join(parameters)}"
        )
    for name in parameters:
        given = request.query_params.getlist(name)
        if len(given) > 1:
            return error_response(
                400, "invalid_parameter", f"{name}: given {len(given)} times, expected once"
            )
    tenant_id = request.query_params.get("tenant_id", principal.tenant_id)
    if tenant_id is None:
        return error_response(400, "invalid_parameter", "tenant_id: required (the key names no tenant)")
    return _refusal(principal, tenant_id) or tenant_id


def _refusal(principal: Principal, tenant_id: str) -> Response | None:
    """The 400 or 403 for a path's ``tenant_id`` this key may not use, or ``None``."""
    if not valid_tenant(tenant_id):
        return error_response(400, "invalid_parameter", INVALID_TENANT)
    refusal = forbidden_tenant(principal, tenant_id)
    if refusal is not None:
        return error_response(403, "forbidden", refusal)
    return None


async def _setting(request: Request) -> tuple[str, ...] | Response:
    """The names in the body, checked, or the 400, 413 or 415 saying what is wrong."""
    try:
        check_content_type(request)
        body = await read_body(request, BODY_LIMIT)
    except BodyError as error:
        return error_response(error.status, error.code, error.detail, error.headers)
    try:
        setting = _setting_decoder.decode(body)
    except msgspec.ValidationError as error:
        return error_response(400, "invalid_body", str(error))
    except msgspec.DecodeError as error:
        return error_response(400, "invalid_json", f"the body is not valid JSON: {error}")
    except UnicodeDecodeError as error:
        # msgspec checks UTF-8 only in the strings it keeps, and then raises this.
        return error_response(
            400, "invalid_json", f"the body is not valid JSON: a string is not UTF-8 (byte {error.start})"
        )
    try:
        return check_names(setting.dimensions)
    except InvalidDimension as error:
        return error_response(400, "invalid_body", f"{error} - at `$.dimensions`")


async def in_database(
    request: Request, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]]
) -> _T | Response:
    """``work``'s result on one of the app's connections, bounded as ``/v1/metrics`` is;
    the 503 when Postgres does not answer in time."""
    # api.metrics mounts these routes, so it imports this module first; its helpers
    # are taken once a request needs them.
    from api import metrics

    async def run() -> _T:
        pool: psycopg_pool.AsyncConnectionPool = request.app.state.pool
        async with pool.connection(timeout=metrics.QUERY_SECONDS) as conn:
            return await work(conn)

    try:
        result = await metrics.bounded(run(), metrics.DATABASE_TIMEOUT_SECONDS)
    except (psycopg.Error, psycopg_pool.PoolTimeout, metrics.DatabaseTimeout) as error:
        return metrics._unavailable(request, error, DATABASE_KIND)
    request.app.state.postgres.back()
    return result


def _default(recorded: DefaultSetting | None, settings: Settings) -> DefaultSetting:
    """The ``DIMENSIONS`` the dataflow recorded; before it first started, this process's."""
    return recorded or DefaultSetting(list(settings.dimensions), None)


def _answer(tenant_id: str, read: tuple[list[Change], DefaultSetting | None], request: Request) -> Response:
    history, recorded = read
    answer = dimensions_answer(tenant_id, history, _default(recorded, request.app.state.settings))
    return Response(_encoder.encode(answer), media_type="application/json")


async def _tenant(request: Request, scope: Scope) -> str | Response:
    """The path's tenant when the key may act on it with ``scope``; else the 400, 401, 403 or 503."""
    principal = await authenticate(request, scope)
    if isinstance(principal, Response):
        return principal
    tenant_id: str = request.path_params["tenant_id"]
    refusal = _refusal(principal, tenant_id)
    return tenant_id if refusal is None else refusal


async def get_dimensions(request: Request) -> Response:
    tenant_id = await _tenant(request, "read")
    if isinstance(tenant_id, Response):
        return tenant_id

    async def read(conn: psycopg.AsyncConnection[Any]) -> tuple[list[Change], DefaultSetting | None]:
        return await changes_async(conn, tenant_id), await latest_default_async(conn)

    found = await in_database(request, read)
    if isinstance(found, Response):
        return found
    return _answer(tenant_id, found, request)


async def put_dimensions(request: Request) -> Response:
    tenant_id = await _tenant(request, "manage")
    if isinstance(tenant_id, Response):
        return tenant_id
    names = await _setting(request)
    if isinstance(names, Response):
        return names
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
    if isinstance(found, Response):
        return found
    return _answer(tenant_id, found, request)


# ``path``: a tenant id may hold a slash (sent as %2F).
ROUTES = [
    Route("/v1/tenants/{tenant_id:path}/dimensions", get_dimensions, methods=["GET"]),
    Route("/v1/tenants/{tenant_id:path}/dimensions", put_dimensions, methods=["PUT"]),
]


def openapi_paths(error: dict[str, Any]) -> dict[str, Any]:
    """These endpoints in the query API's OpenAPI document; ``error`` is its error response."""
    names = {
        "type": "array",
        "maxItems": 4,
        "uniqueItems": True,
        "items": {
            "type": "string",
            "description": "`metadata.<key>`, `provider`, `finish_reason` or `user`",
        },
    }
    timestamp = {"type": "string", "format": "date-time"}
    answer = {
        "description": "The tenant's setting: the latest change (or, when it has none, the "
        "`DIMENSIONS` default the dataflow recorded, with `effective_from` its window boundary, "
        "null for the first value recorded) and every change, oldest first.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["tenant_id", "dimensions", "effective_from", "source", "changes"],
                    "properties": {
                        "tenant_id": {"type": "string"},
                        "dimensions": names,
                        "effective_from": {"type": ["string", "null"], "format": "date-time"},
                        "source": {"type": "string", "enum": ["tenant", "default"]},
                        "changes": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["dimensions", "effective_from", "requested_at"],
                                "properties": {
                                    "dimensions": names,
                                    "effective_from": timestamp,
                                    "requested_at": timestamp,
                                },
                            },
                        },
                    },
                }
            }
        },
    }
    tenant = {
        "name": "tenant_id",
        "in": "path",
        "required": True,
        "description": "The tenant (the key's own).",
        "schema": {"type": "string", "minLength": 1, "maxLength": 128},
    }
    unavailable = error | {"description": "Postgres did not answer in time."}
    unauthorized = error | {"description": "No valid API key (`Authorization: Bearer`)."}
    return {
        "/v1/tenants/{tenant_id}/dimensions": {
            "get": {
                "summary": "The tenant's dimensions and their changes",
                "security": [{"apiKey": []}],
                "parameters": [tenant],
                "responses": {
                    "200": answer,
                    "400": error | {"description": "`tenant_id` is malformed."},
                    "401": unauthorized,
                    "403": error | {"description": "The key is not a `read` or `manage` key of this tenant."},
                    "503": unavailable,
                },
            },
            "put": {
                "summary": "Change the tenant's dimensions, from the next window boundary on",
                "description": "The change applies from a window boundary no later than "
                "`WINDOW_SECONDS` after it is made, recorded so that every replay uses it. "
                "A change before that boundary replaces the previous one. `[]`: no dimensions.",
                "security": [{"apiKey": []}],
                "parameters": [tenant],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["dimensions"],
                                "additionalProperties": False,
                                "properties": {"dimensions": names},
                            }
                        }
                    },
                },
                "responses": {
                    "200": answer,
                    "400": error
                    | {"description": "The body or `tenant_id` breaks a rule; `detail` names it."},
                    "401": unauthorized,
                    "403": error | {"description": "The key is not a `manage` key of this tenant."},
                    "413": error | {"description": "The body is over 1 MiB."},
                    "415": error | {"description": "The body is not JSON."},
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
        return _fail(f"invalid tenant {args.tenant!r}: expected 1-128 characters, no control characters", 2)
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
