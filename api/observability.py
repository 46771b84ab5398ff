"""What the two APIs tell an operator: their Prometheus metrics (``GET /metrics``) and outage log lines.

Every metric of the ingestion API and of the query API is defined here, once
(docs/operations.md lists them). ``/metrics`` is open like ``/health``, so no label
carries a tenant, a route or a model: neither their names nor how many there
are can be read from it. Each app has a registry of its own, so several apps in
one process do not mix their figures.

The values are plain numbers rather than ``prometheus_client``'s ``Counter`` and
``Histogram``: those take a lock on every update (1–2 µs each, measured), the
ingestion API makes several per request, and the acknowledgement latency one
per record, in the producer's delivery thread, at 100,000 records/s in
batches. Each value here has one writer only — the event loop, or for the
acknowledgement latency the delivery thread — so no lock is needed; scrapes
run on the event loop and read numbers that are at worst one update behind.
``prometheus_client`` registers, renders (and, in the tests, parses) them.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MiB = 1024 * 1024
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BYTES_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1 * MiB, 4 * MiB, 8 * MiB)

# The ingestion API's endpoints, as the ``endpoint`` label names them.
INGESTION_ENDPOINTS = ("request", "response", "evaluation", "events", "traces", "logs")
# Why an event or span was refused (``reason`` label).
REJECTION_REASONS = ("invalid", "future_timestamp", "other_tenant", "over_quota")
# The query API's kinds of query (``kind`` label).
QUERY_KINDS = ("windows", "rollup", "evaluations")


class Count:
    """One counter or gauge value."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class Buckets:
    """One histogram: counts per bucket (not cumulative; the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound ≥ value, as Prometheus buckets are "le".
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class _Family:
    """A metric with fixed label names; its children are made on first use."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.label_names = tuple(labels)
        self._children: dict[tuple[str, ...], object] = {}

    def _child(self, values: tuple[str, ...], make: Callable[[], object]) -> object:
        assert len(values) == len(self.label_names), (self.name, values)
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = make()
        return child

    def _items(self) -> list[tuple[tuple[str, ...], object]]:
        return list(self._children.items())

    def collect(self) -> Metric:
        raise NotImplementedError


class Counter(_Family):
    """A value that only grows; ``name`` without the ``_total`` the exposition adds."""

    def labels(self, *values: str) -> Count:
        child = self._child(values, Count)
        assert isinstance(child, Count)
        return child

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.label_names)
        for values, child in self._items():
            assert isinstance(child, Count)
            family.add_metric(values, child.value)
        return family


class Gauge(Counter):
    """A value that goes up and down."""

    def collect(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.label_names)
        for values, child in self._items():
            assert isinstance(child, Count)
            family.add_metric(values, child.value)
        return family


class ReadGauge(_Family):
    """A gauge read when scraped, from whatever ``read`` returns (None: not exposed)."""

    def __init__(self, name: str, documentation: str) -> None:
        super().__init__(name, documentation)
        self.read: Callable[[], float | None] = lambda: None

    def collect(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation)
        value = self.read()
        if value is not None:
            family.add_metric((), value)
        return family


