"""The whole dataflow on a pre-filled backlog: calls per second and peak memory.

A broker and a Postgres of its own are started; ``llm.requests`` and
``llm.responses`` are filled with ``tests.bench.dataset.generate`` (500,000 calls
over 1,000 keys, about 995,000 records), then ``python -m dataflows.run`` is started
and timed until every window of the data set has its first row in Postgres. After
the data set, one "closer" call per key, 80 s of event time after the last call,
moves every key's event time past its last window's grace, so the last windows
close on data rather than after a minute of idle wall clock.

In the same run: the plain single-process loop over the same payloads
(``bench_baseline.plain_loop``), the one-core ceiling; the lean per-event loop
(``bench_baseline.lean_loop``: decode, dict join, per-window sums, price and
t-digest, nothing else), the fixed reference the dataflow must beat (``dataflow /
lean loop`` ≥ 1.0); the time one process takes only to read the topics as the
dataflow does, which no dataflow over them can spend less on; and the two ways of
writing a batch to Postgres (one ``INSERT … SELECT FROM unnest(…)`` statement versus
``executemany`` in a pipeline).

The dataflow runs twice on the same backlog: without dimensions, and with three
(``DIMENSIONS``: 10, 100 and 10,000 distinct values, see ``tests.bench.dataset``),
printing the ratio of the two, the dimension rows written per second and the
size of ``llm_dimension_metrics`` per day at the data set's 1,000 calls/s.

``python -m tests.bench.bench_dataflow [--calls N] [--processes P]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import psutil
import psycopg
from confluent_kafka import Producer

from dataflows import sinks
from dataflows.sources import PREFETCH_CONFIG
from dataflows.windows import WindowRow
from schemas.network import free_port
from schemas.rows import FLOAT_STATISTICS, MetricsRow
from schemas.topics import REQUESTS, RESPONSES
from tests.bench.bench_baseline import batch_loop, lean_loop, plain_loop
from tests.bench.dataset import CALLS_PER_SECOND, DIMENSIONS, generate
from tests.bench.stack import local_stack

CALLS = 500_000
KEYS = 1_000
SEED = 1
WINDOW_SECONDS = 60
PARTITIONS = 3
SNAPSHOT_INTERVAL = 10  # seconds, the runner's default


class _Request(msgspec.Struct):
    request_id: str
    tenant_id: str
    route: str
    model: str
    timestamp: datetime
    provider: str | None = None


def _windows_and_closers(requests: list[bytes]) -> tuple[set[tuple], datetime, list[bytes], list[bytes]]:
    """The data set's windows (tenant, route, model, start), when the closers' windows
    start, and one closer call per key."""
    decoder = msgspec.json.Decoder(_Request)
    windows: set[tuple] = set()
    keys: dict[tuple, _Request] = {}
    last = 0.0
    for payload in requests:
        request = decoder.decode(payload)
        seconds = request.timestamp.timestamp()
        last = max(last, seconds)
        key = (request.tenant_id, request.route, request.model)
        windows.add((*key, math.floor(seconds / WINDOW_SECONDS) * WINDOW_SECONDS))
        keys.setdefault(key, request)
    at = datetime.fromtimestamp(last + 80, UTC)
    closing_requests, closing_responses = [], []
    for number, (key, example) in enumerate(sorted(keys.items())):
        rid = f"closer-{number}"
        closing_requests.append(
            json.dumps(
                {
                    "request_id": rid,
                    "tenant_id": key[0],
                    "route": key[1],
                    "model": key[2],
                    "provider": example.provider,
                    "timestamp": at.isoformat(),
                }
            ).encode()
        )
        closing_responses.append(
            json.dumps(
                {
                    "request_id": rid,
                    "tenant_id": key[0],
                    "latency_ms": 100.0,
                    "timestamp": (at + timedelta(seconds=0.1)).isoformat(),
                }
            ).encode()
        )
    closers_window = datetime.fromtimestamp(math.floor(at.timestamp() / WINDOW_SECONDS) * WINDOW_SECONDS, UTC)
    return windows, closers_window, closing_requests, closing_responses


def fill_backlog(brokers: str, requests: list[bytes], responses: list[bytes]) -> None:
    """Pre-fill both event topics and print how long it took."""
    started = time.perf_counter()
    _fill(brokers, REQUESTS, requests)
    _fill(brokers, RESPONSES, responses)
    print(f"  produced {len(requests) + len(responses):,} records in {time.perf_counter() - started:.1f}s")


def _fill(brokers: str, topic: str, payloads: list[bytes]) -> None:
    producer = Producer(
        {
            "bootstrap.servers": brokers,
            "linger.ms": 50,
            "batch.num.messages": 10000,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 2_000_000,
            "enable.idempotence": True,
            "acks": "all",
        }
    )
    for index, payload in enumerate(payloads):
        # Spread like the ingestion API's request_id keys would, without parsing here.
        producer.produce(topic, payload, partition=index % PARTITIONS)
        if index % 50_000 == 0:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError(f"records left unsent to {topic}")


# Both probes' first lines: one consumer a partition of each topic, from the beginning, as the
# dataflow's source reads them (argv: brokers, topics, partitions, extra configuration as JSON).
_CONSUMERS = """
import json, sys, time
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
brokers, topics, partitions = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
extra = json.loads(sys.argv[4])
def open_consumers():
    consumers = []
    for topic in topics:
        for partition in range(partitions):
            consumer = Consumer({"group.id": "probe", "enable.auto.commit": "false",
                                 "bootstrap.servers": brokers, **extra})
            consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
            consumers.append(consumer)
    return consumers
