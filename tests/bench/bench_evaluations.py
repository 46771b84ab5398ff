"""Evaluations joined to their calls: evaluations/s beside calls/s, and the call directory's memory.

Throughput (two runs of ``python -m dataflows.run`` on one broker and Postgres of the
bench's own, as ``bench_dataflow`` runs it):

- A: the calls of ``tests.bench.dataset.generate`` (500,000 by default, over 1,000 keys,
  1,000 calls/s of event time) and ``bench_dataflow``'s closer calls, timed until every
  window of the data set has its first row in ``llm_metrics``.
- B: the same calls, plus one evaluation (name "judge", a score and a label) per
  answered call, made 1-5 s after the call's response (the ~1 % of calls that time
  out have no response to judge), in ``llm.evaluations`` keyed by request id as the
  ingestion API writes them (``murmur2_random``), shuffled within blocks of
  ``dataset.SKEW`` records like the calls; and one evaluation per closer call, so that
  the evaluation windows' event time passes the last window's end + grace. Timed
  until, besides every window's first row, ``llm_evaluation_metrics`` holds a row for
  every (key, window) with evaluations and the sum of their ``evaluations`` equals the
  number of evaluations sent; each row's count and score sum are then checked
  against the data.

Every run starts from an empty recovery directory and empty tables, with the backlog
already in Kafka; the time includes start-up, as in ``bench_dataflow``. ``--rounds N``
runs A N times, then B N times (A must run before ``llm.evaluations`` is filled), and
compares the medians.

Memory (in a process of its own, no Kafka or Postgres): an ``EvaluationJoin`` with the
dataflow's default settings is fed ``CountedCalls`` for 2,000,000 calls (1,000 calls/s
of event time) in batches of 5,000, with one evaluation per batch moving its event
time as the evaluations topic would, then sealed as before a snapshot: the growth of
the process's resident size, divided by the calls, beside what the arrays hold. Then a
longer simulation, at 100 calls/s for a day and a half of event time, the directory
sealing by itself every ``SEAL_SECONDS`` of event time (each seal timed): the calls it
holds and the process's RSS every 6 h, levelling off once calls expire (their window's
end + a window + ``EVALUATION_LATENESS_SECONDS`` + lateness + grace, 24.2 h by
default). Last, a directory fed calls and no evaluation at all, as in run A.

``python -m tests.bench.bench_evaluations [--calls N] [--processes P] [--rounds N]
[--memory | --throughput] [--memory-calls N] [--day-rate R] [--days D]``, or
``just bench evaluations [options]``: ``--memory`` runs the memory part only,
``--throughput`` the runs only.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import psutil
import psycopg
from confluent_kafka import Producer

from dataflows import remembered as remembered_module
from dataflows.batches import EventRun, SourceRef
from dataflows.evaluations import (
    COUNTED,
    CountedCalls,
    EvaluationJoin,
    EvaluationWindows,
    Matched,
    dimension_text,
)
from dataflows.remembered import SEAL_SECONDS
from dataflows.shards import Shards, default_count
from schemas.events import LLMEvaluation, encoder
from schemas.topics import EVALUATIONS
from tests.bench.bench_dataflow import (
    KEYS,
    PARTITIONS,
    SEED,
    WINDOW_SECONDS,
    DataflowRun,
    _first_rows,
    _windows_and_closers,
    fill_backlog,
    run_dataflow,
)
from tests.bench.dataset import SKEW, START, generate
from tests.bench.stack import local_stack

CALLS = 500_000
NAME = "judge"
PRIMER = "primer"  # the evaluations of run A′, one a directory shard
EVALUATOR = "llm-judge"
DELAY = (1.0, 5.0)  # seconds between a call's response and its evaluation
TIMEOUT = 900.0  # seconds a run may take at most

# The directory's settings: the dataflow's defaults (schemas.config).
GRACE_SECONDS, LATENESS_SECONDS, EVALUATION_LATENESS_SECONDS = 10, 600, 86_400
MEMORY_CALLS = 2_000_000
TRACED_CALLS = 500_000
MEMORY_RATE = 1_000.0  # calls/s of event time, the data set's
MEMORY_KEYS = 1_000
BATCH = 5_000  # calls per CountedCalls, about what a window shard counts per activation
DAY = 86_400
DAY_RATE = 100.0
DIMENSIONS = ("metadata.country", "finish_reason")
DAYS = 1.5


# -- the data ------------------------------------------------------------------------------


class _Request(msgspec.Struct):
    request_id: str
    tenant_id: str
    route: str
    model: str
    timestamp: datetime


class _Response(msgspec.Struct):
    request_id: str
    timestamp: datetime


WindowOf = tuple[str, str, str, int]  # tenant, route, model, window start


@dataclass
class Evaluations:
    """One evaluation per answered call: (request id, payload) in topic order, and what
    each (key, window) must count: evaluations and their score sum."""

    records: list[tuple[str, bytes]]
    counts: Counter[WindowOf]
    score_sums: dict[WindowOf, float]
    # One evaluation named PRIMER for each directory shard (run A'), not checked.
    primers: list[tuple[str, bytes]]


def _payload(rid: str, tenant: str, at: float, score: float, name: str = NAME) -> bytes:
    return encoder.encode(
        LLMEvaluation(
            request_id=rid,
            tenant_id=tenant,
            name=name,
            timestamp=datetime.fromtimestamp(at, UTC),
            score=score,
            label="pass" if score >= 0.5 else "fail",
            evaluator=EVALUATOR,
        )
    )


def make_evaluations(
    requests: list[bytes], responses: list[bytes], closing_requests: list[bytes], seed: int, shards: Shards
) -> Evaluations:
    """An evaluation of every answered call, DELAY after its response, and one of every
    closer call; in event-time order shuffled within blocks of SKEW records. And a primer:
    an evaluation named PRIMER of the first answered call of each join shard of ``shards``."""
    rng = random.Random(seed * 7919 + 1)
    primers: dict[str, tuple[str, bytes]] = {}
    calls = {
        request.request_id: request
        for request in msgspec.json.Decoder(list[_Request]).decode(b"[" + b",".join(requests) + b"]")
    }
    timed: list[tuple[float, str, bytes]] = []
    counts: Counter[WindowOf] = Counter()
    sums: dict[WindowOf, list[float]] = {}
    for response in msgspec.json.Decoder(list[_Response]).decode(b"[" + b",".join(responses) + b"]"):
        call = calls[response.request_id]
        at = response.timestamp.timestamp() + rng.uniform(*DELAY)
        score = round(rng.betavariate(5.0, 2.0), 3)
        start = math.floor(call.timestamp.timestamp() / WINDOW_SECONDS) * WINDOW_SECONDS
        window = (call.tenant_id, call.route, call.model, start)
        counts[window] += 1
        sums.setdefault(window, []).append(score)
        timed.append((at, call.request_id, _payload(call.request_id, call.tenant_id, at, score)))
        shard = shards.join_key(call.request_id)
        if shard not in primers:
            primers[shard] = (call.request_id, _payload(call.request_id, call.tenant_id, at, 1.0, PRIMER))
    # The closers' evaluations (their windows are not checked): the last windows close on them.
    for closer in msgspec.json.Decoder(list[_Request]).decode(b"[" + b",".join(closing_requests) + b"]"):
        at = closer.timestamp.timestamp() + 1.0
        timed.append((at, closer.request_id, _payload(closer.request_id, closer.tenant_id, at, 0.5)))
    timed.sort(key=lambda record: record[0])
    records = [(rid, payload) for _, rid, payload in timed]
    for block in range(0, len(records), SKEW):
        chunk = records[block : block + SKEW]
        rng.shuffle(chunk)
        records[block : block + SKEW] = chunk
    sums_of = {window: math.fsum(scores) for window, scores in sums.items()}
    return Evaluations(records, counts, sums_of, [primers[name] for name in shards.names if name in primers])


def fill_evaluations(brokers: str, records: list[tuple[str, bytes]], what: str = "evaluations") -> None:
    """``llm.evaluations``, keyed by request id and partitioned as the ingestion API does."""
    started = time.perf_counter()
    producer = Producer(
        {
            "bootstrap.servers": brokers,
            "partitioner": "murmur2_random",
            "linger.ms": 50,
            "batch.num.messages": 10000,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 2_000_000,
            "enable.idempotence": True,
            "acks": "all",
        }
    )
    for index, (rid, payload) in enumerate(records):
        producer.produce(EVALUATIONS, payload, key=rid.encode())
        if index % 50_000 == 0:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError(f"records left unsent to {EVALUATIONS}")
    print(f"  produced {len(records):,} {what} in {time.perf_counter() - started:.1f}s")


# -- the runs --------------------------------------------------------------------------------


def _evaluation_totals(dsn: str, before: datetime) -> tuple[int, int]:
    """Rows of llm_evaluation_metrics before the closers' window, and their evaluations."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*), coalesce(sum(evaluations), 0) FROM llm_evaluation_metrics "
            "WHERE window_start < %s AND name = %s",
            (before, NAME),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def run_until(
    brokers: str, dsn: str, processes: int, work: Path, done: Callable[[], bool], timeout: float = TIMEOUT
) -> tuple[DataflowRun, str]:
    """``bench_dataflow.run_dataflow`` from an empty recovery directory until ``done()``; and
    how busy the machine's CPUs were meanwhile (the broker and Postgres share them)."""
    recovery = work / "recovery"
    if recovery.exists():
        shutil.rmtree(recovery)
    machine = psutil.cpu_times()
    run = run_dataflow(brokers, dsn, 0, datetime.now(UTC), processes, work, timeout, done=done)
    return run, _machine(machine)


