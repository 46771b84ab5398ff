"""The ingestion API (docs/api.md): ``uvicorn api.ingestion:app``.

Each event is decoded with the shared schemas, so a value that reaches Kafka is
valid and normalised (timestamps in UTC, unknown fields dropped). A timestamp
more than two minutes ahead of the server's clock is refused
(:func:`schemas.events.check_not_future`). The API answers
202 only after the broker acknowledged the record; anything else is a 503 with
``Retry-After``, and the client sends again (the dataflow ignores duplicates by
``request_id``).

``POST /v1/llm/evaluation`` (and ``"type": "evaluation"`` in a batch) takes scores and
labels about calls (docs/evaluations.md), stored on ``llm.evaluations`` keyed by the call's
``request_id``, so that they share its partition.

``POST /v1/traces`` takes OTLP/HTTP trace exports: each GenAI span becomes a
request and a response event (:mod:`api.otlp`), judged and sent like the others.
``gen_ai.evaluation.result`` events — span events there, log records on
``POST /v1/logs`` (OTLP/HTTP log exports) — become evaluations.

Every endpoint but ``/health``, ``/ready`` and ``/metrics`` takes an ``ingest``
API key (:mod:`api.auth`, declared with ``@requires("ingest")``); an event of another
tenant than the key's is refused (403, or that index in a batch), and responses are
stamped with the key's tenant.

``/ready`` answers 200 once the broker has the event topics and has given the
producer its producer id; start-up waits for that (a few seconds at most), so
the first requests do not. ``GET /metrics`` is in the Prometheus text format
(:mod:`api.observability`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import NamedTuple, TypeVar

import msgspec
from confluent_kafka import KafkaException
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api import otlp
from api.auth import AUTHENTICATION, Principal, check_event, open_key_store, principal_of, requires
from api.body import BodyError, MiB, check_content_type, read_body
from api.errors import EXCEPTION_HANDLERS, ApiError, api_error
from api.observability import (
    INGESTION_ENDPOINTS,
    REJECTION_REASONS,
    Buckets,
    Count,
    EndpointObservations,
    IngestionObservations,
    ObservedEndpoints,
    metrics_route,
)
from api.producer import BrokerUnavailable, EventProducer
from api.quotas import OverQuota, QuotaGate
from schemas.config import Settings, load_or_exit
from schemas.events import (
    IngestEvent,
    LLMEvaluation,
    LLMRequest,
    batch_decoder,
    check_not_future,
    encoder,
    evaluation_decoder,
    ingest_decoder,
    request_decoder,
    response_decoder,
)
from schemas.logs import configure_logging
from schemas.topics import EVALUATIONS, REQUESTS, RESPONSES, ensure_topics

logger = logging.getLogger("streamlens.ingestion")

EVENT_BODY_LIMIT = 1 * MiB
BATCH_BODY_LIMIT = 8 * MiB
RETRY_AFTER_SECONDS = 5
# /ready asks the broker at most this often; probes every second cost one request.
READY_CACHE_SECONDS = 1.5
# How often a lost broker (or lost topics) is looked for again.
RECOVERY_INTERVAL_SECONDS = 2.0
# Start-up waits at most this long for the producer to be ready, then serves (503 until it is).
STARTUP_READY_SECONDS = 5.0
DEFAULT_PORT = 8080
# What the API writes to and so needs to exist.
EVENT_TOPICS = frozenset({REQUESTS, RESPONSES, EVALUATIONS})

_ACCEPTED = b'{"status":"accepted"}'
Record = tuple[str, bytes, bytes]
T = TypeVar("T")
Export = TypeVar("Export")
# What a refusal's status says about the event (see _refuse), as the metrics' reason.
_REFUSAL_REASONS = {400: "future_timestamp", 403: "other_tenant"}


def to_record(event: IngestEvent) -> Record:
    """``(topic, key, value)``: keyed by ``request_id`` so both halves of a call, and its
    evaluations, share a partition."""
    if isinstance(event, LLMRequest):
        topic = REQUESTS
    else:
        topic = EVALUATIONS if isinstance(event, LLMEvaluation) else RESPONSES
    return topic, event.request_id.encode(), encoder.encode(event)


def _json(status: int, content: object) -> Response:
    return Response(encoder.encode(content), status_code=status, media_type="application/json")


def _malformed(error: ValueError) -> str:
    # msgspec checks UTF-8 only in the strings it keeps, and then raises
    # UnicodeDecodeError rather than one of its own errors.
    if isinstance(error, UnicodeDecodeError):
        return f"a string is not valid UTF-8 (byte {error.start} of it)"
    return str(error)


async def _decode_body(
    request: Request,
    limit: int,
    decoder: msgspec.json.Decoder[T],
    invalid_code: str,
    sizes: Buckets,
    invalid: Count | None = None,
) -> T:
    """The body decoded, or the 415/413/400 :class:`ApiError` saying what is wrong with it.

    ``invalid`` counts bodies read and found invalid: for a single event, that is the event.
    """
    check_content_type(request)
    body = await read_body(request, limit)
    sizes.observe(len(body))
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as error:
        problem = ApiError(400, invalid_code, str(error))
    except (msgspec.DecodeError, UnicodeDecodeError) as error:
        problem = ApiError(400, "invalid_json", _malformed(error))
    if invalid is not None:
        invalid.value += 1
    raise problem


async def _read_export(
    request: Request,
    encoding: otlp.Encoding,
    sizes: Buckets,
    decode: Callable[[bytes, otlp.Encoding], Export],
) -> Export:
    """The OTLP export in the body, decoded by ``decode``, or :class:`BodyError` saying
    what is wrong with it."""
    if encoding == "json":
        check_content_type(request)
    try:
        body = await read_body(request, otlp.TRACES_BODY_LIMIT)
    except BodyError as error:
        # An export without spans is an empty protobuf message: no bytes at all.
        if error.code != "empty_body" or encoding != "protobuf":
            raise
        body = b""
    sizes.observe(len(body))
    return decode(otlp.decompress(body, request.headers.get("content-encoding")), encoding)


def _refuse(principal: Principal, event: IngestEvent, now: float) -> tuple[int, str] | None:
    """Why a decoded event may not be stored, as (status, detail); None when it may.

    The one place every endpoint judges an event beyond its schema: a timestamp too
    far ahead of this clock (400), another tenant than the key's (403).
    """
    future = check_not_future(event, now)
    if future is not None:
        return 400, future
    refusal = check_event(principal, event)
    if refusal is not None:
        return 403, refusal
    return None


class _Counts(NamedTuple):
    """What an endpoint counts as accepted, and as rejected by reason."""

    accepted: Count
    rejected: dict[str, Count]


def _evaluation_records(
    principal: Principal,
    evaluations: list[LLMEvaluation],
    rejected: list[str],
    refused: dict[str, Count],
    now: float,
) -> tuple[list[Record], list[LLMEvaluation]]:
    """The records of the evaluations that may be stored, and those evaluations; each
    refusal is added to ``rejected`` (the OTLP answer's) and counted in ``refused`` by reason."""
    records: list[Record] = []
    kept: list[LLMEvaluation] = []
    for evaluation in evaluations:
        refusal = _refuse(principal, evaluation, now)
        if refusal is not None:
            rejected.append(f"evaluation {evaluation.name!r} of {evaluation.request_id}: {refusal[1]}")
            refused[_REFUSAL_REASONS[refusal[0]]].value += 1
            continue
        records.append(to_record(evaluation))
        kept.append(evaluation)
    return records, kept


def tenant_counts(principal: Principal, events: Sequence[IngestEvent]) -> Counter[str]:
    """Events per tenant, as quotas count them: the key's tenant, or with ``AUTH=off`` each
    event's own (a response without one counts toward no quota)."""
    if principal.tenant_id is not None:
        return Counter({principal.tenant_id: len(events)}) if events else Counter()
    return Counter(event.tenant_id for event in events if event.tenant_id is not None)


def _unavailable(detail: str) -> ApiError:
    return ApiError(503, "broker_unavailable", detail, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


# The OTLP/HTTP endpoints, which answer errors as a ``google.rpc.Status``.
OTLP_PATHS = frozenset({"/v1/traces", "/v1/logs"})


async def ingestion_error(request: Request, exc: Exception) -> Response:
    """An :class:`ApiError` as its JSON body, or on the OTLP endpoints as a
    ``google.rpc.Status`` in the request's encoding."""
    if request.url.path in OTLP_PATHS:
        assert isinstance(exc, ApiError)
        return otlp.as_status(exc, otlp.answer_encoding(request.headers.get("content-type")))
    return await api_error(request, exc)


class Ingestion:
    """The API's state (settings, producer, broker checks) and its endpoints."""

    def __init__(self, settings: Settings | None = None) -> None:
        # None: read the environment at start-up, so importing needs nothing.
        self._given_settings = settings
        self.settings: Settings | None = None
        self.producer: EventProducer | None = None
        self._ready_checked_at = -READY_CACHE_SECONDS
        self._ready_answer: Response | None = None
        self._ready_check: asyncio.Task[Response] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self.metrics = IngestionObservations()
        self._endpoints = {name: EndpointObservations(self.metrics, name) for name in INGESTION_ENDPOINTS}
        # The traces endpoint counts spans; the evaluations of their events are events.
        self._span_evaluations = _Counts(
            self.metrics.events_accepted.labels("traces"),
            {reason: self.metrics.events_rejected.labels("traces", reason) for reason in REJECTION_REASONS},
        )
        self._in_flight = self.metrics.sends_in_flight.labels()
        self.quotas: QuotaGate | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        settings = self._given_settings or load_or_exit()
        configure_logging(settings.log_format)
        self.settings = settings
        self.producer = EventProducer(
            settings.kafka_brokers, ack_latency=self.metrics.broker_ack_seconds.labels()
        )
        self.producer.start()
        try:
            await asyncio.to_thread(
                ensure_topics, settings.kafka_brokers, settings.topic_partitions, timeout=3.0
            )
        except (KafkaException, RuntimeError) as error:
            logger.warning(
                "the broker at %s is not usable (%s); starting anyway, answering 503 until it is back",
                settings.kafka_brokers,
                error,
            )
            self.recover_soon()
        else:
            # Ready before serving: the first requests would otherwise wait for the
            # producer id, or be the ones to find the broker slow.
            if not await self._until_ready(STARTUP_READY_SECONDS):
                logger.warning(
                    "the producer is not ready after %.0f s; starting anyway, /ready says why",
                    STARTUP_READY_SECONDS,
                )
        logger.info(
            "ingestion API started: HTTP_PORT %s, brokers %s, auth %s",
            settings.http_port or f"unset ({DEFAULT_PORT})",
            settings.kafka_brokers,
            "on" if settings.auth else "off",
        )
        self.quotas = QuotaGate(settings)
        try:
            async with open_key_store(settings) as keys, self.quotas.running():
                app.state.key_store = keys
                yield
        finally:
            # The server has answered every request it took by now (uvicorn waits
            # for them before the lifespan ends); what is left is to deliver.
            for task in (self._recovery, self._ready_check):
                if task is not None:
                    task.cancel()
            left = await self.producer.close(timeout=10.0)
            if left:
                logger.error("%d records were not delivered at shut-down", left)

    # -- the broker's health ---------------------------------------------------

    async def _until_ready(self, timeout: float) -> bool:
        """Whether ``/ready`` answered 200 within ``timeout`` (asked every 50 ms).

        Asking fetches every topic's metadata through the producer, so the first
        sends find their partitions known.
        """
        deadline = time.monotonic() + timeout
        while True:
            self._ready_checked_at = -READY_CACHE_SECONDS
            if (await self._check_ready()).status_code == 200:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

    def recover_soon(self) -> None:
        """Look for the broker until it answers and has the event topics, creating them if lost.

        A broker restarted empty (memory storage) has no topics; they are created
        again, as at start-up, so that sends succeed once it is back.
        """
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._recover())

    async def _recover(self) -> None:
        assert self.producer is not None and self.settings is not None
        while True:
            topics = await self.producer.reachable()
            if topics is None:
                self.producer.outage.lost("it does not answer a metadata request")
            else:
                self.producer.outage.back()
                if topics >= EVENT_TOPICS:
                    return
                try:
                    await asyncio.to_thread(
                        ensure_topics,
                        self.settings.kafka_brokers,
                        self.settings.topic_partitions,
                        timeout=3.0,
                    )
                    logger.warning("created the missing topics again on %s", self.settings.kafka_brokers)
                    return
                except (KafkaException, RuntimeError) as error:
                    logger.warning("could not create the topics: %s", error)
            await asyncio.sleep(RECOVERY_INTERVAL_SECONDS)

    async def _send(self, records: list[Record]) -> None:
        """Returns once the broker acknowledged every record; raises the 503 otherwise."""
        assert self.producer is not None
        if not records:
            return
        self._in_flight.value += 1
        try:
            await self.producer.send(records)
        except BrokerUnavailable as error:
            self.recover_soon()
            raise _unavailable(f"{error.detail}; the events may not be stored, send them again") from None
        finally:
            self._in_flight.value -= 1

    async def _send_within_quota(
        self, records: list[Record], counts: Counter[str], metrics: EndpointObservations
    ) -> None:
        """Returns once each tenant's events (``counts``) were taken from its quota and the
        broker acknowledged every record, counted as the tenants' usage; raises the 429 or 503
        otherwise."""
        assert self.quotas is not None
        try:
            await self.quotas.admit(counts)
        except OverQuota as refusal:
            metrics.rejected["over_quota"].value += sum(counts.values())
            raise ApiError(
                429, "over_quota", str(refusal), headers={"Retry-After": str(refusal.retry_after)}
            ) from None
        await self._send(records)
        for tenant, count in counts.items():
            self.quotas.count(tenant, accepted=count)

    def endpoint_observations(self, endpoint: str) -> EndpointObservations:
        """The metrics of ``endpoint`` (one of ``INGESTION_ENDPOINTS``)."""
        return self._endpoints[endpoint]

    # -- endpoints ---------------------------------------------------------------

    @requires("ingest")
    async def post_request(self, request: Request) -> Response:
        return await self._post_one(request, request_decoder, self._endpoints["request"])

    @requires("ingest")
    async def post_response(self, request: Request) -> Response:
        return await self._post_one(request, response_decoder, self._endpoints["response"])

    @requires("ingest")
    async def post_evaluation(self, request: Request) -> Response:
        return await self._post_one(request, evaluation_decoder, self._endpoints["evaluation"])

    async def _post_one(
        self, request: Request, decoder: msgspec.json.Decoder, metrics: EndpointObservations
    ) -> Response:
        event = await _decode_body(
            request,
            EVENT_BODY_LIMIT,
            decoder,
            "invalid_event",
            metrics.body_bytes,
            metrics.rejected["invalid"],
        )
        principal = principal_of(request)
        refusal = _refuse(principal, event, time.time())
        if refusal is not None:
            status, detail = refusal
            metrics.rejected[_REFUSAL_REASONS[status]].value += 1
            raise ApiError(status, "invalid_event" if status == 400 else "forbidden", detail)
        await self._send_within_quota([to_record(event)], tenant_counts(principal, [event]), metrics)
        metrics.accepted.value += 1
        return Response(_ACCEPTED, status_code=202, media_type="application/json")

    @requires("ingest")
    async def post_events(self, request: Request) -> Response:
        metrics = self._endpoints["events"]
        batch = await _decode_body(
            request, BATCH_BODY_LIMIT, batch_decoder, "invalid_batch", metrics.body_bytes
        )
        principal = principal_of(request)
        records: list[Record] = []
        events: list[IngestEvent] = []
        rejected: list[dict[str, object]] = []
        now = time.time()
        for index, raw in enumerate(batch.events):
            # Each event on its own: one bad event must not cost the others.
            try:
                event = ingest_decoder.decode(raw)
            except (msgspec.ValidationError, UnicodeDecodeError) as error:
                rejected.append({"index": index, "error": _malformed(error)})
                metrics.rejected["invalid"].value += 1
                continue
            refusal = _refuse(principal, event, now)
            if refusal is not None:
                rejected.append({"index": index, "error": refusal[1]})
                metrics.rejected[_REFUSAL_REASONS[refusal[0]]].value += 1
                continue
            records.append(to_record(event))
            events.append(event)
        # All or nothing: a batch over its quota is refused whole, to be sent again; and
        # all-or-503: which records of a failed send were stored cannot be known, so the
        # client resends the batch and duplicates are ignored downstream.
        await self._send_within_quota(records, tenant_counts(principal, events), metrics)
        metrics.accepted.value += len(records)
        if rejected:
            return _json(207, {"accepted": len(records), "rejected": rejected})
        return _json(202, {"accepted": len(records)})

    async def _otlp_export(
        self,
        request: Request,
        metrics: EndpointObservations,
        decode: Callable[[bytes, otlp.Encoding], Export],
    ) -> tuple[otlp.Encoding, Export]:
        """The encoding and the export of an OTLP/HTTP request, or the :class:`ApiError`
        saying why not (answered as a ``google.rpc.Status`` by :func:`ingestion_error`)."""
        encoding = otlp.request_encoding(request.headers.get("content-type"))
        return encoding, await _read_export(request, encoding, metrics.body_bytes, decode)

    @requires("ingest")
    async def post_traces(self, request: Request) -> Response:
        """OTLP/HTTP: 200 with an ``ExportTraceServiceResponse`` (``partial_success`` naming
        the first rejected span or evaluation event), errors as a ``google.rpc.Status``, in
        the request's encoding."""
        metrics = self._endpoints["traces"]
        encoding, export = await self._otlp_export(request, metrics, otlp.decode_export)
        principal = principal_of(request)
        mapped = otlp.calls_from_export(export, principal.tenant_id)
        rejected = mapped.rejected
        metrics.rejected["invalid"].value += len(rejected) - mapped.rejected_evaluations
        self._span_evaluations.rejected["invalid"].value += mapped.rejected_evaluations
        records: list[Record] = []
        events: list[IngestEvent] = []
        spans = 0
        now = time.time()
        for call in mapped.calls:
            refusal = _refuse(principal, call[0], now) or _refuse(principal, call[1], now)
            if refusal is not None:
                rejected.append(f"span {call[0].request_id}: {refusal[1]}")
                metrics.rejected[_REFUSAL_REASONS[refusal[0]]].value += 1
                continue
            records.extend(to_record(event) for event in call)
            events.extend(call)
            spans += 1
        evaluations, evaluated = _evaluation_records(
            principal, mapped.evaluations, rejected, self._span_evaluations.rejected, now
        )
        records.extend(evaluations)
        # All or nothing, as for a batch: OTLP exporters send the whole export again
        # (after Retry-After for a 429, a status the SDK retries).
        await self._send_within_quota(records, tenant_counts(principal, events + evaluated), metrics)
        metrics.accepted.value += spans
        self._span_evaluations.accepted.value += len(evaluations)
        return otlp.export_response(rejected, encoding)

    @requires("ingest")
    async def post_logs(self, request: Request) -> Response:
        """OTLP/HTTP log exports, answered as :meth:`post_traces` answers: each
        ``gen_ai.evaluation.result`` log record is an evaluation, other records are ignored."""
        metrics = self._endpoints["logs"]
        encoding, export = await self._otlp_export(request, metrics, otlp.decode_logs_export)
        principal = principal_of(request)
        found = otlp.evaluations_from_logs(export, principal.tenant_id)
        rejected = found.rejected
        metrics.rejected["invalid"].value += len(rejected)
        records, evaluated = _evaluation_records(
            principal, found.evaluations, rejected, metrics.rejected, time.time()
        )
        await self._send_within_quota(records, tenant_counts(principal, evaluated), metrics)
        metrics.accepted.value += len(records)
        return otlp.logs_export_response(rejected, encoding)

    async def health(self, request: Request) -> Response:
        return _json(200, {"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """200 when the broker answers a metadata request and has the event topics."""
        if time.monotonic() - self._ready_checked_at < READY_CACHE_SECONDS:
            assert self._ready_answer is not None
            return self._ready_answer
        # Concurrent probes share one check.
        if self._ready_check is None or self._ready_check.done():
            self._ready_check = asyncio.create_task(self._check_ready())
        return await asyncio.shield(self._ready_check)

    async def _check_ready(self) -> Response:
        assert self.producer is not None
        topics = await self.producer.reachable()
        if topics is None:
            answer = _unavailable(f"the broker at {self.producer.brokers} does not answer").response()
        elif not topics >= EVENT_TOPICS:
            self.recover_soon()
            missing = ", ".join(sorted(EVENT_TOPICS - topics))
            answer = _unavailable(f"the broker has no topic {missing} (being created)").response()
        elif not self.producer.initialised:
            answer = _unavailable("the producer has no producer id from the broker yet").response()
        else:
            answer = _json(200, {"status": "ready"})
        self._ready_answer = answer
        self._ready_checked_at = time.monotonic()
        return answer


def create_app(settings: Settings | None = None) -> Starlette:
    """The ingestion app; ``settings`` None reads the environment when the app starts."""
    ingestion = Ingestion(settings)
    # Each observed endpoint: its path, its name in the metrics' labels, its handler.
    endpoints = [
        ("/v1/llm/request", "request", ingestion.post_request),
        ("/v1/llm/response", "response", ingestion.post_response),
        ("/v1/llm/evaluation", "evaluation", ingestion.post_evaluation),
        ("/v1/llm/events", "events", ingestion.post_events),
        ("/v1/traces", "traces", ingestion.post_traces),
        ("/v1/logs", "logs", ingestion.post_logs),
    ]
    routes = [
        *(Route(path, handler, methods=["POST"]) for path, _, handler in endpoints),
        Route("/health", ingestion.health, methods=["GET"]),
        Route("/ready", ingestion.ready, methods=["GET"]),
        metrics_route(ingestion.metrics),
    ]
    observed = {path: ingestion.endpoint_observations(name) for path, name, _ in endpoints}
    app = Starlette(
        routes=routes,
        middleware=[Middleware(ObservedEndpoints, endpoints=observed), AUTHENTICATION],
        exception_handlers={**EXCEPTION_HANDLERS, ApiError: ingestion_error},
        lifespan=ingestion.lifespan,
    )
    app.state.ingestion = ingestion
    return app


app = create_app()
