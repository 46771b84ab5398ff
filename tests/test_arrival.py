"""Arrival order, lateness and backlogs do not change the rows (real broker, Postgres, dataflow).

Three tenants get the same calls (the same timestamps, tokens and latencies),
in sorted, reversed and shuffled order, over two minutes of event time with a
join timeout of 5 s, far shorter than the disorder.

1. Backlog: the requests topic is filled entirely before the responses topic,
   and the processor starts cold on it.
2. Live: three more tenants get the same calls again while the processor runs,
   in small chunks, each tenant's requests and responses together in its order.
   Event time is then far past their windows and their requests' timeouts: a
   request times out as soon as it is read unless its response comes in the same
   batch, the response then turns that timeout into the answered call, and every
   call reaches a window already emitted.

Each tenant's rows must equal the same independent computation.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tests.support import dataflow as h
from tests.support.stacks import Broker

pytestmark = pytest.mark.slow

WINDOW = 10
SETTINGS = {
    "WINDOW_SECONDS": str(WINDOW),
    "GRACE_SECONDS": "2",
    "JOIN_TIMEOUT_SECONDS": "5",
    "LATENESS_SECONDS": "600",
}
SPAN = 120.0
ORDERS = {"sorted-co": "sorted", "reversed-co": "reversed", "shuffled-co": "shuffled"}


def _template(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """One tenant's calls, without tenant or ids: what the three tenants share."""
    calls = []
    for n in range(count):
        ts = h.BASE + rng.uniform(0, SPAN)
        call: dict[str, Any] = {
            "n": n,
            "route": rng.choice(["/chat", "/search"]),
            "model": "test-model-a",
            "ts": ts,
            "prompt_tokens": rng.randrange(0, 2000),
        }
        if n % 25 != 0:  # the others never get an answer: timeouts
            call["response_ts"] = ts + rng.uniform(0.1, 4.5)
            call["completion_tokens"] = rng.randrange(0, 500)
            call["latency_ms"] = round(rng.uniform(10, 4000), 3)
            call["error"] = "boom" if n % 17 == 0 else None
        calls.append(call)
    return calls


def _events(tenant: str, calls: list[dict[str, Any]]) -> tuple[list[h.Event], list[h.Event], list[h.Counted]]:
    requests, responses, counted = [], [], []
    for call in calls:
        rid = f"{tenant}-{call['n']:05d}"
        request = {
            "request_id": rid,
            "tenant_id": tenant,
            "route": call["route"],
            "model": call["model"],
            "timestamp": h.timestamp(call["ts"]),
            "prompt_tokens": call["prompt_tokens"],
        }
        requests.append(h.Event(h.REQUESTS, request))
        response = None
        if "response_ts" in call:
            response = {
                "request_id": rid,
                "timestamp": h.timestamp(call["response_ts"]),
                "completion_tokens": call["completion_tokens"],
                "cache_read_tokens": 0,
                "reasoning_tokens": 0,
                "latency_ms": call["latency_ms"],
                "error": call["error"],
            }
            responses.append(h.Event(h.RESPONSES, response))
        counted.append(
            h.Counted((tenant, call["route"], call["model"]), call["ts"], response, request, late=False)
        )
    return requests, responses, counted


def _ordered(events: list[h.Event], order: str, rng: random.Random) -> list[h.Event]:
    def ts(event: h.Event) -> str:
        assert event.record is not None
        return event.record["timestamp"]

    if order == "sorted":
        return sorted(events, key=ts)
    if order == "reversed":
        return sorted(events, key=ts, reverse=True)
    return rng.sample(events, len(events))


def test_any_order_and_a_backlog_give_the_same_exact_rows(
    tmp_path: Path, broker: Broker, postgres_dsn: str
) -> None:
    rng = random.Random(20261201)
    template = _template(rng, 600)
    expected_counted: list[h.Counted] = []

    def streams(suffix: str) -> list[tuple[list[h.Event], list[h.Event], list[h.Event]]]:
        out = []
        for tenant, order in ORDERS.items():
            requests, responses, calls = _events(tenant + suffix, template)
            expected_counted.extend(calls)
            out.append(
                (
                    _ordered(requests, order, rng),
                    _ordered(responses, order, rng),
                    _ordered(requests + responses, order, rng),
                )
            )
        return out

    backlog = streams("")
    # Interleaved tenant by tenant, so each tenant's events keep their own order.
    for side in (0, 1):
        h.produce(broker.address, _interleave([s[side] for s in backlog]))
    processor = h.Processor.in_directory(
        broker.address,
        postgres_dsn,
        tmp_path,
        settings=SETTINGS,
    ).start()
    try:
        backlog_expected = h.expected_rows_of(expected_counted, WINDOW)
        _wait_final(postgres_dsn, backlog_expected, processor)
        backlog_emissions = len(h.records_on(broker.address, h.METRICS))
        live = _interleave([s[2] for s in streams("-live")])
        for first in range(0, len(live), 60):
            h.produce(broker.address, live[first : first + 60])
        expected = h.expected_rows_of(expected_counted, WINDOW)
        _wait_final(postgres_dsn, expected, processor)
    finally:
        processor.stop()
    rows = h.postgres_rows(postgres_dsn)
    h.check_rows(rows, expected)
    h.check_rows(h.latest_metrics(broker.address), expected)
    # The same calls, whatever their order: the rows differ only in the tenant.
    by_tenant = {
        tenant: {
            key[1:]: {k: v for k, v in row.items() if k not in ("tenant_id", "updated_at")}
            for key, row in rows.items()
            if key[0] == tenant
        }
        for tenant in {key[0] for key in rows}
    }
    first, *others = by_tenant.values()
    assert len(others) == 5 and all(other == first for other in others)
    # Nothing was dead-lettered: no call was too late, no response an orphan.
    assert h.dead_letters(broker.address) == []
    live_emissions = len(h.records_on(broker.address, h.METRICS)) - backlog_emissions
    windows = len(backlog_expected)
    print(
        f"backlog: {backlog_emissions} emissions for {windows} windows; "
        f"live, late and out of order: {live_emissions} for {len(expected) - windows}"
    )
    assert live_emissions > len(expected) - windows, "the live calls never updated an emitted row"


def _wait_final(dsn: str, expected: dict, processor: h.Processor) -> None:
    def final() -> bool:
        rows = h.postgres_rows(dsn)
        return all(key in rows and rows[key]["revision"] >= row.revision for key, row in expected.items())

    h.wait_for(final, 120, "the final rows", processor.check_alive)


def _interleave(streams: list[list[h.Event]]) -> list[h.Event]:
    """Round robin over the streams."""
    longest = max(len(stream) for stream in streams)
    return [stream[i] for i in range(longest) for stream in streams if i < len(stream)]
