"""Alert rules on the query API (docs/alerts.md), with a ``manage`` key of the rule's tenant.

- ``POST /v1/alerts/rules``: a rule (:class:`schemas.alerts.RuleBody`) → ``201`` and the
  stored rule; ``400`` naming the field that is wrong, ``403`` for another tenant's.
- ``GET /v1/alerts/rules?tenant_id=…``: the tenant's rules, oldest first (``tenant_id``
  defaults to the key's).
- ``GET /v1/alerts?tenant_id=…&recent=20`` (a ``read`` key is enough): each rule's state,
  ``firing`` or ``ok``, and its latest transitions with their delivery status.
- ``GET``, ``PATCH`` (the fields to change, checked with the rest) and ``DELETE``
  ``/v1/alerts/rules/{id}``: ``404`` for a rule that does not exist or is another
  tenant's (which is not told apart).

A webhook secret is stored and never answered: rules show ``webhook_secret_set``. A
webhook URL is resolved when the rule is saved and refused when any address it
resolves to is not public (:mod:`schemas.webhooks`; ``ALERT_WEBHOOK_ALLOW``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

import msgspec
import psycopg
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.auth import Principal, forbidden_tenant, principal_of, requires
from api.body import MiB, check_content_type, read_body
from api.errors import ApiError
from api.openapi import SECURITY, Spec
from api.tenants import TenantParameters, in_database, tenant_param
from schemas.alert_rules import (
    MAX_RULES_PER_TENANT,
    TooManyRules,
    alerts_of_tenant,
    body_of,
    create_rule,
    delete_rule,
    get_rule,
    list_rules,
    update_rule,
)
from schemas.alerts import AlertRule, InvalidRule, RuleAlerts, RuleBody, check_rule, decode_body, merged

logger = logging.getLogger("streamlens.alerts")

BODY_LIMIT = MiB
# Transitions GET /v1/alerts shows per rule, unless ``recent`` asks for another number.
RECENT_DEFAULT = 20
RECENT_MAX = 200
_encoder = msgspec.json.Encoder()


class RulesPage(msgspec.Struct):
    rules: list[AlertRule]
    count: int


class AlertsPage(msgspec.Struct):
    tenant_id: str
    firing: int  # how many of its rules fire now
    rules: list[RuleAlerts]


def _json(value: object, status: int = 200) -> Response:
    return Response(_encoder.encode(value), status_code=status, media_type="application/json")


async def _body(request: Request) -> bytes:
    check_content_type(request)
    return await read_body(request, BODY_LIMIT)


def _invalid(error: Exception) -> ApiError:
    return ApiError(400, "invalid_body", str(error))


async def _check(request: Request, rule: RuleBody) -> None:
    """The 400, raised, for what depends on the deployment (resolving the webhook's host takes
    a thread: the resolver blocks)."""
    settings = request.app.state.settings
    try:
        await asyncio.to_thread(check_rule, rule, settings.window_seconds, settings.alert_webhook_allow)
    except InvalidRule as error:
        raise _invalid(error) from None


def _not_found(rule_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no alert rule {rule_id!r} of this tenant")


@requires("manage")
async def create(request: Request) -> Response:
    principal = principal_of(request)
    body = await _body(request)
    try:
        rule = decode_body(body)
    except InvalidRule as error:
        raise _invalid(error) from None
    except msgspec.DecodeError as error:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {error}") from None
    refusal = forbidden_tenant(principal, rule.tenant_id)
    if refusal is not None:
        raise ApiError(403, "forbidden", refusal)
    await _check(request, rule)

    async def store(conn: psycopg.AsyncConnection[Any]) -> AlertRule:
        try:
            return await create_rule(conn, rule)
        except TooManyRules:
            raise ApiError(
                409, "too_many_rules", f"tenant {rule.tenant_id!r} keeps {MAX_RULES_PER_TENANT} rules already"
            ) from None

    stored = await in_database(request, store)
    logger.info("tenant %r: alert rule %s (%r) created", stored.tenant_id, stored.id, stored.name)
    return _json(stored, 201)


@requires("manage")
async def listed(request: Request) -> Response:
    principal = principal_of(request)
    tenant_id = tenant_param(request, principal, ("tenant_id",))
    found = await in_database(request, lambda conn: list_rules(conn, tenant_id))
    return _json(RulesPage(rules=found, count=len(found)))


@requires("read")
async def alerts(request: Request) -> Response:
    """``GET /v1/alerts``: each rule's state and its latest transitions with their delivery."""
    principal = principal_of(request)
    tenant_id = tenant_param(request, principal, ("tenant_id", "recent"))
    text = request.query_params.get("recent", str(RECENT_DEFAULT))
    if not text.isdigit() or not 1 <= int(text) <= RECENT_MAX:
        raise ApiError(
            400, "invalid_parameter", f"recent: expected a whole number from 1 to {RECENT_MAX}, got {text!r}"
        )
    recent = int(text)
    found = await in_database(request, lambda conn: alerts_of_tenant(conn, tenant_id, recent))
    firing = sum(rule.state == "firing" for rule in found)
    return _json(AlertsPage(tenant_id=tenant_id, firing=firing, rules=found))


async def _own_rule(
    request: Request, principal: Principal, conn: psycopg.AsyncConnection[Any]
) -> tuple[AlertRule, str | None] | None:
    found = await get_rule(conn, request.path_params["rule_id"])
    if found is None or forbidden_tenant(principal, found[0].tenant_id) is not None:
        return None
    return found


