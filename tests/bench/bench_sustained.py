"""Sustained load: the dataflow on a backlog spanning more than twice ``DEDUPE_SECONDS``.

The burst (``bench_dataflow``) spans minutes of event time, so the join never
holds a full ``DEDUPE_SECONDS`` of remembered request ids. Here the data set
(``tests.bench.dataset.generate`` at a steady rate, 1,000 keys) spans
``--span`` seconds of event time, at least twice ``--dedupe`` (the dataflow runs
with ``DEDUPE_SECONDS`` set to it), so the join's state fills up, then holds
steady while ids expire as fast as new ones come. Topics are pre-filled, with one
closing call per key after the data so that the last windows close on data.

Printed, for each ``--processes`` count (each run reads the same topics afresh):

- calls/s overall (start-up included) and per quarter of the event-time span.
  Progress is read from Postgres: a quarter ends when every window of the data
  set starting before its end has its first row, which happens once event time
  passes that window's end + grace on its shard; the first quarter starts when
  the first minute's windows are all out, so start-up is not in it.
- peak, final and per-quarter RSS of the processor (psutil, all its processes).
- CPU seconds per call (psutil ``cpu_times`` of all its processes) between the
  first minute's rows and the last rows, and what the 1- and 2-process figures
  predict for 8 processes.
- the join's state in the last snapshot, read from the recovery SQLite files.

Side measurements, in this process: bytes per remembered id and per in-flight
request (tracemalloc over a ``JoinShard``, as ``bench_baseline``), and the
seconds a snapshot of one worker's join shards takes (``JoinLogic.snapshot``, what
Bytewax calls at every epoch) while the same data is fed through them, one
snapshot per epoch of as many calls as the one-process run read per snapshot
interval. Bytewax's ``snaps`` table stamps its rows to the second only, too
coarse to time a snapshot, hence the side measurement. And the plain loop's
calls/s on the same data, the same-run baseline.

``python -m tests.bench.bench_sustained [--calls N] [--span S] [--dedupe D] [--processes 1,2]``
"""

from __future__ import annotations

import argparse
import itertools
import math
import sqlite3
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from dataflows.join import SourceRef
from dataflows.operators import join_builder
from dataflows.segments import PostgresSegments
from dataflows.shards import DEFAULT as SHARDS
from schemas.config import Settings
from schemas.events import request_decoder, response_decoder
from schemas.topics import REQUESTS, RESPONSES
from tests.bench.bench_baseline import (
    BATCH,
    bytes_per_inflight_request,
    bytes_per_remembered_id,
    in_step,
    plain_loop,
)
from tests.bench.bench_dataflow import (
    PARTITIONS,
    SNAPSHOT_INTERVAL,
    WINDOW_SECONDS,
    DataflowRun,
    _windows_and_closers,
    fill_backlog,
    run_dataflow,
)
from tests.bench.dataset import START, generate
from tests.bench.stack import local_stack

CALLS = 1_000_000
KEYS = 1_000
SEED = 2
DEDUPE_SECONDS = 600
SPAN_SECONDS = 1_200.0  # 2 × DEDUPE_SECONDS: the second half runs with a full dedupe memory
PROCESSES = "1,2"
MIB = 2**20


@dataclass
class Quarters:
    """The data set's event-time span cut into quarters at window boundaries."""

    bounds: list[float]  # b0 (end of the first minute) … b4 (end of the last window)
    windows_before: list[int]  # data-set windows starting before each bound
    calls: list[int]  # calls whose request falls in each quarter
    offsets: list[int]  # the first request at or after each bound

    @classmethod
    def of(cls, windows: set[tuple], calls: int, span: float) -> Quarters:
        last_start = max(window[3] for window in windows)
        bounds = [START + WINDOW_SECONDS]
        for quarter in (1, 2, 3):
            bounds.append(START + WINDOW_SECONDS * round(quarter * span / 4 / WINDOW_SECONDS))
        bounds.append(last_start + WINDOW_SECONDS)
        starts = sorted(window[3] for window in windows)
        rate = calls / span

        def calls_before(at: float) -> int:
            # Request n is stamped START + n / rate (tests.bench.dataset).
            return min(calls, math.ceil((at - START) * rate))

        return cls(
            bounds,
            [sum(1 for start in starts if start < bound) for bound in bounds],
            [calls_before(high) - calls_before(low) for low, high in itertools.pairwise(bounds)],
            [calls_before(bound) for bound in bounds],
        )


