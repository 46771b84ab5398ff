"""The dataflow's Prometheus metrics, served on ``METRICS_PORT`` (one port per process).

Counters move where the thing happens (records handed over by a partition, calls
leaving the join, rows Postgres took, dead letters written); state sizes, event
time and consumer lag are read when Prometheus scrapes, from what each shard and
partition of this process last reported. Nothing is labelled by tenant, route or
model.

**Consumer lag** is ``end − next``: ``next`` is the offset a partition hands over
next; ``end`` is one past the partition's last record. The broker's high
watermark cannot give ``end`` alone: the local broker (Tansu) reports the offset
just after the *first* record of its last batch, not after its last record. So
``end`` is found by reading from just before that watermark to the end of the
partition with a consumer of its own (about one batch of records), until a poll
finds nothing more. (Its end-of-partition events come from the same watermark,
so they cannot be used either.) A thread does this every ``LAG_INTERVAL``
seconds; a scrape reports the last figures.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator

from confluent_kafka import Consumer, TopicPartition
from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger("streamlens.dataflow")

DEFAULT_PORT = 9464

RECORDS_READ = Counter(
    "streamlens_dataflow_records_read", "Records handed over by the input partitions", ["topic"]
)
DEAD_LETTERS = Counter(
    "streamlens_dataflow_dead_letters", "Dead letters written to llm.deadletter", ["reason"]
)
CALLS = Counter(
    "streamlens_dataflow_calls",
    "Calls out of the join: answered, timed out (provisionally), or answered in place of an earlier timeout",
    ["outcome"],
)
ROWS_WRITTEN = Counter(
    "streamlens_dataflow_rows_written", "Window emissions Postgres took (and llm.metrics carries)"
)
ROWS_STALE = Counter(
    "streamlens_dataflow_rows_stale",
    "Window emissions Postgres refused: a higher revision was stored (replays)",
)
DIMENSION_ROWS = Counter(
    "streamlens_dataflow_dimension_rows",
    "Dimension rows (one per value) of the window emissions Postgres took",
)
EVALUATION_ROWS = Counter(
    "streamlens_dataflow_evaluation_rows", "Evaluation rows (window, key and name) Postgres took"
)
SNAPSHOT_SECONDS = Histogram(
    "streamlens_dataflow_snapshot_seconds",
    "Time to snapshot one shard of state",
    ["step"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)

# How long the end of a partition may take to read back.
END_READ_TIMEOUT = 2.0
LAG_INTERVAL = 5.0


class _Board(Collector):
    """What the shards and partitions of this process last reported, read at each scrape."""

    def __init__(self) -> None:
        self.join: dict[str, tuple[int, int, float]] = {}  # shard -> in flight, remembered, event time
        self.windows: dict[str, tuple[int, float]] = {}  # shard -> open windows, event time
        self.positions: dict[tuple[str, int], int] = {}  # partition -> next offset to hand over
        self.lags: dict[tuple[str, int], int] = {}  # partition -> records not handed over

    def report_join(self, shard: str, in_flight: int, remembered: int, event_time: float) -> None:
        self.join[shard] = (in_flight, remembered, event_time)

    def report_windows(self, shard: str, open_windows: int, event_time: float) -> None:
        self.windows[shard] = (open_windows, event_time)

    def report_position(self, topic: str, partition: int, offset: int) -> None:
        self.positions[(topic, partition)] = offset

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.time()
        join, windows = list(self.join.values()), list(self.windows.values())
        yield GaugeMetricFamily(
            "streamlens_dataflow_join_in_flight",
            "Requests and responses waiting for their other half",
            value=sum(entry[0] for entry in join),
        )
        yield GaugeMetricFamily(
            "streamlens_dataflow_join_remembered",
            "Counted request ids remembered to ignore repeats",
            value=sum(entry[1] for entry in join),
        )
        yield GaugeMetricFamily(
            "streamlens_dataflow_open_windows",
            "Windows held (not yet past end + lateness)",
            value=sum(entry[0] for entry in windows),
        )
        times = [entry[2] for entry in join] + [entry[1] for entry in windows]
        times = [t for t in times if math.isfinite(t)]
        yield GaugeMetricFamily(
            "streamlens_dataflow_event_time_lag_seconds",
            "Wall clock minus the event time of the shard furthest behind",
            value=now - min(times) if times else 0.0,
        )
        lag = GaugeMetricFamily(
            "streamlens_dataflow_consumer_lag_records",
            "Records in the partition not handed over yet (end - next offset)",
            labels=["topic", "partition"],
        )
        for (topic, partition), records in sorted(self.lags.items()):
            lag.add_metric([topic, str(partition)], records)
        yield lag

    def measure_lags(self, brokers: str) -> None:
        """Every LAG_INTERVAL seconds, each partition's end less its next offset (forever)."""
        consumer = Consumer(
            {
                "bootstrap.servers": brokers,
                "group.id": "streamlens-lag",
                "enable.auto.commit": "false",
                "enable.partition.eof": "false",
                "fetch.wait.max.ms": "10",
            }
        )
        ends: dict[tuple[str, int], int] = {}
        while True:
            for part in sorted(self.positions):
                try:
                    ends[part] = end = partition_end(consumer, *part, known=ends.get(part, 0))
                    position = self.positions[part]
                    if position < 0:
                        # A logical offset (the beginning): nothing handed over yet, so
                        # everything from the partition's first record on is unread.
                        position = consumer.get_watermark_offsets(
                            TopicPartition(*part), timeout=5, cached=False
                        )[0]
                    self.lags[part] = max(0, end - position)
                except Exception as error:  # a broker away: the last figure stays
                    logger.warning("consumer lag of %s[%s] not measured: %s", *part, error)
            time.sleep(LAG_INTERVAL)


def partition_end(consumer: Consumer, topic: str, partition: int, known: int = 0) -> int:
    """One past the last record of the partition (see the module's note on the watermark).

    ``known``: an end found before. Reading on from there, not from the watermark,
    skips what was read last time (the whole last batch a producer wrote, when the
    watermark lags); if nothing is there (the topic was recreated), from the watermark.
    """
    _low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=5, cached=False)
    if high <= 0:
        return 0
    for start in dict.fromkeys((max(high, known) - 1, high - 1)):
        end = _read_end(consumer, topic, partition, start)
        if end is not None:
            return max(end, high)
    return high


def _read_end(consumer: Consumer, topic: str, partition: int, start: int) -> int | None:
    """One past the last record from ``start`` on; None when there is no record at ``start``."""
    consumer.assign([TopicPartition(topic, partition, start)])
    deadline = time.monotonic() + END_READ_TIMEOUT
    end = None  # the record at start exists: wait for it, then read on while more come
    while time.monotonic() < deadline:
        messages = consumer.consume(10_000, 0.2)
        if not messages and end is not None:
            break
        for message in messages:
            offset = message.offset()
            if message.error() is None and offset is not None:
                end = max(end or 0, offset + 1)
    return end


BOARD = _Board()
REGISTRY.register(BOARD)


def serve(port: int, brokers: str) -> None:
    """Serve /metrics on ``port`` (all interfaces) and measure consumer lag, from threads of
    this process."""
    try:
        start_http_server(port)
    except OSError as error:
        # Metrics are for watching the dataflow, not a reason to stop it.
        logger.error("metrics: cannot serve /metrics on port %d (METRICS_PORT): %s", port, error)
    else:
        logger.info("metrics: serving /metrics on port %d", port)
    threading.Thread(target=BOARD.measure_lags, args=(brokers,), name="consumer-lag", daemon=True).start()
