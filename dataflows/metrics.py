"""The metrics dataflow (docs/counting.md): ``python -m bytewax.run dataflows.metrics``.

::

    llm.requests ──┐
    llm.responses ─┼▶ read: a poll a partition, decoded once
    llm.evaluations┘  └▶ route ─┬▶ invalid, broker errors ─────────────────┐
                                └▶ (crc32(request_id) % N, [EventRun])     │
                                    └▶ join (JoinShard) ─┬▶ orphans ───────┤
                                                         └▶ CallBatch      │
                                    price (PriceBook), split ◀┘            │
                                └▶ (crc32(tenant,route,model) % N, CallBatch)
                                    └▶ windows (WindowShard) ─┬▶ too_late ─┤
                                                              ├▶ rows      │
                                                              └▶ counted calls
                   Postgres llm_metrics, then llm.metrics ◀┘               │
                                                                           │
    evaluations (by request_id) + counted calls (by request_id)            │
        └▶ evaluation_join (EvaluationJoin) ─┬▶ too_late, orphans, invalid ┤
                                             └▶ matched (by key)           │
            └▶ evaluation_windows (EvaluationWindows) ─┬▶ too_late ────────┤
                                                       └▶ rows             ▼
        Postgres llm_evaluation_metrics, then llm.evaluation-metrics   llm.deadletter
        (rows per dimension value: llm_evaluation_dimension_windows,
         then llm.evaluation-dimension-metrics)

N is ``STATE_SHARDS`` (:mod:`dataflows.shards`). Items are batches, not events: a
partition's poll is decoded once where it is read, the join takes the runs of
events of its shard, and the calls travel to the windows as columns
(:mod:`dataflows.batches`). Bytewax's cost is per item, so it is paid per shard
and activation, not per event.

The flow is built on first access of ``flow`` from the environment
(:func:`schemas.config.load_or_exit`), which also creates missing topics and the
Postgres schema; importing the module alone touches nothing.
"""

from __future__ import annotations

import functools
import gc
from pathlib import Path
from typing import TypeGuard, cast

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream

from dataflows import dimension_settings, observability, sinks, sources, stopping
from dataflows import operators as ops
from dataflows.batches import CallBatch, EventRun
from dataflows.evaluations import CountedCalls, EvaluationDimensionEmission, EvaluationEmission
from dataflows.pricing import PriceBook
from dataflows.segments import PostgresSegments
from dataflows.shards import DEFAULT, Shards
from dataflows.sources import EvaluationRuns
from dataflows.windows import WindowRow
from schemas.config import Settings, load_or_exit
from schemas.database import ensure_schema
from schemas.deadletter import DeadLetter
from schemas.logs import configure_logging
from schemas.topics import DEADLETTER, EVALUATIONS, REQUESTS, RESPONSES, ensure_topics


@functools.cache
def price_book(prices_file: Path | None) -> PriceBook:
    """One price book per process, built on first use: resolved prices are reused, never state."""
    return PriceBook(prices_file)


