"""The alert service's Postgres (schemas/alerts.sql): the figures a rule judges, what each
rule was told, transitions and their deliveries, and how far the topics were read.

Figures come from the stored rows (written before the topics carry them), merged
across the keys a rule covers: the same rows the query API answers from.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
from psycopg.types.json import Jsonb

from dataflows.alerting import Figures, RowKey, RuleState, Transition
from schemas.alerts import AlertRule, evaluation_name


def source_of(rule: AlertRule) -> str:
    """The table (or view) a rule's rows are in."""
    scored = evaluation_name(rule.metric) is not None
    if rule.dimension is not None:
        return "llm_evaluation_dimension_metrics" if scored else "llm_dimension_metrics"
    return "llm_evaluation_metrics" if scored else "llm_metrics"


_SCORED = frozenset({"llm_evaluation_metrics", "llm_evaluation_dimension_metrics"})
_DIMENSIONED = frozenset({"llm_dimension_metrics", "llm_evaluation_dimension_metrics"})
_CALL_COLUMNS = (
    "requests, errors, timeouts, estimated_cost_usd, prompt_tokens, completion_tokens, "
    "coalesce(avg_time_to_first_token_ms, 0) * ttft_count, ttft_count, latency_digest"
)
_SCORE_COLUMNS = "coalesce(score_sum, 0), scores"


def _figures(record: Sequence[Any], scored: bool) -> Figures:
    if scored:
        return Figures(score_sum=float(record[0] or 0.0), scores=int(record[1] or 0))
    digest = record[8]
    return Figures(
        int(record[0] or 0),
        int(record[1] or 0),
        int(record[2] or 0),
        float(record[3] or 0.0),
        int(record[4] or 0),
        int(record[5] or 0),
        float(record[6] or 0.0),
        int(record[7] or 0),
        () if digest is None else (bytes(digest),),
    )


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _iso(seconds: float) -> str:
    return _at(seconds).isoformat().replace("+00:00", "Z")


def tenant_rows(
    conn: psycopg.Connection[Any], table: str, tenant: str, first: int, narrowed: Sequence[str] = ()
) -> list[tuple[RowKey, int, Figures]]:
    """Every row of ``table`` of the tenant from window ``first`` on: what it is of, its window
    start, its figures. ``narrowed``: only these evaluation names (or, in a dimension table,
    these dimensions), when given."""
    scored, dimensioned = table in _SCORED, table in _DIMENSIONED
    name = "name" if scored else "NULL"
    dimension = "dimension, value" if dimensioned else "NULL, NULL"
    conditions = "tenant_id = %s AND window_start >= %s"
    values: list[Any] = [tenant, _at(first)]
    if narrowed:
        conditions += f" AND {'dimension' if dimensioned else 'name'} = ANY(%s)"
        values.append(list(narrowed))
    cursor = conn.execute(
        f"SELECT route, model, {name}, {dimension}, extract(epoch FROM window_start)::bigint, "
        f"{_SCORE_COLUMNS if scored else _CALL_COLUMNS} FROM {table} WHERE {conditions}",
        values,
    )
    return [
        (RowKey(*record[:5]), int(record[5]), _figures(record[6:], scored)) for record in cursor.fetchall()
    ]


def total_figures(conn: psycopg.Connection[Any], rule: AlertRule, first: int, end: int) -> Figures:
    """The figures of the rule's rows of windows starting in ``[first, end)``, added up (by
    Postgres: a month of windows is too many to read)."""
    table = source_of(rule)
    scored = table in _SCORED
    conditions = ["tenant_id = %s", "window_start >= %s", "window_start < %s"]
    values: list[Any] = [rule.tenant_id, _at(first), _at(end)]
    for column, value in (("route", rule.route), ("model", rule.model)):
        if value is not None:
            conditions.append(f"{column} = %s")
            values.append(value)
    if scored:
        conditions.append("name = %s")
        values.append(evaluation_name(rule.metric))
    if rule.dimension is not None:
        conditions += ["dimension = %s", "value IS NOT DISTINCT FROM %s"]
        values += [rule.dimension, rule.value]
    sums = (
        "sum(score_sum), sum(scores)"
        if scored
        else "sum(requests), sum(errors), sum(timeouts), sum(estimated_cost_usd), sum(prompt_tokens), "
        "sum(completion_tokens), sum(coalesce(avg_time_to_first_token_ms, 0) * ttft_count), "
        "sum(ttft_count), NULL"
    )
    cursor = conn.execute(f"SELECT {sums} FROM {table} WHERE {' AND '.join(conditions)}", values)
    record = cursor.fetchone()
    assert record is not None
    return _figures(record, scored)


def locked_states(conn: psycopg.Connection[Any], rule_ids: Sequence[str]) -> dict[str, RuleState]:
    """What each rule was told, locked until the transaction ends (made when new)."""
    conn.cursor().executemany(
        "INSERT INTO alert_states (rule_id) VALUES (%s) ON CONFLICT DO NOTHING",
        [(rule,) for rule in rule_ids],
    )
    cursor = conn.execute(
        "SELECT rule_id, firing, extract(epoch FROM since)::bigint, extract(epoch FROM told)::bigint, period "
        "FROM alert_states WHERE rule_id = ANY(%s) ORDER BY rule_id FOR UPDATE",
        (list(rule_ids),),
    )
    return {
        rule_id: RuleState(firing, since, told, period)
        for rule_id, firing, since, told, period in cursor.fetchall()
    }


