"""What the end-to-end dataflow tests share: a data set, its expected outcome, and the plumbing.

The data set is fed in phases, because outcomes that hinge on event time must
not depend on the order in which Kafka partitions happen to be read (a backlog
is read in any interleaving, and the watermark is per shard):

1. the bulk, with every timestamp inside a span shorter than the grace period
   and the join timeout, so nothing closes or expires while it is read, in any
   order: answered calls, duplicates on both sides, responses before their
   requests, errors, requests that never get a response, orphan responses, and
   invalid records. Its windows close as the wall clock advances event time.
2. once every first row is out: calls for windows already emitted (late, within
   lateness, so the windows come again with a higher revision), repeats of
   counted calls (ignored), and a far-future "tick" call for a key alone in its
   window shard.
3. once the tick is read: a call for that key's old window, now too late.

Requests without response time out later still (as event time idles forward
with the wall clock) and update their windows again.

Everything expected is computed here, plainly, from the generated events: no
code from ``dataflows`` takes part except the two shard functions, used only to
choose identifiers that keep the phases independent of one another.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Producer
from psycopg.rows import dict_row

from dataflows.shards import Shards
from tests.support.ports import free_port
from tests.support.stacks import TEST_PARTITIONS
from tests.support.topics import records_on

REQUESTS, RESPONSES, METRICS, DIMENSION_METRICS, DEADLETTER = (
    "llm.requests",
    "llm.responses",
    "llm.metrics",
    "llm.dimension-metrics",
    "llm.deadletter",
)

WINDOW_SECONDS = 5
GRACE_SECONDS = 15
JOIN_TIMEOUT_SECONDS = 40
# Orphans are final, and timed-out requests no longer convertible, once event time
# passes their window's end + this: kept just above the join timeout.
LATENESS_SECONDS = 45

# Event time: all relative to BASE, an epoch-aligned instant long past.
BASE = datetime(2025, 6, 1, tzinfo=UTC).timestamp()

PRICES = {
    "test-model-a": {"input_per_mtok": 0.4, "output_per_mtok": 1.6, "cache_read_per_mtok": 0.1},
    "test-model-b": {"input_per_mtok": 3.0, "output_per_mtok": 15.0, "cache_read_per_mtok": 0.3},
}
UNPRICED_MODEL = "streamlens-no-such-model-0"

NORMAL_KEYS: tuple[tuple[str, str, str], ...] = (
    ("acme", "/chat", "test-model-a"),
    ("acme", "/chat", "test-model-b"),
    ("acme", "/summarise", "test-model-a"),
    ("globex", "/chat", "test-model-b"),
    ("globex", "/search", UNPRICED_MODEL),
)


# The shards the data set is made for (a lonely key, ids kept out of a shard): the
# processor runs with this count unless a test gives settings of its own.
SHARDS = Shards(16)


def timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _lonely_key() -> tuple[str, str, str]:
    """A key whose window shard holds no other key of the data set: the tick moves only its clock."""
    taken = {SHARDS.window_key(key) for key in NORMAL_KEYS}
    for number in range(1000):
        key = (f"late-{number}", "/chat", "test-model-a")
        if SHARDS.window_key(key) not in taken:
            return key
    raise AssertionError("no free window shard")


@dataclass
class Event:
    topic: str
    record: dict[str, Any] | None  # None: ``raw`` is the record (invalid on purpose)
    raw: bytes | None = None

    def value(self) -> bytes:
        return self.raw if self.record is None else json.dumps(self.record).encode()

    def key(self) -> bytes | None:
        return None if self.record is None else self.record["request_id"].encode()


@dataclass
class Counted:
    """A call the dataflow must count, as the test sees it."""

    key: tuple[str, str, str]
    request_ts: float
    response: dict[str, Any] | None  # None: timed out
    request: dict[str, Any]
    late: bool  # folded in after the window's first emission


@dataclass
class DataSet:
    phase1: list[Event] = field(default_factory=list)
    phase2: list[Event] = field(default_factory=list)
    phase3: list[Event] = field(default_factory=list)
    counted: list[Counted] = field(default_factory=list)
    orphan_ids: set[str] = field(default_factory=set)
    too_late_ids: set[str] = field(default_factory=set)
    invalid_count: int = 0
    lonely_key: tuple[str, str, str] = ("", "", "")
    tick_window: float = 0.0


def generate(calls: int = 2000, seed: int = 7) -> DataSet:
    rng = random.Random(seed)
    data = DataSet()
    lonely = data.lonely_key = _lonely_key()
    ids = (f"{seed}-{n:06d}-{rng.getrandbits(24):06x}" for n in range(10**6))
    # The tick of phase 2 moves its join shard to far-future event time: the requests
    # left to time out, and the late calls, keep out of that shard, so that nothing of
    # theirs expires early (and no early timeout moves a window shard ahead of the rest).
    tick_rid = next(ids)
    blocked = {SHARDS.join_key(tick_rid)}

    def free_id() -> str:
        while True:
            rid = next(ids)
            if SHARDS.join_key(rid) not in blocked:
                return rid

    def request(rid: str, key: tuple[str, str, str], ts: float) -> dict[str, Any]:
        return {
            "type": "request",
            "request_id": rid,
            "tenant_id": key[0],
            "route": key[1],
            "model": key[2],
            "timestamp": timestamp(ts),
            "prompt_tokens": rng.randrange(0, 3000),
            "metadata": {"seed": seed},
        }

    def response(rid: str, req: dict[str, Any], ts: float) -> dict[str, Any]:
        completion = rng.randrange(0, 800)
        body: dict[str, Any] = {
            "type": "response",
            "request_id": rid,
            "timestamp": timestamp(ts),
            "completion_tokens": completion,
            "cache_read_tokens": rng.randrange(0, req["prompt_tokens"] + 1) if rng.random() < 0.4 else 0,
            "reasoning_tokens": rng.randrange(0, completion + 1) if rng.random() < 0.3 else 0,
        }
        if rng.random() < 0.8:
            body["latency_ms"] = round(rng.uniform(50, 4000), 3)
        if rng.random() < 0.5:
            body["time_to_first_token_ms"] = round(rng.uniform(5, 500), 3)
        if rng.random() < 0.08:
            body["error"] = rng.choice(["rate_limited", "upstream 500"])
        elif rng.random() < 0.05:
            body["error"] = ""  # an empty error is not a failure
        return body

    def answered(
        key: tuple[str, str, str], ts: float, late: bool, rid: str | None = None
    ) -> tuple[Event, Event, Counted]:
        rid = rid or next(ids)
        req = request(rid, key, ts)
        resp = response(rid, req, ts + rng.uniform(0.01, 1.0))
        return (Event(REQUESTS, req), Event(RESPONSES, resp), Counted(key, ts, resp, req, late))

    # Phase 1: request times in [BASE+0.5, BASE+9.5]: windows [0, 5) and [5, 10).
    answered_pairs: list[tuple[Event, Event]] = []
    for _ in range(calls):
        req, resp, counted = answered(rng.choice(NORMAL_KEYS), BASE + rng.uniform(0.5, 9.5), late=False)
        data.phase1 += [req, resp]
        data.counted.append(counted)
        answered_pairs.append((req, resp))
    for _ in range(6):
        req, resp, counted = answered(lonely, BASE + rng.uniform(0.5, 9.5), late=False)
        data.phase1 += [req, resp]
        data.counted.append(counted)
    for _ in range(max(1, calls // 40)):  # never answered: they time out
        key = rng.choice(NORMAL_KEYS)
        ts = BASE + rng.uniform(5.5, 9.5)
        req = request(free_id(), key, ts)
        data.phase1.append(Event(REQUESTS, req))
        data.counted.append(Counted(key, ts, None, req, late=True))
    for _ in range(max(1, calls // 100)):  # responses whose request never comes
        rid = next(ids)
        data.phase1.append(
            Event(
                RESPONSES,
                {
                    "type": "response",
                    "request_id": rid,
                    "timestamp": timestamp(BASE + rng.uniform(1, 9)),
                    "latency_ms": 12.5,
                },
            )
        )
        data.orphan_ids.add(rid)
    for req, resp in rng.sample(answered_pairs, max(1, calls // 20)):  # duplicates, both sides
        data.phase1.append(Event(req.topic, dict(req.record or {})))
        data.phase1.append(Event(resp.topic, dict(resp.record or {})))
    invalid = [
        Event(REQUESTS, None, b"{not json"),
        Event(
            REQUESTS,
            None,
            json.dumps(
                {"request_id": "no-tenant", "route": "/r", "model": "m", "timestamp": timestamp(BASE + 1)}
            ).encode(),
        ),
        Event(
            RESPONSES,
            None,
            json.dumps({"request_id": "naive-ts", "timestamp": "2025-06-01T00:00:03"}).encode(),
        ),
        Event(RESPONSES, None, b"\xff\xfe\x00 not utf-8"),
    ]
    data.phase1 += invalid
    data.invalid_count = len(invalid)
    rng.shuffle(data.phase1)

    # Phase 2, after the first rows. The tick moves the lonely key's shard to far-future
    # event time, and with it the watermark of the tick's own join shard.
    tick_ts = BASE + 140.5
    data.tick_window = BASE + 140
    tick_req, tick_resp, tick = answered(lonely, tick_ts, late=False, rid=tick_rid)
    data.phase2 += [tick_req, tick_resp]
    data.counted.append(tick)

    for _ in range(max(2, calls // 60)):
        req, resp, counted = answered(
            rng.choice(NORMAL_KEYS), BASE + rng.uniform(3.0, 9.5), late=True, rid=free_id()
        )
        data.phase2 += [req, resp]
        data.counted.append(counted)
    for req, resp in rng.sample(answered_pairs, max(1, calls // 50)):  # repeats after counting
        data.phase2 += [Event(req.topic, dict(req.record or {})), Event(resp.topic, dict(resp.record or {}))]
    rng.shuffle(data.phase2)

    # Phase 3: a call for the lonely key's window [5, 10), after its shard saw the tick.
    rid = free_id()
    req = request(rid, lonely, BASE + 8.0)
    data.phase3 += [Event(REQUESTS, req), Event(RESPONSES, response(rid, req, BASE + 8.4))]
    data.too_late_ids.add(rid)
    return data


# -- the expected outcome -------------------------------------------------------------------


@dataclass
class ExpectedRow:
    key: tuple[str, str, str]
    window_start: float
    requests: int
    errors: int
    timeouts: int
    latencies: list[float]
    ttfts: list[float]
    prompt_tokens: int
    completion_tokens: int
    cache_read_tokens: int
    reasoning_tokens: int
    answered: int
    cost: float
    unpriced: int
    revision: int
    window_seconds: int = WINDOW_SECONDS


def expected_rows(
    data: DataSet, window_seconds: int = WINDOW_SECONDS
) -> dict[tuple[str, str, str, float], ExpectedRow]:
    """Every final row, computed from the calls the test generated."""
    return expected_rows_of(data.counted, window_seconds)


def expected_rows_of(
    counted: Iterable[Counted], window_seconds: int = WINDOW_SECONDS
) -> dict[tuple[str, str, str, float], ExpectedRow]:
    """Every final row of these calls."""
    groups: dict[tuple[str, str, str, float], list[Counted]] = defaultdict(list)
    for call in counted:
        start = math.floor(call.request_ts / window_seconds) * window_seconds
        groups[(*call.key, float(start))].append(call)
    rows = {}
    for (tenant, route, model, start), calls in groups.items():
        answered = [c for c in calls if c.response is not None]
        latencies = []
        cost = 0.0
        unpriced = 0
        for c in answered:
            resp = c.response or {}
            if "latency_ms" in resp:
                latencies.append(resp["latency_ms"])
            else:
                # From the timestamps as sent (whole microseconds), not the test's own floats.
                latencies.append(
                    max(
                        0.0,
                        (
                            datetime.fromisoformat(resp["timestamp"]).timestamp()
                            - datetime.fromisoformat(c.request["timestamp"]).timestamp()
                        )
                        * 1000,
                    )
                )
            price = PRICES.get(model)
            if price is None:
                unpriced += 1
            else:
                prompt, cached = c.request["prompt_tokens"], resp["cache_read_tokens"]
                cost += (
                    (prompt - cached) * price["input_per_mtok"]
                    + cached * price["cache_read_per_mtok"]
                    + resp["completion_tokens"] * price["output_per_mtok"]
                ) / 1e6
        rows[(tenant, route, model, start)] = ExpectedRow(
            key=(tenant, route, model),
            window_start=start,
            requests=len(calls),
            errors=sum(1 for c in calls if c.response is None or c.response.get("error")),
            timeouts=sum(1 for c in calls if c.response is None),
            latencies=sorted(latencies),
            ttfts=[
                c.response["time_to_first_token_ms"]
                for c in answered
                if c.response and "time_to_first_token_ms" in c.response
            ],
            prompt_tokens=sum(c.request["prompt_tokens"] for c in answered),
            completion_tokens=sum((c.response or {})["completion_tokens"] for c in answered),
            cache_read_tokens=sum((c.response or {})["cache_read_tokens"] for c in answered),
            reasoning_tokens=sum((c.response or {})["reasoning_tokens"] for c in answered),
            answered=len(answered),
            cost=cost,
            unpriced=unpriced,
            # The row's content version: one per timed-out call, two per answered call.
            revision=len(calls) + len(answered),
            window_seconds=window_seconds,
        )
    return rows


# -- dimensions (docs/dimensions.md), computed here from the calls the test made ---------------------

DimensionKey = tuple[str, str, str, float, str, str | None]
OTHER = "(other)"


def dimension_value(name: str, call: Counted) -> str | None:
    """A call's value for dimension ``name``, as docs/dimensions.md writes it."""
    if name.startswith("metadata."):
        found = (call.request.get("metadata") or {}).get(name.removeprefix("metadata."))
    elif name == "provider":
        found = call.request.get("provider")
    elif name == "user":
        found = call.request.get("user_id_hash")
    else:
        assert name == "finish_reason"
        found = (call.response or {}).get("finish_reason")
    if found is None:
        return None
    if isinstance(found, bool):
        return "true" if found else "false"
    if isinstance(found, int | float):
        return json.dumps(found)
    return re.sub(r"[\x00-\x1f\x7f]", "\ufffd", found[:128])