"""

_PREFETCH_PROBE = (
    _CONSUMERS
    + """
import psutil
before = psutil.Process().memory_info().rss
consumers = open_consumers()
for consumer in consumers:
    consumer.consume(1, 10)
time.sleep(2)  # what the fetcher threads queue meanwhile is the measurement
print(psutil.Process().memory_info().rss - before)
"""
)


_CONSUME_PROBE = (
    _CONSUMERS
    + """
total = int(sys.argv[5])
consumers = open_consumers()
read = 0
started, cpu = time.perf_counter(), time.thread_time()
while read < total:
    for consumer in consumers:
        for message in consumer.consume(5000, 0.05):
            if message.error() is None:
                message.value()
                read += 1
print(read, time.perf_counter() - started, time.thread_time() - cpu)
"""
)


def consume_seconds(brokers: str, records: int) -> tuple[float, float]:
    """Seconds, wall-clock and of the reading thread's CPU, one process takes only to read
    ``records`` off both event topics, one consumer a partition and the dataflow's prefetch, as
    its source reads them (``consume`` of up to 5,000, each record's value taken). The thread's
    CPU is what no dataflow over these topics can spend less of in its one Python thread
    (librdkafka fetches and decompresses on threads of its own); the wall clock also waits for
    fetches, which a dataflow overlaps with its work."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _CONSUME_PROBE,
            brokers,
            f"{REQUESTS},{RESPONSES}",
            str(PARTITIONS),
            json.dumps(PREFETCH_CONFIG),
            str(records),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    _, wall, cpu = done.stdout.split()
    return float(wall), float(cpu)


def prefetch_rss(brokers: str, extra: dict[str, str]) -> int:
    """Bytes one consumer per partition (as the dataflow reads) holds 2 s after its first
    poll of the backlog, with ``extra`` configuration: what librdkafka prefetched."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _PREFETCH_PROBE,
            brokers,
            f"{REQUESTS},{RESPONSES}",
            str(PARTITIONS),
            json.dumps(extra),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.split()[-1])


def records_read(port: int) -> float:
    """Records the dataflow process serving Prometheus metrics on ``port`` has read so far
    (0 while it does not answer yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=0.5) as answer:
            text = answer.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("streamlens_dataflow_records_read_total{")
    )


def _first_rows(dsn: str, before: datetime) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM llm_metrics WHERE window_start < %s", (before,)).fetchone()
    return int(row[0]) if row else 0


