"""The one shape of every error either API answers: ``{"error": code, "detail": what and where}``."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

_encoder = msgspec.json.Encoder()


def error_response(status: int, code: str, detail: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        _encoder.encode({"error": code, "detail": detail}),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405, in the same JSON shape as every other error."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    detail = {
        404: f"no such path: {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, exc.detail)
    return error_response(exc.status_code, code, detail, headers=exc.headers)


async def server_error(request: Request, exc: Exception) -> Response:
    """An unexpected exception: logged by the server, never shown to the caller."""
    return error_response(500, "internal_error", "an unexpected error; it has been logged")
