"""Where the dataflow writes: Postgres ``llm_metrics``, Kafka ``llm.metrics`` and ``llm.deadletter``.

Bytewax replays the outputs since the last snapshot after a restart
(at-least-once), and a replay may emit a window at other moments than the first
run did. Every write is therefore judged by the row's ``revision``, which is a
function of the window's content (see :mod:`dataflows.windows`):

- Postgres takes an emission only when its revision is at least the stored one;
- ``llm.metrics`` carries exactly the emissions Postgres took, published after
  the transaction commits and before the batch counts as written. So a key's
  revisions never decrease on the topic either (a replay may repeat the latest
  one), and the record with the highest revision equals the Postgres row.

Outages of Postgres or the broker are waited out, however long: a batch is
retried with capped backoff until it is written, logged once when the outage
starts and once when it ends. Nothing is dropped meanwhile; the dataflow just
does not advance.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from functools import partial
from itertools import chain
from typing import Any, TypeVar

import msgspec
import psycopg
from bytewax.connectors.kafka import KafkaSinkMessage
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.types.json import Jsonb

from dataflows import binary_arrays, connections
from dataflows.evaluations import EvaluationDimensionEmission, EvaluationEmission
from dataflows.observability import DEAD_LETTERS, DIMENSION_ROWS, EVALUATION_ROWS, ROWS_STALE, ROWS_WRITTEN
from dataflows.stopping import STOPPING
from dataflows.windows import DimensionEmission, WindowRow
from schemas import rollups
from schemas.deadletter import KEY_MAX_BYTES, MESSAGE_MAX_BYTES, DeadLetter, encode_bounded
from schemas.rows import (
    FLOAT_STATISTICS,
    ROW_FIELDS,
    VALUE_STATISTICS,
    EvaluationDimensionRows,
    row_encoder,
)
from schemas.topics import (
    DEADLETTER,
    DIMENSION_METRICS,
    EVALUATION_DIMENSION_METRICS,
    EVALUATION_METRICS,
    METRICS,
)

logger = logging.getLogger("streamlens.dataflow")

# librdkafka settings for both output topics: no duplicates from retries, every
# replica acknowledges, and batches compressed.
PRODUCER_CONFIG: dict[str, str] = {
    "enable.idempotence": "true",
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": "20",
    # The limit dead letters are bounded by, stated once.
    "message.max.bytes": str(MESSAGE_MAX_BYTES),
}

# The row's columns, then what Postgres keeps beside it.
COLUMNS: tuple[str, ...] = (*ROW_FIELDS, "ttft_count", "latency_digest")
KEY_COLUMNS = ("tenant_id", "route", "model", "window_start")
CONFLICT_SQL = (
    f" ON CONFLICT ({', '.join(KEY_COLUMNS)}) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in (*COLUMNS, "updated_at") if c not in KEY_COLUMNS)
    # A replayed or reordered older emission never overwrites a newer one. An equal
    # revision holds the same calls: taking it again is harmless, and lets a replay
    # publish to llm.metrics what a crash kept from being published.
    + " WHERE llm_metrics.revision <= EXCLUDED.revision"
)
# One row per execution; executemany sends the batch in one pipeline. Measured
# against one INSERT ... SELECT FROM unnest(...) of the whole batch in
# bench_dataflow: the pipeline was faster (about 20k against 13k rows/s).
UPSERT_SQL = (
    f"INSERT INTO llm_metrics ({', '.join(COLUMNS)}, updated_at) "
    f"VALUES ({', '.join(['%s'] * len(COLUMNS))}, now())" + CONFLICT_SQL + " RETURNING 1"
)


def _quoted(column: str) -> str:
    return '"values"' if column == "values" else column  # a reserved word


# Dimension rows (docs/counting.md §12): one packed row per window, key and
# dimension (schemas/dimensions.sql), replaced whole under the same revision rule as
# the window's row, in the same transaction.
PACKED_COLUMNS: tuple[str, ...] = (
    "tenant_id",
    "route",
    "model",
    "window_start",
    "window_end",
    "revision",
    "dimension",
    "values",
    *VALUE_STATISTICS,
    "ttft_count",
    "latency_digest",
)
PACKED_KEY = ("tenant_id", "dimension", "window_start", "route", "model")
_FIRST_ARRAY = PACKED_COLUMNS.index("values")
UPSERT_DIMENSIONS_SQL = (
    f"INSERT INTO llm_dimension_windows ({', '.join(map(_quoted, PACKED_COLUMNS))}, updated_at) "
    f"VALUES ({', '.join(['%s'] * _FIRST_ARRAY + ['%b'] * (len(PACKED_COLUMNS) - _FIRST_ARRAY))}, now()) "
    f"ON CONFLICT ({', '.join(PACKED_KEY)}) DO UPDATE SET "
    + ", ".join(
        f"{_quoted(c)} = EXCLUDED.{_quoted(c)}"
        for c in (*PACKED_COLUMNS, "updated_at")
        if c not in PACKED_KEY
    )
    + " WHERE llm_dimension_windows.revision <= EXCLUDED.revision"
)


class _BinaryArray:
    """A Postgres array already in binary form (dataflows.binary_arrays): sent as it is."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _BinaryArrayDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: Any) -> bytes:
        return obj.data


