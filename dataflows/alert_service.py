"""The alert service (docs/alerts.md): ``python -m dataflows.alert_service`` (``just alerts``).

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

**Postgres away**: both parts log it once and wait; judging then reads again from the
offsets stored, delivering goes on with what is pending.

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
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from datetime import datetime
from typing import Any, NamedTuple

import httpx
import msgspec
import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from prometheus_client import Counter, start_http_server

from dataflows import alert_store
from dataflows.alerting import (
    RuleState,
    Transition,
    figures_by_window,
    judge,
    judge_budget,
    period_of,
    takes_key,
)
from schemas.alert_rules import rules_of_tenants
from schemas.alerts import AlertRule, evaluation_name
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
CONNECT_TIMEOUT_SECONDS = 5
RETRY_PAUSE_SECONDS = 2.0
DELIVERY_THREADS = 16

TRANSITIONS = Counter("streamlens_alert_transitions", "Alert transitions stored", ["state"])
DELIVERIES = Counter(
    "streamlens_alert_deliveries", "Alert delivery attempts by outcome", ["outcome"]
)  # delivered, retried, failed, cancelled


class _Outage:
    """One log line when Postgres is lost to a part of the service, one when it is back."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.since: float | None = None

    def lost(self, error: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
            logger.warning(
                "alert service: postgres unavailable, %s waits until it is back (%s)",
                self.part,
                str(error).strip() or type(error).__name__,
            )

    def back(self) -> None:
        if self.since is not None:
            logger.warning(
                "alert service: postgres back after %.1f s, %s goes on from what is stored",
                time.monotonic() - self.since,
                self.part,
            )
            self.since = None


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


# The topic that tells when rows of each table (alert_store.source_of) were written.
_TOPIC_OF_TABLE = {
    "llm_metrics": METRICS,
    "llm_dimension_metrics": DIMENSION_METRICS,
    "llm_evaluation_metrics": EVALUATION_METRICS,
    "llm_evaluation_dimension_metrics": EVALUATION_DIMENSION_METRICS,
}


def covers(rule: AlertRule, touched: Touched) -> bool:
    """Whether a rule judges the window of this row: its kind of row, key and filters (a
    dimension's record holds all its values)."""
    return touched.topic == _TOPIC_OF_TABLE[alert_store.source_of(rule)] and takes_key(
        rule, touched.route, touched.model, touched.name, touched.dimension
    )


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def judge_tenant(
    conn: psycopg.Connection[Any], touched: list[tuple[AlertRule, set[int]]], window_seconds: int
) -> list[tuple[AlertRule, RuleState, RuleState, list[Transition]]]:
    """The transitions of a tenant's rules once rows of the windows each covers were written,
    from the stored rows: each rule's state before and after, and its new transitions. A
    table's rows are read once for all the rules on it."""
    states = alert_store.locked_states(conn, [rule.id for rule, _ in touched])
    firsts: dict[str, int] = {}
    narrowed: dict[str, set[str]] = {}
    for rule, windows in touched:
        if rule.span_seconds is None:
            continue
        table = alert_store.source_of(rule)
        span = rule.span_seconds // window_seconds
        first = min(windows) - (rule.for_windows - 1 + span - 1) * window_seconds
        firsts[table] = min(first, firsts.get(table, first))
        name = evaluation_name(rule.metric)
        if rule.dimension is not None:
            narrowed.setdefault(table, set()).add(rule.dimension)
        elif name is not None:
            narrowed.setdefault(table, set()).add(name)
    tenant = touched[0][0].tenant_id
    rows = {
        table: alert_store.tenant_rows(conn, table, tenant, first, sorted(narrowed.get(table, ())))
        for table, first in firsts.items()
    }
    out = []
    for rule, windows in touched:
        before = states[rule.id]
        if rule.period is not None:
            state, transitions = before, []
            for window in sorted(windows):
                # The period up to this window's end, not beyond: the window a budget fires at
                # must not depend on how many later windows were read with it.
                _, begin, _ = period_of(rule.period, window)
                total = alert_store.total_figures(conn, rule, begin, window + window_seconds)
                found, state = judge_budget(rule, state, total, window, window_seconds)
                transitions += found
        else:
            figures = figures_by_window(rule, rows[alert_store.source_of(rule)])
            latest = max([*windows, *figures])
            transitions, state = judge(rule, before, figures, windows, latest, window_seconds)
        out.append((rule, before, state, transitions))
    return out


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
                # An offset stored before the broker deleted what it pointed at: read on from
                # the oldest record kept (rows of windows judged again find what was told).
                "auto.offset.reset": "earliest",
            }
        )
        outage = _Outage("judging")
        try:
            while not self.stop.is_set():
                try:
                    with psycopg.connect(
                        settings.postgres_dsn, connect_timeout=CONNECT_TIMEOUT_SECONDS
                    ) as conn:
                        # Again after an outage: what was read but not stored is read again.
                        self._assign(consumer, conn)
                        outage.back()
                        self._loop(consumer, conn)
                except psycopg.Error as error:
                    outage.lost(error)
                    self.stop.wait(RETRY_PAUSE_SECONDS)
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
        started = time.monotonic()
        judged: list[tuple[AlertRule, RuleState, list[Transition]]] = []
        with conn.transaction():
            for tenant, rules in rules_of_tenants(conn, list(touched)).items():
                covered = [
                    (rule, {item.window for item in touched[tenant] if covers(rule, item)}) for rule in rules
                ]
                covered = [(rule, windows) for rule, windows in covered if windows]
                if covered:
                    judged += [
                        (rule, state, transitions)
                        for rule, before, state, transitions in judge_tenant(conn, covered, window_seconds)
                        if state != before or transitions
                    ]
            new = alert_store.save(conn, judged)
            alert_store.save_offsets(conn, read)
        for rule, transition in new:
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
        if new:
            logger.info(
                "alert service: %d new transitions (%d rules changed) judged and stored in %.2f s",
                len(new),
                len(judged),
                time.monotonic() - started,
            )
        return len(new)


