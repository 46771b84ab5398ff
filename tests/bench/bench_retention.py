"""Roll-ups kept as windows are written, and retention deleting under query load.

A year of one key's 1-minute windows (525,600) is written through the dataflow's
sink a day at a time (which keeps each hour and day as it writes), beside a day of
1,000 other keys filled in SQL. Through a uvicorn process of the query API:

- the first year-long ``bucket=1d`` query of a fresh process (target: 200 in ≤ 1 s),
  then 8 at once (target: all 200 within 2 s);
- the query API's latency under a steady mix (one key's ``limit=60``, a tenant's day
  ``bucket=1h``, the year ``bucket=1d``) for a while, then the same mix while
  ``python -m schemas.retention`` deletes 335 days of windows (target: p99 during
  ≤ 1.2 × p99 before, same run);
- whether every daily answer of the year is the same afterwards.

Printed beside them, the same run's reference: the sink's time per window when it keeps
no parts (as before), writing the same windows into another database.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
import time

import httpx
import psycopg

from dataflows.sinks import RowsSink
from dataflows.windows import WindowRow
from schemas import rollups
from schemas.database import ensure_schema
from tests.bench import bench_query
from tests.bench.stack import local_stack
from tests.support.ports import free_port
from tests.support.stacks import empty_database
from tests.support.year_data import DAY, DAYS, made_year, today, window_row

KEYS_DAY = today() - DAY
MIX_SECONDS = 20.0


def _year_params(bucket: str = "1d") -> dict[str, str]:
    return {
        "tenant_id": "acme",
        "bucket": bucket,
        "limit": "1000",
        "from": (today() - DAYS * DAY).isoformat(),
        "to": today().isoformat(),
    }


def _mix(rnd: random.Random) -> dict[str, str]:
    tenant = f"tenant-{rnd.randint(1, bench_query.TENANTS)}"
    choice = rnd.random()
    if choice < 0.6:
        return {"tenant_id": tenant, "route": "/route-1", "model": "model-1", "limit": "60"}
    if choice < 0.9:
        return {
            "tenant_id": tenant,
            "bucket": "1h",
            "limit": "1000",
            "from": KEYS_DAY.isoformat(),
            "to": (KEYS_DAY + DAY).isoformat(),
        }
    return _year_params()


def _load(base_url: str, running: threading.Event, seconds: list[float], statuses: list[int]) -> None:
    rnd = random.Random(3)
    with httpx.Client(base_url=base_url, timeout=30) as client:
        while running.is_set():
            started = time.perf_counter()
            response = client.get("/v1/metrics", params=_mix(rnd))
            seconds.append(time.perf_counter() - started)
            statuses.append(response.status_code)


def _p99(seconds: list[float]) -> float:
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _under_load(base_url: str, until: threading.Event | None) -> tuple[list[float], list[int]]:
    """Two clients asking the mix, for :data:`MIX_SECONDS` or until ``until`` is set."""
    seconds: list[float] = []
    statuses: list[int] = []
    running = threading.Event()
    running.set()
    clients = [threading.Thread(target=_load, args=(base_url, running, seconds, statuses)) for _ in range(2)]
    for client in clients:
        client.start()
    if until is None:
        time.sleep(MIX_SECONDS)
    else:
        until.wait()
    running.clear()
    for client in clients:
        client.join()
    return seconds, statuses


def _figures(name: str, seconds: list[float], statuses: list[int]) -> str:
    ordered = sorted(seconds)
    bad = len(statuses) - statuses.count(200)
    return (
        f"{name:<34} p50 {ordered[len(ordered) // 2] * 1000:6.1f} ms  p99 {_p99(seconds) * 1000:6.1f} ms"
        f"  ({len(seconds)} requests, {bad} not 200)"
    )


def _write(dsn: str, brokers: str, rows: list[WindowRow]) -> float:
    """Seconds to write ``rows`` through the dataflow's sink, a day a batch."""
    sink = RowsSink(dsn, brokers).build("rows", 0, 1)
    started = time.perf_counter()
    for first in range(0, len(rows), 1440):
        sink.write_batch(rows[first : first + 1440])
    sink.close()
    return time.perf_counter() - started


def main() -> None:
    os.environ.setdefault("STREAMLENS_PG_FAST", "1")
    with local_stack("bench_retention_") as (work, broker, postgres):
        dsn = postgres.dsn
        bench_query.fill(dsn, KEYS_DAY, year=False)
        rows = [window_row(minute) for minute in made_year(2026)]
        keeping = _write(dsn, broker.address, rows)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        # Reference, same run: the same sink keeping no parts (what it did before), into a
        # database of its own.
        reference = empty_database(postgres)
        ensure_schema(reference)
        keep = rollups.keep
        rollups.keep = lambda *_: 0
        try:
            plain = _write(reference, broker.address, rows)
        finally:
            rollups.keep = keep
        print(
            f"sink, a year of one key a day a batch: {keeping:.1f} s with parts kept"
            f" ({keeping / len(rows) * 1e6:.0f} µs a window); the same sink keeping none"
            f" {plain:.1f} s ({plain / len(rows) * 1e6:.0f} µs a window)",
            flush=True,
        )
        port = free_port()
        process = bench_query._serve(dsn, port, work / "metrics-api.log")
        base_url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=base_url, timeout=30) as client:
                started = time.perf_counter()
                first = client.get("/v1/metrics", params=_year_params())
                took = time.perf_counter() - started
                print(
                    f"first year-long bucket=1d query of a fresh process: {first.status_code} in"
                    f" {took * 1000:.0f} ms (target 200 in <= 1 s)",
                    flush=True,
                )
                before_answer = first.json()

            async def eight() -> list[tuple[int, float]]:
                async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:

                    async def one() -> tuple[int, float]:
                        started = time.perf_counter()
                        response = await client.get("/v1/metrics", params=_year_params())
                        return response.status_code, time.perf_counter() - started

                    return await asyncio.gather(*(one() for _ in range(8)))

            answers = asyncio.run(eight())
            print(
                f"8 at once: {[status for status, _ in answers]}, slowest"
                f" {max(seconds for _, seconds in answers) * 1000:.0f} ms (target all 200 within 2 s)",
                flush=True,
            )
            before = _under_load(base_url, None)
            print(_figures("query mix before retention", *before), flush=True)
            done = threading.Event()
            run_log = work / "retention.log"

            def retire() -> None:
                with run_log.open("wb") as out:
                    subprocess.run(
                        [sys.executable, "-m", "schemas.retention"],
                        env={**os.environ, "POSTGRES_DSN": dsn},
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        check=True,
                    )
                done.set()

            started = time.perf_counter()
            retiring = threading.Thread(target=retire)
            retiring.start()
            during = _under_load(base_url, done)
            retiring.join()
            print(_figures("query mix during retention", *during), flush=True)
            print(
                f"retention run: {time.perf_counter() - started:.1f} s;"
                f" {run_log.read_text().strip().splitlines()[-1]}",
                flush=True,
            )
            print(f"p99 during / before: {_p99(during[0]) / _p99(before[0]):.2f} (target <= 1.2)")
            with httpx.Client(base_url=base_url, timeout=30) as client:
                after = client.get("/v1/metrics", params=_year_params()).json()
            print(f"the year's daily answers after deletion identical to before: {after == before_answer}")
        finally:
            process.terminate()
            process.wait(10)
