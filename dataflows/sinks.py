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
import time
from collections.abc import Callable
from datetime import UTC
from typing import Any, NamedTuple

import msgspec
import psycopg
from bytewax.connectors.kafka import KafkaSinkMessage
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from dataflows.observability import DEAD_LETTERS, DIMENSION_ROWS, ROWS_STALE, ROWS_WRITTEN
from dataflows.stopping import STOPPING
from dataflows.windows import DimensionEmission, WindowRow
from schemas.deadletter import KEY_MAX_BYTES, MESSAGE_MAX_BYTES, DeadLetter, encode_bounded
from schemas.metrics import DIMENSION_ROW_FIELDS, ROW_FIELDS, DimensionRow, row_encoder
from schemas.topics import DEADLETTER, DIMENSION_METRICS, METRICS

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
    f"VALUES ({', '.join(['%s'] * len(COLUMNS))}, now())" + CONFLICT_SQL
    # Whether the row is new: a window's dimension rows are written in the same
    # transaction as its row, so a new row has none yet that could need removing.
    + " RETURNING xmax = 0"
)

# Dimension rows (docs/counting.md §12) go through COPY into a temporary table, then
# one upsert with the same revision rule, then one delete of the rows of values a
# newer emission of their window no longer keeps: a window emits up to 4 × 51 of
# them, too many for a statement each.
DIMENSION_COLUMNS: tuple[str, ...] = (
    *DIMENSION_ROW_FIELDS, "ttft_count", "latency_digest", "window_revision")
DIMENSION_KEY = ("tenant_id", "route", "model", "window_start", "dimension", "value")
_WINDOW_DIMENSION = ("tenant_id", "route", "model", "window_start", "dimension")
STAGE_SQL = (
    "CREATE TEMP TABLE IF NOT EXISTS dimension_rows_in "
    "(LIKE llm_dimension_metrics INCLUDING DEFAULTS) ON COMMIT DELETE ROWS; "
    "CREATE TEMP TABLE IF NOT EXISTS dimension_kept_in (tenant_id text, route text, model text, "
    "window_start timestamptz, dimension text, window_revision integer, kept text[]) "
    "ON COMMIT DELETE ROWS"
)
# How a value is written in dimension_kept_in.kept: null as a text no value can be
# (values have no control characters), so that "= ANY" finds it.
NO_VALUE = "\x01"
UPSERT_DIMENSIONS_SQL = (
    f"INSERT INTO llm_dimension_metrics ({', '.join(DIMENSION_COLUMNS)}, updated_at) "
    f"SELECT {', '.join(DIMENSION_COLUMNS)}, now() FROM dimension_rows_in "
    f"ON CONFLICT ({', '.join(DIMENSION_KEY)}) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in (*DIMENSION_COLUMNS, "updated_at") if c not in DIMENSION_KEY)
    + " WHERE llm_dimension_metrics.revision <= EXCLUDED.revision"
    + f" RETURNING {', '.join(DIMENSION_KEY)}"
)
_same = " AND ".join(f"d.{c} = k.{c}" for c in _WINDOW_DIMENSION)
DELETE_DROPPED_SQL = (
    "DELETE FROM llm_dimension_metrics d USING dimension_kept_in k "
    f"WHERE {_same} AND d.window_revision < k.window_revision "
    f"AND NOT coalesce(d.value, '{NO_VALUE}') = ANY(k.kept) "
    f"RETURNING {', '.join('d.' + c for c in DIMENSION_KEY)}"
)

# Pauses between attempts while something is down: quick at first, then capped.
FIRST_PAUSE = 0.2
MAX_PAUSE = 5.0


class Outage:
    """Retries one kind of write until it succeeds, logging once per outage, not per attempt."""

    def __init__(self, what: str, sleep: Callable[[float], None] = time.sleep) -> None:
        self.what = what
        self.sleep = sleep
        self.since: float | None = None
        self.attempts = 0

    def failed(self, error: object) -> None:
        """An attempt failed: log it if it starts an outage, then wait before the next.

        Asked to stop meanwhile, the process ends at once: the batch is not written,
        and the next start replays it from the last snapshot.
        """
        if STOPPING.is_set():
            logger.warning("stopping while %s is unavailable: the unwritten outputs are "
                           "written after the next start", self.what)
            logging.shutdown()
            os._exit(0)
        if self.since is None:
            self.since = time.monotonic()
            logger.warning("%s unavailable, retrying until it is back: %s", self.what, error)
        self.attempts += 1
        self.sleep(min(MAX_PAUSE, FIRST_PAUSE * 2 ** min(self.attempts - 1, 8)))

    def succeeded(self) -> None:
        if self.since is not None:
            logger.warning("%s back after %.1f s (%d retries)", self.what,
                           time.monotonic() - self.since, self.attempts)
        self.since = None
        self.attempts = 0