def _body(rule: AlertRule, transition: Transition, at: str) -> dict[str, Any]:
    """What a transition's deliveries POST (docs/alerts.md)."""
    return {
        "id": transition.id,
        "rule_id": rule.id,
        "rule_name": rule.name,
        "tenant_id": rule.tenant_id,
        "state": transition.state,
        "metric": rule.metric,
        "value": transition.value,
        "threshold": rule.threshold,
        "window_start": _iso(transition.window_start),
        "window_end": _iso(transition.window_end),
        "at": at,
    }


def save(
    conn: psycopg.Connection[Any], judged: Sequence[tuple[AlertRule, RuleState, list[Transition]]]
) -> list[tuple[AlertRule, Transition]]:
    """Store rules' states and their transitions, each transition once whatever judged it
    again; the transitions that were new."""
    if not judged:
        return []
    cursor = conn.cursor()
    cursor.executemany(
        "UPDATE alert_states SET firing = %s, since = %s, told = %s, period = %s, updated_at = now() "
        "WHERE rule_id = %s",
        [
            (
                state.firing,
                None if state.since is None else _at(state.since),
                None if state.told is None else _at(state.told),
                state.period,
                rule.id,
            )
            for rule, state, _ in judged
        ],
    )
    told = [(rule, transition) for rule, _, transitions in judged for transition in transitions]
    if not told:
        return []
    found = conn.execute(
        "SELECT id FROM alert_transitions WHERE id = ANY(%s)", ([transition.id for _, transition in told],)
    )
    known = {record[0] for record in found.fetchall()}
    new = [(rule, transition) for rule, transition in told if transition.id not in known]
    at = _iso(time.time())
    cursor.executemany(
        "INSERT INTO alert_transitions (id, rule_id, tenant_id, state, window_start, window_end, body, "
        "webhook_url) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
        [
            (
                transition.id,
                rule.id,
                rule.tenant_id,
                transition.state,
                _at(transition.window_start),
                _at(transition.window_end),
                Jsonb(_body(rule, transition, at)),
                rule.webhook_url,
            )
            for rule, transition in new
        ],
    )
    return new


def offsets(conn: psycopg.Connection[Any]) -> dict[tuple[str, int], int]:
    cursor = conn.execute("SELECT topic, partition, next_offset FROM alert_offsets")
    return {(topic, partition): offset for topic, partition, offset in cursor.fetchall()}


def save_offsets(conn: psycopg.Connection[Any], read: dict[tuple[str, int], int]) -> None:
    if read:
        conn.cursor().executemany(
            "INSERT INTO alert_offsets (topic, partition, next_offset) VALUES (%s, %s, %s) "
            "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset",
            [(topic, partition, offset) for (topic, partition), offset in read.items()],
        )


class Due(msgspec.Struct):
    """A transition to deliver now."""

    id: str
    body: bytes
    url: str
    secret: str | None
    attempts: int
    age_seconds: float
    rule_exists: bool


def due(conn: psycopg.Connection[Any], limit: int, busy: Sequence[str] = ()) -> list[Due]:
    """Up to ``limit`` transitions to deliver now, the longest waiting first, but those ``busy``."""
    cursor = conn.execute(
        "SELECT t.id, t.body::text, t.webhook_url, r.webhook_secret, t.attempts, "
        "extract(epoch FROM now() - t.at), r.id IS NOT NULL "
        "FROM alert_transitions t LEFT JOIN alert_rules r ON r.id = t.rule_id "
        "WHERE t.delivery = 'pending' AND t.next_attempt_at <= now() AND t.id <> ALL(%s) "
        "ORDER BY t.next_attempt_at, t.at, t.id LIMIT %s",
        (list(busy), limit),
    )
    return [
        Due(id, body.encode(), url, secret, attempts, float(age), exists)
        for id, body, url, secret, attempts, age, exists in cursor.fetchall()
    ]


def delivered(conn: psycopg.Connection[Any], transition_id: str) -> None:
    conn.execute(
        "UPDATE alert_transitions SET delivery = 'delivered', delivered_at = now(), attempts = attempts + 1, "
        "last_error = NULL WHERE id = %s",
        (transition_id,),
    )


def retry(conn: psycopg.Connection[Any], transition_id: str, after_seconds: float, error: str) -> None:
    conn.execute(
        "UPDATE alert_transitions SET attempts = attempts + 1, last_error = %s, "
        "next_attempt_at = now() + make_interval(secs => %s) WHERE id = %s",
        (error[:1000], after_seconds, transition_id),
    )


def given_up(conn: psycopg.Connection[Any], transition_id: str, delivery: str, error: str) -> None:
    conn.execute(
        "UPDATE alert_transitions SET delivery = %s, attempts = attempts + 1, last_error = %s WHERE id = %s",
        (delivery, error[:1000], transition_id),
    )