def _machine(before: Any) -> str:
    """The machine's CPUs since ``before`` (psutil.cpu_times()): busy and stolen shares."""
    after = psutil.cpu_times()
    # guest time is counted in user time already
    fields = [field for field in after._fields if not field.startswith("guest")]
    spent = {field: getattr(after, field) - getattr(before, field) for field in fields}
    total = sum(spent.values()) or 1.0
    idle = spent.get("idle", 0.0) + spent.get("iowait", 0.0)
    steal = spent.get("steal", 0.0)
    busy = (total - idle - steal) / total
    return f"the machine's {psutil.cpu_count()} CPUs {busy:.0%} busy, {steal / total:.0%} stolen"


def _clear(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE llm_metrics, llm_evaluation_metrics, join_segments")


def _segments(dsn: str) -> tuple[int, int]:
    """join_segments rows of the call directory ("calls/…") and of the join's request ids."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE shard LIKE 'calls/%'), "
            "count(*) FILTER (WHERE shard NOT LIKE '%/%') "
            "FROM join_segments"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def check_evaluation_rows(dsn: str, before: datetime, expected: Evaluations) -> None:
    """Every (key, window) row holds exactly its evaluations, and their score sum."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT tenant_id, route, model, window_start, name, evaluations, scores, score_sum, revision "
            "FROM llm_evaluation_metrics WHERE window_start < %s AND name = %s",
            (before, NAME),
        ).fetchall()
    found: dict[WindowOf, tuple[Any, ...]] = {}
    for tenant, route, model, start, name, evaluations, scores, score_sum, revision in rows:
        assert name == NAME, name
        found[(tenant, route, model, int(start.timestamp()))] = (evaluations, scores, score_sum, revision)
    assert set(found) == set(expected.counts), len(set(found) ^ set(expected.counts))
    for window, count in expected.counts.items():
        evaluations, scores, score_sum, revision = found[window]
        assert evaluations == scores == revision == count, (window, found[window], count)
        assert math.isclose(score_sum, expected.score_sums[window], rel_tol=1e-12), window


