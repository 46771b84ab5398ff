"""The built-in dashboard of the query API: ``GET /dashboard`` and its static files.

The page and its assets are open (docs/api.md); everything it shows comes through
``/v1/metrics`` with the ``read`` key the user enters, sent as
``Authorization: Bearer``. ``GET /dashboard/tenant`` tells the page which tenant
a key reads. The chart library is uPlot's browser build from the npm package
pinned in ``package.json`` / ``package-lock.json``, kept in ``static/vendor/``.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from api.auth import principal_of, requires

STATIC = Path(__file__).parent / "static"

# Only this origin: the page works offline and a key typed into it can be sent nowhere
# else. uPlot sizes its elements through inline styles.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


class KeyTenant(msgspec.Struct):
    """Whose metrics a key reads; ``None`` with ``AUTH=off`` (any tenant)."""

    tenant_id: str | None


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers=_SECURITY_HEADERS)


@requires("read")
async def key_tenant(request: Request) -> Response:
    principal = principal_of(request)
    body = msgspec.json.encode(KeyTenant(tenant_id=principal.tenant_id))
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})


def routes() -> list[BaseRoute]:
    return [
        Route("/dashboard", page, methods=["GET"]),
        Route("/dashboard/tenant", key_tenant, methods=["GET"]),
        Mount("/dashboard/static", app=StaticFiles(directory=STATIC), name="dashboard-static"),
    ]