def _array_type(name: str, element: int) -> type[_BinaryArray]:
    """A :class:`_BinaryArray` of ``element``s, which psycopg sends as the array type of them."""
    array = type(name, (_BinaryArray,), {"__slots__": ()})
    dumper = type(f"{name}Dumper", (_BinaryArrayDumper,), {"oid": binary_arrays.ARRAY_OF[element]})
    psycopg.adapters.register_dumper(array, dumper)
    return array


_Int8Array = _array_type("_Int8Array", binary_arrays.INT8)
_Float8Array = _array_type("_Float8Array", binary_arrays.FLOAT8)
_TextArray = _array_type("_TextArray", binary_arrays.TEXT)
_ByteaArray = _array_type("_ByteaArray", binary_arrays.BYTEA)


# Pauses between attempts while something is down: quick at first, then capped.
FIRST_PAUSE = 0.2
MAX_PAUSE = 5.0


class OutageBackoff:
    """Waits out an outage of one kind of write: a log line when it starts and one when it ends
    (not one per attempt), and a pause before each retry, growing to :data:`MAX_PAUSE`. The
    APIs, which answer 503 rather than wait, only log theirs (``api.observability.OutageLog``)."""

    def __init__(self, what: str, sleep: Callable[[float], None] = time.sleep) -> None:
        self.what = what
        self.sleep = sleep
        self.since: float | None = None
        self.attempts = 0

    def failed(self, error: object, started: float | None = None) -> None:
        """An attempt failed: log it if it starts an outage, then wait before the next.
        ``started`` (``time.monotonic()``) is when the attempt began, if it failed late (a
        timeout): the outage is counted from then.

        Asked to stop meanwhile, the process ends at once: the batch is not written,
        and the next start replays it from the last snapshot.
        """
        if STOPPING.is_set():
            logger.warning(
                "stopping while %s is unavailable: the unwritten outputs are written after the next start",
                self.what,
            )
            logging.shutdown()
            os._exit(0)
        if self.since is None:
            self.since = time.monotonic() if started is None else started
            logger.warning("%s unavailable, retrying until it is back: %s", self.what, error)
        self.attempts += 1
        self.sleep(min(MAX_PAUSE, FIRST_PAUSE * 2 ** min(self.attempts - 1, 8)))

    def succeeded(self) -> None:
        if self.since is not None:
            logger.warning(
                "%s back after %.1f s (%d retries)", self.what, time.monotonic() - self.since, self.attempts
            )
        self.since = None
        self.attempts = 0


def latest_per_window(rows: list[WindowRow]) -> list[WindowRow]:
    """One emission per window, the highest revision: one INSERT may not touch a row twice
    (an emission carries all of its window's dimension rows, so the others add nothing)."""
    return _latest(rows, lambda row: (row.tenant_id, row.route, row.model, row.window_start))