def latest_per_window(rows: list[WindowRow]) -> list[WindowRow]:
    """One emission per window, the highest revision: one INSERT may not touch a row twice
    (an emission carries all of its window's dimension rows, so the others add nothing)."""
    latest: dict[tuple[Any, ...], WindowRow] = {}
    for item in rows:
        row = item.row
        key = (row.tenant_id, row.route, row.model, row.window_start)
        kept = latest.get(key)
        if kept is None or kept.row.revision <= row.revision:
            latest[key] = item
    return list(latest.values())


def values_of(item: WindowRow) -> tuple[Any, ...]:
    """One row's parameters, in :data:`COLUMNS` order."""
    row = item.row
    return (*(getattr(row, name) for name in ROW_FIELDS), item.ttft_count, item.digest)


def dimension_values_of(item: DimensionEmission, window_revision: int) -> tuple[Any, ...]:
    """One dimension row's columns, in :data:`DIMENSION_COLUMNS` order."""
    row = item.row
    return (*(getattr(row, name) for name in DIMENSION_ROW_FIELDS), item.ttft_count, item.digest,
            window_revision)


DimensionKey = tuple[str, str, str, Any, str, str | None]


def dimension_key(row: DimensionRow) -> DimensionKey:
    return (row.tenant_id, row.route or "", row.model or "", row.window_start, row.dimension, row.value)


class DimensionsWritten(NamedTuple):
    """What Postgres did with a batch's dimension rows: the rows it took, the keys it removed."""

    taken: list[DimensionRow]
    removed: list[DimensionKey]


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
        self._outage = Outage(f"kafka topic {topic}")

    def write(self, messages: list[KafkaSinkMessage[bytes | None, bytes | None]]) -> None:
        pending = messages
        while pending:
            failed: list[KafkaSinkMessage[bytes | None, bytes | None]] = []
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

    def _produce(self, message: KafkaSinkMessage[bytes | None, bytes | None],
                 failed: list[KafkaSinkMessage[bytes | None, bytes | None]],
                 errors: list[KafkaError]) -> None:
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


