"""The one shape of every error either API answers: ``{"error": code, "detail": what and where}``."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from starlette.responses import Response

_encoder = msgspec.json.Encoder()


def error_response(
    status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        _encoder.encode({"error": code, "detail": detail}),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )
