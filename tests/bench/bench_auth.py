"""What authentication adds to a request: :class:`api.auth.KeyBackend` and the lookup and
scope check of :func:`api.auth.requires` (:func:`api.auth.authorize`), per call.

The cached path (a key seen in the last few seconds) is what nearly every
request takes; it is timed against ``AUTH=off`` in the same run, and compared
with the time one request has at the ingestion API's ~5.5k requests/s. A real
Postgres answers the first lookup and the uncached ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

import psycopg
from starlette.applications import Starlette
from starlette.requests import Request

from api.auth import KeyBackend, KeyStore, Scope, authorize, generate_key, open_key_store
from api.errors import ApiError
from api.keys import create_key
from schemas.config import Settings
from schemas.database import ensure_schema
from tests.support.stacks import Postgres

CALLS = 200_000
UNCACHED_CALLS = 2_000
# The ingestion API's measured rate with bare Starlette (see the ingestion benchmark).
REQUESTS_PER_SECOND = 5_500


def make_request(app: Starlette, key: str | None) -> Request:
    headers = [(b"content-type", b"application/json"), (b"host", b"localhost")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    return Request(
        {
            "type": "http",
            "method": "POST",
            "path": "/v1/llm/request",
            "headers": headers,
            "app": app,
            "query_string": b"",
        }
    )


async def per_call(app: Starlette, keys: list[str | None], scope: Scope, calls: int) -> float:
    """Seconds per request for what the middleware and ``requires`` do, cycling over ``keys``."""
    backend = KeyBackend()
    requests = [make_request(app, key) for key in keys]
    count = len(requests)
    started = time.perf_counter()
    for index in range(calls):
        request = requests[index % count]
        request.scope["auth"], request.scope["user"] = await backend.authenticate(request)
        with contextlib.suppress(ApiError):
            await authorize(request, scope)
    return (time.perf_counter() - started) / calls


async def measure(dsn: str) -> dict[str, float]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        key = create_key(conn, "acme", "ingest").key
    app = Starlette()
    figures: dict[str, float] = {}
    async with open_key_store(Settings(postgres_dsn=dsn, auth=False)) as off:
        app.state.key_store = off
        figures["auth off"] = await per_call(app, [None], "ingest", CALLS)
    async with open_key_store(Settings(postgres_dsn=dsn)) as store:
        app.state.key_store = store
        assert store.pool is not None
        await store.pool.wait()
        await per_call(app, [key], "ingest", 10)
        figures["auth on, cached key"] = await per_call(app, [key], "ingest", CALLS)
        figures["auth on, no header (401)"] = await per_call(app, [None], "ingest", CALLS)
        # A store that remembers nothing: every call is a Postgres round trip.
        app.state.key_store = KeyStore(store.pool, cache_seconds=0)
        figures["auth on, uncached key (Postgres)"] = await per_call(app, [key], "ingest", UNCACHED_CALLS)
        unknown = [generate_key().key for _ in range(UNCACHED_CALLS)]
        figures["auth on, unknown keys (Postgres)"] = await per_call(
            app, list(unknown), "ingest", UNCACHED_CALLS
        )
    return figures


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="streamlens-bench-auth-") as directory:
        server = Postgres(Path(directory)).start()
        try:
            ensure_schema(server.dsn)
            figures = asyncio.run(measure(server.dsn))
        finally:
            server.stop()
    budget = 1e6 / REQUESTS_PER_SECOND
    off = figures["auth off"]
    for name, seconds in figures.items():
        print(f"{name:<36} {seconds * 1e6:8.2f} µs/call")
    cost = figures["auth on, cached key"] - off
    print(
        f"cached key over auth off: {cost * 1e6:.2f} µs per request, "
        f"{cost * 1e6 / budget:.1%} of the {budget:.0f} µs a request has at "
        f"{REQUESTS_PER_SECOND} requests/s"
    )
