"""The runtime's floor: what any engine inside this Bytewax dataflow pays before its own work.

On the backlog of ``bench_dataflow`` (500,000 calls over 1,000 keys, both topics
pre-filled), three Bytewax flows run in turn, then the dataflow, each with recovery and the runner's
snapshot interval, and are timed from start until every record has gone through:

- ``read``: the dataflow's source (``BatchingKafkaSource``: read, decode once,
  partitions in step) and its routing by join shard (``route_polls``), then a
  stateful step per shard that only counts events. No engine can be faster than
  this inside this runtime with these schemas.
- ``lean``: the same, then the lean per-event loop's work in one state
  (``bench_baseline.lean_loop``: dict join, per-window sums, price, t-digest)
  instead of the count. Its state is not snapshotted (a count stands in): it is the
  lean loop moved into the runtime, no more.
- ``columnar``: the same work by columns (:class:`ColumnarLogic`): a batch's pairs
  found with C-level ``map`` over ``dict.pop``, its calls folded with numpy. The
  windows are those of ``lean`` (checked in ``tests/test_floor.py``).
- the dataflow itself (``python -m dataflows.run``), until every window has its
  first row in Postgres, as ``bench_dataflow`` times it.

Beside them, in the same run, the lean loop alone in memory, the fixed reference.
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
from itertools import repeat
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple, TypeGuard

import bytewax.operators as op
import numpy as np
import psutil
import psycopg
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic
from bytewax.recovery import init_db_dir
from numpy.typing import NDArray

from dataflows import sources
from dataflows.batches import EventRun
from dataflows.metrics import tune_gc
from dataflows.pricing import PriceBook, Rates, cost
from schemas.config import Settings
from schemas.deadletter import DeadLetter
from schemas.events import LLMRequest, LLMResponse
from schemas.topics import EVALUATIONS, REQUESTS, RESPONSES
from tests.bench.bench_baseline import LeanWindow, lean_fold, lean_loop
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
KIND_VARIABLE = "FLOOR_KIND"  # read | lean | columnar
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
    """The lean loop's work (``bench_baseline.lean_fold``) on the events of its state."""

    def __init__(self, resume: int | None) -> None:
        super().__init__(resume)
        self.width = Settings().window_seconds
        self.windows: dict[tuple[str, str, str, int], LeanWindow] = {}
        _, self.answered = lean_fold(self.windows, self.width)
        self.requests_waiting: dict[str, LLMRequest] = {}
        self.responses_waiting: dict[str, LLMResponse] = {}

    def on_batch(self, values: list[list[EventRun]]) -> tuple[Iterable[None], bool]:
        requests_waiting, responses_waiting = self.requests_waiting, self.responses_waiting
        answered = self.answered
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


_ID = attrgetter("request_id")
_KEY = attrgetter("tenant_id", "route", "model")
_PAIR = attrgetter("provider", "model")
_PROMPT = attrgetter("prompt_tokens")
_ANSWER = attrgetter(
    "error",
    "latency_ms",
    "time_to_first_token_ms",
    "completion_tokens",
    "cache_read_tokens",
    "reasoning_tokens",
)