class Progress:
    """Polls Postgres at every sample of a run: when each quarter bound was passed."""

    def __init__(self, dsn: str, quarters: Quarters) -> None:
        self.quarters = quarters
        self.reached: list[float | None] = [None] * len(quarters.bounds)
        self._conn = psycopg.connect(dsn, autocommit=True)
        count = "count(*) FILTER (WHERE window_start < to_timestamp(%s))"
        columns = ", ".join(count for _ in quarters.bounds)
        self._sql = f"SELECT {columns} FROM llm_metrics"

    def __call__(self, seconds: float) -> None:
        row = self._conn.execute(self._sql, self.quarters.bounds).fetchone()
        assert row is not None
        for index, (count, wanted) in enumerate(zip(row, self.quarters.windows_before, strict=True)):
            if self.reached[index] is None and count >= wanted:
                self.reached[index] = seconds

    def close(self) -> None:
        self._conn.close()


def last_join_snapshot_bytes(recovery: Path) -> int:
    """Bytes of the join step's state in the newest snapshot the recovery partitions hold."""
    total = 0
    for part in recovery.glob("part-*.sqlite3"):
        with sqlite3.connect(f"file:{part}?mode=ro", uri=True) as conn:
            row = conn.execute(
                "SELECT sum(length(ser_change)) FROM snaps WHERE step_id LIKE '%.join' "
                "AND snap_epoch = (SELECT max(snap_epoch) FROM snaps WHERE step_id LIKE '%.join')"
            ).fetchone()
        total += int(row[0] or 0) if row else 0
    return total


def snapshot_costs(
    requests: list[bytes], responses: list[bytes], settings: Settings, epoch_calls: int, dsn: str
) -> list[tuple[float, float, int, int]]:
    """Feed the data through the join shards of one worker, routed as the dataflow routes records and
    keeping their segments in Postgres at ``dsn`` as the dataflow does, and snapshot every
    shard once per ``epoch_calls`` requests: (seconds, of which writing segments, bytes,
    remembered ids) per epoch."""
    build = join_builder(
        settings.join_timeout_seconds,
        settings.dedupe_seconds,
        settings.window_seconds,
        settings.lateness_seconds,
        PostgresSegments(dsn),
    )
    logics = [build(None) for _ in range(SHARDS.count)]
    costs: list[tuple[float, float, int, int]] = []
    next_epoch = epoch_calls
    for batch, (request_offsets, response_offsets) in enumerate(in_step(requests, responses)):
        first = batch * BATCH
        now = time.time()
        for topic, decode, payloads, offsets in (
            (REQUESTS, request_decoder.decode, requests, request_offsets),
            (RESPONSES, response_decoder.decode, responses, response_offsets),
        ):
            for offset in offsets:
                event = decode(payloads[offset])
                shard = logics[int(SHARDS.join_key(event.request_id))].shard
                shard.on_event(event, SourceRef(topic, 0, offset), now)
        for logic in logics:
            logic.shard.on_time(now)
        if first + BATCH >= next_epoch:
            next_epoch += epoch_calls
            started = time.perf_counter()
            for logic in logics:
                logic.shard.seal()  # what snapshot() does first: seal, writing the segments
            sealed = time.perf_counter()
            size = sum(len(logic.snapshot()) for logic in logics)
            costs.append(
                (
                    time.perf_counter() - started,
                    sealed - started,
                    size,
                    sum(logic.shard.remembered() for logic in logics),
                )
            )
    return costs


