"""The alert service (SPEC §10): ``python -m dataflows.alert_service`` (``just alerts``).

::

    llm.metrics, llm.dimension-metrics,                 ┌▶ alert_states, alert_transitions
    llm.evaluation-metrics, llm.evaluation-dimension-metrics ─▶ judge ─┤   and alert_offsets: one transaction
        (each record: which tenant's rules, which window)               └▶ deliver: POST, retried ▶ webhooks

**Judging.** The service reads every partition of the row topics (assigned, no
consumer group) from where it stopped. Each record names a window of a key of a
tenant; the records of ``SETTLE_SECONDS`` after the first are gathered (a window's
rows come from several shards within moments of each other, and a rule merges them),
then the tenant's rules that cover them (route, model, dimension value, evaluation
name) are judged from the rows stored in Postgres, by :mod:`dataflows.alerting`. A
judgement stores the rules' states, their new transitions and the offsets read up
to there in **one transaction**: after a crash the service reads again from the
offsets stored, judges those windows again and finds the same transitions (their
ids derive from what they are), stored once.

**Delivering.** A thread POSTs each pending transition (``body``, headers
``Idempotency-Key: <id>`` and, when the rule has a secret,
``X-StreamLens-Signature: sha256=<HMAC-SHA256 of the body>``), to an address checked
again as the rule's was (:mod:`schemas.webhooks`), without following redirects,
``DELIVERY_TIMEOUT_SECONDS`` an attempt. A 2xx answer delivers it; anything else is
retried after 5 s, doubling up to an hour, for ``RETRY_SECONDS`` (25 h); then it is
``failed``. A crash between a POST and its record repeats the POST with the same key:
at least once, one key.

Why not a Bytewax dataflow: what this service keeps is the rules' states and the
transitions, which must be in Postgres before anything is delivered; keeping the
offsets in the same transaction makes the recovery exact with one store, where a
dataflow's snapshots would be a second one to keep in step with it.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import httpx
import msgspec
import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from prometheus_client import Counter, start_http_server

from dataflows import alert_store
from dataflows.alerting import RuleState, Transition, judge, judge_budget, period_of
from schemas.alerts import SCORE_PREFIX, AlertRule
from schemas.config import Settings, load_or_exit
from schemas.database import ensure_schema
from schemas.logs import configure_logging
from schemas.topics import (
    DIMENSION_METRICS,
    EVALUATION_DIMENSION_METRICS,
    EVALUATION_METRICS,
    METRICS,
    ensure_topics,
)
from schemas.webhooks import check_url

logger = logging.getLogger("streamlens.alerts")

TOPICS = (METRICS, DIMENSION_METRICS, EVALUATION_METRICS, EVALUATION_DIMENSION_METRICS)
SETTLE_SECONDS = 1.0
DELIVERY_TIMEOUT_SECONDS = 5.0
RETRY_SECONDS = 25 * 3600
FIRST_RETRY_SECONDS = 5.0
MAX_RETRY_SECONDS = 3600.0
USER_AGENT = "StreamLens-Alerts/1"

TRANSITIONS = Counter("streamlens_alert_transitions", "Alert transitions stored", ["state"])
DELIVERIES = Counter(
    "streamlens_alert_deliveries", "Alert delivery attempts by outcome", ["outcome"]
)  # delivered, retried, failed, cancelled


class _Row(msgspec.Struct):
    """What a rule needs of a row record to know whether it covers it."""

    tenant_id: str
    window_start: datetime
    route: str | None = None
    model: str | None = None
    name: str | None = None
    dimension: str | None = None


_decoder = msgspec.json.Decoder(_Row)


class Touched(msgspec.Struct, frozen=True):
    """A window of a key whose row (of ``topic``) was written."""

    topic: str
    route: str | None
    model: str | None
    window: int
    name: str | None
    dimension: str | None


def covers(rule: AlertRule, touched: Touched) -> bool:
    """Whether a rule judges the window of this row: its kind of row, key and filters."""
    scored = rule.metric.startswith(SCORE_PREFIX)
    if scored:
        wanted = EVALUATION_METRICS if rule.dimension is None else EVALUATION_DIMENSION_METRICS
        if touched.name != rule.metric[len(SCORE_PREFIX) :]:
            return False
    else:
        wanted = METRICS if rule.dimension is None else DIMENSION_METRICS
    return (
        touched.topic == wanted
        and (rule.dimension is None or touched.dimension == rule.dimension)
        and (rule.route is None or touched.route == rule.route)
        and (rule.model is None or touched.model == rule.model)
    )


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def judge_rule(
    conn: psycopg.Connection[Any], rule: AlertRule, windows: set[int], window_seconds: int
) -> tuple[list[Transition], RuleState]:
    """A rule's transitions once rows of ``windows`` were written, from the stored rows."""
    state = alert_store.locked_state(conn, rule.id)
    if rule.period is not None:
        out: list[Transition] = []
        for window in sorted(windows):
            # The period up to this window's end, not beyond: the window a budget fires at
            # must not depend on how many later windows were read with it.
            _, begin, _ = period_of(rule.period, window)
            total = alert_store.total_figures(conn, rule, begin, window + window_seconds)
            found, state = judge_budget(rule, state, total, window, window_seconds)
            out += found
        return out, state
    assert rule.span_seconds is not None
    span = rule.span_seconds // window_seconds
    first = min(windows) - (rule.for_windows - 1 + span - 1) * window_seconds
    figures = alert_store.window_figures(conn, rule, first)
    latest = max([*windows, *figures])
    return judge(rule, state, figures, windows, latest, window_seconds)