def expected_dimension_rows(
    counted: Iterable[Counted],
    names: Callable[[str, float], tuple[str, ...]],
    limit: int,
    window_seconds: int = WINDOW_SECONDS,
) -> dict[DimensionKey, ExpectedRow]:
    """Every final dimension row of these calls: per window, key and dimension (``names`` of
    the tenant at the window's start), the ``limit`` values with most calls (ties by value,
    none first) and the rest as "(other)", each with the window's revision."""
    windows: dict[tuple[str, str, str, float], list[Counted]] = defaultdict(list)
    for call in counted:
        start = math.floor(call.request_ts / window_seconds) * window_seconds
        windows[(*call.key, float(start))].append(call)
    rows: dict[DimensionKey, ExpectedRow] = {}
    for window, calls in windows.items():
        revision = len(calls) + sum(1 for c in calls if c.response is not None)
        for name in names(window[0], window[3]):
            by_value: dict[str | None, list[Counted]] = defaultdict(list)
            for call in calls:
                by_value[dimension_value(name, call)].append(call)
            ranked = sorted(
                (v for v in by_value if v != OTHER), key=lambda v: (-len(by_value[v]), v is not None, v or "")
            )
            kept = {value: by_value[value] for value in ranked[:limit]}
            rest = [call for value in ranked[limit:] for call in by_value[value]] + by_value.get(OTHER, [])
            if rest:
                kept[OTHER] = rest
            for value, members in kept.items():
                (row,) = expected_rows_of(members, window_seconds).values()
                row.revision = revision
                rows[(*window, name, value)] = row
    return rows


