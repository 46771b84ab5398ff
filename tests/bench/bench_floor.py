"""The runtime's floor: what any engine inside this Bytewax dataflow pays before its own work.

On the backlog of ``bench_dataflow`` (500,000 calls over 1,000 keys, both topics
pre-filled), three Bytewax flows run in turn, each with recovery and the runner's
snapshot interval, and are timed from start until every record has gone through:

- ``read``: the dataflow's source (``BatchingKafkaSource``: read, decode once,
  partitions in step) and its routing by join shard (``route_polls``), then a
  stateful step per shard that only counts events. No engine can be faster than
  this inside this runtime with these schemas.
- ``lean``: the same, then the lean per-event loop's work per shard
  (``bench_baseline.lean_loop``: dict join, per-window sums, price, t-digest)
  instead of the count. Its state is not snapshotted (a count stands in): it is the
  lean loop moved into the runtime, no more.
- the dataflow itself (``python -m dataflows.run``), until every window has its
  first row in Postgres, as ``bench_dataflow`` times it.

Beside them, in the same run, the lean loop alone in memory (the issue's reference).
``python -m tests.bench.bench_floor [--calls N]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple, TypeGuard

import bytewax.operators as op
import psutil
import psycopg
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic
from bytewax.recovery import init_db_dir

from dataflows import sources
from dataflows.batches import EventRun
from dataflows.metrics import tune_gc
from dataflows.pricing import PriceBook, Rates, cost
from schemas.config import Settings
from schemas.deadletter import DeadLetter
from schemas.events import LLMRequest, LLMResponse
from schemas.topics import EVALUATIONS, REQUESTS, RESPONSES
from tests.bench.bench_baseline import _LeanWindow, lean_loop
from tests.bench.bench_dataflow import (
    KEYS,
    PARTITIONS,
    SEED,
    SNAPSHOT_INTERVAL,
    _after_start_up,
    _windows_and_closers,
    fill_backlog,
    run_dataflow,
)
from tests.bench.dataset import generate
from tests.bench.stack import local_stack

CALLS = 500_000
# The flows below read their work from these (set by main for the child process).
KIND_VARIABLE = "FLOOR_KIND"  # read | lean
RECORDS_VARIABLE = "FLOOR_RECORDS"  # records to go through before the flow says it is done
DONE_VARIABLE = "FLOOR_DONE"  # a file written when they have


class _Seen:
    """Events gone through in this process, over every shard; the flow writes the done
    file once they reach the total."""

    count = 0
    total = 0
    first = 0.0  # wall clock of the first events gone through
    done: Path | None = None

    @classmethod
    def add(cls, events: int) -> None:
        if not cls.count:
            cls.first = time.time()
        cls.count += events
        if cls.done is not None and cls.count >= cls.total:
            cls.done.write_text(f"{cls.first} {time.time()}\n")
            cls.done = None


class CountLogic(StatefulBatchLogic[list[EventRun], None, int]):
    """Only counts the events of its shard."""

    def __init__(self, resume: int | None) -> None:
        self.events = resume or 0

    def on_batch(self, values: list[list[EventRun]]) -> tuple[Iterable[None], bool]:
        events = sum(len(run) for runs in values for run in runs)
        self.events += events
        _Seen.add(events)
        return (), StatefulBatchLogic.RETAIN

    def snapshot(self) -> int:
        return self.events


class LeanLogic(CountLogic):
    """The lean loop's work (``bench_baseline._lean_loop``) on its shard's events."""

    def __init__(self, resume: int | None) -> None:
        super().__init__(resume)
        self.width = Settings().window_seconds
        self.book = PriceBook()
        self.prices: dict[tuple[str | None, str], Rates | None] = {}
        self.windows: dict[tuple[str, str, str, int], _LeanWindow] = {}
        self.requests_waiting: dict[str, LLMRequest] = {}
        self.responses_waiting: dict[str, LLMResponse] = {}

    def on_batch(self, values: list[list[EventRun]]) -> tuple[Iterable[None], bool]:
        requests_waiting, responses_waiting = self.requests_waiting, self.responses_waiting
        answered = self._answered
        for runs in values:
            for run in runs:
                if run.kind is LLMRequest:
                    for request in run.events:
                        assert type(request) is LLMRequest
                        early = responses_waiting.pop(request.request_id, None)
                        if early is None:
                            requests_waiting[request.request_id] = request
                        else:
                            answered(request, early)
                else:
                    for response in run.events:
                        assert type(response) is LLMResponse
                        waiting = requests_waiting.pop(response.request_id, None)
                        if waiting is None:
                            responses_waiting[response.request_id] = response
                        else:
                            answered(waiting, response)
        return super().on_batch(values)

    def _answered(self, request: LLMRequest, response: LLMResponse) -> None:
        # bench_baseline._lean_loop's answered(), as it is there.
        start = int(request.timestamp.timestamp() // self.width) * self.width
        key = (request.tenant_id, request.route, request.model, start)
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = _LeanWindow()
        window.requests += 1
        if response.error:
            window.errors += 1
        latency = response.latency_ms
        if latency is None:
            latency = max(0.0, (response.timestamp.timestamp() - request.timestamp.timestamp()) * 1000.0)
        window.latency_ms += latency
        window.digest.update(latency)
        ttft = response.time_to_first_token_ms
        if ttft is not None:
            window.ttft_ms += ttft
            window.ttft_count += 1
        prompt = request.prompt_tokens
        cached = response.cache_read_tokens
        completion = response.completion_tokens
        window.prompt_tokens += prompt
        window.completion_tokens += completion
        window.cache_read_tokens += cached
        window.reasoning_tokens += response.reasoning_tokens
        pair = (request.provider, request.model)
        if pair in self.prices:
            rates = self.prices[pair]
        else:
            rates = self.prices[pair] = self.book.rates(request.provider, request.model, request.timestamp)
        if rates is None:
            window.unpriced += 1
        else:
            window.cost_usd += cost(rates, prompt, cached, completion)


def _is_event_group(item: object) -> TypeGuard[tuple[str, list[EventRun]]]:
    return type(item) is tuple


def build(brokers: str, kind: str) -> Dataflow:
    """The source and routing of ``dataflows.metrics``, then ``kind``'s step per join shard."""
    flow = Dataflow(f"floor_{kind}")
    batches = op.input(
        "read",
        flow,
        sources.BatchingKafkaSource(
            brokers.split(","),
            [REQUESTS, RESPONSES, EVALUATIONS],
            starting_offset=sources.STARTING_OFFSET,
            batch_size=sources.BATCH_SIZE,
            read_ahead=5.0,  # dataflows.metrics.read_ahead at the default settings
        ),
    )
    routed = op.flat_map_batch("route", batches, sources.route_polls)
    events = op.branch("valid", routed, _is_event_group)
    if kind == "lean":
        # One state for the process, as the lean loop keeps: its windows are not split by
        # request id, as the join shards would split them.
        op.stateful_batch("work", op.map("one_state", events.trues, _one_state), LeanLogic)
    else:
        op.stateful_batch("work", events.trues, CountLogic)
    op.inspect("letters", events.falses, _no_letters)
    return flow