class AlertService:
    """Reads the row topics, judges, stores; a :class:`Deliverer` delivers."""

    def __init__(
        self, settings: Settings, stop: threading.Event, wake: threading.Event | None = None
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.wake = wake or threading.Event()  # set when transitions were stored

    def run(self) -> None:
        settings = self.settings
        consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_brokers,
                "group.id": "streamlens-alerts",  # required by the client; offsets are ours
                "enable.auto.commit": False,
                "enable.partition.eof": False,
            }
        )
        try:
            with psycopg.connect(settings.postgres_dsn) as conn:
                self._assign(consumer, conn)
                self._loop(consumer, conn)
        finally:
            consumer.close()

    def _assign(self, consumer: Consumer, conn: psycopg.Connection[Any]) -> None:
        stored = alert_store.offsets(conn)
        conn.commit()
        assigned = []
        for topic in TOPICS:
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            for partition in sorted(partitions):
                assigned.append(
                    TopicPartition(topic, partition, stored.get((topic, partition), OFFSET_BEGINNING))
                )
        consumer.assign(assigned)
        logger.info("alert service: reading %d partitions of %s", len(assigned), ", ".join(TOPICS))

    def _loop(self, consumer: Consumer, conn: psycopg.Connection[Any]) -> None:
        touched: dict[str, set[Touched]] = {}
        read: dict[tuple[str, int], int] = {}
        since: float | None = None
        while not self.stop.is_set():
            for message in consumer.consume(1000, timeout=0.2):
                if message.error() is not None:
                    logger.warning("alert service: %s", message.error())
                    continue
                topic, partition, offset = message.topic(), message.partition(), message.offset()
                read[(topic, partition)] = offset + 1
                since = time.monotonic() if since is None else since
                try:
                    row = _decoder.decode(message.value() or b"")
                except (msgspec.DecodeError, msgspec.ValidationError) as error:
                    logger.warning(
                        "alert service: %s[%d]@%d is not a row: %s", topic, partition, offset, error
                    )
                    continue
                window = int(row.window_start.timestamp())
                touched.setdefault(row.tenant_id, set()).add(
                    Touched(topic, row.route, row.model, window, row.name, row.dimension)
                )
            if since is not None and time.monotonic() - since >= SETTLE_SECONDS:
                stored = self._judge(conn, touched, read)
                touched, read, since = {}, {}, None
                if stored:
                    self.wake.set()

    def _judge(
        self,
        conn: psycopg.Connection[Any],
        touched: dict[str, set[Touched]],
        read: dict[tuple[str, int], int],
    ) -> int:
        """Judge every rule the rows touched; store states, transitions and offsets at once."""
        window_seconds = self.settings.window_seconds
        stored = 0
        with conn.transaction():
            for tenant, rules in alert_store.rules(conn, touched).items():
                for rule in rules:
                    windows = {item.window for item in touched[tenant] if covers(rule, item)}
                    if not windows:
                        continue
                    transitions, state = judge_rule(conn, rule, windows, window_seconds)
                    new = alert_store.save(conn, rule, state, transitions)
                    stored += new
                    for transition in transitions:
                        TRANSITIONS.labels(transition.state).inc()
                        logger.info(
                            "alert %s: rule %s (%r) of tenant %r %s at window %d (value %s)",
                            transition.id,
                            rule.id,
                            rule.name,
                            rule.tenant_id,
                            transition.state,
                            transition.window_start,
                            transition.value,
                        )
            alert_store.save_offsets(conn, read)
        return stored