def postgres_dimension_rows(dsn: str) -> dict[DimensionKey, dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        rows = conn.execute("SELECT * FROM llm_dimension_metrics").fetchall()
    return {(*window_of(r), r["dimension"], r["value"]): r for r in rows}


def dimension_records(brokers: str) -> dict[bytes, list[dict[str, Any]]]:
    """``llm.dimension-metrics`` by key (window, key and dimension), each key's records in
    the order they were written (one worker writes a window's records, to one partition)."""
    by_key: dict[bytes, list[tuple[tuple[int, int], dict[str, Any]]]] = defaultdict(list)
    for key, value, partition, offset in records_on(brokers, DIMENSION_METRICS):
        record = json.loads(value)
        assert (
            key
            == (
                f"{record['tenant_id']}|{record['route']}|{record['model']}|"
                f"{datetime.fromisoformat(record['window_start']).isoformat()}|"
                f"{record['dimension']}"
            ).encode()
        )
        by_key[key].append(((partition, offset), record))
    return {
        key: [record for _, record in sorted(records, key=lambda r: r[0])] for key, records in by_key.items()
    }


def latest_dimension_metrics(brokers: str) -> dict[DimensionKey, dict[str, Any]]:
    """``llm.dimension-metrics`` as compaction leaves it (each key's last record), one row
    per value: the record's columns taken apart."""
    rows: dict[DimensionKey, dict[str, Any]] = {}
    for records in dimension_records(brokers).values():
        last = records[-1]
        start = datetime.fromisoformat(last["window_start"]).timestamp()
        columns = [name for name, column in last.items() if isinstance(column, list) and name != "values"]
        for i, value in enumerate(last["values"]):
            row = {name: last[name] for name in last if name not in columns and name != "values"}
            row |= {name: last[name][i] for name in columns}
            rows[(last["tenant_id"], last["route"], last["model"], start, last["dimension"], value)] = row
    return rows


def check_dimension_rows(
    actual: dict[DimensionKey, dict[str, Any]], expected: dict[DimensionKey, ExpectedRow]
) -> None:
    assert set(actual) == set(expected), (
        f"missing {sorted(set(expected) - set(actual), key=str)[:5]}, "
        f"unexpected {sorted(set(actual) - set(expected), key=str)[:5]}"
    )
    for key, row in expected.items():
        check_row(actual[key], row)


def first_rows(data: DataSet) -> set[tuple[str, str, str, float]]:
    """The windows that phase 1 fills: their first rows open phase 2."""
    keys = set()
    for call in data.counted:
        if call.late or call.request_ts > BASE + 10:
            continue
        start = math.floor(call.request_ts / WINDOW_SECONDS) * WINDOW_SECONDS
        keys.add((*call.key, float(start)))
    return keys


def _close(actual: float | None, expected: float | None, what: str, rel: float = 1e-9) -> None:
    if expected is None:
        assert actual is None, f"{what}: expected null, got {actual}"
        return
    assert actual is not None and math.isclose(actual, expected, rel_tol=rel, abs_tol=1e-9), (
        f"{what}: expected {expected}, got {actual}"
    )


# Up to this many latencies a window's percentiles are nearest-rank exact (a digest
# holds each as its own centroid); beyond, docs/counting.md allows 1 % of error.
FEW_CALLS = 500


def _percentile_bounds(values: list[float], q: float) -> tuple[float, float]:
    """The nearest-rank values around the q-quantile (one rank of slack either side)."""
    n = len(values)
    rank = q * (n - 1)
    return values[max(0, math.floor(rank) - 1)], values[min(n - 1, math.ceil(rank) + 1)]


def check_row(actual: dict[str, Any], expected: ExpectedRow) -> None:
    """One row (Postgres columns or llm.metrics JSON fields) against its expectation."""
    where = f"{expected.key} @ {timestamp(expected.window_start)}"
    for name in (
        "requests",
        "errors",
        "timeouts",
        "prompt_tokens",
        "completion_tokens",
        "cache_read_tokens",
        "reasoning_tokens",
        "revision",
    ):
        assert actual[name] == getattr(expected, name), (
            f"{where}: {name} expected {getattr(expected, name)}, got {actual[name]}"
        )
    assert actual["unpriced_requests"] == expected.unpriced, where
    start = actual["window_start"]
    if isinstance(start, str):
        start = datetime.fromisoformat(start)
    assert start.timestamp() == expected.window_start, where
    end = actual["window_end"]
    if isinstance(end, str):
        end = datetime.fromisoformat(end)
    assert end.timestamp() == expected.window_start + expected.window_seconds, where
    _close(actual["estimated_cost_usd"], expected.cost, f"{where} cost", rel=1e-6)
    lat = expected.latencies
    if not lat:
        for name in (
            "avg_latency_ms",
            "p50_latency_ms",
            "p95_latency_ms",
            "p99_latency_ms",
            "avg_prompt_tokens",
            "avg_completion_tokens",
        ):
            assert actual[name] is None, f"{where}: {name} should be null"
    else:
        _close(actual["avg_latency_ms"], sum(lat) / len(lat), f"{where} avg latency", rel=1e-6)
        for q, name in ((0.5, "p50_latency_ms"), (0.95, "p95_latency_ms"), (0.99, "p99_latency_ms")):
            low, high = _percentile_bounds(lat, q)
            if len(lat) > FEW_CALLS:
                # Contract §3: with many calls, within 1 % of the exact value.
                low, high = low * 0.99, high * 1.01
            assert low - 1e-6 <= actual[name] <= high + 1e-6, (
                f"{where}: {name} {actual[name]} outside [{low}, {high}]"
            )
        _close(
            actual["avg_prompt_tokens"],
            expected.prompt_tokens / expected.answered,
            f"{where} avg prompt",
            rel=1e-9,
        )
        _close(
            actual["avg_completion_tokens"],
            expected.completion_tokens / expected.answered,
            f"{where} avg completion",
            rel=1e-9,
        )
    ttft = expected.ttfts
    _close(
        actual["avg_time_to_first_token_ms"],
        sum(ttft) / len(ttft) if ttft else None,
        f"{where} avg ttft",
        rel=1e-6,
    )
    if "ttft_count" in actual:
        assert actual["ttft_count"] == len(ttft), where
        assert actual["latency_digest"], f"{where}: digest missing"


def check_rows(
    actual: dict[tuple[str, str, str, float], dict[str, Any]],
    expected: dict[tuple[str, str, str, float], ExpectedRow],
) -> None:
    assert set(actual) == set(expected), (
        f"missing {sorted(set(expected) - set(actual))[:5]}, "
        f"unexpected {sorted(set(actual) - set(expected))[:5]}"
    )
    for key, row in expected.items():
        check_row(actual[key], row)


# -- Kafka and Postgres plumbing ---------------------------------------------------------


def produce(brokers: str, events: Iterable[Event]) -> None:
    producer = Producer(
        {"bootstrap.servers": brokers, "enable.idempotence": True, "acks": "all", "linger.ms": 5}
    )
    for event in events:
        producer.produce(event.topic, event.value(), key=event.key())
        producer.poll(0)
    assert producer.flush(30) == 0, "records left unsent"


def produce_markers(brokers: str) -> str:
    """An invalid record on every partition of both input topics: once all are dead
    letters, every record produced before them has been read."""
    tag = f"marker-{uuid.uuid4().hex}"
    producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True, "acks": "all"})
    for topic in (REQUESTS, RESPONSES):
        for partition in range(TEST_PARTITIONS):
            producer.produce(topic, tag.encode(), partition=partition)
    assert producer.flush(30) == 0
    return tag


