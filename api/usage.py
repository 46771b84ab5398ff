"""``GET /v1/usage?tenant_id=…&from=…&to=…`` (docs/quotas.md): what a bill is made from.

Per UTC day from ``from`` up to (not including) ``to`` (``YYYY-MM-DD``; the last 30
days by default, at most 366): the events the ingestion API accepted and those it
refused because the tenant was over its quota (counted by every ingestion process,
added up in ``ingestion_usage`` every few seconds), and the calls counted in the
tenant's windows that started that day. A ``read`` key of the tenant.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

import msgspec
import psycopg
from msgspec import UNSET, Meta, UnsetType
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.auth import principal_of, requires
from api.errors import ApiError
from api.openapi import SECURITY, Spec
from api.tenants import TenantParameters, in_database, tenant_param
from schemas.rollups import HORIZON_VALUE_SQL

DEFAULT_DAYS = 30
MAX_DAYS = 366


class UsageParameters(TenantParameters, kw_only=True, rename={"first": "from", "end": "to"}):
    """The query string, as the OpenAPI document shows it."""

    first: (
        Annotated[date, Meta(description=f"The first day (default: {DEFAULT_DAYS} days before `to`).")]
        | UnsetType
    ) = UNSET
    end: (
        Annotated[
            date,
            Meta(
                description="The day after the last (default: tomorrow, UTC); "
                f"at most {MAX_DAYS} days after `from`."
            ),
        ]
        | UnsetType
    ) = UNSET


PARAMETERS: tuple[str, ...] = tuple(field.encode_name for field in msgspec.structs.fields(UsageParameters))


class UsageDay(msgspec.Struct):
    day: date
    events_accepted: int
    events_refused: int  # over the tenant's quota
    calls_counted: int


class UsagePage(msgspec.Struct):
    tenant_id: str
    days: list[UsageDay]


_encoder = msgspec.json.Encoder()


def _day(request: Request, name: str, default: date) -> date:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ApiError(
            400, "invalid_parameter", f"{name}: expected a UTC day as YYYY-MM-DD, got {text!r}"
        ) from None


async def usage_of(
    conn: psycopg.AsyncConnection[Any], tenant_id: str, first: date, end: date
) -> list[UsageDay]:
    """Every day in ``[first, end)`` with events or calls, oldest first."""
    cursor = await conn.execute(
        "WITH events AS (SELECT day, accepted, refused FROM ingestion_usage "
        "  WHERE tenant_id = %(tenant)s AND day >= %(first)s AND day < %(end)s), "
        # Windows from the retention horizon on; before it, the daily parts kept of them.
        f"horizon AS (SELECT {HORIZON_VALUE_SQL} AS at), "
        "calls AS (SELECT (window_start AT TIME ZONE 'UTC')::date AS day, sum(requests)::bigint AS calls "
        "  FROM llm_metrics WHERE tenant_id = %(tenant)s "
        "  AND window_start >= greatest(%(from)s, (SELECT at FROM horizon)) AND window_start < %(to)s "
        "  GROUP BY 1 "
        "  UNION ALL "
        "  SELECT (bucket_start AT TIME ZONE 'UTC')::date, sum(requests)::bigint "
        "  FROM llm_metrics_rollups WHERE tenant_id = %(tenant)s AND bucket_seconds = 86400 "
        "  AND bucket_start >= %(from)s AND bucket_start < least(%(to)s, (SELECT at FROM horizon)) "
        "  GROUP BY 1) "
        "SELECT day, coalesce(e.accepted, 0), coalesce(e.refused, 0), coalesce(c.calls, 0) "
        "FROM events e FULL JOIN calls c USING (day) ORDER BY day",
        {
            "tenant": tenant_id,
            "first": first,
            "end": end,
            "from": datetime(first.year, first.month, first.day, tzinfo=UTC),
            "to": datetime(end.year, end.month, end.day, tzinfo=UTC),
        },
    )
    return [UsageDay(*record) for record in await cursor.fetchall()]


@requires("read")
async def usage(request: Request) -> Response:
    principal = principal_of(request)
    tenant_id = tenant_param(request, principal, PARAMETERS)
    today = datetime.now(UTC).date()
    end = _day(request, "to", today + timedelta(days=1))
    first = _day(request, "from", end - timedelta(days=DEFAULT_DAYS))
    if not first < end:
        raise ApiError(400, "invalid_parameter", f"from: {first} is not before to ({end})")
    if (end - first).days > MAX_DAYS:
        raise ApiError(400, "invalid_parameter", f"to: at most {MAX_DAYS} days after from")
    found = await in_database(request, lambda conn: usage_of(conn, tenant_id, first, end))
    return Response(
        _encoder.encode(UsagePage(tenant_id=tenant_id, days=found)), media_type="application/json"
    )


ROUTES = [Route("/v1/usage", usage, methods=["GET"])]


def openapi(spec: Spec) -> dict[str, Any]:
    """This endpoint in the query API's OpenAPI document (:mod:`api.openapi`)."""
    return {
        "/v1/usage": {
            "get": {
                "summary": "Events accepted and refused by quota, and calls counted, per UTC day",
                "security": SECURITY,
                "parameters": spec.parameters(UsageParameters),
                "responses": {
                    "200": spec.answer(
                        "The days with events or calls, oldest first.", spec.schema(UsagePage)
                    ),
                    "400": spec.error("A parameter is wrong; `detail` names it."),
                    "401": spec.error("No valid API key."),
                    "403": spec.error("The key is not one of this tenant's."),
                    "503": spec.error("Postgres did not answer in time."),
                },
            }
        }
    }
