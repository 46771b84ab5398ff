"""Roll-ups kept as windows are written, and retention that deletes windows without changing
an hourly or daily answer: a year of one key's 1-minute windows written through the sink."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from starlette.testclient import TestClient

from api.query import create_app
from dataflows.sinks import RowsSink
from dataflows.windows import WindowRow
from schemas import retention
from schemas.config import Settings
from schemas.database import ensure_schema
from schemas.topics import ensure_topics
from tests.support.servers import serving
from tests.support.stacks import TEST_PARTITIONS, Broker, Postgres, empty_database
from tests.support.year_data import DAY, DAYS, MINUTE, Minute, made_year, today, window_row

logger = logging.getLogger(__name__)

SETTINGS = Settings(auth=False)  # RETENTION_DAYS 30, ROLLUP_RETENTION_DAYS 400


@dataclass
class Year:
    dsn: str
    minutes: list[Minute]


@pytest.fixture(scope="module")
def year(postgres_server: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Year]:
    """A database holding a year of one key's windows, written through the dataflow's sink a
    day (one batch) at a time."""
    dsn = empty_database(postgres_server)
    ensure_schema(dsn)
    minutes = made_year(2026)
    broker = Broker(tmp_path_factory.mktemp("broker")).start()
    try:
        ensure_topics(broker.address, TEST_PARTITIONS)
        sink = RowsSink(dsn, broker.address).build("rows", 0, 1)
        for first in range(0, len(minutes), 1440):
            sink.write_batch([window_row(minute) for minute in minutes[first : first + 1440]])
        sink.close()
    finally:
        broker.stop()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE")
    yield Year(dsn, minutes)


def expected_days(minutes: list[Minute]) -> dict[str, dict[str, Any]]:
    days: dict[str, dict[str, Any]] = defaultdict(lambda: defaultdict(int))
    for minute in minutes:
        day = days[rfc3339(minute.start.replace(hour=0, minute=0))]
        day["requests"] += len(minute.latencies)
        day["errors"] += minute.errors
        day["prompt_tokens"] += minute.prompt_tokens
        day["cost"] += minute.cost
        day.setdefault("latencies", []).extend(minute.latencies)
    return days


def rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def year_query(bucket: str = "1d") -> dict[str, Any]:
    return {
        "tenant_id": "acme",
        "bucket": bucket,
        "limit": 1000,
        "from": rfc3339(today() - DAYS * DAY),
        "to": rfc3339(today()),
    }


def nearest(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def test_the_first_year_long_daily_query_answers_from_parts_kept_as_windows_were_written(year: Year):
    with psycopg.connect(year.dsn) as conn:
        kept = dict(
            conn.execute("SELECT bucket_seconds, count(*) FROM llm_metrics_rollups GROUP BY 1").fetchall()
        )
    assert kept == {3600: DAYS * 24, 86400: DAYS}
    with TestClient(create_app(Settings(postgres_dsn=year.dsn, auth=False))) as client:
        response = client.get("/v1/metrics", params=year_query())
    assert response.status_code == 200, response.text
    rows = response.json()["metrics"]
    days = expected_days(year.minutes)
    assert [row["window_start"] for row in rows] == sorted(days, reverse=True)
    for row in rows:
        day = days[row["window_start"]]
        assert (row["requests"], row["errors"], row["prompt_tokens"]) == (
            day["requests"],
            day["errors"],
            day["prompt_tokens"],
        )
        assert row["estimated_cost_usd"] == pytest.approx(day["cost"], rel=1e-9)
        assert row["p50_latency_ms"] == pytest.approx(nearest(day["latencies"], 0.5), rel=0.03)


def test_eight_cold_year_long_daily_queries_at_once_all_answer(year: Year):
    async def ask_eight(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await asyncio.gather(*(client.get("/v1/metrics", params=year_query()) for _ in range(8)))

    with serving(create_app(Settings(postgres_dsn=year.dsn, auth=False)), "the query API") as url:
        answers = asyncio.run(ask_eight(url))
    assert [answer.status_code for answer in answers] == [200] * 8, [a.text for a in answers]
    assert len({answer.content for answer in answers}) == 1


def answers(dsn: str) -> dict[str, Any]:
    with TestClient(create_app(Settings(postgres_dsn=dsn, auth=False))) as client:
        found = {}
        for bucket in ("1d", "1h"):
            rows: list[Any] = []
            # Hours come 1,000 a page: pages end on day boundaries.
            end = today()
            while end > today() - DAYS * DAY:
                start = max(end - (40 if bucket == "1h" else 400) * DAY, today() - DAYS * DAY)
                params = year_query(bucket) | {"from": rfc3339(start), "to": rfc3339(end)}
                response = client.get("/v1/metrics", params=params)
                assert response.status_code == 200, response.text
                rows += response.json()["metrics"]
                end = start
            found[bucket] = rows
        first = (today() - DAYS * DAY).date()
        usage = client.get(
            "/v1/usage", params={"tenant_id": "acme", "from": str(first), "to": str(today().date())}
        )
        assert usage.status_code == 200, usage.text
        found["usage"] = usage.json()
    return found


def windows_left(dsn: str) -> tuple[int, datetime | None]:
    with psycopg.connect(dsn) as conn:
        found = conn.execute("SELECT count(*), min(window_start) FROM llm_metrics").fetchone()
    assert found is not None
    return found[0], found[1]


def test_retention_killed_mid_batch_then_run_again_leaves_every_hourly_and_daily_answer_as_it_was(
    year: Year, tmp_path: Path
):
    before = answers(year.dsn)
    assert len(before["1d"]) == DAYS and len(before["1h"]) == DAYS * 24
    calls = {day: figures["requests"] for day, figures in expected_days(year.minutes).items()}
    assert {f"{day['day']}T00:00:00Z": day["calls_counted"] for day in before["usage"]["days"]} == calls
    # A run killed at a moment the test does not choose: while sealing, moving the horizon
    # or deleting (it deletes 335 days of windows, 2,000 a transaction).
    seed = random.randrange(2**32)
    delay = random.Random(seed).uniform(0.2, 4.0)
    logger.warning("killing the retention run after %.2f s (seed %d)", delay, seed)
    log = tmp_path / "retention.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "schemas.retention"],
            env={**os.environ, "POSTGRES_DSN": year.dsn},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
    logger.warning("killed run: %s", log.read_text()[-500:] or "(no output)")
    if process.returncode == -signal.SIGKILL:
        assert answers(year.dsn) == before  # whatever it had done by then
    report = retention.run(year.dsn, SETTINGS)
    horizon = retention.horizon_for(datetime.now(UTC), 30)
    assert report.horizon == horizon and report.parts_sealed == 0
    count, oldest = windows_left(year.dsn)
    assert oldest == horizon
    assert count == sum(minute.start >= horizon for minute in year.minutes)
    assert answers(year.dsn) == before
    # A range that cuts a day whose windows are gone: refused, naming what to give instead.
    with TestClient(create_app(Settings(postgres_dsn=year.dsn, auth=False))) as client:
        params = year_query() | {"from": rfc3339(today() - 200 * DAY + 3 * MINUTE)}
        response = client.get("/v1/metrics", params=params)
    assert response.status_code == 400, response.text
    assert "from" in response.json()["detail"] and "boundary" in response.json()["detail"]
    again = retention.run(year.dsn, SETTINGS)
    assert (again.parts_sealed, again.windows_deleted, again.parts_deleted) == (0, 0, 0)


def test_parts_follow_every_revision_the_sink_writes(postgres_dsn: str, broker: Broker):
    """Windows of two keys over three hours, then some of them revised, some added, in
    shuffled batches: every kept part equals its windows merged as the test merges them."""
    rng = random.Random(7)
    start = today() - 3 * DAY + timedelta(minutes=rng.randrange(1440 - 180))
    written: dict[tuple[str, datetime], WindowRow] = {}
    emissions = []
    for route in ("/chat", "/search"):
        for minute in range(180):
            if rng.random() < 0.2:
                continue
            made = Minute(
                start + minute * MINUTE,
                tuple(rng.uniform(10, 900) for _ in range(rng.randint(1, 4))),
                0,
                rng.randint(1, 99),
                rng.randint(1, 1000) / 1000,
            )
            for revision in range(1, rng.choice((1, 1, 2, 3)) + 1):
                row = window_row(made)
                row.row.route, row.row.revision = route, revision
                row.row.requests += revision - 1  # a revision counts more calls
                emissions.append(row)
    rng.shuffle(emissions)  # a replay may bring an older revision after a newer one
    sink = RowsSink(postgres_dsn, broker.address).build("rows", 0, 1)
    for first in range(0, len(emissions), 37):
        sink.write_batch(emissions[first : first + 37])
    sink.close()
    for row in emissions:
        key = (row.row.route, row.row.window_start)
        if key not in written or written[key].row.revision < row.row.revision:
            written[key] = row
    expected: dict[tuple[str, int, datetime], list[int]] = defaultdict(lambda: [0, 0, 0])
    for (route, window_start), row in written.items():
        for seconds in (3600, 86400):
            part = expected[(route, seconds, retention.rollups.floor_to(window_start, seconds))]
            part[0] += 1
            part[1] += row.row.requests
            part[2] = max(part[2], row.row.revision)
    with psycopg.connect(postgres_dsn) as conn:
        kept = conn.execute(
            "SELECT route, bucket_seconds, bucket_start, windows, requests, revision FROM llm_metrics_rollups"
        ).fetchall()
    assert {
        (route, seconds, start): [windows, requests, revision]
        for route, seconds, start, windows, requests, revision in kept
    } == expected
