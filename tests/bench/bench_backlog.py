"""A backlog read unevenly: how many provisional timeouts and rows it produces.

A broker and a Postgres of its own; ``llm.requests`` is filled entirely with a
time-ordered backlog (40,000 calls over 20 minutes of event time, 5 keys), then
``llm.responses``; the processor starts cold on it (10 s windows, 2 s grace, 5 s
join timeout). Every call is answered, so every timeout a row reports was
provisional (event time ran ahead of an unread response), and every row beyond
one per window was a re-emission caused by a window closing before all its calls
were read. The baseline, in the same run, reads the same backlog with partitions
not held in step (``READ_AHEAD_SECONDS`` far beyond the span). Both runs must end
with exact rows.
"""

from __future__ import annotations

import json
import time

from tests.bench.stack import local_stack
from tests.support import dataflow as h

CALLS = 40_000
SPAN = 1200.0
WINDOW = 10
SETTINGS = {
    "WINDOW_SECONDS": str(WINDOW),
    "GRACE_SECONDS": "2",
    "JOIN_TIMEOUT_SECONDS": "5",
    "LATENESS_SECONDS": "1500",
}


def _backlog() -> tuple[list[h.Event], list[h.Event], list[h.Counted]]:
    requests, responses, counted = [], [], []
    for n in range(CALLS):
        ts = h.BASE + n * SPAN / CALLS
        key = h.NORMAL_KEYS[n % len(h.NORMAL_KEYS)]
        request = {
            "request_id": f"backlog-{n}",
            "tenant_id": key[0],
            "route": key[1],
            "model": key[2],
            "timestamp": h.timestamp(ts),
            "prompt_tokens": 10,
        }
        response = {
            "request_id": f"backlog-{n}",
            "timestamp": h.timestamp(ts + 1),
            "completion_tokens": 5,
            "cache_read_tokens": 0,
            "reasoning_tokens": 0,
            "latency_ms": 100.0,
        }
        requests.append(h.Event(h.REQUESTS, request))
        responses.append(h.Event(h.RESPONSES, response))
        counted.append(h.Counted(key, ts, response, request, late=False))
    return requests, responses, counted


def _once(read_ahead: str | None) -> tuple[int, int, int, float]:
    """(rows emitted, provisional timeouts they reported, windows, seconds to exact rows)."""
    with local_stack("streamlens-bench-backlog-") as (work, broker, postgres):
        requests, responses, counted = _backlog()
        h.produce(broker.address, requests)
        h.produce(broker.address, responses)
        expected = h.expected_rows_of(counted, WINDOW)
        settings = dict(SETTINGS)
        if read_ahead is not None:
            settings["READ_AHEAD_SECONDS"] = read_ahead
        processor = h.Processor(
            broker.address,
            postgres.dsn,
            work / "recovery",
            h.write_prices(work / "prices.json"),
            work / "dataflow.log",
            settings=settings,
        ).start()
        started = time.monotonic()
        try:
            h.wait_for(
                lambda: all(
                    key in rows and rows[key]["revision"] >= row.revision
                    for rows in [h.postgres_rows(postgres.dsn)]
                    for key, row in expected.items()
                ),
                600,
                "the final rows",
                processor.check_alive,
            )
            elapsed = time.monotonic() - started
        finally:
            processor.stop()
        h.check_rows(h.postgres_rows(postgres.dsn), expected)
        records = [json.loads(value) for _, value, _, _ in h.records_on(broker.address, h.METRICS)]
        return len(records), sum(r["timeouts"] for r in records), len(expected), elapsed


def main() -> None:
    rows, timeouts, windows, seconds = _once(None)
    base_rows, base_timeouts, _, base_seconds = _once(str(SPAN * 10))
    print(
        f"{CALLS:,} calls over {SPAN:.0f} s of event time, requests topic filled before the "
        f"responses topic, {windows} windows; exact rows in both runs"
    )
    print(
        f"partitions read in step: {rows:,} rows emitted, {timeouts:,} provisional timeouts, {seconds:.1f} s"
    )
    print(
        f"baseline, not in step (same run): {base_rows:,} rows emitted, {base_timeouts:,} "
        f"provisional timeouts, {base_seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
