"""Retention of dimension rows: hours of windows replaced by hour rows, every hourly and daily
answer of a dimension the same before and after, and right against the raw calls."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from starlette.testclient import TestClient

from api.query import create_app
from schemas.config import Settings
from schemas.dimension_retention import retire_dimensions
from schemas.rollups import NO_HORIZON
from schemas.tenant_settings import set_dimensions
from tests.support import dimension_store as store
from tests.support.expected import bucket_start, check_bucket
from tests.support.metric_windows import Window, random_calls, rfc3339

logger = logging.getLogger(__name__)

COUNTRY = "metadata.country"
COUNTRIES: tuple[str | None, ...] = (None, "de", "DE", "Ω")
ROUTES = ("/chat", "/search")
START = datetime.fromisoformat("2026-02-27T00:00:00+00:00")
HORIZON = START + timedelta(days=2)


def made_windows(seed: int) -> list[Window]:
    """Three days of two routes' windows, every 7 to 23 minutes (some hours hold one window),
    each sliced by country."""
    rnd = random.Random(seed)
    rows: list[Window] = []
    for route in ROUTES:
        at = START
        while at < START + timedelta(days=3):
            window = Window(
                "acme", route, "gpt-4o", at, random_calls(rnd, rnd.randint(1, 12)), revision=rnd.randint(1, 3)
            )
            rows += store.split_by(window, COUNTRY, COUNTRIES, rnd)
            at += timedelta(minutes=rnd.choice((7, 13, 23, 61)))
    return rows


@pytest.fixture
def stored(postgres_dsn: str) -> tuple[str, list[Window]]:
    rows = made_windows(11)
    store.insert_dimension_rows(postgres_dsn, [row.column_values() for row in rows])
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        set_dimensions(conn, "acme", (COUNTRY,), 60)
        conn.execute("UPDATE retention_horizon SET windows_before = %s", (HORIZON,))
    return postgres_dsn, rows


QUERIES = [
    {"bucket": bucket, "group_by": group_by} for bucket in ("1h", "1d") for group_by in ("route,model", "")
] + [{"bucket": "1d", "value": "de"}, {"bucket": "1h", "value": ""}, {"bucket": "1h", "route": "/chat"}]


def answers(dsn: str) -> list[Any]:
    found = []
    with TestClient(create_app(Settings(postgres_dsn=dsn, auth=False))) as client:
        for query in QUERIES:
            params = {"tenant_id": "acme", "dimension": COUNTRY, "limit": 1000} | query
            response = client.get("/v1/metrics", params=params)
            assert response.status_code == 200, response.text
            found.append(response.json()["metrics"])
    return found


def stored_rows(dsn: str) -> list[tuple[datetime, datetime]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT window_start, window_end FROM llm_dimension_windows").fetchall()


def test_hourly_and_daily_answers_of_a_dimension_are_the_same_after_its_hours_are_retired(stored):
    dsn, rows = stored
    before = answers(dsn)
    # Right against the raw calls, grouped here.
    groups: dict[tuple, list[Window]] = defaultdict(list)
    for row in rows:
        key = (rfc3339(bucket_start(row.start, 86400)), row.route, row.extra["value"])
        groups[key].append(row)
    daily = before[2]
    assert len(daily) == len(groups)
    for row in daily:
        check_bucket(row, groups[(row["window_start"], row["route"], row["value"])])
    with psycopg.connect(dsn, autocommit=True) as conn:
        replaced = retire_dimensions(conn, NO_HORIZON, HORIZON, lambda: None)
    assert replaced == sum(1 for row in {(w.route, w.start) for w in rows if w.start < HORIZON})
    left = stored_rows(dsn)
    assert all(end - start == timedelta(hours=1) for start, end in left if start < HORIZON)
    assert sum(start >= HORIZON for start, _ in left) == len(
        {(w.route, w.start) for w in rows if w.start >= HORIZON}
    )
    assert answers(dsn) == before
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert retire_dimensions(conn, NO_HORIZON, HORIZON, lambda: None) == 0
    # Short buckets and plain rows read the windows only: those before the horizon are gone.
    with TestClient(create_app(Settings(postgres_dsn=dsn, auth=False))) as client:
        params = {"tenant_id": "acme", "dimension": COUNTRY, "limit": 1000}
        for extra in ({}, {"bucket": "5m"}):
            got = client.get("/v1/metrics", params=params | extra).json()["metrics"]
            assert got and min(row["window_start"] for row in got) >= rfc3339(HORIZON)
        cut = client.get(
            "/v1/metrics", params=params | {"bucket": "1d", "from": rfc3339(START + timedelta(hours=5))}
        )
    assert cut.status_code == 400 and "from" in cut.json()["detail"]


def test_retiring_killed_at_a_random_moment_then_run_again_changes_no_answer(stored, tmp_path):
    dsn, _ = stored
    before = answers(dsn)
    seed = random.randrange(2**32)
    delay = random.Random(seed).uniform(0.3, 1.5)
    logger.warning("killing the dimension retirement after %.2f s (seed %d)", delay, seed)
    code = (
        "import sys, psycopg; from datetime import datetime; import schemas.dimension_retention as r;"
        "r.HOURS_PER_BATCH = 2; conn = psycopg.connect(sys.argv[1], autocommit=True);"
        "print(r.retire_dimensions(conn, r.rollups.NO_HORIZON, datetime.fromisoformat(sys.argv[2]),"
        " lambda: None), flush=True)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, dsn, HORIZON.isoformat()],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )
    try:
        output, _ = process.communicate(timeout=delay)
        logger.warning("it finished first: %s", output.decode()[-300:])
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.communicate()
        logger.warning("killed")
        assert answers(dsn) == before
    with psycopg.connect(dsn, autocommit=True) as conn:
        retire_dimensions(conn, NO_HORIZON, HORIZON, lambda: None)
    assert all(end - start == timedelta(hours=1) for start, end in stored_rows(dsn) if start < HORIZON)
    assert answers(dsn) == before