class Attempt(NamedTuple):
    """How one delivery attempt went: ``error`` None when the receiver took it."""

    outcome: str  # delivered, refused (the target is not allowed), cancelled (no rule), error
    error: str | None = None


class Deliverer:
    """POSTs pending transitions until ``stop`` is set; ``wake`` says some were stored.

    ``DELIVERY_THREADS`` attempts run at once (a slow receiver holds one of them, not
    the others' alerts); this thread alone records how each went.
    """

    def __init__(self, settings: Settings, stop: threading.Event, wake: threading.Event) -> None:
        self.settings = settings
        self.stop = stop
        self.wake = wake
        self._client = httpx.Client(
            follow_redirects=False,
            timeout=DELIVERY_TIMEOUT_SECONDS,
            limits=httpx.Limits(max_connections=DELIVERY_THREADS),
        )

    def run(self) -> None:
        outage = _Outage("delivering")
        with ThreadPoolExecutor(DELIVERY_THREADS, thread_name_prefix="alert-post") as pool:
            while not self.stop.is_set():
                in_flight: dict[Future[Attempt], alert_store.Due] = {}
                try:
                    with psycopg.connect(
                        self.settings.postgres_dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS
                    ) as conn:
                        outage.back()
                        self._deliver(conn, pool, in_flight)
                except psycopg.Error as error:
                    outage.lost(error)
                    # Attempts whose end cannot be recorded stay pending: made again, same key.
                    wait(in_flight)
                    self.stop.wait(RETRY_PAUSE_SECONDS)
        self._client.close()

    def _deliver(
        self,
        conn: psycopg.Connection[Any],
        pool: ThreadPoolExecutor,
        in_flight: dict[Future[Attempt], alert_store.Due],
    ) -> None:
        while not self.stop.is_set():
            room = 2 * DELIVERY_THREADS - len(in_flight)
            if room > 0:
                busy = [item.id for item in in_flight.values()]
                for item in alert_store.due(conn, room, busy):
                    in_flight[pool.submit(self._attempt, item)] = item
            if not in_flight:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            done, _ = wait(in_flight, timeout=0.2, return_when=FIRST_COMPLETED)
            with conn.transaction():  # one commit for the attempts that ended together
                for future in done:
                    self._record(conn, in_flight.pop(future), future.result())
        # Stopping: the attempts under way end (each within its timeout) and are recorded.
        for future in as_completed(list(in_flight)):
            self._record(conn, in_flight.pop(future), future.result())

    def _attempt(self, item: alert_store.Due) -> Attempt:
        if not item.rule_exists:
            return Attempt("cancelled", "the rule was deleted")
        try:
            check_url(item.url, self.settings.alert_webhook_allow)
        except ValueError as error:
            return Attempt("refused", f"webhook refused: {error}")
        headers = {"Content-Type": "application/json", "Idempotency-Key": item.id, "User-Agent": USER_AGENT}
        if item.secret:
            headers["X-StreamLens-Signature"] = signature(item.secret, item.body)
        try:
            answer = self._client.post(item.url, content=item.body, headers=headers)
        except httpx.HTTPError as failure:
            return Attempt("error", f"{type(failure).__name__}: {failure}")
        if 200 <= answer.status_code < 300:
            return Attempt("delivered")
        return Attempt("error", f"HTTP {answer.status_code}")

    def _record(self, conn: psycopg.Connection[Any], item: alert_store.Due, attempt: Attempt) -> None:
        error = attempt.error or ""
        if attempt.outcome == "delivered":
            alert_store.delivered(conn, item.id)
            DELIVERIES.labels("delivered").inc()
        elif attempt.outcome in ("cancelled", "refused"):
            delivery = "cancelled" if attempt.outcome == "cancelled" else "failed"
            alert_store.given_up(conn, item.id, delivery, error)
            DELIVERIES.labels(delivery).inc()
            logger.warning("alert %s: %s, not delivered", item.id, error)
        elif item.age_seconds >= RETRY_SECONDS:
            alert_store.given_up(conn, item.id, "failed", f"{error}; retried for {RETRY_SECONDS // 3600} h")
            DELIVERIES.labels("failed").inc()
            logger.warning("alert %s: %s; retried for %d h, given up", item.id, error, RETRY_SECONDS // 3600)
        else:
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