# A window's emission or an evaluation row's: each has a row with a revision.
_Emission = TypeVar("_Emission", WindowRow, EvaluationEmission, EvaluationDimensionEmission)


def _latest(items: list[_Emission], key_of: Callable[[Any], tuple[Any, ...]]) -> list[_Emission]:
    """The emission of each row (``key_of(item.row)``) with the highest revision, the later
    one of equal revisions."""
    latest: dict[tuple[Any, ...], _Emission] = {}
    for item in items:
        key = key_of(item.row)
        kept = latest.get(key)
        if kept is None or kept.row.revision <= item.row.revision:
            latest[key] = item
    return list(latest.values())


def taken_rows(cursor: psycopg.Cursor[Any], sql: str, params: list[tuple[Any, ...]]) -> list[bool]:
    """Run ``sql`` (an upsert ``RETURNING 1`` when its revision guard lets it write) once per
    parameter tuple, pipelined; which ones Postgres took."""
    if not params:
        return []
    cursor.executemany(sql, params, returning=True)
    taken = []
    while True:
        taken.append(cursor.rowcount == 1)
        if not cursor.nextset():
            return taken


def values_of(item: WindowRow) -> tuple[Any, ...]:
    """One row's parameters, in :data:`COLUMNS` order."""
    row = item.row
    return (*(getattr(row, name) for name in ROW_FIELDS), item.ttft_count, item.digest)


def packed_values_of(emissions: list[DimensionEmission]) -> list[tuple[Any, ...]]:
    """Each dimension's packed row, in :data:`PACKED_COLUMNS` order, arrays in binary form,
    built column by column for all of them at once. As text, writing and parsing the
    arrays' numbers took a third of the dataflow's time with dimensions (bench_dataflow,
    py-spy); one array at a time, numpy's overhead per call did."""
    counts = [len(emission.rows.values) for emission in emissions]

    def column(name: str) -> list[Any]:
        return list(chain.from_iterable(getattr(emission.rows, name) for emission in emissions))

    arrays = [
        map(_TextArray, binary_arrays.text_arrays(column("values"), counts)),
        *(
            map(_Float8Array, binary_arrays.float8_arrays(column(name), counts))
            if name in FLOAT_STATISTICS
            else map(_Int8Array, binary_arrays.int8_arrays(column(name), counts))
            for name in VALUE_STATISTICS
        ),
        map(
            _Int8Array,
            binary_arrays.int8_arrays(
                list(chain.from_iterable(emission.ttft_count for emission in emissions)), counts
            ),
        ),
        map(
            _ByteaArray,
            binary_arrays.bytea_arrays(
                list(chain.from_iterable(emission.latency_digest for emission in emissions)), counts
            ),
        ),
    ]
    keys = (
        [getattr(emission.rows, name) for name in PACKED_COLUMNS[:_FIRST_ARRAY]] for emission in emissions
    )
    return [(*key, *values) for key, values in zip(keys, zip(*arrays, strict=True), strict=True)]


# Errors no retry can cure: the record is larger than the broker or producer allow.
_NEVER_FITS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE})


class KafkaWriter:
    """Produces records and returns only once the broker acknowledged every one of them.

    Bytewax's own Kafka sink neither checks deliveries nor survives a record the
    broker refuses; here a failed delivery is produced again (after a pause, as an
    outage) until it succeeds, so nothing is lost and a batch is written before the
    epoch that holds it can be snapshotted.
    """

    def __init__(self, brokers: str, topic: str) -> None:
        self._config = {"bootstrap.servers": brokers, **PRODUCER_CONFIG}
        self._producer = Producer(self._config)
        self._topic = topic
        self._outage = OutageBackoff(f"kafka topic {topic}")

    def write(self, messages: list[KafkaSinkMessage[bytes | None, bytes]]) -> None:
        pending = messages
        while pending:
            failed: list[KafkaSinkMessage[bytes | None, bytes]] = []
            errors: list[KafkaError] = []
            for message in pending:
                self._produce(message, failed, errors)
            self._producer.flush()
            if not failed:
                self._outage.succeeded()
                return
            for error in errors:
                if error.code() in _NEVER_FITS:
                    raise ValueError(f"a record for {self._topic} can never be written: {error.str()}")
            if any(error.fatal() for error in errors):
                # The idempotent producer's session is gone for good (e.g. a broker that
                # lost its state): only a new producer can write again.
                self._producer = Producer(self._config)
            self._outage.failed(errors[0].str())
            pending = failed

    def _produce(
        self,
        message: KafkaSinkMessage[bytes | None, bytes],
        failed: list[KafkaSinkMessage[bytes | None, bytes]],
        errors: list[KafkaError],
    ) -> None:
        def delivered(error: KafkaError | None, _record: Message) -> None:
            if error is not None:
                failed.append(message)
                errors.append(error)

        while True:
            try:
                self._producer.produce(self._topic, message.value, message.key, on_delivery=delivered)
                return
            except BufferError:
                # The local queue is full (the broker is slow or away): make room.
                self._producer.poll(0.1)
            except KafkaException as error:
                failed.append(message)
                errors.append(error.args[0])
                return

    def close(self) -> None:
        self._producer.flush()


