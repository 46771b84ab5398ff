"""The one shape of every error either API answers: ``{"error": code, "detail": what and where}``.

A handler that cannot answer what was asked raises :class:`ApiError`; the apps render it
with :func:`api_error` (registered in :data:`EXCEPTION_HANDLERS`), so no handler builds an
error body itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ExceptionHandler

_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    """An answer other than success: ``status``, a machine-readable ``code`` and a ``detail``
    saying what is wrong and where, with ``headers`` such as ``Retry-After``."""

    def __init__(self, status: int, code: str, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers: Mapping[str, str] = headers or {}

    def response(self) -> Response:
        return error_response(self.status, self.code, self.detail, self.headers)


def error_response(status: int, code: str, detail: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        _encoder.encode({"error": code, "detail": detail}),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def api_error(request: Request, exc: Exception) -> Response:
    """An :class:`ApiError` raised by a handler, as its JSON body."""
    assert isinstance(exc, ApiError)
    return exc.response()


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


# What both apps answer for each kind of exception a handler lets out.
EXCEPTION_HANDLERS: dict[Any, ExceptionHandler] = {
    ApiError: api_error,
    HTTPException: http_error,
    Exception: server_error,
}