def _describe(measured: tuple[DataflowRun, str], calls: int, processes: int) -> str:
    run, machine = measured
    rate = calls / run.seconds
    return (
        f"{run.seconds:.1f}s (start-up included) = {rate:,.0f} calls/s, {rate / processes:,.0f} per process; "
        f"peak RSS {run.peak_rss / 2**20:,.0f} MiB; {run.cpu_seconds:.1f} CPU-s; {machine}"
    )


def throughput(calls: int, processes: int, rounds: int) -> None:
    started = time.perf_counter()
    requests, responses = generate(calls, KEYS, SEED)
    windows, closers_window, closing_requests, closing_responses = _windows_and_closers(requests)
    evaluations = make_evaluations(
        requests, responses, closing_requests, SEED, Shards(default_count(processes))
    )
    sent = sum(evaluations.counts.values())
    rows = len(evaluations.counts)
    print(
        f"  data set: {len(requests):,} requests, {len(responses):,} responses, {len(windows):,} windows; "
        f"{sent:,} evaluations (one per answered call) in {rows:,} (key, window) rows; "
        f"+{len(closing_requests):,} closer calls and their evaluations; made in "
        f"{time.perf_counter() - started:.1f}s"
    )
    workers = f"{processes} process(es), 1 worker each"
    rates: dict[str, list[float]] = {"A": [], "A′": [], "B": []}
    segments: dict[str, tuple[int, int]] = {}
    with local_stack("streamlens-bench-", PARTITIONS) as (work, broker, postgres):
        dsn = postgres.dsn

        def calls_done() -> bool:
            return _first_rows(dsn, closers_window) >= len(windows)

        def run_calls(run: str, what: str) -> None:
            for _ in range(rounds):
                _clear(dsn)
                done = run_until(broker.address, dsn, processes, work, calls_done)
                rates[run].append(calls / done[0].seconds)
                print(
                    f"  {run}, {what} ({workers}): every window's first row after "
                    f"{_describe(done, calls, processes)}"
                )
            segments[run] = _segments(dsn)

        fill_backlog(broker.address, requests + closing_requests, responses + closing_responses)
        # A: the calls only (llm.evaluations is still empty).
        run_calls("A", "calls only")
        # A′: the calls and one evaluation in each shard of the call directory, whose event
        # time then moves (it moves with evaluations only): what A would cost if the calls
        # moved it too.
        fill_evaluations(broker.address, evaluations.primers, f"{PRIMER} evaluations, one a directory shard")
        run_calls("A′", f"calls + {len(evaluations.primers)} {PRIMER} evaluations")

        # B: the same calls and one evaluation per answered call.
        fill_evaluations(broker.address, evaluations.records)
        for _ in range(rounds):
            _clear(dsn)
            windows_done: list[float] = []
            b_started = time.perf_counter()

            def b_done(windows_done: list[float] = windows_done, b_started: float = b_started) -> bool:
                if not windows_done:
                    if not calls_done():
                        return False
                    windows_done.append(time.perf_counter() - b_started)
                return _evaluation_totals(dsn, closers_window) == (rows, sent)

            try:
                measured = run_until(broker.address, dsn, processes, work, b_done)
            except RuntimeError:
                found, counted = _evaluation_totals(dsn, closers_window)
                print(f"  B did not finish: {found:,} of {rows:,} rows, {counted:,} of {sent:,} evaluations")
                raise
            check_evaluation_rows(dsn, closers_window, evaluations)
            seconds = measured[0].seconds
            rates["B"].append(calls / seconds)
            print(
                f"  B, calls + evaluations ({workers}): every window's first row after "
                f"{windows_done[0]:.1f}s, every evaluation row complete after "
                f"{_describe(measured, calls, processes)}; "
                f"{sent / seconds:,.0f} evaluations/s, {sent / seconds / processes:,.0f} per process"
            )
        segments["B"] = _segments(dsn)
    print(
        f'  checked after every B: {rows:,} "{NAME}" rows, sum(evaluations) = {sent:,} = evaluations sent; '
        f"each row's evaluations, scores, revision and score_sum as the data says"
    )
    print(
        "  join_segments rows after the last run of each: "
        + "; ".join(
            f"{run} {directory:,} of the call directory (calls/…), {join:,} of the join"
            for run, (directory, join) in segments.items()
        )
    )
    a, primed, b_rate = (statistics.median(rates[run]) for run in ("A", "A′", "B"))
    median = " (medians)" if rounds > 1 else ""
    print(
        f"  A {a:,.0f} calls/s, A′ {primed:,.0f} calls/s; B {b_rate:,.0f} calls/s and "
        f"{b_rate * sent / calls:,.0f} evaluations/s{median}. Same run: B / A {b_rate / a:.2f}, "
        f"B / A′ {b_rate / primed:.2f}, A′ / A {primed / a:.2f}"
    )