def _report(processes: int, run: DataflowRun, progress: Progress, calls: int, baseline: float) -> float:
    """Print one run's figures; its CPU seconds per call between the first and last rows."""
    quarters = progress.quarters
    reached = progress.reached
    reached[-1] = run.seconds  # the run ends when every window of the data set has its row
    rate = calls / run.seconds
    print(
        f"  {processes} process(es): every window's first row after {run.seconds:.1f}s "
        f"(start-up included) = {rate:,.0f} calls/s; dataflow / plain loop {rate / baseline:.2f}"
    )
    rates = []
    for index in range(4):
        low, high = reached[index], reached[index + 1]
        if low is None or high is None or high <= low:
            print(f"    quarter {index + 1}: progress not seen (polled too coarsely)")
            continue
        rates.append(quarters.calls[index] / (high - low))
        rss = max((sample[1] for sample in run.samples if low <= sample[0] <= high), default=run.rss_at(high))
        cpu = run.at(high)[2] - run.at(low)[2]
        print(
            f"    quarter {index + 1}: {quarters.calls[index]:,} calls in {high - low:.1f}s = "
            f"{rates[-1]:,.0f} calls/s ({rates[-1] / baseline:.2f} of the plain loop), "
            f"peak RSS {rss / MIB:,.0f} MiB, {cpu / quarters.calls[index] * 1e6:.1f} µs CPU per call, "
            f"{cpu / (high - low):.0%} of a core"
        )
    if len(rates) == 4:
        print(f"    last quarter / first quarter: {rates[3] / rates[0]:.2f}")
    print(
        f"    RSS: peak {run.peak_rss / MIB:,.0f} MiB, final {run.final_rss / MIB:,.0f} MiB, "
        f"{run.rss_at(3.0) / MIB:,.0f} MiB 3 s after start"
    )
    first_rows = reached[0] if reached[0] is not None else 0.0
    _, _, cpu_start = run.at(first_rows)
    per_call = (run.cpu_seconds - cpu_start) / sum(quarters.calls)
    print(
        f"    CPU: {run.cpu_seconds:.1f} s in all; {per_call * 1e6:.1f} µs per call between "
        f"the first minute's rows and the last rows ({1 / per_call:,.0f} calls per CPU-second)"
    )
    return per_call


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_sustained")
    parser.add_argument("--calls", type=int, default=CALLS)
    parser.add_argument("--keys", type=int, default=KEYS)
    parser.add_argument("--span", type=float, default=SPAN_SECONDS, help="seconds of event time")
    parser.add_argument("--dedupe", type=int, default=DEDUPE_SECONDS, help="DEDUPE_SECONDS of the run")
    parser.add_argument("--processes", default=PROCESSES, help="comma-separated process counts, run in turn")
    args = parser.parse_args(argv if argv is not None else [])
    try:
        counts = [int(count) for count in args.processes.split(",")]
    except ValueError:
        parser.error(f"--processes {args.processes!r}: expected numbers separated by commas, e.g. 1,2")
    if args.span < 2 * args.dedupe:
        parser.error(f"--span {args.span:g} must cover at least 2 × --dedupe ({2 * args.dedupe})")
    if args.calls < 1 or min(counts) < 1:
        parser.error("--calls and --processes must be at least 1")
    settings = Settings(dedupe_seconds=args.dedupe)
    env = {"DEDUPE_SECONDS": str(args.dedupe)}

    started = time.perf_counter()
    requests, responses = generate(args.calls, args.keys, SEED, calls_per_second=args.calls / args.span)
    windows, closers_window, closing_requests, closing_responses = _windows_and_closers(requests)
    quarters = Quarters.of(windows, args.calls, args.span)
    print(
        f"  data set: {len(requests):,} requests, {len(responses):,} responses over {args.keys:,} keys, "
        f"{args.span:,.0f} s of event time at {args.calls / args.span:,.0f} calls/s, "
        f"{len(windows):,} windows; DEDUPE_SECONDS={args.dedupe} "
        f"(generated in {time.perf_counter() - started:.1f}s)"
    )

    passed = dict.fromkeys(quarters.offsets, 0.0)
    calls, seconds = plain_loop(requests, responses, settings, passed)
    baseline = calls / seconds
    loop_rates = [
        quarters.calls[index] / max(passed[high] - passed[low], 1e-9)
        for index, (low, high) in enumerate(itertools.pairwise(quarters.offsets))
    ]
    ratio = f"{loop_rates[3] / loop_rates[0]:.2f}" if loop_rates[0] else "none (empty first quarter)"
    print(
        f"  plain loop (one process, no Bytewax): {calls:,} calls in {seconds:.2f}s = "
        f"{baseline:,.0f} calls/s; per quarter {' / '.join(f'{rate:,.0f}' for rate in loop_rates)}, "
        f"last / first {ratio}"
    )
    per_id, per_request = bytes_per_remembered_id(), bytes_per_inflight_request()
    print(
        f"  join state (tracemalloc over a JoinShard): {per_id:,.0f} bytes per remembered id, "
        f"{per_request:,.0f} bytes per in-flight request"
    )

    per_call: dict[int, float] = {}
    first_rate = 0.0
    with local_stack("streamlens-bench-", PARTITIONS) as (work, broker, postgres):
        fill_backlog(broker.address, requests + closing_requests, responses + closing_responses)
        for processes in counts:
            with psycopg.connect(postgres.dsn, autocommit=True) as conn:
                conn.execute("TRUNCATE llm_metrics")
            run_dir = work / f"processes-{processes}"
            run_dir.mkdir()
            progress = Progress(postgres.dsn, quarters)
            try:
                run = run_dataflow(
                    broker.address,
                    postgres.dsn,
                    len(windows),
                    closers_window,
                    processes,
                    run_dir,
                    timeout=1200.0,
                    settings=env,
                    on_sample=progress,
                )
            finally:
                progress.close()
            per_call[processes] = _report(processes, run, progress, args.calls, baseline)
            print(
                f"    join state in the last snapshot (recovery SQLite): "
                f"{last_join_snapshot_bytes(run_dir / 'recovery') / MIB:,.1f} MiB"
            )
            if not first_rate:
                first_rate = args.calls / run.seconds

        epoch_calls = max(1, round(first_rate * SNAPSHOT_INTERVAL))
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE join_segments")
        costs = snapshot_costs(requests, responses, settings, epoch_calls, postgres.dsn)

    if 1 in per_call and 2 in per_call:
        # With N processes a record crosses to another process with odds (N - 1) / N:
        # what the second process added per call is the exchange at odds 1/2.
        exchange = (per_call[2] - per_call[1]) * 2
        if exchange <= 0:
            print(
                "  exchange between processes: not measurable in this run (2 processes used less "
                "CPU per call than 1: the machine's load changed between the runs)"
            )
        else:
            eight = per_call[1] + exchange * 7 / 8
            print(
                f"  exchange between processes: {exchange * 1e6:.1f} µs per crossing call; "
                f"8 processes would spend {eight * 1e6:.1f} µs per call, "
                f"{1 / eight:,.0f} calls/s per process, {8 / eight:,.0f} calls/s on 8 free cores"
            )

    if not costs:
        print(
            f"  snapshot of the {SHARDS.count} join shards: the data set is shorter than one epoch "
            f"({epoch_calls:,} calls)"
        )
        return
    times = [seconds for seconds, _, _, _ in costs]
    writes = [seconds for _, seconds, _, _ in costs]
    sizes = [size for _, _, size, _ in costs]
    print(
        f"  snapshot of the {SHARDS.count} join shards (JoinLogic.snapshot, side measurement), one per "
        f"{epoch_calls:,} calls ({SNAPSHOT_INTERVAL} s of the first run), {len(costs)} epochs: "
        f"median {statistics.median(times) * 1e3:,.0f} ms, max {max(times) * 1e3:,.0f} ms "
        f"(sealing the ids counted since the last: digests, sorting, one Postgres row a shard; "
        f"median {statistics.median(writes) * 1e3:,.0f} ms); "
        f"{statistics.median(sizes) / MIB:,.1f} MiB median, {max(sizes) / MIB:,.1f} MiB max; "
        f"first {times[0] * 1e3:,.0f} ms ({sizes[0] / MIB:,.1f} MiB, {costs[0][3]:,} remembered ids), "
        f"last {times[-1] * 1e3:,.0f} ms ({sizes[-1] / MIB:,.1f} MiB, {costs[-1][3]:,} remembered ids)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