@requires("manage")
async def read(request: Request) -> Response:
    principal = principal_of(request)
    found = await in_database(request, lambda conn: _own_rule(request, principal, conn))
    if found is None:
        raise _not_found(request.path_params["rule_id"])
    return _json(found[0])


@requires("manage")
async def patch(request: Request) -> Response:
    principal = principal_of(request)
    rule_id = request.path_params["rule_id"]
    body = await _body(request)
    try:
        changes = msgspec.json.decode(body)
    except msgspec.DecodeError as error:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {error}") from None
    if not isinstance(changes, dict):
        raise ApiError(400, "invalid_body", "Expected an object of the fields to change - at `$`")
    found = await in_database(request, lambda conn: _own_rule(request, principal, conn))
    if found is None:
        raise _not_found(rule_id)
    try:
        rule = merged(body_of(*found), changes)
    except InvalidRule as error:
        raise _invalid(error) from None
    await _check(request, rule)
    stored = await in_database(request, lambda conn: update_rule(conn, rule_id, rule))
    if stored is None:
        raise _not_found(rule_id)
    logger.info("tenant %r: alert rule %s updated", stored.tenant_id, stored.id)
    return _json(stored)


@requires("manage")
async def delete(request: Request) -> Response:
    principal = principal_of(request)
    rule_id = request.path_params["rule_id"]

    async def remove(conn: psycopg.AsyncConnection[Any]) -> bool:
        found = await _own_rule(request, principal, conn)
        return found is not None and await delete_rule(conn, rule_id)

    deleted = await in_database(request, remove)
    if not deleted:
        raise _not_found(rule_id)
    logger.info("alert rule %s deleted", rule_id)
    return Response(status_code=204)


ROUTES = [
    Route("/v1/alerts", alerts, methods=["GET"]),
    Route("/v1/alerts/rules", create, methods=["POST"]),
    Route("/v1/alerts/rules", listed, methods=["GET"]),
    Route("/v1/alerts/rules/{rule_id}", read, methods=["GET"]),
    Route("/v1/alerts/rules/{rule_id}", patch, methods=["PATCH"]),
    Route("/v1/alerts/rules/{rule_id}", delete, methods=["DELETE"]),
]


class AlertsParameters(TenantParameters, kw_only=True):
    """The query string of ``GET /v1/alerts``, as the OpenAPI document shows it."""

    recent: Annotated[
        int,
        Meta(
            ge=1, le=RECENT_MAX, description=f"Transitions per rule, newest first (default {RECENT_DEFAULT})."
        ),
    ] = RECENT_DEFAULT


class _RulePath(msgspec.Struct):
    rule_id: Annotated[str, Meta(description="The rule's `id`.")]


def openapi(spec: Spec) -> dict[str, Any]:
    """These endpoints in the query API's OpenAPI document (:mod:`api.openapi`)."""
    rule_id = spec.parameters(_RulePath, "path")
    refused = {
        "400": spec.error("A field breaks a rule; `detail` names it."),
        "401": spec.error("No valid API key (`Authorization: Bearer`)."),
        "403": spec.error("The key is not a `manage` key of the rule's tenant."),
        "503": spec.error("Postgres did not answer in time."),
    }
    missing = {"404": spec.error("No such rule of this tenant.")}
    sent = {
        "413": spec.error(f"The body is over {BODY_LIMIT // MiB} MiB."),
        "415": spec.error("The body is not JSON."),
    }
    return {
        "/v1/alerts": {
            "get": {
                "summary": "Each alert rule's state and its latest transitions with their delivery status",
                "security": SECURITY,
                "parameters": spec.parameters(AlertsParameters),
                "responses": {
                    "200": spec.answer("The rules' states and transitions.", spec.schema(AlertsPage)),
                    **refused,
                    "403": spec.error("The key is not a key of this tenant."),
                },
            },
        },
        "/v1/alerts/rules": {
            "post": {
                "summary": "Create an alert rule or budget",
                "security": SECURITY,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": spec.schema(RuleBody)}},
                },
                "responses": {
                    "201": spec.answer("The stored rule (its secret never shown).", spec.schema(AlertRule)),
                    "409": spec.error(f"The tenant keeps {MAX_RULES_PER_TENANT} rules already."),
                    **refused,
                    **sent,
                },
            },
            "get": {
                "summary": "The tenant's alert rules, oldest first",
                "security": SECURITY,
                "parameters": spec.parameters(TenantParameters),
                "responses": {"200": spec.answer("The rules.", spec.schema(RulesPage)), **refused},
            },
        },
        "/v1/alerts/rules/{rule_id}": {
            "get": {
                "summary": "One alert rule",
                "security": SECURITY,
                "parameters": rule_id,
                "responses": {"200": spec.answer("The rule.", spec.schema(AlertRule)), **refused, **missing},
            },
            "patch": {
                "summary": "Change some fields of an alert rule (checked with the rest)",
                "security": SECURITY,
                "parameters": rule_id,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": spec.answer("The changed rule.", spec.schema(AlertRule)),
                    **refused,
                    **missing,
                    **sent,
                },
            },
            "delete": {
                "summary": "Delete an alert rule",
                "security": SECURITY,
                "parameters": rule_id,
                "responses": {"204": {"description": "Deleted."}, **refused, **missing},
            },
        },
    }
