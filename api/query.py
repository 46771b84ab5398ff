"""The query API (``api.query:app``, port 8081): per-window metrics out of Postgres.

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
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgspec
import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api import alerts, tenants, usage
from api.auth import AUTHENTICATION, forbidden_tenant, open_key_store, principal_of, requires
from api.dashboard import routes as dashboard_routes
from api.errors import EXCEPTION_HANDLERS, ApiError
from api.evaluations import (
    EvaluationParameters,
    EvaluationQuery,
    EvaluationsPage,
    fetch_evaluations,
    parse_evaluation_query,
)
from api.observability import OutageLog, QueryObservations, metrics_route
from api.openapi import SECURITY, Spec
from api.params import InvalidParameter, MetricsParameters, MetricsQuery, multi_dict, parse_query
from api.queries import Deadline, DeadlineExceeded, fetch_rollup, parameters, window_row, windows_sql
from schemas.config import Settings, load_or_exit
from schemas.database import ensure_schema
from schemas.logs import configure_logging
from schemas.rows import DimensionRow, EvaluationDimensionRow, EvaluationRow, MetricsRow
from schemas.tenant_settings import changes_async

logger = logging.getLogger("streamlens.query")

# The work of one /v1/metrics request: waiting for a connection, its statements
# and merging digests. What does not fit gets 503 deadline_exceeded.
QUERY_SECONDS = 2.0
# The server-side cap on any one statement of a session.
STATEMENT_TIMEOUT_MS = 2000
# Client-side: a database call that has not returned by then is given up on and
# answered 503, even when Postgres is frozen and no server-side timeout can fire.
DATABASE_TIMEOUT_SECONDS = 4.0
READY_TIMEOUT_SECONDS = 2.0
# libpq's connect timeout (whole seconds): a frozen server accepts TCP but never answers.
CONNECT_TIMEOUT_SECONDS = 3
RETRY_AFTER_SECONDS = "5"
# A roll-up cut short by its deadline keeps what it merged: a retry soon goes on.
RETRY_ROLLUP_SECONDS = "1"
SCHEMA_RETRY_SECONDS = 2.0
# Roll-ups are CPU work in Postgres and here: more at once than there are cores
# only makes them all late. The others wait their turn within their deadline.
ROLLUPS_AT_ONCE = 2
DEFAULT_PORT = 8081

_T = TypeVar("_T")
_Row = TypeVar("_Row", MetricsRow, EvaluationRow)

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


def unavailable(request: Request, error: Exception, kind: str) -> ApiError:
    """The 503 for a failed use of Postgres by ``kind`` of request, counted and logged once an outage."""
    request.app.state.observed.database_errors.labels(kind).value += 1
    first_line = (str(error).strip().splitlines() or [""])[0]
    request.app.state.postgres.lost(f"{type(error).__name__}: {first_line}")
    return ApiError(
        503,
        "unavailable",
        "the metrics database did not answer; retry later",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


class DatabaseTimeout(Exception):
    """A database call did not return within its client-side timeout."""


# Abandoned calls still winding down (a cancelled query waits for Postgres to
# acknowledge, up to psycopg's own limits); referenced so they are not collected.
_abandoned: set[asyncio.Task[Any]] = set()


def _forget(task: asyncio.Task[Any]) -> None:
    _abandoned.discard(task)
    # Nobody awaits an abandoned call: read its outcome so asyncio does not report it.
    if not task.cancelled():
        task.exception()


async def bounded(call: Awaitable[_T], seconds: float) -> _T:
    """``call``'s result, or :class:`DatabaseTimeout` after ``seconds``.

    The call runs as its own task and is cancelled in the background when it
    takes too long: a query on a frozen server does not end when cancelled
    (psycopg waits for the server), and the caller must not wait for it.
    """
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        _abandoned.add(task)
        task.add_done_callback(_forget)
        raise DatabaseTimeout(f"no answer within {seconds:g} s")
    return task.result()


async def _check_dimension(
    pool: psycopg_pool.AsyncConnectionPool, query: MetricsQuery, defaults: tuple[str, ...], deadline: Deadline
) -> None:
    """:class:`InvalidParameter` unless the tenant has ``query.dimension``: in ``defaults``
    (``DIMENSIONS``) or in any of its stored changes, past ones included, since their rows
    stay readable."""
    if query.dimension is None or query.dimension in defaults:
        return
    async with pool.connection(timeout=max(0.0, deadline.remaining())) as conn, conn.transaction():
        await conn.execute(deadline.statement_timeout())
        changes = await changes_async(conn, query.tenant_id)
    names = dict.fromkeys([*defaults, *(name for change in changes for name in change.dimensions)])
    if query.dimension not in names:
        has = ", ".join(names) if names else "none"
        raise InvalidParameter(
            f"dimension: {query.dimension!r} is not a dimension of tenant {query.tenant_id!r} (it has: {has})"
        )


async def _fetch(
    pool: psycopg_pool.AsyncConnectionPool,
    rollup_slots: asyncio.Semaphore,
    query: MetricsQuery,
    default_dimensions: tuple[str, ...] = (),
) -> list[MetricsRow]:
    deadline = Deadline(QUERY_SECONDS)
    await _check_dimension(pool, query, default_dimensions, deadline)
    if not query.is_rollup:
        async with pool.connection(timeout=max(0.0, deadline.remaining())) as conn:
            cursor = await conn.execute(windows_sql(query), parameters(query))
            return [window_row(record) for record in await cursor.fetchall()]
    try:
        await asyncio.wait_for(rollup_slots.acquire(), max(0.0, deadline.remaining()))
    except TimeoutError:
        raise DeadlineExceeded(
            f"waited {QUERY_SECONDS:g} s for other roll-ups to finish (the database is slow or not"
            " answering); retry"
        ) from None
    try:
        async with pool.connection(timeout=max(0.0, deadline.remaining())) as conn:
            return await fetch_rollup(conn, query, deadline)
    finally:
        rollup_slots.release()


@requires("read")
async def metrics(request: Request) -> Response:
    started = time.perf_counter()
    try:
        query = parse_query(multi_dict(request.query_params.multi_items()))
    except InvalidParameter as error:
        raise ApiError(400, "invalid_parameter", str(error)) from None
    refusal = forbidden_tenant(principal_of(request), query.tenant_id)
    if refusal is not None:
        raise ApiError(403, "forbidden", refusal)
    kind = "rollup" if query.is_rollup else "windows"
    fetching = _fetch(
        request.app.state.pool, request.app.state.rollup_slots, query, request.app.state.settings.dimensions
    )
    rows = await _rows(request, kind, started, fetching)
    return _json(MetricsPage(metrics=rows, count=len(rows)))


async def _rows(request: Request, kind: str, started: float, fetching: Awaitable[list[_Row]]) -> list[_Row]:
    """The rows ``fetching`` reads, within :data:`DATABASE_TIMEOUT_SECONDS`, counted and timed
    as ``kind`` of request; or the :class:`ApiError` saying why not: 400 for a parameter only
    the database could judge (a dimension the tenant lacks, a range cutting a bucket before the
    retention horizon), 503 for a deadline or a database that did not answer."""
    observed: QueryObservations = request.app.state.observed
    try:
        rows = await bounded(fetching, DATABASE_TIMEOUT_SECONDS)
    except InvalidParameter as error:
        request.app.state.postgres.back()
        failure = ApiError(400, "invalid_parameter", str(error))
    except DeadlineExceeded as error:
        failure = ApiError(
            503, "deadline_exceeded", str(error), headers={"Retry-After": RETRY_ROLLUP_SECONDS}
        )
    except (psycopg.Error, psycopg_pool.PoolTimeout, DatabaseTimeout) as error:
        failure = unavailable(request, error, kind)
    else:
        request.app.state.postgres.back()
        observed.rows_returned.labels(kind).value += len(rows)
        return rows
    finally:
        observed.request_seconds.labels(kind).observe(time.perf_counter() - started)
    raise failure


async def _fetch_evaluations(
    pool: psycopg_pool.AsyncConnectionPool, asked: EvaluationQuery
) -> list[EvaluationRow]:
    deadline = Deadline(QUERY_SECONDS)
    async with pool.connection(timeout=max(0.0, deadline.remaining())) as conn:
        return await fetch_evaluations(conn, asked, deadline)


@requires("read")
async def evaluations(request: Request) -> Response:
    started = time.perf_counter()
    try:
        asked = parse_evaluation_query(multi_dict(request.query_params.multi_items()))
    except InvalidParameter as error:
        raise ApiError(400, "invalid_parameter", str(error)) from None
    refusal = forbidden_tenant(principal_of(request), asked.query.tenant_id)
    if refusal is not None:
        raise ApiError(403, "forbidden", refusal)
    rows = await _rows(request, "evaluations", started, _fetch_evaluations(request.app.state.pool, asked))
    return _json(EvaluationsPage(evaluations=rows, count=len(rows)))


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


async def _ping(pool: psycopg_pool.AsyncConnectionPool) -> None:
    async with pool.connection(timeout=READY_TIMEOUT_SECONDS) as conn:
        await conn.execute("SELECT 1")


async def ready(request: Request) -> Response:
    pool: psycopg_pool.AsyncConnectionPool = request.app.state.pool
    if not request.app.state.schema_ready.is_set():
        raise ApiError(
            503,
            "unavailable",
            "the metrics table is not prepared yet; retry later",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )
    try:
        await bounded(_ping(pool), READY_TIMEOUT_SECONDS)
    except (psycopg.Error, psycopg_pool.PoolTimeout, DatabaseTimeout) as error:
        raise unavailable(request, error, "ready") from None
    request.app.state.postgres.back()
    return _json({"status": "ready"})


def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI 3.1 description, made from the types it checks and answers with
    (:mod:`api.openapi`): the parameters from :class:`MetricsParameters` and
    :class:`EvaluationParameters`, the rows from :class:`MetricsRow` and the others."""
    spec = Spec()
    unauthorized = spec.error("No valid API key (`Authorization: Bearer`).")
    refused = {
        "400": spec.error(
            "A parameter is malformed, missing or unknown, or `dimension` is not one of the "
            "tenant's; `detail` starts with its name."
        ),
        "401": unauthorized,
        "403": spec.error("The key is not a `read` key, or not of this tenant."),
        "503": spec.error(
            "`unavailable`: Postgres did not answer in time. `deadline_exceeded`: the roll-up needs "
            "more work than one request may do; what it merged is kept, so a retry goes on from there."
        ),
    }
    paths = {
        "/v1/metrics": {
            "get": {
                "summary": "Per-window LLM call metrics of one tenant, or their roll-ups",
                "security": SECURITY,
                "parameters": spec.parameters(MetricsParameters),
                "responses": {
                    "200": spec.answer(
                        "Rows newest first, then by route and model; with `dimension`, then by value "
                        "(null first). Route, model and value in code-point order.",
                        spec.page(MetricsPage, [MetricsRow, DimensionRow]),
                    ),
                    **refused,
                },
            }
        },
        **tenants.openapi(spec),
        "/health": {
            "get": {"summary": "The process is alive", "responses": {"200": {"description": "alive"}}}
        },
        "/ready": {
            "get": {
                "summary": "Postgres answers",
                "responses": {
                    "200": {"description": "ready"},
                    "503": spec.error("Postgres does not answer, or the schema is not prepared yet."),
                },
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
                "security": SECURITY,
                "responses": {
                    "200": {"description": "OpenAPI 3.1"},
                    "401": unauthorized,
                    "403": spec.error("The key is not a `read` key."),
                },
            }
        },
        "/v1/evaluations": {
            "get": {
                "summary": "Evaluation rows (scores and labels per window, key and name), or their roll-ups",
                "security": SECURITY,
                "parameters": spec.parameters(EvaluationParameters),
                "responses": {
                    "200": spec.answer(
                        "Rows newest first, then by route, model, name (and value, null first); "
                        "with `dimension`, one per value (`EvaluationDimensionRow`)",
                        spec.page(EvaluationsPage, [EvaluationRow, EvaluationDimensionRow]),
                    ),
                    **refused,
                },
            }
        },
        **alerts.openapi(spec),
        **usage.openapi(spec),
    }
    return spec.document("StreamLens query API", paths)


def create_app(settings: Settings | None = None) -> Starlette:
    """The app; with no ``settings`` they are read from the environment at start-up."""
    document = _encoder.encode(openapi_document())

    @requires("read")
    async def openapi(request: Request) -> Response:
        return Response(document, media_type="application/json")

    observed = QueryObservations()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        current = settings or load_or_exit()
        configure_logging(current.log_format)
        app.state.settings = current
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
                "connect_timeout": CONNECT_TIMEOUT_SECONDS,
                "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c TimeZone=UTC",
            },
        )
        await pool.open(wait=False)
        app.state.pool = pool
        app.state.rollup_slots = asyncio.Semaphore(ROLLUPS_AT_ONCE)
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
            Route("/v1/evaluations", evaluations, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            *tenants.ROUTES,
            *alerts.ROUTES,
            *usage.ROUTES,
            metrics_route(observed),
            *dashboard_routes(),
        ],
        middleware=[AUTHENTICATION],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.observed = observed
    app.state.postgres = OutageLog(logger, "postgres")
    return app


app = create_app()
