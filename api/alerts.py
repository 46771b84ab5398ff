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
from typing import Any

import msgspec
import psycopg
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.auth import Principal, authenticate, forbidden_tenant
from api.body import BodyError, MiB, check_content_type, read_body
from api.errors import error_response
from api.tenants import in_database, tenant_param
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


async def _body(request: Request) -> bytes | Response:
    try:
        check_content_type(request)
        return await read_body(request, BODY_LIMIT)
    except BodyError as error:
        return error_response(error.status, error.code, error.detail, error.headers)


def _invalid(error: Exception) -> Response:
    return error_response(400, "invalid_body", str(error))


async def _checked(request: Request, rule: RuleBody) -> Response | None:
    """The 400 for what depends on the deployment (resolving the webhook's host takes a
    thread: the resolver blocks)."""
    settings = request.app.state.settings
    try:
        await asyncio.to_thread(check_rule, rule, settings.window_seconds, settings.alert_webhook_allow)
    except InvalidRule as error:
        return _invalid(error)
    return None


def _not_found(rule_id: str) -> Response:
    return error_response(404, "not_found", f"no alert rule {rule_id!r} of this tenant")


async def create(request: Request) -> Response:
    principal = await authenticate(request, "manage")
    if isinstance(principal, Response):
        return principal
    body = await _body(request)
    if isinstance(body, Response):
        return body
    try:
        rule = decode_body(body)
    except InvalidRule as error:
        return _invalid(error)
    except msgspec.DecodeError as error:
        return error_response(400, "invalid_json", f"the body is not valid JSON: {error}")
    refusal = forbidden_tenant(principal, rule.tenant_id)
    if refusal is not None:
        return error_response(403, "forbidden", refusal)
    checked = await _checked(request, rule)
    if checked is not None:
        return checked

    async def store(conn: psycopg.AsyncConnection[Any]) -> AlertRule | Response:
        try:
            return await create_rule(conn, rule)
        except TooManyRules:
            return error_response(
                409, "too_many_rules", f"tenant {rule.tenant_id!r} keeps {MAX_RULES_PER_TENANT} rules already"
            )

    stored = await in_database(request, store)
    if isinstance(stored, Response):
        return stored
    logger.info("tenant %r: alert rule %s (%r) created", stored.tenant_id, stored.id, stored.name)
    return _json(stored, 201)


async def listed(request: Request) -> Response:
    principal = await authenticate(request, "manage")
    if isinstance(principal, Response):
        return principal
    tenant_id = tenant_param(request, principal, ("tenant_id",))
    if isinstance(tenant_id, Response):
        return tenant_id
    found = await in_database(request, lambda conn: list_rules(conn, tenant_id))
    if isinstance(found, Response):
        return found
    return _json(RulesPage(rules=found, count=len(found)))


async def alerts(request: Request) -> Response:
    """``GET /v1/alerts``: each rule's state and its latest transitions with their delivery."""
    principal = await authenticate(request, "read")
    if isinstance(principal, Response):
        return principal
    tenant_id = tenant_param(request, principal, ("tenant_id", "recent"))
    if isinstance(tenant_id, Response):
        return tenant_id
    text = request.query_params.get("recent", str(RECENT_DEFAULT))
    if not text.isdigit() or not 1 <= int(text) <= RECENT_MAX:
        return error_response(
            400, "invalid_parameter", f"recent: expected a whole number from 1 to {RECENT_MAX}, got {text!r}"
        )
    recent = int(text)
    found = await in_database(request, lambda conn: alerts_of_tenant(conn, tenant_id, recent))
    if isinstance(found, Response):
        return found
    firing = sum(rule.state == "firing" for rule in found)
    return _json(AlertsPage(tenant_id=tenant_id, firing=firing, rules=found))


async def _own_rule(
    request: Request, principal: Principal, conn: psycopg.AsyncConnection[Any]
) -> tuple[AlertRule, str | None] | None:
    found = await get_rule(conn, request.path_params["rule_id"])
    if found is None or forbidden_tenant(principal, found[0].tenant_id) is not None:
        return None
    return found


async def read(request: Request) -> Response:
    principal = await authenticate(request, "manage")
    if isinstance(principal, Response):
        return principal
    found = await in_database(request, lambda conn: _own_rule(request, principal, conn))
    if isinstance(found, Response):
        return found
    return _not_found(request.path_params["rule_id"]) if found is None else _json(found[0])


