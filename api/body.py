"""Request bodies for the ingestion API: JSON only, and never more than a limit in memory."""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

from api.errors import ApiError

MiB = 1024 * 1024


class BodyError(ApiError):
    """The body cannot be taken; ``status`` and ``code`` are what the API answers."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        # Unread body bytes of a refused request would still be received and
        # thrown away; closing the connection ends that.
        super().__init__(status, code, detail, {"Connection": "close"} if status == 413 else None)


def check_content_type(request: Request) -> None:
    """Accept ``application/json`` and ``application/*+json``, UTF-8 if a charset is named."""
    header = request.headers.get("content-type")
    if header is None:
        raise BodyError(415, "unsupported_media_type", "Content-Type is missing; send application/json")
    media_type, _, parameters = header.partition(";")
    media_type = media_type.strip().lower()
    if not (
        media_type == "application/json"
        or (media_type.startswith("application/") and media_type.endswith("+json"))
    ):
        raise BodyError(
            415, "unsupported_media_type", f"Content-Type {media_type!r} is not JSON; send application/json"
        )
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise BodyError(
                415, "unsupported_media_type", f"charset {value.strip()!r} is not supported; JSON is UTF-8"
            )


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or :class:`BodyError` 413 as soon as it is known to exceed ``limit``.

    A declared Content-Length over the limit is refused before reading anything;
    a chunked body is counted while it streams in and abandoned at the limit.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        # Nobody will read the answer; this keeps a traceback out of the log.
        raise BodyError(400, "incomplete_body", "the client left before sending the body") from None
    if size == 0:
        raise BodyError(400, "empty_body", "the body is empty; send a JSON object")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> BodyError:
    return BodyError(413, "body_too_large", f"the body exceeds {limit // MiB} MiB")
