"""The metrics dataflow (contract §3): ``python -m bytewax.run dataflows.metrics``.

::

    llm.requests ─┐                      ┌─▶ invalid ───────────────────────────────┐
    llm.responses ┴▶ decode ─────────────┤                                          │
                                         └─▶ key by crc32(request_id) % 64          │
                                              └▶ join (JoinShard) ─┬▶ orphan ───────┤
                                                                   └▶ call          │
                                              price (PriceBook) ◀──┘                │
                                              key by crc32(tenant,route,model) % 64 │
                                              └▶ windows (WindowShard) ─┬▶ too_late ┤
                                                                        └▶ rows     ▼
                                              Postgres llm_metrics, llm.metrics   llm.deadletter

The flow is built on first access of ``flow`` from the environment
(:func:`schemas.config.load_or_exit`), which also creates missing topics and the
Postgres schema; importing the module alone touches nothing.
"""

from __future__ import annotations

import functools
from pathlib import Path

import bytewax.operators as op
from bytewax.connectors.kafka import operators as kop
from bytewax.dataflow import Dataflow

from dataflows import operators as ops
from dataflows import sinks, sources
from dataflows.join import Call
from dataflows.pricing import PriceBook
from dataflows.windows import WindowRow
from schemas.config import Settings, load_or_exit
from schemas.database import ensure_schema
from schemas.topics import DEADLETTER, METRICS, REQUESTS, RESPONSES, ensure_topics


@functools.cache
def price_book(prices_file: Path | None) -> PriceBook:
    """One price book per process, built on first use: resolved prices are reused, never state."""
    return PriceBook(prices_file)


def build(settings: Settings) -> Dataflow:
    """The dataflow for these settings (pure: creates nothing outside the process)."""
    brokers = settings.kafka_brokers.split(",")
    prices_file = settings.prices_file
    flow = Dataflow("streamlens_metrics")

    consumed = kop.input("read", flow, brokers=brokers, topics=[REQUESTS, RESPONSES],
                         starting_offset=sources.STARTING_OFFSET,
                         batch_size=sources.BATCH_SIZE)
    broken = op.map("broker_errors", consumed.errs, sources.broker_error)

    decoded = op.map("decode", consumed.oks, sources.decode)
    split = op.branch("valid", decoded, lambda item: isinstance(item, tuple))
    invalid = split.falses

    keyed = op.key_on("by_request", split.trues, lambda item: ops.join_shard_key(
        item[0].request_id))
    joined = op.stateful_batch("join", keyed, ops.join_builder(
        settings.join_timeout_seconds, settings.dedupe_seconds))
    joined_values = op.key_rm("join_values", joined)
    calls_or_orphans = op.branch("answered", joined_values,
                                 lambda item: isinstance(item, Call))
    orphans = calls_or_orphans.falses

    priced = op.map("price", calls_or_orphans.trues,
                    lambda call: price_book(prices_file).price(call))
    by_window = op.key_on("by_window", priced, ops.window_shard_key)
    windowed = op.stateful_batch("windows", by_window, ops.window_builder(
        settings.window_seconds, settings.grace_seconds, settings.lateness_seconds))
    window_values = op.key_rm("window_values", windowed)
    rows_or_late = op.branch("on_time", window_values,
                             lambda item: isinstance(item, WindowRow))
    rows = rows_or_late.trues
    too_late = rows_or_late.falses

    op.output("postgres", rows, sinks.PostgresSink(settings.postgres_dsn))
    kop.output("metrics", op.map("metrics_records", rows, sinks.metrics_message),
               brokers=brokers, topic=METRICS, add_config=sinks.PRODUCER_CONFIG)

    letters = op.merge("dead_letters", broken, invalid, orphans, too_late)
    kop.output("deadletter", op.map("deadletter_records", letters, sinks.deadletter_message),
               brokers=brokers, topic=DEADLETTER, add_config=sinks.PRODUCER_CONFIG)
    return flow


def from_environment() -> Dataflow:
    """The flow ``bytewax.run`` runs: settings from the environment, topics and schema ensured."""
    settings = load_or_exit()
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