def _usage(process: psutil.Process, cpu: dict[int, float]) -> int:
    """Resident memory of the process tree now; ``cpu`` keeps each member's CPU seconds."""
    total = 0
    for member in (process, *process.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += member.memory_info().rss
            times = member.cpu_times()
            cpu[member.pid] = times.user + times.system
    return total


@dataclass
class DataflowRun:
    """What one run of the dataflow measured; RSS sums every process of the processor."""

    seconds: float  # from start until every window had its first row
    # (seconds since start, RSS bytes, CPU seconds used so far) at every sample
    samples: list[tuple[float, int, float]]
    # Seconds from start until the first process had read its first records (None: never
    # seen), polled every 0.2 s from its Prometheus metrics: what start-up took.
    first_read: float | None = None

    @property
    def after_start_up(self) -> float:
        """Seconds from the first records read until done."""
        return self.seconds - (self.first_read or 0.0)

    @property
    def cpu_seconds(self) -> float:
        return self.samples[-1][2]

    @property
    def peak_rss(self) -> int:
        return max(rss for _, rss, _ in self.samples)

    @property
    def final_rss(self) -> int:
        return self.samples[-1][1]

    def at(self, seconds: float) -> tuple[float, int, float]:
        """The first sample taken at or after ``seconds`` since start (the last one if none)."""
        return next((sample for sample in self.samples if sample[0] >= seconds), self.samples[-1])

    def rss_at(self, seconds: float) -> int:
        return self.at(seconds)[1]


# The processor's resident size this long after start is what the consumers' prefetch
# costs, before much state exists: it has started up and is 2-3 s into the backlog.
BACKLOG_PROBE_SECONDS = 3.0


def run_dataflow(
    brokers: str,
    dsn: str,
    windows: int,
    before: datetime,
    processes: int,
    work: Path,
    timeout: float = 600.0,
    settings: dict[str, str] | None = None,
    on_sample: Callable[[float], None] | None = None,
    done: Callable[[], bool] | None = None,
) -> DataflowRun:
    """Run ``python -m dataflows.run`` until ``windows`` rows exist (the closers' windows,
    from ``before`` on, are not counted), or until ``done()`` when given, sampling its
    processes' RSS and CPU every 0.2 s; ``on_sample`` is called with the seconds since
    start at each sample. ``settings`` are extra environment variables (``DEDUPE_SECONDS`` …)."""
    metrics_port = free_port()
    env = {
        **os.environ,
        "KAFKA_BROKERS": brokers,
        "POSTGRES_DSN": dsn,
        "TOPIC_PARTITIONS": str(PARTITIONS),
        "METRICS_PORT": str(metrics_port),
        **(settings or {}),
    }
    log = open(work / "dataflow.log", "wb")  # noqa: SIM115 - the child keeps it
    started = time.perf_counter()
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dataflows.run",
            "--recovery-dir",
            str(work / "recovery"),
            "--processes",
            str(processes),
            "--snapshot-interval",
            str(SNAPSHOT_INTERVAL),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    watched = psutil.Process(child.pid)
    samples: list[tuple[float, int, float]] = []
    cpu: dict[int, float] = {}
    first_read: float | None = None
    try:
        while True:
            rss = _usage(watched, cpu)
            samples.append((time.perf_counter() - started, rss, sum(cpu.values())))
            if child.poll() is not None:
                raise RuntimeError((work / "dataflow.log").read_text()[-3000:])
            if on_sample is not None:
                on_sample(time.perf_counter() - started)
            if first_read is None and records_read(metrics_port) > 0:
                first_read = time.perf_counter() - started
            if done() if done is not None else _first_rows(dsn, before) >= windows:
                return DataflowRun(time.perf_counter() - started, samples, first_read)
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"not done after {timeout:.0f}s")
            time.sleep(0.2)
    finally:
        child.terminate()
        child.wait(30)


def _after_start_up(run: DataflowRun, calls: int) -> str:
    """The run's start-up and its rate after it, as a phrase."""
    if run.first_read is None:
        return "its first read not seen"
    return (
        f"start-up (until its first records read) {run.first_read:.1f}s, then "
        f"{calls / run.after_start_up:,.0f} calls/s"
    )


