"""Ingestion API throughput: one uvicorn process against a local broker, loaded over loopback.

Figures: single events at concurrency 64 (events/s, p50/p99 latency) and batches
of 1,000 events (events/s), with ``GET /health`` as the same-run baseline of what
the HTTP stack alone does on this machine; all of it with API keys off, then on
(a real key in a real Postgres), then with a quota as well (above what the server
takes, so each event is taken from the shared bucket and none refused), and the ratios.
Each server is loaded with single events from the moment ``/ready`` first answers 200: the first
``COLD_SECONDS`` are the cold start's figures. Targets (2 cores, one server
process): ≥ 5,000 single events/s with p99 ≤ 50 ms; ≥ 100,000 events/s in
batches; auth on within 10 % of auth off; p99 ≤ 100 ms over the first 5 s.
Each phase also reports the server's CPU time per event (all its threads), a
figure that moves far less than throughput when other work shares the machine.

The load comes from ``wrk`` with a Lua script when it is installed, else from a
small asyncio client speaking raw HTTP/1.1 over keep-alive connections.

Environment: ``BENCH_SECONDS`` (default 10) per phase.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import psycopg

from api.keys import create_key
from api.quotas import set_quota
from schemas.quotas import Limits
from tests.bench.stack import local_stack
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
CONCURRENCY = 64
BATCH_EVENTS = 1000
BATCH_CONCURRENCY = 8
# The cold start: load from the first /ready 200 on, for this long.
COLD_SECONDS = 5


@dataclass
class Figures:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    failures: int  # answers other than 2xx, and transport errors
    requests: int
    server_cpu_seconds: float = 0.0  # filled in by _phases


def _request_event(request_id: str) -> dict[str, object]:
    return {
        "request_id": request_id,
        "tenant_id": "bench",
        "route": "/chat",
        "model": "gpt-4o-mini",
        "timestamp": "2026-03-01T12:00:00.123+01:00",
        "prompt_tokens": 812,
        "provider": "openai",
        "metadata": {"team": "search", "attempt": 1},
    }


def _batch_body() -> bytes:
    events = []
    for i in range(BATCH_EVENTS // 2):
        events.append({"type": "request", **_request_event(f"batch-{i}")})
        events.append(
            {
                "type": "response",
                "request_id": f"batch-{i}",
                "timestamp": "2026-03-01T12:00:01.456+01:00",
                "completion_tokens": 230,
                "reasoning_tokens": 12,
                "finish_reason": "stop",
                "error": None,
            }
        )
    return json.dumps({"events": events}).encode()


def _headers(key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


# -- wrk ---------------------------------------------------------------------------

_WRK_SINGLE = """
local counter = 0
local thread_id = 0
function setup(thread) thread:set("id", thread_id); thread_id = thread_id + 1 end
function request()
  counter = counter + 1
  local body = string.format(%s, id, counter)
  return wrk.format("POST", "/v1/llm/request", headers, body)
