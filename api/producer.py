"""The Kafka producer behind the ingestion API.

An HTTP request is answered 202 only once the broker has acknowledged its
records (``acks=all``, idempotent producer). Waiting for that must not block the
event loop, so one background thread polls the producer for delivery reports and
hands them to the loop in bulk with ``call_soon_threadsafe``. All requests in
flight share the one producer, and so its batching: a thousand concurrent
requests cost the broker a handful of produce requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from api.observability import SECONDS_BUCKETS, Buckets, OutageLog

logger = logging.getLogger("streamlens.ingestion")

# The contract's deadline: no acknowledgement within this many seconds is a 503.
ACK_TIMEOUT_SECONDS = 5.0
# librdkafka's statistics say when the idempotent producer has its producer id;
# they are looked at only until it has.
STATISTICS_INTERVAL_MS = 100


def producer_config(brokers: str) -> dict[str, object]:
    return {
        "bootstrap.servers": brokers,
        "acks": "all",
        "enable.idempotence": True,
        # Tansu and Kafka both accept lz4; it is the cheapest codec for CPU.
        "compression.type": "lz4",
        # Short enough to be invisible in latency, long enough for concurrent
        # requests to share produce requests.
        "linger.ms": 5,
        # librdkafka fails a record it could not deliver in this time, so every
        # record gets a delivery report close to the API's own deadline.
        "message.timeout.ms": int(ACK_TIMEOUT_SECONDS * 1000),
        # A restarted broker is found again within a second, not after the
        # default back-off of up to 10 s.
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 1000,
        # Same key, same partition as the Java client would choose.
        "partitioner": "murmur2_random",
        # Topics are created with the configured partitions (schemas.topics), never
        # as a side effect of producing to a broker that lost them.
        "allow.auto.create.topics": False,
        # Errors reach error_cb (and are logged there); librdkafka's own log
        # would repeat each connection failure.
        "log_level": 2,
        "statistics.interval.ms": STATISTICS_INTERVAL_MS,
    }


class BrokerUnavailable(Exception):
    """Records were not acknowledged: the broker is down, slow, or refused them."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


_TIMED_OUT = object()

# Delivery errors after which this producer's idempotence session is of no more use.
_SESSION_LOST = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
        KafkaError.PRODUCER_FENCED,
    }
)


_CONNECTION_ERRORS = frozenset({KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE})


class _Pending:
    """The acknowledgements one HTTP request waits for; settled when the last one arrives."""

    __slots__ = ("error", "future", "owner", "remaining")

    def __init__(self, owner: EventProducer, future: asyncio.Future[object], count: int) -> None:
        self.owner = owner
        self.future = future
        self.remaining = count
        self.error: KafkaError | None = None

    def acknowledge(self, error: KafkaError | None, message: Message) -> None:
        # Runs in the polling thread, the only one that touches ``remaining``
        # and writes the acknowledgement latency.
        if error is None:
            latency = message.latency()
            if latency is not None:
                self.owner.ack_latency.observe(latency)
        elif self.error is None:
            self.error = error
            if error.code() in _SESSION_LOST:
                self.owner._renew = f"after {error.str()}"
        self.remaining -= 1
        if self.remaining == 0:
            self.owner._settled.append(self)


def _settle(pendings: list[_Pending]) -> None:
    for pending in pendings:
        if not pending.future.done():
            pending.future.set_result(pending.error)


def _expire(future: asyncio.Future[object]) -> None:
    if not future.done():
        future.set_result(_TIMED_OUT)