async def patch(request: Request) -> Response:
    principal = await authenticate(request, "manage")
    if isinstance(principal, Response):
        return principal
    rule_id = request.path_params["rule_id"]
    body = await _body(request)
    if isinstance(body, Response):
        return body
    try:
        changes = msgspec.json.decode(body)
    except msgspec.DecodeError as error:
        return error_response(400, "invalid_json", f"the body is not valid JSON: {error}")
    if not isinstance(changes, dict):
        return error_response(400, "invalid_body", "Expected an object of the fields to change - at `$`")
    found = await in_database(request, lambda conn: _own_rule(request, principal, conn))
    if isinstance(found, Response):
        return found
    if found is None:
        return _not_found(rule_id)
    try:
        rule = merged(body_of(*found), changes)
    except InvalidRule as error:
        return _invalid(error)
    checked = await _checked(request, rule)
    if checked is not None:
        return checked
    stored = await in_database(request, lambda conn: update_rule(conn, rule_id, rule))
    if isinstance(stored, Response):
        return stored
    if stored is None:
        return _not_found(rule_id)
    logger.info("tenant %r: alert rule %s updated", stored.tenant_id, stored.id)
    return _json(stored)


async def delete(request: Request) -> Response:
    principal = await authenticate(request, "manage")
    if isinstance(principal, Response):
        return principal
    rule_id = request.path_params["rule_id"]

    async def remove(conn: psycopg.AsyncConnection[Any]) -> bool:
        found = await _own_rule(request, principal, conn)
        return found is not None and await delete_rule(conn, rule_id)

    deleted = await in_database(request, remove)
    if isinstance(deleted, Response):
        return deleted
    if not deleted:
        return _not_found(rule_id)
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


def openapi(error: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """These endpoints in the query API's OpenAPI document, and the schemas they refer to
    (from :class:`RuleBody` and :class:`AlertRule`); ``error`` is its error response."""
    _, components = msgspec.json.schema_components(
        [RuleBody, AlertRule, RulesPage, AlertsPage], ref_template="#/components/schemas/{name}"
    )

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    body = {"required": True, "content": {"application/json": {"schema": ref("RuleBody")}}}
    rule_id = {"name": "rule_id", "in": "path", "required": True, "schema": {"type": "string"}}
    refused = {
        "400": error | {"description": "A field breaks a rule; `detail` names it."},
        "401": error | {"description": "No valid API key (`Authorization: Bearer`)."},
        "403": error | {"description": "The key is not a `manage` key of the rule's tenant."},
        "503": error | {"description": "Postgres did not answer in time."},
    }
    missing = {"404": error | {"description": "No such rule of this tenant."}}
    security = [{"apiKey": []}]
    tenant = {
        "name": "tenant_id",
        "in": "query",
        "required": False,
        "description": "The key's tenant unless given.",
        "schema": {"type": "string"},
    }
    paths = {
        "/v1/alerts": {
            "get": {
                "summary": "Each alert rule's state and its latest transitions with their delivery status",
                "security": security,
                "parameters": [
                    tenant,
                    {
                        "name": "recent",
                        "in": "query",
                        "required": False,
                        "description": f"Transitions per rule, newest first (default {RECENT_DEFAULT}).",
                        "schema": {"type": "integer", "minimum": 1, "maximum": RECENT_MAX},
                    },
                ],
                "responses": {
                    "200": answer("The rules' states and transitions.", ref("AlertsPage")),
                    **refused,
                    "403": error | {"description": "The key is not a key of this tenant."},
                },
            },
        },
        "/v1/alerts/rules": {
            "post": {
                "summary": "Create an alert rule or budget",
                "security": security,
                "requestBody": body,
                "responses": {
                    "201": answer("The stored rule (its secret never shown).", ref("AlertRule")),
                    "409": error | {"description": f"The tenant keeps {MAX_RULES_PER_TENANT} rules already."},
                    **refused,
                },
            },
            "get": {
                "summary": "The tenant's alert rules, oldest first",
                "security": security,
                "parameters": [tenant],
                "responses": {"200": answer("The rules.", ref("RulesPage")), **refused},
            },
        },
        "/v1/alerts/rules/{rule_id}": {
            "get": {
                "summary": "One alert rule",
                "security": security,
                "parameters": [rule_id],
                "responses": {"200": answer("The rule.", ref("AlertRule")), **refused, **missing},
            },
            "patch": {
                "summary": "Change some fields of an alert rule (checked with the rest)",
                "security": security,
                "parameters": [rule_id],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {"200": answer("The changed rule.", ref("AlertRule")), **refused, **missing},
            },
            "delete": {
                "summary": "Delete an alert rule",
                "security": security,
                "parameters": [rule_id],
                "responses": {"204": {"description": "Deleted."}, **refused, **missing},
            },
        },
    }
    return paths, components