_Done = TypeVar("_Done")


class PostgresWriter:
    """One connection for a sink's writes, each a transaction retried through outages
    (waited out, however long, as the module says). The connection has timeouts
    (:mod:`dataflows.connections`): a server that stops answering is an outage too."""

    def __init__(self, dsn: str, what: str = "postgres") -> None:
        self._dsn = dsn
        self._conn: psycopg.Connection | None = None
        self._outage = OutageBackoff(what)
        self._patience = connections.Patience()

    def in_transaction(self, work: Callable[[psycopg.Cursor[Any]], _Done]) -> _Done:
        """``work(cursor)`` in one transaction, run again after a lost connection or a timeout
        until it commits; what it returned."""
        while True:
            started = time.monotonic()
            try:
                if self._conn is None or self._conn.closed:
                    # Text array elements go in binary: as UTF-8, whatever the database's encoding.
                    self._conn = connections.connect(self._dsn, self._patience.factor, client_encoding="UTF8")
                with self._conn.transaction(), self._conn.cursor() as cursor:
                    done = work(cursor)
                self._outage.succeeded()
                if self._patience.succeeded():
                    self.close()
                return done
            except (psycopg.OperationalError, psycopg.InterfaceError) as error:
                # A statement that timed out is rolled back with its transaction; the
                # connection goes too, and the next attempt makes a new one.
                self.close()
                self._patience.failed(error)
                self._outage.failed(error, started)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


# How long the part keeper gathers written windows before merging their hours: a window's
# revisions and its neighbours come in bursts, and each hour is merged once for all of them.
KEEP_DELAY_SECONDS = 1.0
# ... and at least this many times as long as its last round of merging took. Merging an
# hour reads and merges all its windows so far, so while a backlog is read (an hour's
# windows written within seconds) merging every second would merge each hour again and
# again, ever larger, on the dataflow's interpreter: this bounds the keeper to a tenth of
# the time, and parts lag their windows meanwhile, as they may (the query API merges those).
KEEP_PAUSE_FACTOR = 9.0
# A round that waited out an outage says nothing of merging: the pause stays within this.
KEEP_PAUSE_MAX_SECONDS = 30.0
# Hours merged per transaction.
KEEP_HOURS = 500


def _keep(hours: list[rollups.PartKey], cursor: psycopg.Cursor[Any]) -> int:
    return rollups.keep(cursor, hours, rollups.horizon(cursor))