class ColumnarLogic(LeanLogic):
    """The lean loop's work done by columns: a batch's requests and responses paired with
    C-level dict operations (``map`` over ``dict.pop``), its calls folded into their
    windows with numpy (group sums by ``bincount``, one t-digest ``batch_update`` a window
    and batch). Same windows as :class:`LeanLogic`; no more exactness than it."""

    def __init__(self, resume: int | None) -> None:
        super().__init__(resume)
        self.book = PriceBook()
        self.codes: dict[tuple[str, str, str], int] = {}
        self.pair_rates: dict[tuple[str | None, str], Rates | None] = {}

    def on_batch(self, values: list[list[EventRun]]) -> tuple[Iterable[None], bool]:
        requests: list = []
        request_times: list[float] = []
        responses: list = []
        response_times: list[float] = []
        for runs in values:
            for run in runs:
                if run.kind is LLMRequest:
                    requests += run.events
                    request_times += run.times
                else:
                    responses += run.events
                    response_times += run.times
        waiting, early = self.requests_waiting, self.responses_waiting
        paired_requests: list = []
        paired_responses: list = []
        request_ids = list(map(_ID, requests))
        if early:
            found = list(map(early.pop, request_ids, repeat(None)))
            alone = [index for index, answer in enumerate(found) if answer is None]
            for index, answer in enumerate(found):
                if answer is not None:
                    paired_requests.append((requests[index], request_times[index]))
                    paired_responses.append(answer)
            waiting.update((request_ids[index], (requests[index], request_times[index])) for index in alone)
        else:
            waiting.update(zip(request_ids, zip(requests, request_times, strict=True), strict=True))
        response_ids = list(map(_ID, responses))
        found = list(map(waiting.pop, response_ids, repeat(None)))
        for index, held in enumerate(found):
            if held is None:
                early[response_ids[index]] = (responses[index], response_times[index])
            else:
                paired_requests.append(held)
                paired_responses.append((responses[index], response_times[index]))
        if paired_requests:
            self._fold(paired_requests, paired_responses)
        return CountLogic.on_batch(self, values)

    def _fold(self, paired_requests: list, paired_responses: list) -> None:
        count = len(paired_requests)
        requests = [request for request, _ in paired_requests]
        responses = [response for response, _ in paired_responses]
        request_time = np.fromiter((at for _, at in paired_requests), np.float64, count)
        response_time = np.fromiter((at for _, at in paired_responses), np.float64, count)
        keys = list(map(_KEY, requests))
        codes = self.codes
        for key in set(keys).difference(codes):
            codes[key] = len(codes)
        code = np.fromiter(map(codes.__getitem__, keys), np.int64, count)
        start = (request_time // self.width).astype(np.int64)
        groups, first, inverse = np.unique(code * (1 << 32) + start, return_index=True, return_inverse=True)
        answers = list(map(_ANSWER, responses))
        columns = (list(column) for column in zip(*answers, strict=True))
        error, latency, ttft, completion, cached, reasoning = columns
        latency_ms = np.array(latency, dtype=np.float64)
        unknown = np.isnan(latency_ms)
        if unknown.any():
            latency_ms[unknown] = np.maximum(0.0, (response_time - request_time)[unknown] * 1000.0)
        ttft_ms = np.array(ttft, dtype=np.float64)
        has_ttft = ~np.isnan(ttft_ms)
        prompt = np.fromiter(map(_PROMPT, requests), np.float64, count)
        completion_tokens = np.array(completion, dtype=np.float64)
        cached_tokens = np.array(cached, dtype=np.float64)
        cost_usd, unpriced = self._costs(requests, prompt, cached_tokens, completion_tokens)
        sums = {
            name: np.bincount(inverse, weights=column, minlength=len(groups))
            for name, column in (
                ("errors", np.fromiter(map(bool, error), np.float64, count)),
                ("latency_ms", latency_ms),
                ("ttft_ms", np.where(has_ttft, ttft_ms, 0.0)),
                ("ttft_count", has_ttft.astype(np.float64)),
                ("prompt_tokens", prompt),
                ("completion_tokens", completion_tokens),
                ("cache_read_tokens", cached_tokens),
                ("reasoning_tokens", np.array(reasoning, dtype=np.float64)),
                ("cost_usd", cost_usd),
                ("unpriced", unpriced),
            )
        }
        calls = np.bincount(inverse, minlength=len(groups))
        order = np.argsort(inverse, kind="stable")
        latencies = np.split(latency_ms[order], np.cumsum(calls)[:-1])
        windows, width = self.windows, self.width
        for group, index in enumerate(first.tolist()):
            key = (*keys[index], int(start[index]) * width)
            window = windows.get(key)
            if window is None:
                window = windows[key] = LeanWindow()
            window.requests += int(calls[group])
            window.errors += int(sums["errors"][group])
            window.latency_ms += float(sums["latency_ms"][group])
            window.ttft_ms += float(sums["ttft_ms"][group])
            window.ttft_count += int(sums["ttft_count"][group])
            window.prompt_tokens += int(sums["prompt_tokens"][group])
            window.completion_tokens += int(sums["completion_tokens"][group])
            window.cache_read_tokens += int(sums["cache_read_tokens"][group])
            window.reasoning_tokens += int(sums["reasoning_tokens"][group])
            window.cost_usd += float(sums["cost_usd"][group])
            window.unpriced += int(sums["unpriced"][group])
            window.digest.batch_update(latencies[group])

    def _costs(
        self, requests: list, prompt: NDArray, cached: NDArray, completion: NDArray
    ) -> tuple[NDArray, NDArray]:
        """Each call's cost (0 where unpriced) and whether it is unpriced, by (provider, model)."""
        pairs = list(map(_PAIR, requests))
        cost_usd = np.zeros(len(requests))
        unpriced = np.zeros(len(requests))
        by_pair: dict[tuple[str | None, str], list[int]] = {}
        for index, pair in enumerate(pairs):
            by_pair.setdefault(pair, []).append(index)
        for pair, indexes in by_pair.items():
            if pair not in self.pair_rates:
                request = requests[indexes[0]]
                self.pair_rates[pair] = self.book.rates(request.provider, request.model, request.timestamp)
            rates = self.pair_rates[pair]
            at = np.array(indexes)
            if rates is None:
                unpriced[at] = 1.0
            elif any(type(rate) is not float for rate in rates):
                cost_usd[at] = [
                    cost(rates, int(prompt[i]), int(cached[i]), int(completion[i])) for i in indexes
                ]
            else:
                input_rate, cache_rate, output_rate = rates
                clamped = np.minimum(cached[at], prompt[at])
                cost_usd[at] = (
                    (prompt[at] - clamped) * input_rate + clamped * cache_rate + completion[at] * output_rate
                )
        return cost_usd, unpriced


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
    if kind in ("lean", "columnar"):
        # One state for the process, as the lean loop keeps: its windows are not split by
        # request id, as the join shards would split them.
        logic = LeanLogic if kind == "lean" else ColumnarLogic
        op.stateful_batch("work", op.map("one_state", events.trues, _one_state), logic)
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
            ("lean", "read, decode, route, then the lean loop's work in one state"),
            ("columnar", "read, decode, route, then the lean loop's work by columns"),
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