class _RowsPartition(StatelessSinkPartition[WindowRow]):
    def __init__(self, dsn: str, brokers: str) -> None:
        self._dsn = dsn
        self._conn: psycopg.Connection | None = None
        self._outage = Outage("postgres")
        self._metrics = KafkaWriter(brokers, METRICS)
        self._dimensions = KafkaWriter(brokers, DIMENSION_METRICS)

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=5)
            self._conn.execute(STAGE_SQL)
        return self._conn

    def write_batch(self, items: list[WindowRow]) -> None:
        if not items:
            return
        latest = latest_per_window(items)
        taken, dimensions = self._upsert(latest)
        written = sum(taken)
        ROWS_WRITTEN.inc(written)
        ROWS_STALE.inc(len(latest) - written)
        self._metrics.write([metrics_message(item) for item, took in zip(latest, taken, strict=True)
                             if took])
        if dimensions.taken or dimensions.removed:
            self._dimensions.write([*map(dimension_message, dimensions.taken),
                                    *map(dimension_tombstone, dimensions.removed)])

    def _upsert(self, items: list[WindowRow]) -> tuple[list[bool], DimensionsWritten]:
        """Write the rows in one transaction, retrying through outages; which ones Postgres
        took, and what it did with the dimension rows of the windows it took."""
        params = [values_of(item) for item in items]
        while True:
            try:
                conn = self._connection()
                with conn.transaction(), conn.cursor() as cursor:
                    cursor.executemany(UPSERT_SQL, params, returning=True)
                    taken: list[bool] = []
                    revised: list[WindowRow] = []
                    for item in items:
                        found = cursor.fetchone()
                        taken.append(found is not None)
                        if found is not None and not found[0]:
                            revised.append(item)
                        cursor.nextset()
                    dimensions = _write_dimensions(
                        cursor, [item for item, took in zip(items, taken, strict=True) if took], revised)
                self._outage.succeeded()
                return taken, dimensions
            except (psycopg.OperationalError, psycopg.InterfaceError) as error:
                self._disconnect()
                self._outage.failed(error)

    def _disconnect(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def close(self) -> None:
        self._disconnect()
        self._metrics.close()
        self._dimensions.close()


def _write_dimensions(cursor: psycopg.Cursor[Any], items: list[WindowRow], revised: list[WindowRow]
                      ) -> DimensionsWritten:
    """The dimension rows of windows whose emission Postgres took: upserted by revision, and,
    of ``revised`` windows (those Postgres had a row of already), the rows of values no
    longer kept (merged into "(other)") removed."""
    if not any(item.kept for item in items):
        return DimensionsWritten([], [])
    by_key: dict[DimensionKey, DimensionRow] = {}
    with cursor.copy(f"COPY dimension_rows_in ({', '.join(DIMENSION_COLUMNS)}) FROM STDIN") as copy:
        for item in items:
            for emitted in item.dimension_rows:
                copy.write_row(dimension_values_of(emitted, item.row.revision))
                by_key[dimension_key(emitted.row)] = emitted.row
    cursor.execute(UPSERT_DIMENSIONS_SQL)
    taken = [by_key[_key_of(record)] for record in cursor.fetchall()]
    removed: list[DimensionKey] = []
    if any(item.kept for item in revised):
        with cursor.copy("COPY dimension_kept_in FROM STDIN") as copy:
            for item in revised:
                row = item.row
                for name, values in item.kept.items():
                    copy.write_row((row.tenant_id, row.route, row.model, row.window_start, name,
                                    row.revision, [NO_VALUE if value is None else value for value in values]))
        cursor.execute(DELETE_DROPPED_SQL)
        removed = [_key_of(record) for record in cursor.fetchall()]
    DIMENSION_ROWS.labels("written").inc(len(taken))
    DIMENSION_ROWS.labels("stale").inc(len(by_key) - len(taken))
    DIMENSION_ROWS.labels("removed").inc(len(removed))
    return DimensionsWritten(taken, removed)


def _key_of(record: tuple[Any, ...]) -> DimensionKey:
    tenant_id, route, model, window_start, dimension, value = record
    return (tenant_id, route, model, window_start, dimension, value)


class RowsSink(DynamicSink[WindowRow]):
    """Upserts rows into ``llm_metrics`` (one transaction per batch), then publishes the
    ones Postgres took to ``llm.metrics``.

    Each worker writes its own batches: a window's emissions all come from the one
    worker holding its shard, and the revision guard makes any order safe anyway.
    """

    def __init__(self, dsn: str, brokers: str) -> None:
        self._dsn = dsn
        self._brokers = brokers

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _RowsPartition:
        return _RowsPartition(self._dsn, self._brokers)


class _KafkaPartition(StatelessSinkPartition[KafkaSinkMessage[bytes | None, bytes | None]]):
    def __init__(self, brokers: str, topic: str) -> None:
        self._writer = KafkaWriter(brokers, topic)

    def write_batch(self, items: list[KafkaSinkMessage[bytes | None, bytes | None]]) -> None:
        self._writer.write(items)

    def close(self) -> None:
        self._writer.close()


class KafkaTopicSink(DynamicSink[KafkaSinkMessage[bytes | None, bytes | None]]):
    """Produces to one topic, each batch acknowledged before it counts as written."""

    def __init__(self, brokers: str, topic: str = DEADLETTER) -> None:
        self._brokers = brokers
        self._topic = topic

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _KafkaPartition:
        return _KafkaPartition(self._brokers, self._topic)


def metrics_message(item: WindowRow) -> KafkaSinkMessage[bytes, bytes]:
    """An ``llm.metrics`` record: keyed by window, so compaction keeps the latest revision."""
    return KafkaSinkMessage(key=item.row.kafka_key(), value=row_encoder.encode(item.row))


def dimension_message(row: DimensionRow) -> KafkaSinkMessage[bytes | None, bytes | None]:
    """An ``llm.dimension-metrics`` record: keyed by window, dimension and value."""
    return KafkaSinkMessage(key=row.kafka_key(), value=row_encoder.encode(row))


def dimension_tombstone(key: DimensionKey) -> KafkaSinkMessage[bytes | None, bytes | None]:
    """The tombstone of a value's row that was merged into ``"(other)"``: compaction
    forgets the row, as Postgres did."""
    tenant_id, route, model, window_start, dimension, value = key
    # As DimensionRow.kafka_key writes it: the window's start in UTC.
    start = window_start.astimezone(UTC).isoformat()
    text = f"{tenant_id}|{route}|{model}|{start}|{dimension}|{'' if value is None else value}"
    return KafkaSinkMessage(key=text.encode(), value=None)


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


def deadletter_message(letter: DeadLetter) -> KafkaSinkMessage[bytes | None, bytes | None]:
    """An ``llm.deadletter`` record, keyed by request id when known, that always fits the
    producer's message limit (:func:`schemas.deadletter.encode_bounded`).

    A key longer than any request id can be is left out (the payload still shows it),
    and so is one that cannot be read: the payload of an invalid record is anything.
    """
    try:
        key = deadletter_key(letter)
    except RecursionError:  # JSON nested deeper than msgspec follows
        key = None
    if key is not None and len(key) > KEY_MAX_BYTES:
        key = None
    DEAD_LETTERS.labels(letter.reason).inc()
    return KafkaSinkMessage(key=key, value=encode_bounded(letter))
