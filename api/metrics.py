"""The query API (``api.metrics:app``, port 8081): per-window metrics out of Postgres.

``GET /v1/metrics`` reads stored windows or rolls them up (see :mod:`api.queries`);
``GET /health`` answers while the process runs, ``GET /ready`` while Postgres
answers, ``GET /openapi.json`` describes all of it, ``GET /dashboard`` draws it
(:mod:`api.dashboard`), ``GET /metrics`` is this API's own Prometheus metrics
(:mod:`api.observability`, no key). ``/v1/metrics`` takes a
``read`` API key of the tenant asked for, ``/openapi.json`` a ``read`` key of any
tenant (:mod:`api.auth`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.auth import authenticate, forbidden_tenant, open_key_store
from api.dashboard import routes as dashboard_routes
from api.errors import error_response, http_error, server_error
from api.observability import Outage, QueryMetrics, metrics_route
from api.params import (
    BUCKETS,
    DEFAULT_LIMIT,
    DIMENSIONS,
    MAX_LIMIT,
    InvalidParameter,
    MetricsQuery,
    multi_dict,
    parse_query,
)
from api.queries import parameters, rollup_row, rollup_sql, window_row, windows_sql
from schemas.config import Settings, load_or_exit
from schemas.database import ensure_schema
from schemas.logs import configure_logging
from schemas.metrics import MetricsRow

logger = logging.getLogger("streamlens.metrics")

STATEMENT_TIMEOUT_MS = 5000
READY_TIMEOUT_SECONDS = 2.0
# Waiting longer than this for a free connection means Postgres is overloaded or gone.
POOL_TIMEOUT_SECONDS = 5.0
RETRY_AFTER_SECONDS = "5"
SCHEMA_RETRY_SECONDS = 2.0
DEFAULT_PORT = 8081
# Merging more digests than this moves off the event loop, so other requests keep flowing.
INLINE_DIGESTS = 2000

_encoder = msgspec.json.Encoder()


class MetricsPage(msgspec.Struct):
    metrics: list[MetricsRow]
    count: int


def _where(dsn: str) -> str:
    """host:port/dbname of ``dsn``: what a log line may show of it (no password)."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(an unreadable POSTGRES_DSN)"
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


def _json(body: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status_code=status, media_type="application/json")