class EventProducer:
    """One confluent-kafka producer, its polling thread, and awaitable sends."""

    def __init__(
        self,
        brokers: str,
        *,
        timeout: float = ACK_TIMEOUT_SECONDS,
        overrides: Mapping[str, object] | None = None,
        ack_latency: Buckets | None = None,
    ) -> None:
        """``overrides``: librdkafka settings on top of :func:`producer_config`;
        ``ack_latency``: where each acknowledged record's latency is counted."""
        self.brokers = brokers
        self.timeout = timeout
        self.ack_latency = ack_latency or Buckets(SECONDS_BUCKETS)
        self.outage = OutageLog(logger, f"broker {brokers}")
        self._config = {**producer_config(brokers), **(overrides or {})}
        # Whether the current producer has its producer id (see _new_producer).
        self.initialised = False
        self._generation = 0
        self._producer = self._new_producer()
        # Set from librdkafka's callbacks, acted on by the polling thread.
        self._renew: str | None = None
        self._renewed_at = 0.0
        self._lost = False
        self._last_probe = 0.0
        self._logged: dict[str, float] = {}
        self._settled: list[_Pending] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind to the running event loop and start polling for delivery reports."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._poll, name="kafka-delivery", daemon=True)
        self._thread.start()

    def _new_producer(self) -> Producer:
        """A producer; :attr:`initialised` turns true once the broker gave it a producer id.

        Until then its first records would wait for that id (and for the
        connection it needs), so readiness waits for it instead.
        """
        self.initialised = False
        self._generation += 1
        generation = self._generation

        def on_error(error: KafkaError) -> None:
            # A replaced producer's queued errors (served while it is flushed) are of the past.
            if generation == self._generation:
                self._on_error(error)

        def on_statistics(text: str) -> None:
            # A replaced producer may still report while it is flushed: only the current one counts.
            if self.initialised or generation != self._generation:
                return
            state = json.loads(text).get("eos", {}).get("idemp_state")
            self.initialised = state == "Assigned"

        return Producer(self._config, error_cb=on_error, stats_cb=on_statistics, logger=logger)

    def _answers(self) -> bool:
        try:
            return bool(self._producer.list_topics(timeout=0.5).brokers)
        except KafkaException:
            return False

    def _poll(self) -> None:
        while not self._stopping.is_set():
            try:
                self._producer.poll(0.1)
            except KafkaException as error:
                # confluent-kafka raises a fatal error from poll() rather than
                # passing it to error_cb.
                self._on_error(error.args[0])
            self._hand_over()
            now = time.monotonic()
            if self._renew is not None and now - self._renewed_at >= 1.0:
                self._replace_producer(self._renew)
            elif (self._lost or self.outage.down) and now - self._last_probe >= 1.0:
                self._last_probe = now
                if self._answers():
                    self.outage.back()
                    if self._lost:
                        self._replace_producer("the broker is back")

    def _replace_producer(self, why: str) -> None:
        """Carry on with a new producer, with a new producer id.

        The idempotent producer's state lives on the broker. A broker that lost it
        (restarted with memory storage, say) answers "unknown producer id" for
        ever: librdkafka either fails for good or bumps the epoch and retries
        without end. After a timed-out record librdkafka bumps the epoch itself,
        which a broker without KIP-360 (Tansu) refuses for good. So after a fatal
        error, a lost producer session or a timeout, and whenever the broker
        comes back from being unreachable, a new producer takes over (at most once
        a second). Records still queued in the old one fail now, and their
        requests get a 503 at once.
        """
        self._renew = None
        self._renewed_at = time.monotonic()
        self._lost = False
        old, self._producer = self._producer, self._new_producer()
        logger.warning("kafka: new producer, %s", why)
        old.purge()
        with contextlib.suppress(KafkaException):
            old.flush(0)
        self._hand_over()

    def _hand_over(self) -> None:
        if self._settled:
            settled, self._settled = self._settled, []
            assert self._loop is not None
            # A closed loop (RuntimeError) has nobody waiting any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_settle, settled)

    def _on_error(self, error: KafkaError) -> None:
        # Connection losses are reported here and retried by librdkafka itself;
        # the records concerned fail on their own timeout. What needs action is
        # taken in the polling thread, outside poll().
        if error.fatal():
            self._renew = "after a fatal error"
        elif error.code() == KafkaError._ALL_BROKERS_DOWN:
            self._lost = True
            self.outage.lost(f"no broker answers ({error.str()})")
        # During an outage its one line says it; the connection errors would repeat it.
        if self.outage.down and error.code() in _CONNECTION_ERRORS:
            return
        # librdkafka repeats connection errors every second; each once in 10 s is enough.
        text, now = error.str(), time.monotonic()
        if now - self._logged.get(text, -10.0) >= 10:
            if len(self._logged) > 100:
                self._logged.clear()
            self._logged[text] = now
            logger.warning("kafka: %s", text)

    async def send(self, records: Iterable[tuple[str, bytes, bytes]]) -> None:
        """Produce ``(topic, key, value)`` records and wait until the broker acknowledged all.

        Raises :class:`BrokerUnavailable` when any is refused or not acknowledged
        within the timeout; some of them may have been persisted all the same.
        """
        assert self._loop is not None, "EventProducer.start() was not called"
        records = records if isinstance(records, list) else list(records)
        if not records:
            return
        future = self._loop.create_future()
        pending = _Pending(self, future, len(records))
        produce = self._producer.produce
        acknowledge = pending.acknowledge
        try:
            for topic, key, value in records:
                produce(topic, value, key, on_delivery=acknowledge)
        except BufferError:
            raise BrokerUnavailable("the send queue is full: the broker is not keeping up") from None
        except KafkaException as error:
            if error.args[0].code() == KafkaError._FATAL:
                self._renew = "after a fatal error"
            raise BrokerUnavailable(f"the event could not be sent: {error.args[0].str()}") from None
        timer = self._loop.call_later(self.timeout, _expire, future)
        try:
            outcome = await future
        finally:
            timer.cancel()
        if outcome is None:
            return
        if outcome is _TIMED_OUT:
            raise BrokerUnavailable(f"the broker did not acknowledge within {self.timeout:g} s")
        assert isinstance(outcome, KafkaError)
        raise BrokerUnavailable(f"the broker did not acknowledge: {outcome.str()}")

    async def reachable(self, timeout: float = 1.0) -> set[str] | None:
        """The broker's topics, or None when it does not answer a metadata request in time."""

        def topics() -> set[str] | None:
            try:
                metadata = self._producer.list_topics(timeout=timeout)
            except KafkaException:
                return None
            if not metadata.brokers:
                return None
            return {name for name, topic in metadata.topics.items() if topic.error is None}

        return await asyncio.to_thread(topics)

    async def close(self, timeout: float = 10.0) -> int:
        """Stop polling and deliver what is queued; returns how many records were left undelivered."""
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        left = await asyncio.to_thread(self._producer.flush, timeout)
        self._hand_over()
        # Close the connections now rather than when the object is collected.
        await asyncio.to_thread(self._producer.close)
        return left
