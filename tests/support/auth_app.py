"""A small Starlette app that uses :mod:`api.auth` the way the ingestion and query APIs do, and
records what it accepted so the tests can see what would have reached Kafka; and a request
event to send it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.auth import (
    AUTHENTICATION,
    CACHE_SECONDS,
    check_event,
    forbidden_tenant,
    open_key_store,
    principal_of,
    requires,
)
from api.errors import EXCEPTION_HANDLERS, ApiError
from schemas.config import Settings
from schemas.events import batch_decoder, event_decoder, request_decoder, response_decoder

REQUEST = {"route": "/chat", "model": "gpt-4o", "timestamp": "2026-01-01T00:00:00Z"}


def make_app(settings: Settings, cache_seconds: float = CACHE_SECONDS) -> Starlette:
    accepted: list[tuple[str, str | None]] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_key_store(settings, cache_seconds=cache_seconds) as keys:
            app.state.key_store = keys
            yield

    @requires("ingest")
    async def one_event(request: Request) -> Response:
        principal = principal_of(request)
        decoder = request_decoder if request.url.path.endswith("request") else response_decoder
        try:
            event = decoder.decode(await request.body())
        except msgspec.ValidationError as error:
            raise ApiError(400, "invalid_event", str(error)) from None
        problem = check_event(principal, event)
        if problem is not None:
            raise ApiError(403, "forbidden", problem)
        accepted.append((event.request_id, event.tenant_id))
        return JSONResponse({"status": "accepted"}, status_code=202)

    @requires("ingest")
    async def batch(request: Request) -> Response:
        principal = principal_of(request)
        rejected = []
        count = 0
        for index, raw in enumerate(batch_decoder.decode(await request.body()).events):
            event = event_decoder.decode(raw)
            problem = check_event(principal, event)
            if problem is not None:
                rejected.append({"index": index, "error": problem})
                continue
            accepted.append((event.request_id, event.tenant_id))
            count += 1
        if rejected:
            return JSONResponse({"accepted": count, "rejected": rejected}, status_code=207)
        return JSONResponse({"accepted": count}, status_code=202)

    @requires("read")
    async def metrics(request: Request) -> Response:
        tenant_id = request.query_params.get("tenant_id")
        if not tenant_id:
            raise ApiError(400, "invalid_parameter", "tenant_id: required")
        problem = forbidden_tenant(principal_of(request), tenant_id)
        if problem is not None:
            raise ApiError(403, "forbidden", problem)
        return JSONResponse({"metrics": [], "count": 0, "tenant_id": tenant_id})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[
            Route("/v1/llm/request", one_event, methods=["POST"]),
            Route("/v1/llm/response", one_event, methods=["POST"]),
            Route("/v1/llm/events", batch, methods=["POST"]),
            Route("/v1/metrics", metrics),
            Route("/health", health),
        ],
        middleware=[AUTHENTICATION],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.accepted = accepted
    return app


def request_event(tenant: str, request_id: str = "r1") -> dict[str, Any]:
    return {"request_id": request_id, "tenant_id": tenant, **REQUEST}
