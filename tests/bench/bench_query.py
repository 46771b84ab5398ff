"""Query API latency over a day of windows for 1,000 keys (1,440,000 rows).

The keys are 100 tenants x 5 routes x 2 models, one row per key and minute, each
with a latency digest drawn from a few hundred distinct blobs. The digests are
loaded with COPY; Postgres then expands them into the rows itself
(INSERT ... SELECT over generate_series), which fills the table far faster
than shipping 1.4 million rows from Python.

Figures, through a uvicorn process of ``api.query:app`` on the same machine:
- ``limit=60`` for one key (the plain query): target p99 <= 100 ms;
- a 1-day ``bucket=1h`` roll-up for one tenant, per route and model
  (240 buckets, ``limit=1000``) and tenant-wide (``group_by=``, 24 buckets),
  each merging 14,400 windows' digests: target p99 <= 1 s;
- the worst query: a year of 1-minute windows for one key (525,600 windows, each
  with a digest) rolled up with ``bucket=1d`` (365 buckets) and ``bucket=1h``
  (the newest 1,000 buckets): every request within ~2 s. Printed: the requests
  it takes from an empty roll-up cache, then p50/p99 once cached, then eight at
  once beside a stream of cheap ``limit=60`` requests (which must keep being
  answered).
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
from fastdigest import TDigest, merge_all

from schemas.database import ensure_schema
from tests.support.ports import free_port
from tests.support.stacks import Postgres

TENANTS = 100
ROUTES = 5
MODELS = 2
MINUTES = 1440
DISTINCT_DIGESTS = 300
DAY = datetime(2026, 3, 1, tzinfo=UTC)

KEY_SAMPLES = 200
ROLLUP_SAMPLES = 30
YEAR_SAMPLES = 20
YEAR_TENANT = "tenant-year"
YEAR_START = datetime(2025, 6, 1, tzinfo=UTC)
YEAR_MINUTES = 365 * 1440
CONCURRENT = 8


def _fill_sql(key_and_window: str, source: str) -> str:
    """An INSERT of whole rows: ``key_and_window`` gives the key and window columns,
    the rest come from the bench_digests row ``d`` that ``source`` joins in."""
    return f"""
INSERT INTO llm_metrics (
    tenant_id, route, model, window_start, window_end, requests, errors, timeouts,
    avg_latency_ms, p50_latency_ms, p95_latency_ms, p99_latency_ms,
    avg_time_to_first_token_ms, ttft_count, prompt_tokens, completion_tokens,
    cache_read_tokens, reasoning_tokens, avg_prompt_tokens, avg_completion_tokens,
    estimated_cost_usd, unpriced_requests, latency_digest, revision)
SELECT{key_and_window}
    d.calls + 1, 1, 1,
    d.avg, d.p50, d.p95, d.p99,
    d.avg / 4, d.calls / 2, d.calls * 800, d.calls * 200,
    d.calls * 100, d.calls * 20, 800, 200,
    d.calls * 0.001, 0, d.blob, 1
{source}
"""


FILL_SQL = _fill_sql(
    """
    'tenant-' || t, '/route-' || r, 'model-' || m,
    %(day)s + make_interval(mins => minute), %(day)s + make_interval(mins => minute + 1),""",
    """\
FROM generate_series(1, %(tenants)s) AS t,
     generate_series(1, %(routes)s) AS r,
     generate_series(1, %(models)s) AS m,
     generate_series(0, %(minutes)s - 1) AS minute,
     LATERAL (SELECT * FROM bench_digests
              WHERE id = (t * 7919 + r * 104729 + m * 1299709 + minute * 31)
                         %% %(distinct)s) AS d""",
)

# A year of one key's windows, digests drawn from the same blobs.
YEAR_FILL_SQL = _fill_sql(
    """
    %(tenant)s, '/route-1', 'model-1',
    %(start)s + make_interval(mins => minute), %(start)s + make_interval(mins => minute + 1),""",
    """\