# -- memory --------------------------------------------------------------------------------------


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    """The process's high-water resident size (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _trimmed_rss() -> int:
    """RSS once the garbage is collected and malloc has returned its free memory."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _rss()


def _array_bytes(join: EvaluationJoin) -> int:
    """What the directory's sealed arrays hold (digests, expiries, key indexes)."""
    calls = join._calls
    return sum(
        part.digests.nbytes + part.expiry.nbytes + part.tenant.nbytes for part in (calls._small, calls._large)
    )


class _Feeder:
    """Calls at ``rate`` a second of event time over ``keys`` keys, into a call directory,
    in batches of BATCH; one evaluation of the batch's last call after each batch moves
    the directory's event time, as the evaluations topic does. ``now`` stays 0: event
    time does not idle forward with the wall clock here."""

    def __init__(
        self, join: EvaluationJoin, rate: float, keys: int, seed: int, dimensions: bool = False
    ) -> None:
        self.join = join
        self.rate = rate
        self.rng = random.Random(seed)
        self.keys = [(f"tenant-{n % 17}", f"/api/route-{n}", f"model-{n % 5}") for n in range(keys)]
        self.number = 0
        self.offset = 0
        # With dimensions, each call has a country among 30 and a finish_reason among 3.
        self.values = (
            [
                dimension_text(COUNTED, DIMENSIONS, [f"C{n % 30:02d}", ("stop", "length", None)[n // 30]])
                for n in range(90)
            ]
            if dimensions
            else [""]
        )

    def batch(self, count: int) -> float:
        """Feed ``count`` calls; the event time reached."""
        rate, rng, keys, first = self.rate, self.rng, self.keys, self.number
        times = [START + (first + n) / rate for n in range(count)]
        rids = [f"1-{first + n:010d}-{rng.getrandbits(32):08x}" for n in range(count)]
        chosen = [keys[rng.randrange(len(keys))] for _ in range(count)]
        starts = [int(t // WINDOW_SECONDS) * WINDOW_SECONDS for t in times]
        values = self.values
        dimensions = [values[rng.randrange(len(values))] for _ in range(count)]
        self.number += count
        join = self.join
        join.on_counted(
            CountedCalls(rids, chosen, starts, [float(start) for start in starts], dimensions), 0.0
        )
        at = times[-1] + 1.0
        evaluation = LLMEvaluation(
            request_id=rids[-1],
            tenant_id=chosen[-1][0],
            name=NAME,
            timestamp=datetime.fromtimestamp(at, UTC),
            score=0.5,
        )
        join.on_runs([EventRun(EVALUATIONS, 0, LLMEvaluation, [self.offset], [evaluation], [at])], 0.0)
        self.offset += 1
        join.on_time(0.0)
        return at


def _directory() -> EvaluationJoin:
    return EvaluationJoin(WINDOW_SECONDS, GRACE_SECONDS, LATENESS_SECONDS, EVALUATION_LATENESS_SECONDS)


def memory_probe(calls: int, day_rate: float, days: float) -> dict[str, Any]:
    """The measurements of the memory part (run in a process of its own)."""
    out: dict[str, Any] = {}
    # Bytes a call: everything imported and made first, then the calls fed and sealed.
    join = _directory()
    feeder = _Feeder(join, MEMORY_RATE, MEMORY_KEYS, SEED)
    feeder.batch(1)  # the first seal, the hash, the evaluation path: made before measuring
    join.seal()
    before, before_trimmed = _rss(), _trimmed_rss()
    started = time.perf_counter()
    while feeder.number < calls + 1:
        feeder.batch(min(BATCH, calls + 1 - feeder.number))
    join.seal()
    out["feed_seconds"] = time.perf_counter() - started
    gc.collect()
    out["rss_growth"] = _rss() - before
    out["trimmed_growth"] = _trimmed_rss() - before_trimmed
    out["peak_growth"] = _peak_rss() - before
    out["remembered"] = join.remembered()
    out["array_bytes"] = _array_bytes(join)
    out["keep"] = join.keep
    del join, feeder
    gc.collect()

    # Days of event time at a lower rate: held calls and RSS. The directory seals by itself
    # every SEAL_SECONDS of event time (or SEAL_AT calls); every seal is timed.
    join = _directory()
    feeder = _Feeder(join, day_rate, MEMORY_KEYS, SEED + 1)
    base = _trimmed_rss()
    per_batch = max(1, round(day_rate * SEAL_SECONDS / 10))  # ten batches a seal
    total = round(day_rate * DAY * days)
    samples: list[tuple[float, int, int, int]] = []
    # (event hours, ms, held after, calls dropped, whether the small arrays joined the large)
    seals: list[tuple[float, float, int, int, bool]] = []
    remembered = join._calls
    seal = remembered.seal

    def timed_seal(watermark: float, *, snapshot: bool = False) -> None:
        held = len(remembered)
        sealing = time.perf_counter()
        seal(watermark, snapshot=snapshot)
        spent = (time.perf_counter() - sealing) * 1000
        after = len(remembered)
        merged = held > 0 and not len(remembered._small.digests)
        seals.append(((watermark - START) / 3600, spent, after, held - after, merged))

    remembered.seal = timed_seal  # type: ignore[method-assign]
    next_sample = 0.0
    started = time.perf_counter()
    while feeder.number < total:
        at = feeder.batch(min(per_batch, total - feeder.number))
        hours = (at - START) / 3600
        if hours >= next_sample:
            samples.append((hours, feeder.number, join.remembered(), _rss() - base))
            next_sample += 6
    join.seal()
    if samples[-1][1] != feeder.number:
        samples.append(((feeder.number / day_rate) / 3600, feeder.number, join.remembered(), _rss() - base))
    out["day_seconds"] = time.perf_counter() - started
    out["day_samples"] = samples
    out["day_trimmed"] = _trimmed_rss() - base
    out["day_arrays"] = _array_bytes(join)
    out["day_calls"] = total
    out["seals"] = seals
    del join, feeder
    gc.collect()

    # Without any evaluation, event time never moves: what a directory does with calls only.
    join = _directory()

    class Counting:
        saved = 0

        def save(self, shard: str, number: int, segment: object) -> bool:
            Counting.saved += 1
            return True

        def load(self, shard: str, low: int, high: int) -> list[Any]:
            return []

        def forget(self, shard: str, below: int, from_: int | None = None) -> bool:
            return True

    join.attach(Counting(), lambda rid: "0")
    keys = [("tenant-0", "/api/route-0", "model-0")] * 1000
    batches = 200
    for number in range(batches):
        # 200 batches of 1,000 calls over 2 × keep of call time: the first ones long expired.
        at = START + number * 2 * join.keep / batches
        start = int(at // WINDOW_SECONDS) * WINDOW_SECONDS
        rids = [f"q-{number}-{n}" for n in range(1000)]
        join.on_counted(
            CountedCalls(rids, keys, [start] * 1000, [float(start)] * 1000, [""] * 1000), time.time()
        )
        join.on_time(time.time())
    out["quiet"] = {
        "batches": batches,
        "calls": batches * 1000,
        "segments": Counting.saved,
        "remembered": join.remembered(),
        "span": 2 * join.keep,
    }
    del join
    gc.collect()

    # The same as the first measurement, by tracemalloc (which numpy reports its arrays to),
    # on fewer calls: tracing slows feeding several times over. Then with two dimensions a
    # call (a country among 30, a finish_reason among 3): each distinct text held once.
    traced = min(calls, TRACED_CALLS)
    out["traced"] = _traced(traced, SEED + 2, dimensions=False)
    out["traced_dimensions"] = _traced(traced, SEED + 3, dimensions=True)
    return out


def _traced(calls: int, seed: int, dimensions: bool) -> dict[str, int]:
    """A directory fed ``calls`` calls and sealed, by tracemalloc: what it holds (and held
    at the peak), and how many key (and values) texts."""
    join = _directory()
    feeder = _Feeder(join, MEMORY_RATE, MEMORY_KEYS, seed, dimensions)
    feeder.batch(1)
    join.seal()
    tracemalloc.start(1)
    before = tracemalloc.get_traced_memory()[0]
    while feeder.number < calls + 1:
        feeder.batch(min(BATCH, calls + 1 - feeder.number))
    join.seal()
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    texts = len(join._calls._tenants)
    del join, feeder
    gc.collect()
    return {"calls": calls, "held": current - before, "peak": peak - before, "texts": texts}


_PROBE = (
    "import json, sys\n"
    "from tests.bench.bench_evaluations import memory_probe\n"
    "print(json.dumps(memory_probe(*json.loads(sys.argv[1]))))\n"
)


def memory(calls: int, day_rate: float, days: float) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps([calls, day_rate, days])],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    m = json.loads(done.stdout.splitlines()[-1])
    n = m["remembered"]
    per_call = m["rss_growth"] / n
    print(
        f"  call directory (one EvaluationJoin, in a process of its own): {n:,} calls fed as CountedCalls "
        f"(batches of {BATCH:,}, {MEMORY_KEYS:,} keys, {MEMORY_RATE:,.0f} calls/s of event time) and sealed "
        f"in {m['feed_seconds']:.1f}s ({n / m['feed_seconds']:,.0f} calls/s)"
    )
    print(
        f"  measured: RSS +{m['rss_growth'] / 2**20:,.1f} MiB = {per_call:.1f} B a remembered call "
        f"({m['trimmed_growth'] / n:.1f} B after gc + malloc_trim; the arrays themselves "
        f"{m['array_bytes'] / n:.1f} B); peak while feeding +{m['peak_growth'] / 2**20:,.0f} MiB "
        f"= {m['peak_growth'] / n:.1f} B a call"
    )
    traced = m["traced"]
    print(
        f"  tracemalloc, {traced['calls']:,} calls fed and sealed the same way: "
        f"{traced['held'] / traced['calls']:.1f} B a remembered call held, "
        f"{traced['peak'] / traced['calls']:.1f} B at the peak"
    )
    with_values = m["traced_dimensions"]
    print(
        f"  the same with two dimensions a call (30 countries × 3 finish reasons): "
        f"{with_values['held'] / with_values['calls']:.1f} B a remembered call held, "
        f"{with_values['texts']:,} distinct key-and-values texts held once each"
    )
    keep = m["keep"]
    live = traced["held"] / traced["calls"]
    day, steady = 86_400 * 1_000, keep * 1_000
    print(
        f"  extrapolated (not measured) at {live:.1f} B a call (tracemalloc) and at {per_call:.1f} B (RSS): "
        f"1,000 calls/s for a day = {day / 1e6:.1f} M calls = {day * live / 2**30:,.2f} GiB "
        f"({day * per_call / 2**30:,.2f} GiB); a call is kept {keep:,} s (2 windows + "
        f"EVALUATION_LATENESS + LATENESS + grace), so the directory levels off at {steady / 1e6:,.1f} M "
        f"calls = {steady * live / 2**30:,.2f} GiB ({steady * per_call / 2**30:,.2f} GiB), "
        f"{steady / 8 / 1e6:,.1f} M calls per shard of 8"
    )
    print(
        f"  simulated: {m['day_calls']:,} calls at {day_rate:,.0f} calls/s over {days:g} day(s) "
        f"of event time, "
        f"sealed by the directory every {SEAL_SECONDS:.0f} s of it, in {m['day_seconds']:.1f}s:"
    )
    for hours, fed, held_calls, growth in m["day_samples"]:
        print(
            f"    {hours:5.1f} h: {fed / 1e6:6.2f} M fed, {held_calls / 1e6:5.2f} M held, "
            f"RSS +{growth / 2**20:6,.0f} MiB ({growth / max(held_calls, 1):5.1f} B a held call)"
        )
    share = getattr(remembered_module, "DROP_SHARE", None)
    dropped = (
        f", plus expired ones up to 1/{share} of a part (dropped at a seal beyond that)" if share else ""
    )
    print(
        f"    at the end, after gc + malloc_trim: RSS +{m['day_trimmed'] / 2**20:,.0f} MiB, of which arrays "
        f"{m['day_arrays'] / 2**20:,.0f} MiB; calls within their keep: {day_rate:,.0f} calls/s × "
        f"{keep:,} s = {day_rate * keep / 1e6:.2f} M{dropped}"
    )
    late = [seal for seal in m["seals"] if seal[0] * 3600 > keep]
    if late:
        held = statistics.mean(seal[2] for seal in late)
        shard = steady / 8
        kinds = (
            ("dropping expired calls", [seal[1] for seal in late if seal[3] and not seal[4]]),
            ("dropping none", [seal[1] for seal in late if not seal[3] and not seal[4]]),
            ("merging the small arrays into the large", [seal[1] for seal in late if seal[4]]),
        )
        figures = "; ".join(
            f"{len(times)} {kind}: median {statistics.median(times):,.1f} ms, max {max(times):,.0f} ms"
            for kind, times in kinds
            if times
        )
        slowest = max(seal[1] for seal in late)
        print(
            f"  seals once calls expire (after {keep / 3600:.1f} h), {held / 1e6:.2f} M held: {figures}; "
            f"extrapolated linearly to 1,000 calls/s ({shard / 1e6:.1f} M held per shard of 8), the slowest "
            f"would take {slowest * shard / held / 1000:,.1f} s a shard"
        )
    quiet = m["quiet"]
    print(
        f"  no evaluation at all (the counted calls alone move the directory's event time): "
        f"{quiet['calls']:,} calls in {quiet['batches']} batches over {quiet['span']:,} s of call time "
        f"(twice the keep): {quiet['segments']} segments sealed and written, {quiet['remembered']:,} "
        f"calls still held"
    )


def windows_memory(keys: int = 1_000, minutes: int = 60, per_row: int = 16) -> None:
    """What the evaluation windows hold: ``keys`` keys with ``per_row`` evaluations (a score
    and a label each) in every 1-minute window for ``minutes`` minutes, traced."""
    rng = random.Random(5)
    windows = EvaluationWindows(60, 10, 600, 86_400)
    source = SourceRef(EVALUATIONS, 0, 0)
    chosen = [(f"tenant-{k % 10}", f"/route-{k % 7}", f"model-{k}") for k in range(keys)]
    start = 1_780_000_020
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    evaluations = 0
    for minute in range(minutes):
        at = datetime.fromtimestamp(start + 60 * minute + 30, UTC)
        batch = [
            Matched(
                key,
                start + 60 * minute,
                LLMEvaluation(
                    request_id="r",
                    tenant_id=key[0],
                    name=NAME,
                    timestamp=at,
                    score=round(rng.random(), 3),
                    label=rng.choice(("pass", "fail")),
                ),
                source,
            )
            for key in chosen
            for _ in range(per_row)
        ]
        windows.on_matched(batch, 0.0)
        windows.on_time(0.0)
        evaluations += len(batch)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    rows = len(windows)
    day = held / rows * keys * 1440 / 2**30
    print(
        f"  evaluation windows: {rows:,} rows ({keys:,} keys × {minutes} minutes, {per_row} evaluations a "
        f"row): {held / rows:,.0f} B a row, {held / evaluations:.1f} B an evaluation (tracemalloc); "
        f"a row a key and minute kept a day (EVALUATION_LATENESS_SECONDS) is {day:.2f} GiB"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_evaluations")
    parser.add_argument("--calls", type=int, default=CALLS, help="calls of the throughput runs")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="runs of A, then of B (medians compared)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--memory", action="store_true", help="the memory part only")
    only.add_argument("--throughput", action="store_true", help="the throughput runs only")
    parser.add_argument("--memory-calls", type=int, default=MEMORY_CALLS)
    parser.add_argument("--day-rate", type=float, default=DAY_RATE, help="calls/s of the simulated days")
    parser.add_argument("--days", type=float, default=DAYS, help="simulated days of event time")
    args = parser.parse_args(argv if argv is not None else [])
    if not args.memory:
        throughput(args.calls, args.processes, args.rounds)
    if not args.throughput:
        memory(args.memory_calls, args.day_rate, args.days)
        windows_memory()


if __name__ == "__main__":
    main(sys.argv[1:])