class Deliverer:
    """POSTs pending transitions until ``stop`` is set; ``wake`` says some were stored."""

    def __init__(
        self,
        settings: Settings,
        stop: threading.Event,
        wake: threading.Event,
        post: Callable[..., httpx.Response] | None = None,
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.wake = wake
        self._client = httpx.Client(follow_redirects=False, timeout=DELIVERY_TIMEOUT_SECONDS)
        self._post = post or self._client.post

    def run(self) -> None:
        with psycopg.connect(self.settings.postgres_dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                batch = alert_store.due(conn)
                if not batch:
                    self.wake.wait(1.0)
                    self.wake.clear()
                    continue
                for item in batch:
                    if self.stop.is_set():
                        break
                    self._deliver(conn, item)
        self._client.close()

    def _deliver(self, conn: psycopg.Connection[Any], item: alert_store.Due) -> None:
        if not item.rule_exists:
            alert_store.given_up(conn, item.id, "cancelled", "the rule was deleted")
            DELIVERIES.labels("cancelled").inc()
            return
        try:
            check_url(item.url, self.settings.alert_webhook_allow)
        except ValueError as error:
            alert_store.given_up(conn, item.id, "failed", f"webhook refused: {error}")
            DELIVERIES.labels("failed").inc()
            return
        headers = {"Content-Type": "application/json", "Idempotency-Key": item.id, "User-Agent": USER_AGENT}
        if item.secret:
            headers["X-StreamLens-Signature"] = signature(item.secret, item.body)
        try:
            answer = self._post(item.url, content=item.body, headers=headers)
            error = None if 200 <= answer.status_code < 300 else f"HTTP {answer.status_code}"
        except httpx.HTTPError as failure:
            error = f"{type(failure).__name__}: {failure}"
        if error is None:
            alert_store.delivered(conn, item.id)
            DELIVERIES.labels("delivered").inc()
            return
        if item.age_seconds >= RETRY_SECONDS:
            alert_store.given_up(conn, item.id, "failed", f"{error}; retried for {RETRY_SECONDS // 3600} h")
            DELIVERIES.labels("failed").inc()
            return
        after = min(FIRST_RETRY_SECONDS * 2**item.attempts, MAX_RETRY_SECONDS)
        alert_store.retry(conn, item.id, after, error)
        DELIVERIES.labels("retried").inc()
        logger.info("alert %s: delivery failed (%s), again in %.0f s", item.id, error, after)


def serve(settings: Settings, stop: threading.Event) -> None:
    """Judge and deliver until ``stop`` is set."""
    wake = threading.Event()
    deliverer = Deliverer(settings, stop, wake)
    thread = threading.Thread(target=deliverer.run, name="alert-delivery", daemon=True)
    thread.start()
    try:
        AlertService(settings, stop, wake).run()
    finally:
        stop.set()
        wake.set()
        thread.join(DELIVERY_TIMEOUT_SECONDS + 5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dataflows.alert_service", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port")
    args = parser.parse_args(argv)
    settings = load_or_exit()
    configure_logging(settings.log_format)
    ensure_schema(settings.postgres_dsn)
    ensure_topics(settings.kafka_brokers, settings.topic_partitions)
    if args.metrics_port:
        start_http_server(args.metrics_port)
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    logger.info("alert service started: brokers %s", settings.kafka_brokers)
    serve(settings, stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