end
"""

_WRK_BODY = """
function request() return wrk.format("POST", %s, headers, body) end
"""


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def _lua_headers(key: str | None) -> str:
    pairs = ", ".join(f'["{k}"] = "{v}"' for k, v in _headers(key).items())
    return f"headers = {{{pairs}}}\n"


def _run_wrk(url: str, script: str, seconds: int, connections: int, workdir: Path) -> Figures:
    path = workdir / f"load-{time.monotonic_ns()}.lua"
    path.write_text(script)
    output = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(path),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def latency(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        assert match, output
        value, unit = float(match.group(1)), match.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    assert rate, output
    failures = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: (.*)"):
        match = re.search(pattern, output)
        if match:
            failures += sum(int(n) for n in re.findall(r"\d+", match.group(1)))
    done = re.search(r"(\d+) requests in", output)
    assert done, output
    return Figures(float(rate.group(1)), latency("50"), latency("99"), failures, int(done.group(1)))


def _wrk_single(url: str, seconds: int, workdir: Path, key: str | None) -> Figures:
    template = json.dumps(_request_event("REQUEST_ID")).replace("REQUEST_ID", "w%d-%d")
    script = _lua_headers(key) + _WRK_SINGLE % _lua_string(template)
    return _run_wrk(url, script, seconds, CONCURRENCY, workdir)


def _wrk_body(
    url: str,
    path: str,
    body: bytes | None,
    seconds: int,
    connections: int,
    workdir: Path,
    key: str | None,
) -> Figures:
    if body is None:
        script = f'function request() return wrk.format("GET", "{path}") end\n'
    else:
        script = _lua_headers(key) + f"body = {_lua_string(body.decode())}\n"
        script += _WRK_BODY % json.dumps(path)
    return _run_wrk(url, script, seconds, connections, workdir)


# -- the asyncio fallback -----------------------------------------------------------


async def _raw_load(
    port: int, make_request: Callable[[int], bytes], seconds: float, connections: int
) -> Figures:
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds
    counter = 0

    async def connection() -> None:
        nonlocal failures, counter
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                counter += 1
                request = make_request(counter)
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                found = re.search(rb"content-length: (\d+)", head, re.I)
                assert found is not None, head  # every answer of the API has a length
                length = int(found.group(1))
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                if head[9:10] != b"2":
                    failures += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return Figures(
        len(latencies) / elapsed,
        latencies[len(latencies) // 2] * 1000,
        latencies[int(len(latencies) * 0.99)] * 1000,
        failures,
        len(latencies),
    )


def _raw_request(path: str, body: bytes | None, key: str | None) -> bytes:
    if body is None:
        return f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in _headers(key).items())
    return head.encode() + b"\r\n" + body


def _asyncio_single(port: int, seconds: int, key: str | None) -> Figures:
    def make(counter: int) -> bytes:
        body = json.dumps(_request_event(f"a-{counter}")).encode()
        return _raw_request("/v1/llm/request", body, key)

    return asyncio.run(_raw_load(port, make, seconds, CONCURRENCY))


def _asyncio_body(
    port: int, path: str, body: bytes | None, seconds: int, connections: int, key: str | None
) -> Figures:
    request = _raw_request(path, body, key)
    return asyncio.run(_raw_load(port, lambda _: request, seconds, connections))


# -- the run ----------------------------------------------------------------------


def _start_server(
    brokers: str, dsn: str, auth: bool, port: int, log: Path
) -> tuple[subprocess.Popen[bytes], float]:
    """The server, once ``/ready`` answers 200, and how long that took from its launch."""
    env = {**os.environ, "KAFKA_BROKERS": brokers, "POSTGRES_DSN": dsn, "AUTH": "on" if auth else "off"}
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "api.ingestion:app",
                "--host", "127.0.0.1", "--port", str(port),
                "--loop", "uvloop", "--http", "httptools",
                "--no-access-log", "--log-level", "warning",
            ],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    launched = time.monotonic()
    deadline = launched + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process, time.monotonic() - launched
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not become ready:\n{log.read_text()}")
        # Often enough that the cold start's load begins as soon as the server is ready.
        time.sleep(0.01)


def _report(name: str, figures: Figures, events_per_request: int = 1) -> None:
    cpu_per_event = figures.server_cpu_seconds / max(1, figures.requests * events_per_request)
    print(
        f"{name:<40} {figures.requests_per_second * events_per_request:>10,.0f} events/s"
        f"   p50 {figures.p50_ms:6.1f} ms   p99 {figures.p99_ms:6.1f} ms"
        f"   server CPU {cpu_per_event * 1e6:6.1f} µs/event   failures {figures.failures}",
        flush=True,
    )


def _phases(
    url: str, port: int, pid: int, key: str | None, seconds: int, workdir: Path, use_wrk: bool, label: str
) -> tuple[Figures, Figures, Figures]:
    """The cold start, the /health baseline, single events, batches; returns (cold, single, batches)."""
    batch = _batch_body()
    server = psutil.Process(pid)

    def server_cpu() -> float:
        times = server.cpu_times()
        return times.user + times.system

    def single(duration: int) -> Figures:
        before = server_cpu()
        if use_wrk:
            figures = _wrk_single(url, duration, workdir, key)
        else:
            figures = _asyncio_single(port, duration, key)
        figures.server_cpu_seconds = server_cpu() - before
        return figures

    def fixed(path: str, body: bytes | None, duration: int, connections: int) -> Figures:
        before = server_cpu()
        if use_wrk:
            figures = _wrk_body(url, path, body, duration, connections, workdir, key)
        else:
            figures = _asyncio_body(port, path, body, duration, connections, key)
        figures.server_cpu_seconds = server_cpu() - before
        return figures

    # At once, on a server that was just found ready: no warm-up before it.
    cold = single(COLD_SECONDS)
    _report(f"{label}: first {COLD_SECONDS} s after ready (c=64)", cold)
    _report(f"{label}: baseline GET /health (c=64)", fixed("/health", None, seconds, CONCURRENCY))
    singles = single(seconds)
    _report(f"{label}: single events (c=64)", singles)
    batches = fixed("/v1/llm/events", batch, seconds, BATCH_CONCURRENCY)
    _report(f"{label}: batches of {BATCH_EVENTS} (c={BATCH_CONCURRENCY})", batches, BATCH_EVENTS)
    return cold, singles, batches


# Quotas on: the bench tenant's own, above what the server takes, so that every event is
# taken from the shared bucket (leases of a twentieth of a second's rate) and none refused.
QUOTA = Limits(200_000.0, 200_000)


def main() -> None:
    seconds = int(os.environ.get("BENCH_SECONDS", "10"))
    use_wrk = shutil.which("wrk") is not None
    print(f"load generator: {'wrk' if use_wrk else 'asyncio raw HTTP/1.1'}; {seconds} s per phase")
    with local_stack("bench-ingestion-", 3) as (workdir, broker, postgres):
        with psycopg.connect(postgres.dsn) as conn:
            key = create_key(conn, "bench", "ingest").key
        results: dict[str, tuple[Figures, Figures, Figures]] = {}
        runs = (("auth off", False, None), ("auth on", True, None), ("quota on", True, QUOTA))
        for label, auth, quota in runs:
            if quota is not None:
                with psycopg.connect(postgres.dsn, autocommit=True) as conn:
                    set_quota(conn, "bench", quota)
            port = free_port()
            server, startup = _start_server(broker.address, postgres.dsn, auth, port, workdir / "server.log")
            print(f"{label}: ready {startup:.2f} s after launch", flush=True)
            try:
                results[label] = _phases(
                    f"http://127.0.0.1:{port}",
                    port,
                    server.pid,
                    key if auth else None,
                    seconds,
                    workdir,
                    use_wrk,
                    label,
                )
            finally:
                server.terminate()
                server.wait(30)
        (_, single_off, batch_off), (_, single_on, batch_on), (_, single_quota, batch_quota) = (
            results["auth off"],
            results["auth on"],
            results["quota on"],
        )
        single_ratio = single_on.requests_per_second / single_off.requests_per_second
        batch_ratio = batch_on.requests_per_second / batch_off.requests_per_second
        print(f"auth on / off: single events {single_ratio:.1%}, batches {batch_ratio:.1%}")
        print(
            f"quota on ({QUOTA.events_per_second:,.0f} events/s, never reached) / off, both with keys: "
            f"single events {single_quota.requests_per_second / single_on.requests_per_second:.1%}, batches "
            f"{batch_quota.requests_per_second / batch_on.requests_per_second:.1%}"
        )
        print(
            "targets: ≥ 5,000 single events/s with p99 ≤ 50 ms, ≥ 100,000 events/s in batches, "
            "auth on ≥ 90 % of auth off, quota on ≥ 90 % of off, "
            f"p99 ≤ 100 ms over the first {COLD_SECONDS} s after ready"
        )


if __name__ == "__main__":
    main()