FROM generate_series(0, %(minutes)s - 1) AS minute,
     LATERAL (SELECT * FROM bench_digests WHERE id = (minute * 31) %% %(distinct)s) AS d""",
)


def _digests(rnd: random.Random) -> list[tuple[int, int, float, float, float, float, bytes]]:
    made = []
    for number in range(DISTINCT_DIGESTS):
        latencies = [rnd.lognormvariate(6.3, 0.6) for _ in range(rnd.randint(5, 60))]
        digest = TDigest.from_values(latencies)
        made.append(
            (
                number,
                len(latencies),
                statistics.fmean(latencies),
                digest.quantile(0.5),
                digest.quantile(0.95),
                digest.quantile(0.99),
                digest.to_bytes(),
            )
        )
    return made


def fill(dsn: str, day: datetime = DAY, year: bool = True) -> None:
    """A day of 1,000 keys from ``day``, and (``year``) a year of one key, filled in SQL."""
    ensure_schema(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE bench_digests (id int PRIMARY KEY, calls int, avg float8,"
            " p50 float8, p95 float8, p99 float8, blob bytea)"
        )
        with conn.cursor().copy("COPY bench_digests FROM STDIN") as copy:
            for row in _digests(random.Random(1)):
                copy.write_row(row)
        conn.execute(
            FILL_SQL,
            {
                "day": day,
                "tenants": TENANTS,
                "routes": ROUTES,
                "models": MODELS,
                "minutes": MINUTES,
                "distinct": DISTINCT_DIGESTS,
            },
        )
        if year:
            conn.execute(
                YEAR_FILL_SQL,
                {
                    "tenant": YEAR_TENANT,
                    "start": YEAR_START,
                    "minutes": YEAR_MINUTES,
                    "distinct": DISTINCT_DIGESTS,
                },
            )
        conn.execute("DROP TABLE bench_digests")
        conn.execute("VACUUM ANALYZE llm_metrics")
        count = conn.execute("SELECT count(*) FROM llm_metrics").fetchone()[0]
    assert count == TENANTS * ROUTES * MODELS * MINUTES + (YEAR_MINUTES if year else 0), count


def _serve(dsn: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "POSTGRES_DSN": dsn, "AUTH": "off"}
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.query:app",
                "--port",
                str(port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.terminate()
    raise RuntimeError(f"the query API did not become ready:\n{log.read_text()[-2000:]}")


def _measure(
    client: httpx.Client, samples: int, params: Callable[[random.Random], dict[str, str]], expect_rows: int
) -> str:
    rnd = random.Random(2)
    client.get("/v1/metrics", params=params(rnd))  # warm the connection and the cache
    seconds = []
    refused = 0
    for _ in range(samples):
        query = params(rnd)
        started = time.perf_counter()
        response = client.get("/v1/metrics", params=query)
        seconds.append(time.perf_counter() - started)
        if response.status_code == 503 and response.json()["error"] == "deadline_exceeded":
            refused += 1
            continue
        assert response.status_code == 200, response.text
        assert response.json()["count"] == expect_rows, (query, response.json()["count"])
    return _percentiles(seconds) + (f", {refused} answered 503 deadline_exceeded" if refused else "")


def _percentiles(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms  ({len(ordered)} requests)"


def _year(bucket: str) -> dict[str, str]:
    end = YEAR_START + timedelta(minutes=YEAR_MINUTES)
    return {
        "tenant_id": YEAR_TENANT,
        "bucket": bucket,
        "limit": "1000",
        "from": YEAR_START.isoformat(),
        "to": end.isoformat(),
    }


def _until_answered(client: httpx.Client, params: dict[str, str], expect_rows: int) -> str:
    """From an empty roll-up cache: every attempt until a 200, each timed."""
    attempts: list[str] = []
    for _ in range(60):
        started = time.perf_counter()
        response = client.get("/v1/metrics", params=params)
        attempts.append(f"{response.status_code} in {(time.perf_counter() - started) * 1000:.0f} ms")
        if response.status_code == 200:
            assert response.json()["count"] == expect_rows, response.json()["count"]
            return ", ".join(attempts)
        assert response.status_code == 503, response.text
    raise AssertionError(f"never answered: {attempts}")


def _timed(client: httpx.Client, params: dict[str, str]) -> tuple[float, int]:
    started = time.perf_counter()
    response = client.get("/v1/metrics", params=params)
    return time.perf_counter() - started, response.status_code


def _concurrent(base_url: str, params: dict[str, str]) -> str:
    """Eight year roll-ups at once while one client keeps asking a cheap query."""
    cheap = {"tenant_id": "tenant-1", "route": "/route-1", "model": "model-1", "limit": "60"}
    heavy: list[tuple[float, int]] = []
    cheap_seconds: list[float] = []
    cheap_statuses: list[int] = []
    running = threading.Event()
    running.set()

    def one_heavy() -> None:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            heavy.append(_timed(client, params))

    def cheap_loop() -> None:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            while running.is_set():
                seconds, status = _timed(client, cheap)
                cheap_seconds.append(seconds)
                cheap_statuses.append(status)

    threads = [threading.Thread(target=one_heavy) for _ in range(CONCURRENT)]
    watcher = threading.Thread(target=cheap_loop)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    running.clear()
    watcher.join()
    statuses = ", ".join(
        f"{sum(status == each for _, status in heavy)} x {each}" for each in sorted({s for _, s in heavy})
    )
    slowest = max(seconds for seconds, _ in heavy)
    cheap_ok = sum(status == 200 for status in cheap_statuses)
    return (
        f"slowest of {CONCURRENT} {slowest * 1000:7.1f} ms ({statuses}); "
        f"cheap alongside: {cheap_ok}/{len(cheap_statuses)} answered 200, {_percentiles(cheap_seconds)}"
    )


def _merge_every_window(dsn: str) -> str:
    """Same-run baseline: the year's window digests read and merged per day in one go,
    the work a ``bucket=1d`` roll-up did on every request before parts were kept."""
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        cursor = conn.execute(
            "SELECT date_bin('1 day', window_start, timestamptz 'epoch'), latency_digest FROM llm_metrics"
            " WHERE tenant_id = %s ORDER BY window_start",
            (YEAR_TENANT,),
            binary=True,
        )
        days: dict[datetime, list[TDigest]] = {}
        for day, blob in cursor:
            days.setdefault(day, []).append(TDigest.from_bytes(blob))
    merged = [merge_all(digests) for digests in days.values()]
    assert len(merged) == 365
    return f"{(time.perf_counter() - started) * 1000:7.1f} ms for 525,600 digests"


def _tenant(rnd: random.Random) -> str:
    return f"tenant-{rnd.randint(1, TENANTS)}"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench_query_") as directory:
        root = Path(directory)
        os.environ.setdefault("STREAMLENS_PG_FAST", "1")
        server = Postgres(root / "postgres").start()
        process = None
        try:
            started = time.perf_counter()
            fill(server.dsn)
            rows = TENANTS * ROUTES * MODELS * MINUTES + YEAR_MINUTES
            print(f"fill: {rows:,} rows in {time.perf_counter() - started:.1f}s", flush=True)
            port = free_port()
            process = _serve(server.dsn, port, root / "metrics-api.log")
            day = {"from": DAY.isoformat(), "to": (DAY + timedelta(days=1)).isoformat()}
            base_url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base_url, timeout=60) as client:
                figures: list[tuple[str, Callable[[], str]]] = [
                    (
                        "limit=60, one key (target p99 <= 100 ms)",
                        lambda: _measure(
                            client,
                            KEY_SAMPLES,
                            lambda rnd: {
                                "tenant_id": _tenant(rnd),
                                "route": f"/route-{rnd.randint(1, ROUTES)}",
                                "model": f"model-{rnd.randint(1, MODELS)}",
                                "limit": "60",
                            },
                            60,
                        ),
                    ),
                    (
                        "limit=60, one tenant, all keys",
                        lambda: _measure(client, KEY_SAMPLES, lambda rnd: {"tenant_id": _tenant(rnd)}, 60),
                    ),
                    (
                        "1 day bucket=1h per route+model, limit=1000 (target p99 <= 1 s)",
                        lambda: _measure(
                            client,
                            ROLLUP_SAMPLES,
                            lambda rnd: {"tenant_id": _tenant(rnd), "bucket": "1h", "limit": "1000", **day},
                            24 * ROUTES * MODELS,
                        ),
                    ),
                    (
                        "1 day bucket=1h tenant-wide, group_by= (target p99 <= 1 s)",
                        lambda: _measure(
                            client,
                            ROLLUP_SAMPLES,
                            lambda rnd: {"tenant_id": _tenant(rnd), "bucket": "1h", "group_by": "", **day},
                            24,
                        ),
                    ),
                    (
                        "baseline: a year of one key merged from every window digest",
                        lambda: _merge_every_window(server.dsn),
                    ),
                    (
                        "a year of one key, bucket=1d, from empty cache",
                        lambda: _until_answered(client, _year("1d"), 365),
                    ),
                    (
                        "a year of one key, bucket=1h, from empty cache",
                        lambda: _until_answered(client, _year("1h"), 1000),
                    ),
                    (
                        "a year of one key, bucket=1d (target every request <= 2 s)",
                        lambda: _measure(client, YEAR_SAMPLES, lambda rnd: _year("1d"), 365),
                    ),
                    (
                        "a year of one key, bucket=1h, limit=1000",
                        lambda: _measure(client, YEAR_SAMPLES, lambda rnd: _year("1h"), 1000),
                    ),
                    (f"{CONCURRENT} x a year bucket=1d at once", lambda: _concurrent(base_url, _year("1d"))),
                ]
                # Printed as each is measured: the later ones take a while.
                for name, measure in figures:
                    print(f"{name:<66} {measure()}", flush=True)
        finally:
            if process is not None:
                process.terminate()
                process.wait(10)
            server.stop()


if __name__ == "__main__":
    main()