class PartKeeper:
    """Keeps the hourly and daily parts of the windows the sink wrote (:mod:`schemas.rollups`),
    on a thread of its own, about :data:`KEEP_DELAY_SECONDS` behind them.

    Parts are derived: one that lags its windows (for that second, or for good after a crash
    lost what was pending) has another fingerprint than its windows, so the query API never
    uses it but merges it again, and retention checks every part before sealing it. Merging
    off the sink's transaction lets the dataflow go on meanwhile, and an hour revised several
    times within the delay is merged once.
    """

    def __init__(self, dsn: str, delay: float = KEEP_DELAY_SECONDS) -> None:
        self._postgres = PostgresWriter(dsn, "postgres (roll-up parts)")
        self._delay = delay
        self._pending: set[rollups.PartKey] = set()
        self._busy = False
        self._closing = False
        self._flushing = 0  # callers of flush() waiting: no gathering while there are any
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="part-keeper", daemon=True)
        self._thread.start()

    def written(self, windows: list[rollups.PartKey]) -> None:
        """Windows (tenant, route, model, window_start) the sink has committed."""
        if not windows:
            return
        with self._changed:
            self._pending.update(rollups.hours_of(windows))
            self._changed.notify_all()

    def flush(self) -> None:
        """Until every hour written so far is merged."""
        with self._changed:
            self._flushing += 1
            self._changed.notify_all()
            self._changed.wait_for(lambda: not self._pending and not self._busy)
            self._flushing -= 1

    def close(self) -> None:
        self.flush()
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join()
        self._postgres.close()

    def _gathered(self, until: float) -> bool:
        return bool(self._flushing or self._closing or time.monotonic() >= until)

    def _run(self) -> None:
        spent = 0.0  # the last round of merging, in seconds
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closing)
                if self._closing and not self._pending:
                    return
                # Gather for the delay (windows written meanwhile wake this up, and join
                # the round), unless a flush or close asks for it sooner.
                until = time.monotonic() + max(
                    self._delay, min(KEEP_PAUSE_FACTOR * spent, KEEP_PAUSE_MAX_SECONDS)
                )
                self._changed.wait_for(partial(self._gathered, until), max(0.0, until - time.monotonic()))
                hours = sorted(self._pending)
                self._pending.clear()
                self._busy = True
            started = time.monotonic()
            for first in range(0, len(hours), KEEP_HOURS):
                self._postgres.in_transaction(partial(_keep, hours[first : first + KEEP_HOURS]))
            spent = time.monotonic() - started
            with self._changed:
                self._busy = False
                self._changed.notify_all()


class _RowsPartition(StatelessSinkPartition[WindowRow]):
    def __init__(self, dsn: str, brokers: str) -> None:
        self._postgres = PostgresWriter(dsn)
        self._metrics = KafkaWriter(brokers, METRICS)
        self._dimensions = KafkaWriter(brokers, DIMENSION_METRICS)
        self._parts = PartKeeper(dsn)

    def write_batch(self, items: list[WindowRow]) -> None:
        if not items:
            return
        latest = latest_per_window(items)
        taken = self._postgres.in_transaction(lambda cursor: self._upsert(cursor, latest))
        written = sum(taken)
        ROWS_WRITTEN.inc(written)
        ROWS_STALE.inc(len(latest) - written)
        kept = [item for item, took in zip(latest, taken, strict=True) if took]
        self._parts.written(
            [(item.row.tenant_id, item.row.route, item.row.model, item.row.window_start) for item in kept]
        )
        self._metrics.write([metrics_message(item) for item in kept])
        dimensions = [dimension_message(emission) for item in kept for emission in item.dimensions]
        if dimensions:
            self._dimensions.write(dimensions)

    @staticmethod
    def _upsert(cursor: psycopg.Cursor[Any], items: list[WindowRow]) -> list[bool]:
        """Write the rows; which ones Postgres took. The dimension rows of a window Postgres
        took are taken too: they were never written with a higher revision than the window's row."""
        # A window before the retention horizon has its time retired: its hour and day are
        # sealed and its neighbours deleted. Only events that old reaching a dataflow started
        # afresh can make one; it is not written (logged, and counted as stale).
        horizon = rollups.horizon(cursor)
        retired = [item.row.window_start < horizon for item in items]
        if any(retired):
            logger.warning(
                "%d windows before the retention horizon %s not written: their time is retired",
                sum(retired),
                horizon.isoformat(),
            )
        writable = [item for item, old in zip(items, retired, strict=True) if not old]
        written = iter(taken_rows(cursor, UPSERT_SQL, [values_of(item) for item in writable]))
        taken = [False if old else next(written) for old in retired]
        emissions = [
            emission for item, took in zip(items, taken, strict=True) if took for emission in item.dimensions
        ]
        if emissions:
            cursor.executemany(UPSERT_DIMENSIONS_SQL, packed_values_of(emissions))
            DIMENSION_ROWS.inc(sum(len(emission.rows.values) for emission in emissions))
        return taken

    def close(self) -> None:
        self._parts.close()
        self._postgres.close()
        self._metrics.close()
        self._dimensions.close()