def build(settings: Settings) -> Dataflow:
    """The dataflow for these settings (pure: creates nothing outside the process)."""
    brokers = settings.kafka_brokers.split(",")
    shards = Shards(settings.state_shards) if settings.state_shards else DEFAULT
    prices_file = settings.prices_file
    flow = Dataflow("streamlens_metrics")

    batches = op.input(
        "read",
        flow,
        sources.BatchingKafkaSource(
            brokers,
            [REQUESTS, RESPONSES, EVALUATIONS],
            starting_offset=sources.STARTING_OFFSET,
            batch_size=sources.BATCH_SIZE,
            read_ahead=read_ahead(settings),
        ),
    )
    decoded = op.flat_map_batch("route", batches, functools.partial(sources.route_polls, shards=shards))
    # (join shard, events) pairs go on; evaluations apart; everything else is a dead letter.
    events = op.branch("valid", decoded, _is_event_group)
    evaluations = op.branch("evaluations", events.falses, _is_evaluation_group)

    joined = op.stateful_batch(
        "join",
        events.trues,
        ops.join_builder(
            settings.join_timeout_seconds,
            settings.dedupe_seconds,
            settings.window_seconds,
            settings.lateness_seconds,
            PostgresSegments(settings.postgres_dsn),
            shards,
        ),
    )
    routed = op.flat_map_batch(
        "price",
        joined,
        ops.route_to_windows(lambda calls: price_book(prices_file).price_calls(calls), shards),
    )
    calls = op.branch("answered", routed, _is_call_group)

    windowed = op.stateful_batch(
        "windows",
        calls.trues,
        ops.window_builder(
            settings.window_seconds,
            settings.grace_seconds,
            settings.lateness_seconds,
            functools.partial(
                dimension_settings.plan_for,
                settings.postgres_dsn,
                settings.dimensions,
                settings.window_seconds,
            ),
            settings.dimension_values,
            counted=True,
        ),
    )
    window_values = op.key_rm("window_values", windowed)
    rows_or_late = op.branch("on_time", window_values, _is_row)
    rows = rows_or_late.trues
    counted = op.branch("counted", rows_or_late.falses, _is_counted)

    # Evaluations meet the calls the windows counted in the call directory (by request
    # id, as the join), then fold into rows by their call's key and window.
    counted_calls = op.flat_map_batch("route_counted", counted.trues, ops.route_counted(shards))
    evaluation_runs = op.map("evaluation_runs", evaluations.trues, _runs_of)
    directory = op.stateful_batch(
        "evaluation_join",
        op.merge("directory_input", counted_calls, evaluation_runs),
        ops.directory_builder(
            settings.window_seconds,
            settings.grace_seconds,
            settings.lateness_seconds,
            settings.evaluation_lateness_seconds,
            PostgresSegments(settings.postgres_dsn),
            shards,
        ),
    )
    matched = op.branch(
        "matched", op.flat_map_batch("route_matched", directory, ops.route_matched(shards)), _is_matched_group
    )
    evaluation_outputs = op.key_rm(
        "evaluation_outputs",
        op.stateful_batch(
            "evaluation_windows",
            matched.trues,
            ops.evaluation_window_builder(
                settings.window_seconds,
                settings.grace_seconds,
                settings.lateness_seconds,
                settings.evaluation_lateness_seconds,
                settings.dimension_values,
            ),
        ),
    )
    evaluation_rows = op.branch("evaluation_rows", evaluation_outputs, _is_evaluation_row)
    op.output(
        "evaluation_metrics",
        evaluation_rows.trues,
        sinks.EvaluationRowsSink(settings.postgres_dsn, settings.kafka_brokers),
    )

    # Postgres first, then llm.metrics with exactly the emissions Postgres took.
    op.output("rows", rows, sinks.RowsSink(settings.postgres_dsn, settings.kafka_brokers))

    # What a branch did not take is a dead letter; Bytewax types only the taken side.
    letters = op.merge(
        "dead_letters",
        *(
            cast("Stream[DeadLetter]", stream)
            for stream in (
                evaluations.falses,
                calls.falses,
                counted.falses,
                matched.falses,
                evaluation_rows.falses,
            )
        ),
    )
    op.output(
        "deadletter",
        op.map("deadletter_records", letters, sinks.deadletter_message),
        sinks.KafkaTopicSink(settings.kafka_brokers, DEADLETTER),
    )
    return flow


def read_ahead(settings: Settings) -> float:
    """How far in event time a partition may read past the slowest one: by default well
    within the grace period, so that no window closes while a partition is still behind it."""
    if settings.read_ahead_seconds is not None:
        return settings.read_ahead_seconds
    return max(1.0, min(settings.grace_seconds, settings.join_timeout_seconds) / 2)


# Groups are plain (shard, batch) tuples; dead letters are DeadLetter structs.
def _is_event_group(item: DeadLetter | tuple[str, list[EventRun]]) -> TypeGuard[tuple[str, list[EventRun]]]:
    return type(item) is tuple


def _is_evaluation_group(item: DeadLetter | EvaluationRuns) -> TypeGuard[EvaluationRuns]:
    return type(item) is EvaluationRuns


def _runs_of(group: EvaluationRuns) -> tuple[str, list[EventRun]]:
    return group.shard, group.runs


def _is_counted(item: DeadLetter | CountedCalls) -> TypeGuard[CountedCalls]:
    return type(item) is CountedCalls


def _is_matched_group(item: DeadLetter | ops.MatchedGroup) -> TypeGuard[ops.MatchedGroup]:
    return type(item) is tuple


def _is_evaluation_row(
    item: EvaluationEmission | EvaluationDimensionEmission | DeadLetter,
) -> TypeGuard[EvaluationEmission | EvaluationDimensionEmission]:
    return type(item) is not DeadLetter


def _is_call_group(item: DeadLetter | tuple[str, CallBatch]) -> TypeGuard[tuple[str, CallBatch]]:
    return type(item) is tuple


def _is_row(item: WindowRow | DeadLetter) -> TypeGuard[WindowRow]:
    return isinstance(item, WindowRow)


def tune_gc() -> None:
    """Collect garbage less often: most of what the dataflow allocates dies young or lives
    long in state, and the default (a collection every 700 allocations, re-walking the
    state's objects) cost 10-15 % of the CPU time in ``bench_dataflow``.

    What import and set-up created is frozen out of collections altogether.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def from_environment() -> Dataflow:
    """The flow ``bytewax.run`` runs: settings from the environment, topics and schema ensured."""
    settings = load_or_exit()
    configure_logging(settings.log_format)
    stopping.install()
    observability.serve(settings.metrics_port, settings.kafka_brokers)
    tune_gc()
    ensure_topics(settings.kafka_brokers, settings.topic_partitions)
    ensure_schema(settings.postgres_dsn)
    return build(settings)


def __getattr__(name: str) -> Dataflow:
    # ``bytewax.run dataflows.metrics`` looks up ``flow``; building it lazily keeps
    # imports of this module (tests, tools) free of connections.
    if name == "flow":
        flow = from_environment()
        globals()["flow"] = flow
        return flow
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