def _sink_rows(count: int) -> list[WindowRow]:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        WindowRow(
            row=MetricsRow(
                tenant_id=f"tenant-{n % 17}",
                route=f"/route-{n}",
                model="gpt-4o",
                window_start=start,
                window_end=start + timedelta(minutes=1),
                requests=500,
                errors=3,
                timeouts=1,
                avg_latency_ms=512.0,
                p50_latency_ms=480.0,
                p95_latency_ms=1500.0,
                p99_latency_ms=2500.0,
                avg_time_to_first_token_ms=90.0,
                prompt_tokens=400_000,
                completion_tokens=150_000,
                cache_read_tokens=12_000,
                reasoning_tokens=2_000,
                avg_prompt_tokens=800.0,
                avg_completion_tokens=300.0,
                estimated_cost_usd=1.25,
                unpriced_requests=0,
                revision=1,
            ),
            digest=b"\x00" * 800,
            ttft_count=250,
        )
        for n in range(count)
    ]


def compare_sink_statements(dsn: str, rows: int = 20_000, batch: int = 500) -> None:
    """executemany in a pipeline (what the sink does) against one INSERT … SELECT FROM
    unnest(…) per batch: same rows, same batches, same conflict clause."""
    items = _sink_rows(rows)
    types = {name: "text" for name in ("tenant_id", "route", "model")}
    types |= {
        "window_start": "timestamptz",
        "window_end": "timestamptz",
        "latency_digest": "bytea",
        "revision": "integer",
    }
    types |= dict.fromkeys(FLOAT_STATISTICS, "float8")
    unnest_sql = (
        f"INSERT INTO llm_metrics ({', '.join(sinks.COLUMNS)}, updated_at) "
        f"SELECT *, now() FROM unnest("
        + ", ".join(f"%s::{types.get(name, 'bigint')}[]" for name in sinks.COLUMNS)
        + ")"
        + sinks.CONFLICT_SQL
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        # The first round warms the server and the connection up and is not shown.
        for round_, name in enumerate(("executemany+pipeline", "unnest") * 3):
            conn.execute("TRUNCATE llm_metrics")
            started = time.perf_counter()
            for first in range(0, rows, batch):
                params = [sinks.values_of(item) for item in items[first : first + batch]]
                with conn.transaction(), conn.cursor() as cursor:
                    if name == "unnest":
                        cursor.execute(unnest_sql, [list(c) for c in zip(*params, strict=True)])
                    else:
                        cursor.executemany(sinks.UPSERT_SQL, params)
            seconds = time.perf_counter() - started
            if round_ < 2:
                continue
            print(f"  postgres {name:22s} {rows / seconds:10,.0f} rows/s ({batch} rows per batch)")


def _dimension_figures(dsn: str, seconds: float, calls: int) -> None:
    """Dimension rows written, their rate, and the table's size per day of calls at the data
    set's own rate (CALLS_PER_SECOND of event time)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*), pg_total_relation_size('llm_dimension_windows'), "
            "(SELECT count(*) FROM llm_metrics) FROM llm_dimension_metrics"
        ).fetchone()
    assert row is not None
    rows, size, main_rows = row
    event_seconds = calls / CALLS_PER_SECOND
    per_day = 86_400 / event_seconds
    print(
        f"  dimension rows: {rows:,} for {main_rows:,} windows ({rows / max(main_rows, 1):.0f} a window), "
        f"{rows / seconds:,.0f} rows/s written; llm_dimension_windows {size / 2**20:,.0f} MiB "
        f"({size / max(rows, 1):,.0f} B a row) = {size * per_day / 2**30:,.1f} GiB and "
        f"{rows * per_day / 1e6:,.0f} M rows a day at {CALLS_PER_SECOND:,.0f} calls/s over {KEYS:,} keys"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_dataflow")
    parser.add_argument("--calls", type=int, default=CALLS)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args(argv if argv is not None else [])

    requests, responses = generate(args.calls, KEYS, SEED)
    windows, closers_window, closing_requests, closing_responses = _windows_and_closers(requests)
    print(f"  data set: {len(requests):,} requests, {len(responses):,} responses, {len(windows):,} windows")

    calls, seconds = plain_loop(requests, responses)
    baseline = calls / seconds
    print(
        f"  plain loop (one process, no Bytewax): {calls:,} calls in {seconds:.2f}s = {baseline:,.0f} calls/s"
    )
    calls, seconds = lean_loop(requests, responses)
    lean = calls / seconds
    print(
        f"  lean per-event loop (one process, no Bytewax): {calls:,} calls in {seconds:.2f}s "
        f"= {lean:,.0f} calls/s"
    )
    calls, seconds, stages = batch_loop(requests, responses)
    print(
        f"  the dataflow's batch operators (one process, no Bytewax, no Kafka): {calls:,} calls "
        f"folded in {seconds:.2f}s = {calls / seconds:,.0f} calls/s; per call "
        + ", ".join(f"{stage} {spent / calls * 1e6:.1f} µs" for stage, spent in stages.items())
    )

    with local_stack("streamlens-bench-", PARTITIONS) as (work, broker, postgres):
        compare_sink_statements(postgres.dsn)
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE llm_metrics")
        fill_backlog(broker.address, requests + closing_requests, responses + closing_responses)
        records = len(requests) + len(closing_requests) + len(responses) + len(closing_responses)
        wall, consumed = consume_seconds(broker.address, records)
        per_call = consumed / args.calls
        with_lean = 1 / (per_call + 1 / lean)
        print(
            f"  reading the topics alone (one process, consumers as the dataflow's): {records:,} records, "
            f"{wall:.2f}s wall-clock, {consumed:.2f} CPU-s of the reading thread = {per_call * 1e6:.2f} µs "
            f"a call, a ceiling of {1 / per_call:,.0f} calls/s; with the lean loop's own work "
            f"({1e6 / lean:.2f} µs a call): {with_lean:,.0f} calls/s = {with_lean / lean:.2f} of the lean"
            " loop"
        )
        for what, extra in (("librdkafka's defaults", {}), ("dataflows.sources", PREFETCH_CONFIG)):
            print(
                f"  {2 * PARTITIONS} consumers 2 s after their first poll, prefetch as "
                f"{what}: {prefetch_rss(broker.address, extra) / 2**20:,.0f} MiB"
            )
        rates: dict[str, float] = {}
        runs = (("no dimensions", {}), (f"DIMENSIONS={DIMENSIONS}", {"DIMENSIONS": DIMENSIONS}))
        for label, settings in runs:
            with psycopg.connect(postgres.dsn, autocommit=True) as conn:
                # Each run decides its dimensions afresh: DIMENSIONS as recorded by the last one
                # would otherwise hold until after the data set's windows.
                conn.execute(
                    "TRUNCATE llm_metrics, llm_dimension_windows, dimension_horizons, default_dimensions, "
                    "join_segments, llm_evaluation_metrics"
                )
            recovery = work / "recovery"
            if recovery.exists():
                shutil.rmtree(recovery)
            run = run_dataflow(
                broker.address,
                postgres.dsn,
                len(windows),
                closers_window,
                args.processes,
                work,
                settings=settings,
            )
            rate = rates[label] = args.calls / run.seconds
            print(
                f"  dataflow ({args.processes} process(es), 1 worker each, {label}): every window's "
                f"first row after {run.seconds:.1f}s (start-up included) = {rate:,.0f} calls/s, "
                f"{rate / args.processes:,.0f} per process; {_after_start_up(run, args.calls)}; "
                f"peak RSS {run.peak_rss / 2**20:,.0f} MiB, "
                f"{run.rss_at(BACKLOG_PROBE_SECONDS) / 2**20:,.0f} MiB {BACKLOG_PROBE_SECONDS:.0f} s "
                f"after start; {run.cpu_seconds:.1f} CPU-s = "
                f"{args.calls / run.cpu_seconds:,.0f} calls per CPU-second"
            )
            if settings:
                _dimension_figures(postgres.dsn, run.seconds, args.calls)
        without, with_dimensions = rates.values()
        print(f"  dimensions / none, same run: {with_dimensions / without:.2f} (target ≥ 0.7)")
    # The references are per-event loops without dimensions: compare the run without.
    print(f"  dataflow (no dimensions) / plain loop: {without / baseline:.2f}")
    print(f"  dataflow (no dimensions) / lean loop: {without / lean:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
