"""Query API latency over a day of windows for 1,000 keys (1,440,000 rows).

The keys are 100 tenants x 5 routes x 2 models, one row per key and minute, each
with a latency digest drawn from a few hundred distinct blobs. The digests are
loaded with COPY; Postgres then expands them into the rows itself
(INSERT ... SELECT over generate_series), which fills the table far faster
than shipping 1.4 million rows from Python.

Figures, through a uvicorn process of ``api.metrics:app`` on the same machine:
- ``limit=60`` for one key (the plain query): target p99 <= 100 ms;
- a 1-day ``bucket=1h`` roll-up for one tenant, per route and model
  (240 buckets, ``limit=1000``) and tenant-wide (``group_by=``, 24 buckets),
  each merging 14,400 windows' digests: target p99 <= 1 s.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
from fastdigest import TDigest

from deploy.stack import Postgres, free_port
from schemas.database import ensure_schema

TENANTS = 100
ROUTES = 5
MODELS = 2
MINUTES = 1440
DISTINCT_DIGESTS = 300
DAY = datetime(2026, 3, 1, tzinfo=UTC)

KEY_SAMPLES = 200
ROLLUP_SAMPLES = 30

FILL_SQL = """
INSERT INTO llm_metrics (
    tenant_id, route, model, window_start, window_end, requests, errors, timeouts,
    avg_latency_ms, p50_latency_ms, p95_latency_ms, p99_latency_ms,
    avg_time_to_first_token_ms, ttft_count, prompt_tokens, completion_tokens,
    cache_read_tokens, reasoning_tokens, avg_prompt_tokens, avg_completion_tokens,
    estimated_cost_usd, unpriced_requests, latency_digest, revision)
SELECT
    'tenant-' || t, '/route-' || r, 'model-' || m,
    %(day)s + make_interval(mins => minute), %(day)s + make_interval(mins => minute + 1),
    d.calls + 1, 1, 1,
    d.avg, d.p50, d.p95, d.p99,
    d.avg / 4, d.calls / 2, d.calls * 800, d.calls * 200,
    d.calls * 100, d.calls * 20, 800, 200,
    d.calls * 0.001, 0, d.blob, 1
FROM generate_series(1, %(tenants)s) AS t,
     generate_series(1, %(routes)s) AS r,
     generate_series(1, %(models)s) AS m,
     generate_series(0, %(minutes)s - 1) AS minute,
     LATERAL (SELECT * FROM bench_digests
              WHERE id = (t * 7919 + r * 104729 + m * 1299709 + minute * 31)
                         %% %(distinct)s) AS d
"""


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


def fill(dsn: str) -> None:
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
                "day": DAY,
                "tenants": TENANTS,
                "routes": ROUTES,
                "models": MODELS,
                "minutes": MINUTES,
                "distinct": DISTINCT_DIGESTS,
            },
        )
        conn.execute("DROP TABLE bench_digests")
        conn.execute("VACUUM ANALYZE llm_metrics")
        count = conn.execute("SELECT count(*) FROM llm_metrics").fetchone()[0]
    assert count == TENANTS * ROUTES * MODELS * MINUTES, count


def _serve(dsn: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "POSTGRES_DSN": dsn, "AUTH": "off"}
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.metrics:app",
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
    for _ in range(samples):
        query = params(rnd)
        started = time.perf_counter()
        response = client.get("/v1/metrics", params=query)
        seconds.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        assert response.json()["count"] == expect_rows, (query, response.json()["count"])
    seconds.sort()
    p50 = seconds[len(seconds) // 2]
    p99 = seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))]
    return f"p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms  ({samples} requests)"


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
            rows = TENANTS * ROUTES * MODELS * MINUTES
            print(f"fill: {rows:,} rows in {time.perf_counter() - started:.1f}s", flush=True)
            port = free_port()
            process = _serve(server.dsn, port, root / "metrics-api.log")
            day = {"from": DAY.isoformat(), "to": (DAY + timedelta(days=1)).isoformat()}
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                figures = {
                    "limit=60, one key (target p99 <= 100 ms)": _measure(
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
                    "limit=60, one tenant, all keys": _measure(
                        client, KEY_SAMPLES, lambda rnd: {"tenant_id": _tenant(rnd)}, 60
                    ),
                    "1 day bucket=1h per route+model, limit=1000 (target p99 <= 1 s)": _measure(
                        client,
                        ROLLUP_SAMPLES,
                        lambda rnd: {"tenant_id": _tenant(rnd), "bucket": "1h", "limit": "1000", **day},
                        24 * ROUTES * MODELS,
                    ),
                    "1 day bucket=1h tenant-wide, group_by= (target p99 <= 1 s)": _measure(
                        client,
                        ROLLUP_SAMPLES,
                        lambda rnd: {"tenant_id": _tenant(rnd), "bucket": "1h", "group_by": "", **day},
                        24,
                    ),
                }
            for name, figure in figures.items():
                print(f"{name:<66} {figure}", flush=True)
        finally:
            if process is not None:
                process.terminate()
                process.wait(10)
            server.stop()


if __name__ == "__main__":
    main()