class RowsSink(DynamicSink[WindowRow]):
    """Upserts rows into ``llm_metrics`` (one transaction per batch), then publishes the ones
    Postgres took to ``llm.metrics``; a :class:`PartKeeper` keeps their hours and days.

    Each worker writes its own batches: a window's emissions all come from the one
    worker holding its shard, and the revision guard makes any order safe anyway.
    """

    def __init__(self, dsn: str, brokers: str) -> None:
        self._dsn = dsn
        self._brokers = brokers

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _RowsPartition:
        return _RowsPartition(self._dsn, self._brokers)


class _KafkaPartition(StatelessSinkPartition[KafkaSinkMessage[bytes | None, bytes]]):
    def __init__(self, brokers: str, topic: str) -> None:
        self._writer = KafkaWriter(brokers, topic)

    def write_batch(self, items: list[KafkaSinkMessage[bytes | None, bytes]]) -> None:
        self._writer.write(items)

    def close(self) -> None:
        self._writer.close()


class KafkaTopicSink(DynamicSink[KafkaSinkMessage[bytes | None, bytes]]):
    """Produces to one topic, each batch acknowledged before it counts as written."""

    def __init__(self, brokers: str, topic: str = DEADLETTER) -> None:
        self._brokers = brokers
        self._topic = topic

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _KafkaPartition:
        return _KafkaPartition(self._brokers, self._topic)


def metrics_message(item: WindowRow) -> KafkaSinkMessage[bytes, bytes]:
    """An ``llm.metrics`` record: keyed by window, so compaction keeps the latest revision."""
    return KafkaSinkMessage(key=item.row.kafka_key(), value=row_encoder.encode(item.row))


def dimension_message(emission: DimensionEmission) -> KafkaSinkMessage[bytes | None, bytes]:
    """An ``llm.dimension-metrics`` record: one dimension of one window, its rows as columns,
    keyed by window and dimension so that compaction keeps the latest revision."""
    rows = emission.rows
    return KafkaSinkMessage(key=rows.kafka_key(), value=row_encoder.encode(rows))


def deadletter_key(letter: DeadLetter) -> bytes | None:
    """The request id the dead letter is about, when its payload names one."""
    if not letter.payload:
        return None
    try:
        found = msgspec.json.decode(letter.payload)
    except msgspec.DecodeError:
        return None
    if not isinstance(found, dict):
        return None
    request_id = found.get("request_id")
    if request_id is None and isinstance(found.get("request"), dict):
        request_id = found["request"].get("request_id")
    return request_id.encode() if isinstance(request_id, str) else None


def deadletter_message(letter: DeadLetter) -> KafkaSinkMessage[bytes | None, bytes]:
    """An ``llm.deadletter`` record, keyed by request id when known, that always fits the
    producer's message limit (:func:`schemas.deadletter.encode_bounded`).

    The key is the request id the payload names or, when it names none that fits (the
    payload of an invalid record is anything: base64 of bytes that are not UTF-8, JSON
    without an id or nested too deep), the Kafka key of the record read
    (``letter.source_key``). A key longer than any request id can be is left out (the
    payload still shows it).
    """
    try:
        key = deadletter_key(letter)
    except RecursionError:  # JSON nested deeper than msgspec follows
        key = None
    if key is None or len(key) > KEY_MAX_BYTES:
        key = letter.source_key
    if key is not None and len(key) > KEY_MAX_BYTES:
        key = None
    DEAD_LETTERS.labels(letter.reason).inc()
    return KafkaSinkMessage(key=key, value=encode_bounded(letter))