def dead_letters(brokers: str) -> list[dict[str, Any]]:
    return [json.loads(value) for _, value, _, _ in records_on(brokers, DEADLETTER)]


def window_of(row: dict[str, Any]) -> tuple[str, str, str, float]:
    """A row's window, (tenant_id, route, model, window start in Unix seconds), from Postgres
    columns or from a topic's JSON fields (the start then an ISO text)."""
    start = row["window_start"]
    if isinstance(start, str):
        start = datetime.fromisoformat(start)
    return row["tenant_id"], row["route"], row["model"], start.timestamp()


def latest_metrics(brokers: str) -> dict[tuple[str, str, str, float], dict[str, Any]]:
    """The highest revision of each window in ``llm.metrics``, keyed by window."""
    latest: dict[tuple[str, str, str, float], dict[str, Any]] = {}
    for key, value, _, _ in records_on(brokers, METRICS):
        row = json.loads(value)
        window = window_of(row)
        assert (
            key
            == (
                f"{row['tenant_id']}|{row['route']}|{row['model']}|"
                f"{datetime.fromisoformat(row['window_start']).isoformat()}"
            ).encode()
        )
        if window not in latest or latest[window]["revision"] <= row["revision"]:
            latest[window] = row
    return latest


def postgres_rows(dsn: str) -> dict[tuple[str, str, str, float], dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        rows = conn.execute("SELECT * FROM llm_metrics").fetchall()
    return {window_of(r): r for r in rows}


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    alive: Callable[[], None] | None = None,
    log: Callable[[], str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None:
            alive()
        if condition():
            return
        time.sleep(0.25)
    tail = "" if log is None else f"; the dataflow's log ends:\n{log()}"
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")


# -- running the dataflow ----------------------------------------------------------------


@dataclass
class Processor:
    """``python -m dataflows.run`` as a subprocess, in its own process group."""

    brokers: str
    dsn: str
    recovery_dir: Path
    prices_file: Path
    log: Path
    processes: int = 1
    process: subprocess.Popen | None = None
    # The time settings of this module's data set; {} runs with the defaults a user gets.
    settings: dict[str, str] = field(
        default_factory=lambda: {
            "WINDOW_SECONDS": str(WINDOW_SECONDS),
            "GRACE_SECONDS": str(GRACE_SECONDS),
            "LATENESS_SECONDS": str(LATENESS_SECONDS),
            "JOIN_TIMEOUT_SECONDS": str(JOIN_TIMEOUT_SECONDS),
            "STATE_SHARDS": str(SHARDS.count),
        }
    )

    metrics_port: int = field(default_factory=free_port)

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KAFKA_BROKERS": self.brokers,
            "POSTGRES_DSN": self.dsn,
            "METRICS_PORT": str(self.metrics_port),
            **self.settings,
            "TOPIC_PARTITIONS": str(TEST_PARTITIONS),
            "PRICES_FILE": str(self.prices_file),
        }

    @classmethod
    def in_directory(cls, brokers: str, dsn: str, work: Path, **options: Any) -> Processor:
        """A processor keeping everything under ``work``: its recovery store, the test prices
        (:func:`write_prices`) and its log."""
        return cls(
            brokers,
            dsn,
            work / "recovery",
            write_prices(work / "prices.json"),
            work / "dataflow.log",
            **options,
        )

    def start(self) -> Processor:
        out = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        # The runner's defaults (snapshot interval and all), as `just processor` runs it.
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dataflows.run",
                "--recovery-dir",
                str(self.recovery_dir),
                "--processes",
                str(self.processes),
            ],
            env=self.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        return self

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def check_alive(self) -> None:
        assert self.process is not None and self.process.poll() is None, (
            f"the dataflow exited:\n{self.log_tail()}"
        )

    def kill(self) -> None:
        """kill -9 the runner and every process it started."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()


def snapshotted_steps(recovery_dir: Path) -> set[str]:
    """The steps whose state the recovery partitions hold: proof that recovery is in use."""
    import sqlite3

    steps: set[str] = set()
    for part in recovery_dir.glob("part-*.sqlite3"):
        with sqlite3.connect(part) as conn:
            steps |= {row[0] for row in conn.execute("SELECT DISTINCT step_id FROM snaps")}
    return steps


def write_prices(path: Path) -> Path:
    path.write_text(json.dumps(PRICES))
    return path


@dataclass
class Scenario:
    """Drives one run of the data set through a dataflow, phase by phase."""

    data: DataSet
    processor: Processor
    brokers: str
    dsn: str
    markers: list[str] = field(default_factory=list)
    # Called with the name of each step reached; the crash test kills the dataflow there.
    on_step: Callable[[str], None] = lambda step: None

    def barrier(self) -> None:
        """Wait until every partition has been read up to now."""
        tag = produce_markers(self.brokers)
        self.markers.append(tag)
        wanted = 2 * TEST_PARTITIONS

        def seen() -> bool:
            letters = dead_letters(self.brokers)
            return (
                len({(d["source_topic"], d["partition"]) for d in letters if d["payload"] == tag}) == wanted
            )

        wait_for(seen, 60, "the marker records", self.processor.check_alive, self.processor.log_tail)
        time.sleep(0.5)  # what the markers' batch carried is through the stateful steps too

    def run(self) -> None:
        data = self.data
        produce(self.brokers, data.phase1)
        self.barrier()
        self.on_step("phase1-read")
        first = first_rows(data)
        wait_for(
            lambda: len(first & postgres_rows(self.dsn).keys()) > 0,
            60,
            "the first rows",
            self.processor.check_alive,
            self.processor.log_tail,
        )
        self.on_step("some-rows")
        wait_for(
            lambda: first <= postgres_rows(self.dsn).keys(),
            90,
            "every first row",
            self.processor.check_alive,
            self.processor.log_tail,
        )
        # The snapshot that records these emissions must be durable before a late call.
        time.sleep(2.5)
        produce(self.brokers, data.phase2)
        self.barrier()
        self.on_step("phase2-read")
        produce(self.brokers, data.phase3)
        wait_for(
            lambda: any(d["reason"] == "too_late" for d in dead_letters(self.brokers)),
            60,
            "the too-late call",
            self.processor.check_alive,
            self.processor.log_tail,
        )
        self.on_step("too-late-seen")
        expected = expected_rows(data)
        wait_for(
            lambda: self._done(expected),
            120,
            "the final rows",
            self.processor.check_alive,
            self.processor.log_tail,
        )

    def _done(self, expected: dict[tuple[str, str, str, float], ExpectedRow]) -> bool:
        rows = postgres_rows(self.dsn)
        if any(key not in rows or rows[key]["revision"] < row.revision for key, row in expected.items()):
            return False
        letters = Counter(d["reason"] for d in dead_letters(self.brokers))
        done = letters["orphan_response"] >= len(self.data.orphan_ids) and letters["too_late"] >= len(
            self.data.too_late_ids
        )
        if done:
            self.on_step("final")
        return done

    def restart_point(self) -> None:
        """After a restart: let the replay be read before the next phase goes in."""
        self.barrier()


def check_dead_letters(data: DataSet, letters: list[dict[str, Any]], markers: list[str], exact: bool) -> None:
    """Dead letters by reason: ``exact`` counts, or (after replays) distinct records."""
    by_reason: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for letter in letters:
        by_reason[letter["reason"]].append(letter)
    invalid = [d for d in by_reason["invalid"] if d["payload"] not in markers]
    assert {d["reason"] for d in letters} <= {"invalid", "orphan_response", "too_late"}

    def distinct(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list({(d["source_topic"], d["partition"], d["offset"]): d for d in items}.values())

    if not exact:
        invalid = distinct(invalid)
        by_reason["orphan_response"] = distinct(by_reason["orphan_response"])
        by_reason["too_late"] = distinct(by_reason["too_late"])
    assert len(invalid) == data.invalid_count, invalid
    for letter in invalid:
        assert letter["error"] and letter["source_topic"] in (REQUESTS, RESPONSES)
        assert letter["offset"] is not None and letter["partition"] is not None
    assert any("not UTF-8" in d["error"] for d in invalid)
    assert any("tenant_id" in d["error"] for d in invalid)
    assert any("$.timestamp" in d["error"] for d in invalid)
    orphans = {json.loads(d["payload"])["request_id"] for d in by_reason["orphan_response"]}
    assert orphans == data.orphan_ids
    assert len(by_reason["orphan_response"]) == len(data.orphan_ids)
    late = {json.loads(d["payload"])["request"]["request_id"] for d in by_reason["too_late"]}
    assert late == data.too_late_ids
    assert len(by_reason["too_late"]) == len(data.too_late_ids)


# -- a few answered calls, for tests that run the processor their own way ------------

# The harness's windows, closed 1 s of event time after their end.
SHORT_GRACE_SETTINGS = {
    "WINDOW_SECONDS": str(WINDOW_SECONDS),
    "GRACE_SECONDS": "1",
    "JOIN_TIMEOUT_SECONDS": str(JOIN_TIMEOUT_SECONDS),
    "LATENESS_SECONDS": str(LATENESS_SECONDS),
}


def answered_calls(
    rng: random.Random, tenant: str, start: float, count: int
) -> tuple[list[Event], list[Counted]]:
    """``count`` answered calls of ``tenant`` (route /chat, test-model-a) in the window from
    ``start``: their events, and the calls as counted."""
    events, counted = [], []
    for n in range(count):
        rid = f"{tenant}-{n}-{rng.getrandbits(32):08x}"
        ts = start + rng.uniform(0.5, 4.5)
        request = {
            "request_id": rid,
            "tenant_id": tenant,
            "route": "/chat",
            "model": "test-model-a",
            "timestamp": timestamp(ts),
            "prompt_tokens": rng.randrange(1, 1000),
        }
        response = {
            "request_id": rid,
            "timestamp": timestamp(ts + 0.5),
            "completion_tokens": rng.randrange(1, 300),
            "cache_read_tokens": 0,
            "reasoning_tokens": 0,
            "latency_ms": round(rng.uniform(10, 900), 3),
        }
        events += [Event(REQUESTS, request), Event(RESPONSES, response)]
        counted.append(Counted((tenant, "/chat", "test-model-a"), ts, response, request, late=False))
    return events, counted


def wait_for_rows(processor: Processor, dsn: str, expected: dict) -> None:
    """Until Postgres holds every ``expected`` row at its revision or later (90 s at most)."""

    def final() -> bool:
        rows = postgres_rows(dsn)
        return all(key in rows and rows[key]["revision"] >= row.revision for key, row in expected.items())

    wait_for(final, 90, "the rows", processor.check_alive)
