"""Alert rules in Postgres (``alert_rules``, :mod:`schemas.alerts` for what a rule is).

A rule is kept as the JSON of its :class:`~schemas.alerts.RuleBody` without the
webhook secret, which has a column of its own: every read for the API leaves it
out, and only the alert service, signing deliveries, reads it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec
import psycopg
from psycopg.types.json import Jsonb

from schemas.alerts import AlertRule, AlertTransition, RuleAlerts, RuleBody

# Rules a tenant may keep: each is evaluated whenever a row it covers is written.
MAX_RULES_PER_TENANT = 1_000

_COLUMNS = "id, rule, webhook_secret IS NOT NULL, created_at, updated_at"


class TooManyRules(Exception):
    """The tenant already keeps :data:`MAX_RULES_PER_TENANT` rules."""


def _stored_fields(body: RuleBody) -> dict[str, Any]:
    fields = msgspec.to_builtins(body)
    fields.pop("webhook_secret", None)
    return fields


def _answer(record: tuple[Any, ...]) -> AlertRule:
    rule_id, fields, secret_set, created_at, updated_at = record
    fields = dict(fields)
    fields.setdefault("value", None)
    return AlertRule(
        id=rule_id, **fields, webhook_secret_set=secret_set, created_at=created_at, updated_at=updated_at
    )


def body_of(rule: AlertRule, secret: str | None) -> RuleBody:
    """The body a stored rule was made from (for a ``PATCH`` to merge into)."""
    fields = msgspec.to_builtins(rule)
    for name in ("id", "webhook_secret_set", "created_at", "updated_at"):
        fields.pop(name)
    if fields["dimension"] is None:
        fields.pop("value")
    return msgspec.convert({**fields, "webhook_secret": secret}, RuleBody)


async def create_rule(conn: psycopg.AsyncConnection[Any], body: RuleBody) -> AlertRule:
    """Store a new rule; :class:`TooManyRules` when the tenant keeps the most it may."""
    async with conn.transaction():
        # One creation at a time per tenant, so that the count holds.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('alert_rules:' || %s))", (body.tenant_id,))
        cursor = await conn.execute(
            "SELECT count(*) FROM alert_rules WHERE tenant_id = %s", (body.tenant_id,)
        )
        found = await cursor.fetchone()
        if found is not None and found[0] >= MAX_RULES_PER_TENANT:
            raise TooManyRules
        cursor = await conn.execute(
            f"INSERT INTO alert_rules (id, tenant_id, rule, webhook_secret) VALUES (%s, %s, %s, %s) "
            f"RETURNING {_COLUMNS}",
            (str(uuid.uuid4()), body.tenant_id, Jsonb(_stored_fields(body)), body.webhook_secret),
        )
        record = await cursor.fetchone()
    assert record is not None
    return _answer(record)


def rules_of_tenants(conn: psycopg.Connection[Any], tenants: list[str]) -> dict[str, list[AlertRule]]:
    """The rules of each of ``tenants`` (for the alert service; secrets left out)."""
    out: dict[str, list[AlertRule]] = {tenant: [] for tenant in tenants}
    cursor = conn.execute(
        f"SELECT {_COLUMNS} FROM alert_rules WHERE tenant_id = ANY(%s) ORDER BY created_at, id", (tenants,)
    )
    for record in cursor.fetchall():
        rule = _answer(record)
        out[rule.tenant_id].append(rule)
    return out


async def list_rules(conn: psycopg.AsyncConnection[Any], tenant_id: str) -> list[AlertRule]:
    cursor = await conn.execute(
        f"SELECT {_COLUMNS} FROM alert_rules WHERE tenant_id = %s ORDER BY created_at, id", (tenant_id,)
    )
    return [_answer(record) for record in await cursor.fetchall()]


async def get_rule(conn: psycopg.AsyncConnection[Any], rule_id: str) -> tuple[AlertRule, str | None] | None:
    """The rule and its secret, or None."""
    cursor = await conn.execute(
        f"SELECT {_COLUMNS}, webhook_secret FROM alert_rules WHERE id = %s", (rule_id,)
    )
    record = await cursor.fetchone()
    if record is None:
        return None
    return _answer(record[:-1]), record[-1]


async def update_rule(
    conn: psycopg.AsyncConnection[Any], rule_id: str, body: RuleBody, now: datetime | None = None
) -> AlertRule | None:
    """Replace a rule's fields (its tenant stays); None when it is gone."""
    cursor = await conn.execute(
        f"UPDATE alert_rules SET rule = %s, webhook_secret = %s, updated_at = coalesce(%s, now()) "
        f"WHERE id = %s AND tenant_id = %s RETURNING {_COLUMNS}",
        (Jsonb(_stored_fields(body)), body.webhook_secret, now, rule_id, body.tenant_id),
    )
    record = await cursor.fetchone()
    return None if record is None else _answer(record)