# Evaluation rows (docs/evaluations.md), under the same revision rule: the count of evaluations.
EVALUATION_COLUMNS: tuple[str, ...] = (
    "tenant_id",
    "route",
    "model",
    "window_start",
    "window_end",
    "name",
    "evaluations",
    "scores",
    "score_sum",
    "score_avg",
    "score_min",
    "score_max",
    "score_p50",
    "score_p90",
    "labels",
    "score_digest",
    "revision",
)
_EVALUATION_KEY = ("tenant_id", "route", "model", "window_start", "name")
UPSERT_EVALUATIONS_SQL = (
    f"INSERT INTO llm_evaluation_metrics ({', '.join(EVALUATION_COLUMNS)}, updated_at) "
    f"VALUES ({', '.join(['%s'] * len(EVALUATION_COLUMNS))}, now()) "
    f"ON CONFLICT ({', '.join(_EVALUATION_KEY)}) DO UPDATE SET "
    + ", ".join(
        f"{column} = EXCLUDED.{column}" for column in EVALUATION_COLUMNS if column not in _EVALUATION_KEY
    )
    + ", updated_at = EXCLUDED.updated_at "
    "WHERE llm_evaluation_metrics.revision <= EXCLUDED.revision RETURNING 1"
)


def evaluation_values(item: EvaluationEmission) -> tuple[Any, ...]:
    row = item.row
    return (
        row.tenant_id,
        row.route,
        row.model,
        row.window_start,
        row.window_end,
        row.name,
        row.evaluations,
        row.scores,
        item.score_sum,
        row.score_avg,
        row.score_min,
        row.score_max,
        row.score_p50,
        row.score_p90,
        Jsonb(row.labels),
        item.digest,
        row.revision,
    )


def latest_evaluations(items: list[EvaluationEmission]) -> list[EvaluationEmission]:
    """One emission per row, the highest revision (one INSERT may not touch a row twice)."""
    return _latest(items, lambda row: (row.tenant_id, row.route, row.model, row.window_start, row.name))


# Evaluation rows per dimension value, packed (schemas/evaluations.sql), each dimension's
# rows judged by their own revision.
EVALUATION_DIMENSION_COLUMNS: tuple[str, ...] = (
    "tenant_id",
    "route",
    "model",
    "window_start",
    "window_end",
    "name",
    "dimension",
    "revision",
    "values",
    "evaluations",
    "scores",
    "score_sum",
    "score_avg",
    "score_min",
    "score_max",
    "score_p50",
    "score_p90",
    "labels",
    "score_digest",
)
_EVALUATION_DIMENSION_KEY = ("tenant_id", "dimension", "window_start", "route", "model", "name")
_EVALUATION_DIMENSION_TYPES = {
    "values": "text[]",
    "evaluations": "bigint[]",
    "scores": "bigint[]",
    "labels": "jsonb",
    "score_digest": "bytea[]",
    **{
        column: "double precision[]"
        for column in ("score_sum", "score_avg", "score_min", "score_max", "score_p50", "score_p90")
    },
}
UPSERT_EVALUATION_DIMENSIONS_SQL = (
    "INSERT INTO llm_evaluation_dimension_windows "
    f"({', '.join(_quoted(column) for column in EVALUATION_DIMENSION_COLUMNS)}, updated_at) VALUES ("
    + ", ".join(
        f"%s::{_EVALUATION_DIMENSION_TYPES[column]}" if column in _EVALUATION_DIMENSION_TYPES else "%s"
        for column in EVALUATION_DIMENSION_COLUMNS
    )
    + f", now()) ON CONFLICT ({', '.join(_EVALUATION_DIMENSION_KEY)}) DO UPDATE SET "
    + ", ".join(
        f"{_quoted(column)} = EXCLUDED.{_quoted(column)}"
        for column in EVALUATION_DIMENSION_COLUMNS
        if column not in _EVALUATION_DIMENSION_KEY
    )
    + ", updated_at = EXCLUDED.updated_at "
    "WHERE llm_evaluation_dimension_windows.revision <= EXCLUDED.revision RETURNING 1"
)