def _unavailable(request: Request, error: Exception, kind: str) -> Response:
    """The 503 for a failed use of Postgres by ``kind`` of request, counted and logged once an outage."""
    request.app.state.observed.database_errors.labels(kind).value += 1
    first_line = (str(error).strip().splitlines() or [""])[0]
    request.app.state.postgres.lost(f"{type(error).__name__}: {first_line}")
    return error_response(
        503,
        "unavailable",
        "the metrics database did not answer; retry later",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


async def _fetch(pool: psycopg_pool.AsyncConnectionPool, query: MetricsQuery) -> list[MetricsRow]:
    async with pool.connection(timeout=POOL_TIMEOUT_SECONDS) as conn:
        if not query.is_rollup:
            cursor = await conn.execute(windows_sql(query), parameters(query))
            return [window_row(record) for record in await cursor.fetchall()]
        async with conn.cursor(row_factory=dict_row) as cursor:
            # Binary results: a bytea array in text form is hex that costs more to
            # parse than the digests cost to merge.
            await cursor.execute(rollup_sql(query), parameters(query), binary=True)
            records = await cursor.fetchall()
    digests = sum(len(record["blobs"] or ()) for record in records)
    if digests <= INLINE_DIGESTS:
        return [rollup_row(record) for record in records]
    return await run_in_threadpool(lambda: [rollup_row(record) for record in records])


async def metrics(request: Request) -> Response:
    started = time.perf_counter()
    principal = await authenticate(request, "read")
    if isinstance(principal, Response):
        return principal
    try:
        query = parse_query(multi_dict(request.query_params.multi_items()))
    except InvalidParameter as error:
        return error_response(400, "invalid_parameter", str(error))
    refusal = forbidden_tenant(principal, query.tenant_id)
    if refusal is not None:
        return error_response(403, "forbidden", refusal)
    kind = "rollup" if query.is_rollup else "windows"
    observed: QueryMetrics = request.app.state.observed
    try:
        rows = await _fetch(request.app.state.pool, query)
    except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
        answer = _unavailable(request, error, kind)
    else:
        request.app.state.postgres.back()
        observed.rows_returned.labels(kind).value += len(rows)
        answer = _json(MetricsPage(metrics=rows, count=len(rows)))
    observed.request_seconds.labels(kind).observe(time.perf_counter() - started)
    return answer


async def health(request: Request) -> Response:
    return _json({"status": "ok"})


async def _ensure_schema_until_done(dsn: str, done: asyncio.Event) -> None:
    while True:
        try:
            await run_in_threadpool(ensure_schema, dsn)
        except psycopg.Error as error:
            logger.warning(
                "cannot prepare Postgres yet (retrying in %.0fs): %s",
                SCHEMA_RETRY_SECONDS,
                str(error).splitlines()[0],
            )
            await asyncio.sleep(SCHEMA_RETRY_SECONDS)
        else:
            done.set()
            return


async def ready(request: Request) -> Response:
    pool: psycopg_pool.AsyncConnectionPool = request.app.state.pool
    if not request.app.state.schema_ready.is_set():
        return error_response(
            503,
            "unavailable",
            "the metrics table is not prepared yet; retry later",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )
    try:
        async with pool.connection(timeout=READY_TIMEOUT_SECONDS) as conn:
            await conn.execute("SELECT 1")
    except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
        return _unavailable(request, error, "ready")
    request.app.state.postgres.back()
    return _json({"status": "ready"})


def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI 3.1 description; the row schema comes from :class:`MetricsRow`."""
    _, components = msgspec.json.schema_components([MetricsRow], ref_template="#/components/schemas/{name}")
    row_ref = {"$ref": "#/components/schemas/MetricsRow"}
    timestamp = {"type": "string", "format": "date-time"}

    def parameter(
        name: str, description: str, schema: dict[str, Any], required: bool = False
    ) -> dict[str, Any]:
        return {
            "name": name,
            "in": "query",
            "required": required,
            "description": description,
            "schema": schema,
        }

    error = {
        "description": '{"error": code, "detail": what and where}',
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "StreamLens query API", "version": "1"},
        "paths": {
            "/v1/metrics": {
                "get": {
                    "summary": "Per-window LLM call metrics of one tenant, or their roll-ups",
                    "security": [{"apiKey": []}],
                    "parameters": [
                        parameter(
                            "tenant_id",
                            "The tenant whose metrics to read.",
                            {"type": "string", "minLength": 1, "maxLength": 128},
                            True,
                        ),
                        parameter(
                            "route",
                            "Only this route (exact match).",
                            {"type": "string", "minLength": 1, "maxLength": 255},
                        ),
                        parameter(
                            "model",
                            "Only this model (exact match).",
                            {"type": "string", "minLength": 1, "maxLength": 255},
                        ),
                        parameter(
                            "from",
                            "Windows starting at or after this time (RFC 3339 with an offset; inclusive).",
                            timestamp,
                        ),
                        parameter(
                            "to",
                            "Windows starting before this time (RFC 3339 with an "
                            "offset; exclusive). Must be after `from`.",
                            timestamp,
                        ),
                        parameter(
                            "limit",
                            "Most rows (or buckets) to return; newest first.",
                            {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
                        ),
                        parameter(
                            "bucket",
                            "Merge windows into epoch-aligned buckets of this "
                            "size: sums summed, averages weighted, percentiles from the "
                            "merged t-digests, revision the highest of the windows.",
                            {"type": "string", "enum": list(BUCKETS)},
                        ),
                        parameter(
                            "group_by",
                            "Comma-separated subset of route,model to keep "
                            "(default both); dimensions left out are merged across and "
                            "reported as null. Empty: one row per bucket for the tenant.",
                            {"type": "string", "default": ",".join(DIMENSIONS)},
                        ),
                    ],
                    "responses": {
                        "200": {
                            "description": "Rows newest first, then by route and model.",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["metrics", "count"],
                                        "properties": {
                                            "metrics": {"type": "array", "items": row_ref},
                                            "count": {"type": "integer"},
                                        },
                                    }
                                }
                            },
                        },
                        "400": error
                        | {
                            "description": "A parameter is malformed, missing or "
                            "unknown; `detail` starts with its name."
                        },
                        "401": error | {"description": "No valid API key (`Authorization: Bearer`)."},
                        "403": error | {"description": "The key is not a `read` key, or not of this tenant."},
                        "503": error | {"description": "Postgres did not answer in time."},
                    },
                }
            },
            "/health": {
                "get": {"summary": "The process is alive", "responses": {"200": {"description": "alive"}}}
            },
            "/ready": {
                "get": {
                    "summary": "Postgres answers",
                    "responses": {"200": {"description": "ready"}, "503": error},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "This API's own metrics, in the Prometheus text format",
                    "responses": {"200": {"description": "Prometheus text exposition"}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [{"apiKey": []}],
                    "responses": {
                        "200": {"description": "OpenAPI 3.1"},
                        "401": error | {"description": "No valid API key (`Authorization: Bearer`)."},
                        "403": error | {"description": "The key is not a `read` key."},
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A `read` key of the tenant: `just create-key TENANT --scope read`.",
                }
            },
            "schemas": components
            | {
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
                }
            },
        },
    }


def create_app(settings: Settings | None = None) -> Starlette:
    """The app; with no ``settings`` they are read from the environment at start-up."""
    document = _encoder.encode(openapi_document())

    async def openapi(request: Request) -> Response:
        principal = await authenticate(request, "read")
        if isinstance(principal, Response):
            return principal
        return Response(document, media_type="application/json")

    observed = QueryMetrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        current = settings or load_or_exit()
        configure_logging(current.log_format)
        app.state.schema_ready = asyncio.Event()
        # Postgres may start after this service: keep trying instead of failing start-up.
        schema_task = asyncio.create_task(
            _ensure_schema_until_done(current.postgres_dsn, app.state.schema_ready)
        )
        # Usually Postgres is there: start serving with the schema in place.
        await asyncio.wait([schema_task], timeout=SCHEMA_RETRY_SECONDS)
        pool = psycopg_pool.AsyncConnectionPool(
            current.postgres_dsn,
            min_size=1,
            max_size=10,
            open=False,
            # UTC sessions: times leave as ...Z; the timeout bounds any one query.
            kwargs={
                "autocommit": True,
                "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c TimeZone=UTC",
            },
        )
        await pool.open(wait=False)
        app.state.pool = pool
        observed.pool_size.read = lambda: pool.get_stats()["pool_size"]
        observed.pool_available.read = lambda: pool.get_stats()["pool_available"]
        observed.pool_waiting.read = lambda: pool.get_stats()["requests_waiting"]
        logger.info(
            "query API started: HTTP_PORT %s, postgres %s, auth %s",
            current.http_port or f"unset ({DEFAULT_PORT})",
            _where(current.postgres_dsn),
            "on" if current.auth else "off",
        )
        try:
            async with open_key_store(current, pool) as keys:
                app.state.key_store = keys
                yield
        finally:
            schema_task.cancel()
            await pool.close()

    app = Starlette(
        routes=[
            Route("/v1/metrics", metrics, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            metrics_route(observed),
            *dashboard_routes(),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.observed = observed
    app.state.postgres = Outage(logger, "postgres")
    return app


app = create_app()