class Histogram(_Family):
    def __init__(
        self, name: str, documentation: str, labels: Sequence[str] = (), bounds: Sequence[float] = ()
    ) -> None:
        super().__init__(name, documentation, labels)
        self.bounds = tuple(bounds)

    def labels(self, *values: str) -> Buckets:
        child = self._child(values, lambda: Buckets(self.bounds))
        assert isinstance(child, Buckets)
        return child

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)
        for values, child in self._items():
            assert isinstance(child, Buckets)
            counts, total = list(child.counts), child.total
            cumulative, running = [], 0
            for bound, count in zip((*child.bounds, float("inf")), counts, strict=True):
                running += count
                cumulative.append((_bound(bound), running))
            family.add_metric(list(values), cumulative, total)
        return family


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class _Families:
    """The families of one app, registered in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        for value in vars(self).values():
            if isinstance(value, _Family):
                yield value.collect()


class IngestionObservations(_Families):
    def __init__(self) -> None:
        self.events_accepted = Counter(
            "streamlens_ingestion_events_accepted",
            "Events stored (acknowledged by the broker) from the single-event and batch endpoints.",
            ["endpoint"],
        )
        self.events_rejected = Counter(
            "streamlens_ingestion_events_rejected",
            "Events read and refused, by reason: invalid (not JSON or against the schema), "
            "future_timestamp, other_tenant.",
            ["endpoint", "reason"],
        )
        self.spans_accepted = Counter(
            "streamlens_ingestion_spans_accepted",
            "GenAI spans of OTLP exports stored (each as a request and a response event).",
        )
        self.spans_rejected = Counter(
            "streamlens_ingestion_spans_rejected",
            "GenAI spans of OTLP exports refused, by reason: invalid, future_timestamp, other_tenant.",
            ["reason"],
        )
        self.responses = Counter(
            "streamlens_ingestion_responses",
            "HTTP answers by endpoint and status code (503: the broker did not acknowledge).",
            ["endpoint", "status"],
        )
        self.request_seconds = Histogram(
            "streamlens_ingestion_request_seconds",
            "Time from a request's start to its answer, by endpoint.",
            ["endpoint"],
            SECONDS_BUCKETS,
        )
        self.body_bytes = Histogram(
            "streamlens_ingestion_body_bytes",
            "Sizes of the request bodies read (as received, before any decompression), by endpoint.",
            ["endpoint"],
            BYTES_BUCKETS,
        )
        self.sends_in_flight = Gauge(
            "streamlens_ingestion_sends_in_flight",
            "Requests whose records are produced and not yet acknowledged by the broker.",
        )
        self.broker_ack_seconds = Histogram(
            "streamlens_ingestion_broker_ack_seconds",
            "Time from producing a record to the broker's acknowledgement, per acknowledged record.",
            bounds=SECONDS_BUCKETS,
        )
        super().__init__()


class EndpointObservations:
    """One ingestion endpoint's metrics, looked up once rather than per request.

    For ``traces`` the accepted and refused things are spans, for the others events.
    """

    def __init__(self, metrics: IngestionObservations, endpoint: str) -> None:
        self.request_seconds = metrics.request_seconds.labels(endpoint)
        self.body_bytes = metrics.body_bytes.labels(endpoint)
        if endpoint == "traces":
            self.accepted = metrics.spans_accepted.labels()
            self.rejected = {reason: metrics.spans_rejected.labels(reason) for reason in REJECTION_REASONS}
        else:
            self.accepted = metrics.events_accepted.labels(endpoint)
            self.rejected = {
                reason: metrics.events_rejected.labels(endpoint, reason) for reason in REJECTION_REASONS
            }
        self._endpoint = endpoint
        self._responses = metrics.responses
        self._by_status: dict[int, Count] = {}

    def answered(self, status: int, seconds: float) -> None:
        count = self._by_status.get(status)
        if count is None:
            count = self._by_status[status] = self._responses.labels(self._endpoint, str(status))
        count.value += 1
        self.request_seconds.observe(seconds)


class ObservedEndpoints:
    """ASGI middleware counting each endpoint's answers by status and timing them.

    ``endpoints`` maps a path to its metrics; only ``POST`` is observed there, the one method
    those endpoints take. An exception that escapes the app counts as a 500, as the server
    answers it.
    """

    def __init__(self, app: ASGIApp, endpoints: Mapping[str, EndpointObservations]) -> None:
        self.app = app
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self.endpoints.get(scope["path"]) if scope["type"] == "http" else None
        if metrics is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            metrics.answered(status, time.perf_counter() - started)


class QueryObservations(_Families):
    def __init__(self) -> None:
        self.request_seconds = Histogram(
            "streamlens_query_request_seconds",
            "Time of GET /v1/metrics requests whose parameters were valid, by kind (windows, rollup).",
            ["kind"],
            SECONDS_BUCKETS,
        )
        self.rows_returned = Counter(
            "streamlens_query_rows_returned", "Rows answered by GET /v1/metrics, by kind.", ["kind"]
        )
        self.database_errors = Counter(
            "streamlens_query_database_errors",
            "Postgres errors and pool timeouts, by what was asked (windows, rollup, ready).",
            ["kind"],
        )
        self.pool_size = ReadGauge(
            "streamlens_query_pool_connections", "Connections the Postgres pool holds, busy or not."
        )
        self.pool_available = ReadGauge(
            "streamlens_query_pool_available", "Idle connections in the Postgres pool."
        )
        self.pool_waiting = ReadGauge(
            "streamlens_query_pool_waiting", "Requests waiting for a connection of the Postgres pool."
        )
        # Every series from the start, at 0: a rate needs the value before the first event.
        for kind in QUERY_KINDS:
            self.request_seconds.labels(kind)
            self.rows_returned.labels(kind)
        for kind in (*QUERY_KINDS, "ready"):
            self.database_errors.labels(kind)
        super().__init__()


def metrics_route(families: _Families) -> Route:
    """``GET /metrics``: ``families`` in the Prometheus text format, no key asked."""

    async def scrape(request: Request) -> Response:
        return Response(generate_latest(families.registry), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", scrape, methods=["GET"])


class OutageLog:
    """One log line when a dependency is lost and one when it is back, however often it is seen;
    the APIs answer 503 meanwhile (the dataflow waits instead: ``dataflows.sinks.OutageBackoff``).

    Noticed from several threads (a delivery thread, the event loop), hence the lock.
    """

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._lock = threading.Lock()
        self.down = False

    def lost(self, detail: str) -> None:
        with self._lock:
            if self.down:
                return
            self.down = True
        self._logger.warning("%s lost: %s", self._what, detail)

    def back(self) -> None:
        if not self.down:  # the common case, called after every successful use
            return
        with self._lock:
            if not self.down:
                return
            self.down = False
        self._logger.warning("%s back", self._what)
