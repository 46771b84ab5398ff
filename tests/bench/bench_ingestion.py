"""Ingestion API throughput: one uvicorn process against a local broker, loaded over loopback.

Figures: single events at concurrency 64 (events/s, p50/p99 latency) and batches
of 1,000 events (events/s), with ``GET /health`` as the same-run baseline of what
the HTTP stack alone does on this machine. Targets (2 cores, one server process):
≥ 5,000 single events/s with p99 ≤ 50 ms; ≥ 100,000 events/s in batches.

The load comes from ``wrk`` with a Lua script when it is installed, else from a
small asyncio client speaking raw HTTP/1.1 over keep-alive connections.

Environment: ``BENCH_SECONDS`` (default 10) per phase; ``AUTH`` is passed to the
server (default off) and ``BENCH_API_KEY``, when set, is sent as a Bearer key.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from deploy.stack import Broker, free_port
from schemas.topics import ensure_topics

ROOT = Path(__file__).resolve().parents[2]
CONCURRENCY = 64
BATCH_EVENTS = 1000
BATCH_CONCURRENCY = 8


@dataclass
class Figures:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    failures: int  # answers other than 2xx, and transport errors


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


def _headers() -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("BENCH_API_KEY")
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


def _lua_headers() -> str:
    pairs = ", ".join(f'["{k}"] = "{v}"' for k, v in _headers().items())
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
    return Figures(float(rate.group(1)), latency("50"), latency("99"), failures)


def _wrk_single(url: str, seconds: int, workdir: Path) -> Figures:
    template = json.dumps(_request_event("REQUEST_ID")).replace("REQUEST_ID", "w%d-%d")
    script = _lua_headers() + _WRK_SINGLE % _lua_string(template)
    return _run_wrk(url, script, seconds, CONCURRENCY, workdir)


def _wrk_body(
    url: str, path: str, body: bytes | None, seconds: int, connections: int, workdir: Path
) -> Figures:
    if body is None:
        script = f'function request() return wrk.format("GET", "{path}") end\n'
    else:
        script = _lua_headers() + f"body = {_lua_string(body.decode())}\n"
        script += _WRK_BODY % json.dumps(path)
    return _run_wrk(url, script, seconds, connections, workdir)


# -- the asyncio fallback -----------------------------------------------------------


async def _raw_load(port: int, make_request: object, seconds: float, connections: int) -> Figures:
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
                request = make_request(counter)  # type: ignore[operator]
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
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
    )


def _raw_request(path: str, body: bytes | None) -> bytes:
    if body is None:
        return f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in _headers().items())
    return head.encode() + b"\r\n" + body


def _asyncio_single(port: int, seconds: int) -> Figures:
    def make(counter: int) -> bytes:
        body = json.dumps(_request_event(f"a-{counter}")).encode()
        return _raw_request("/v1/llm/request", body)

    return asyncio.run(_raw_load(port, make, seconds, CONCURRENCY))


def _asyncio_body(port: int, path: str, body: bytes | None, seconds: int, connections: int) -> Figures:
    request = _raw_request(path, body)
    return asyncio.run(_raw_load(port, lambda _: request, seconds, connections))


# -- the run ----------------------------------------------------------------------


def _start_server(brokers: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KAFKA_BROKERS": brokers, "AUTH": os.environ.get("AUTH", "off")}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "api.ingestion:app",
                "--host", "127.0.0.1", "--port", str(port),
                "--loop", "uvloop", "--http", "httptools",
                "--no-access-log", "--log-level", "warning",
            ],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not become ready:\n{log.read_text()}")
        time.sleep(0.1)


def _report(name: str, figures: Figures, events_per_request: int = 1) -> None:
    print(
        f"{name:<34} {figures.requests_per_second * events_per_request:>10,.0f} events/s"
        f"   p50 {figures.p50_ms:6.1f} ms   p99 {figures.p99_ms:6.1f} ms"
        f"   failures {figures.failures}",
        flush=True,
    )


def main() -> None:
    seconds = int(os.environ.get("BENCH_SECONDS", "10"))
    use_wrk = shutil.which("wrk") is not None
    print(
        f"load generator: {'wrk' if use_wrk else 'asyncio raw HTTP/1.1'}; "
        f"{seconds} s per phase; auth {os.environ.get('AUTH', 'off')}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-ingestion-") as directory:
        workdir = Path(directory)
        broker = Broker(workdir / "broker").start()
        server = None
        try:
            ensure_topics(broker.address, 3)
            port = free_port()
            server = _start_server(broker.address, port, workdir / "server.log")
            url = f"http://127.0.0.1:{port}"
            batch = _batch_body()

            def single(duration: int) -> Figures:
                if use_wrk:
                    return _wrk_single(url, duration, workdir)
                return _asyncio_single(port, duration)

            def fixed(path: str, body: bytes | None, duration: int, connections: int) -> Figures:
                if use_wrk:
                    return _wrk_body(url, path, body, duration, connections, workdir)
                return _asyncio_body(port, path, body, duration, connections)

            single(2)  # warm-up: connections, producer id, caches
            _report("baseline GET /health (c=64)", fixed("/health", None, seconds, CONCURRENCY))
            _report("single events (c=64)", single(seconds))
            _report(
                f"batches of {BATCH_EVENTS} (c={BATCH_CONCURRENCY})",
                fixed("/v1/llm/events", batch, seconds, BATCH_CONCURRENCY),
                BATCH_EVENTS,
            )
            print(
                f"batch body: {len(batch) / 1024:.0f} KiB; "
                "targets: ≥ 5,000 single events/s with p99 ≤ 50 ms, ≥ 100,000 events/s "
                "in batches"
            )
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
            broker.stop()


if __name__ == "__main__":
    main()