def evaluation_dimension_values(item: EvaluationDimensionEmission) -> tuple[Any, ...]:
    rows, first = item.rows, item.row
    return (
        first.tenant_id,
        first.route,
        first.model,
        first.window_start,
        first.window_end,
        first.name,
        first.dimension,
        first.revision,
        [row.value for row in rows],
        [row.evaluations for row in rows],
        [row.scores for row in rows],
        item.score_sums,
        [row.score_avg for row in rows],
        [row.score_min for row in rows],
        [row.score_max for row in rows],
        [row.score_p50 for row in rows],
        [row.score_p90 for row in rows],
        Jsonb([row.labels for row in rows]),
        item.digests,
    )


def evaluation_dimension_message(item: EvaluationDimensionEmission) -> KafkaSinkMessage[bytes | None, bytes]:
    """The ``llm.evaluation-dimension-metrics`` record of one dimension's rows."""
    first = item.row
    record = EvaluationDimensionRows(
        tenant_id=first.tenant_id,
        route=first.route or "",
        model=first.model or "",
        window_start=first.window_start,
        window_end=first.window_end,
        name=first.name,
        dimension=first.dimension,
        revision=first.revision,
        rows=item.rows,
    )
    return KafkaSinkMessage(key=record.kafka_key(), value=row_encoder.encode(record))


def latest_evaluation_dimensions(
    items: list[EvaluationDimensionEmission],
) -> list[EvaluationDimensionEmission]:
    """One emission per window, key, name and dimension: the highest revision."""
    return _latest(
        items, lambda row: (row.tenant_id, row.route, row.model, row.window_start, row.name, row.dimension)
    )


class _EvaluationRowsPartition(StatelessSinkPartition[EvaluationEmission | EvaluationDimensionEmission]):
    def __init__(self, dsn: str, brokers: str) -> None:
        self._postgres = PostgresWriter(dsn, "postgres (evaluation rows)")
        self._topic = KafkaWriter(brokers, EVALUATION_METRICS)
        self._dimensions = KafkaWriter(brokers, EVALUATION_DIMENSION_METRICS)

    def write_batch(self, items: list[EvaluationEmission | EvaluationDimensionEmission]) -> None:
        if not items:
            return
        latest = latest_evaluations([item for item in items if type(item) is EvaluationEmission])
        per_value = latest_evaluation_dimensions(
            [item for item in items if type(item) is EvaluationDimensionEmission]
        )
        params = [evaluation_values(item) for item in latest]
        value_params = [evaluation_dimension_values(item) for item in per_value]

        def upsert(cursor: psycopg.Cursor[Any]) -> tuple[list[bool], list[bool]]:
            return (
                taken_rows(cursor, UPSERT_EVALUATIONS_SQL, params),
                taken_rows(cursor, UPSERT_EVALUATION_DIMENSIONS_SQL, value_params),
            )

        taken, values_taken = self._postgres.in_transaction(upsert)
        EVALUATION_ROWS.inc(sum(taken))
        self._topic.write(
            [
                KafkaSinkMessage(key=item.row.kafka_key(), value=row_encoder.encode(item.row))
                for item, took in zip(latest, taken, strict=True)
                if took
            ]
        )
        dimension_messages = [
            evaluation_dimension_message(item)
            for item, took in zip(per_value, values_taken, strict=True)
            if took
        ]
        if dimension_messages:
            self._dimensions.write(dimension_messages)

    def close(self) -> None:
        self._postgres.close()
        self._topic.close()
        self._dimensions.close()


class EvaluationRowsSink(DynamicSink[EvaluationEmission | EvaluationDimensionEmission]):
    """Upserts evaluation rows into ``llm_evaluation_metrics`` (and their rows per dimension
    value into ``llm_evaluation_dimension_windows``), then publishes the ones Postgres took
    to ``llm.evaluation-metrics`` (``llm.evaluation-dimension-metrics``), as :class:`RowsSink`
    does with windows."""

    def __init__(self, dsn: str, brokers: str) -> None:
        self._dsn = dsn
        self._brokers = brokers

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _EvaluationRowsPartition:
        return _EvaluationRowsPartition(self._dsn, self._brokers)