def _one_state(group: tuple[str, list[EventRun]]) -> tuple[str, list[EventRun]]:
    return "all", group[1]


def _no_letters(step: str, item: object) -> None:
    assert isinstance(item, DeadLetter)
    raise RuntimeError(f"the backlog holds no invalid record, yet {step} saw {item.error}")


def __getattr__(name: str) -> Dataflow:
    # ``python -m bytewax.run tests.bench.bench_floor:flow`` in the child process.
    if name == "flow":
        tune_gc()
        _Seen.total = int(os.environ[RECORDS_VARIABLE])
        _Seen.done = Path(os.environ[DONE_VARIABLE])
        flow = build(os.environ["KAFKA_BROKERS"], os.environ[KIND_VARIABLE])
        globals()["flow"] = flow
        return flow
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FloorRun(NamedTuple):
    seconds: float  # from start until every record went through
    steady: float  # from the first events gone through until every record had
    cpu: float  # CPU seconds of the process by then


def run_floor(brokers: str, kind: str, records: int, work: Path) -> FloorRun:
    """Run ``kind``'s flow over the backlog until every record went through."""
    recovery = work / f"recovery-{kind}"
    shutil.rmtree(recovery, ignore_errors=True)
    recovery.mkdir()
    init_db_dir(recovery, 1)
    done = work / f"done-{kind}"
    done.unlink(missing_ok=True)
    env = {
        **os.environ,
        "KAFKA_BROKERS": brokers,
        KIND_VARIABLE: kind,
        RECORDS_VARIABLE: str(records),
        DONE_VARIABLE: str(done),
    }
    log = open(work / f"floor-{kind}.log", "wb")  # noqa: SIM115 - the child keeps it
    started = time.perf_counter()
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bytewax.run",
            f"{__name__}:flow",
            "-r",
            str(recovery),
            "-s",
            str(SNAPSHOT_INTERVAL),
            "-b",
            "0",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    watched = psutil.Process(child.pid)
    try:
        while not done.exists() or not done.read_text().endswith("\n"):
            if child.poll() is not None:
                raise RuntimeError((work / f"floor-{kind}.log").read_text()[-3000:])
            times = watched.cpu_times()
            cpu = times.user + times.system
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        first, last = map(float, done.read_text().split())
        return FloorRun(seconds, last - first, cpu)
    finally:
        child.terminate()
        child.wait(30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_floor")
    parser.add_argument("--calls", type=int, default=CALLS)
    args = parser.parse_args(argv if argv is not None else [])

    requests, responses = generate(args.calls, KEYS, SEED)
    windows, closers_window, closing_requests, closing_responses = _windows_and_closers(requests)
    calls, seconds = lean_loop(requests, responses)
    lean = calls / seconds
    print(f"  lean per-event loop (in memory): {calls:,} calls in {seconds:.2f}s = {lean:,.0f} calls/s")

    with local_stack("streamlens-floor-", PARTITIONS) as (work, broker, postgres):
        fill_backlog(broker.address, requests + closing_requests, responses + closing_responses)
        records = len(requests) + len(closing_requests) + len(responses) + len(closing_responses)
        for kind, what in (
            ("read", "read, decode and route only (a count per shard)"),
            ("lean", "read, decode, route, then the lean loop's work per shard"),
        ):
            floor = run_floor(broker.address, kind, records, work)
            rate = args.calls / floor.seconds
            print(
                f"  Bytewax flow, {what}: {records:,} records in {floor.seconds:.1f}s (start-up "
                f"included) = {rate:,.0f} calls/s, {rate / lean:.2f} of the lean loop; from its first "
                f"events on {args.calls / floor.steady:,.0f} calls/s; {floor.cpu:.1f} CPU-s = "
                f"{floor.cpu / args.calls * 1e6:.1f} µs a call"
            )
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE llm_metrics")
        run = run_dataflow(broker.address, postgres.dsn, len(windows), closers_window, 1, work)
        rate = args.calls / run.seconds
        print(
            f"  the dataflow (python -m dataflows.run): every window's first row after {run.seconds:.1f}s = "
            f"{rate:,.0f} calls/s, {rate / lean:.2f} of the lean loop; {_after_start_up(run, args.calls)}; "
            f"{run.cpu_seconds:.1f} CPU-s = "
            f"{run.cpu_seconds / args.calls * 1e6:.1f} µs a call"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