async def delete_rule(conn: psycopg.AsyncConnection[Any], rule_id: str) -> bool:
    """Delete a rule and its state; its undelivered transitions are cancelled when their turn
    comes (the alert service finds no rule)."""
    async with conn.transaction():
        cursor = await conn.execute("DELETE FROM alert_rules WHERE id = %s", (rule_id,))
        await conn.execute("DELETE FROM alert_states WHERE rule_id = %s", (rule_id,))
    return cursor.rowcount == 1


async def alerts_of_tenant(
    conn: psycopg.AsyncConnection[Any], tenant_id: str, recent: int
) -> list[RuleAlerts]:
    """Each rule of the tenant with its state (``alert_states``, written by the alert service)
    and its ``recent`` latest transitions with their delivery status."""
    cursor = await conn.execute(
        "SELECT r.id, r.rule->>'name', r.rule->>'metric', r.rule->>'op', (r.rule->>'threshold')::float8, "
        "r.rule->>'route', r.rule->>'model', r.rule->>'period', "
        "CASE WHEN r.rule->>'period' IS NULL THEN coalesce(s.firing, false) "
        "ELSE coalesce(s.period = to_char(now() AT TIME ZONE 'UTC', "
        "  CASE r.rule->>'period' WHEN 'day' THEN 'YYYY-MM-DD' ELSE 'YYYY-MM' END), false) END, s.since "
        "FROM alert_rules r LEFT JOIN alert_states s ON s.rule_id = r.id "
        "WHERE r.tenant_id = %s ORDER BY r.created_at, r.id",
        (tenant_id,),
    )
    rules = await cursor.fetchall()
    cursor = await conn.execute(
        "SELECT t.rule_id, t.id, t.state, t.window_start, t.window_end, (t.body->>'value')::float8, "
        "(t.body->>'threshold')::float8, t.at, t.delivery, t.attempts, t.delivered_at, t.next_attempt_at, "
        "t.last_error FROM alert_rules r CROSS JOIN LATERAL ("
        "  SELECT * FROM alert_transitions t WHERE t.rule_id = r.id"
        "  ORDER BY t.at DESC, t.window_start DESC, t.id LIMIT %s"
        ") t WHERE r.tenant_id = %s",
        (recent, tenant_id),
    )
    transitions: dict[str, list[AlertTransition]] = {}
    for rule_id, *fields in await cursor.fetchall():
        (
            transition_id, state, window_start, window_end, value, threshold, at, delivery, attempts,
            delivered_at, next_attempt_at, last_error,
        ) = fields  # fmt: skip
        transitions.setdefault(rule_id, []).append(
            AlertTransition(
                id=transition_id,
                state=state,
                window_start=window_start,
                window_end=window_end,
                value=value,
                threshold=threshold,
                at=at,
                delivery=delivery,
                attempts=attempts,
                delivered_at=delivered_at,
                next_attempt_at=next_attempt_at if delivery == "pending" else None,
                last_error=last_error,
            )
        )
    return [
        RuleAlerts(
            rule_id=rule_id,
            rule_name=name,
            metric=metric,
            op=op,
            threshold=threshold,
            route=route,
            model=model,
            period=period,
            state="firing" if firing else "ok",
            since=since,
            transitions=transitions.get(rule_id, []),
        )
        for rule_id, name, metric, op, threshold, route, model, period, firing, since in rules
    ]
