"""OTLP trace exports: one uvicorn process against a local broker, loaded over loopback.

Figures: exports of 1,000 GenAI spans (protobuf, the attributes the openai
instrumentation sets) at concurrency 8, as spans/s (each span is a request and
a response event) and p99 per export; beside them, in the same run and against
the same server, the batch endpoint's events/s with batches of 1,000 events
(``bench_ingestion``'s body). API keys on, as in production. Also the CPU time
(median of 20) of decoding and mapping one export in this process, beside that of
decoding one batch of 1,000 events as the batch endpoint does, and the protobuf
backend in use (``upb``: the Python one is many times slower). Target (2 cores,
one server process): ≥ 50,000 spans/s (≥ 100,000 events/s).

Environment: ``BENCH_SECONDS`` (default 10) per phase.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import psycopg
from google.protobuf.internal import api_implementation
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from api import otlp
from api.keys import create_key
from schemas.events import batch_decoder, event_decoder
from tests.bench.bench_ingestion import (
    BATCH_CONCURRENCY,
    BATCH_EVENTS,
    Figures,
    _asyncio_body,
    _batch_body,
    _raw_load,
    _report,
    _run_wrk,
    _start_server,
    _wrk_body,
)
from tests.bench.stack import local_stack
from tests.support.ports import free_port

EXPORT_SPANS = 1000
CONCURRENCY = 8


def _value(value: object) -> AnyValue:
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[_value(v) for v in value]))
    return AnyValue(string_value=str(value))


def export_body(spans: int = EXPORT_SPANS) -> bytes:
    """One export of ``spans`` chat spans, as the openai instrumentation records them."""
    now = time.time_ns() - 60 * 10**9
    resource = [
        KeyValue(key=k, value=_value(v))
        for k, v in {
            "service.name": "assistant",
            "telemetry.sdk.language": "python",
            "telemetry.sdk.name": "opentelemetry",
            "telemetry.sdk.version": "1.45.2",
        }.items()
    ]
    built = []
    for n in range(spans):
        attributes = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": "openai",
            "gen_ai.request.model": "gpt-4o-mini",
            "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
            "gen_ai.response.id": f"chatcmpl-{n:08d}",
            "gen_ai.response.finish_reasons": ["stop"],
            "gen_ai.usage.input_tokens": 812 + n % 100,
            "gen_ai.usage.output_tokens": 96 + n % 50,
            "server.address": "api.openai.com",
            "server.port": 443,
        }
        start = now + n * 1_000_000
        built.append(
            Span(
                trace_id=(0x5EED << 64 | n).to_bytes(16, "big"),
                span_id=(n + 1).to_bytes(8, "big"),
                name="chat gpt-4o-mini",
                kind=Span.SPAN_KIND_CLIENT,
                start_time_unix_nano=start,
                end_time_unix_nano=start + 850_000_000,
                attributes=[KeyValue(key=k, value=_value(v)) for k, v in attributes.items()],
            )
        )
    export = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=resource),
                scope_spans=[
                    ScopeSpans(
                        scope=InstrumentationScope(name="opentelemetry.instrumentation.openai_v2"),
                        spans=built,
                    )
                ],
            )
        ]
    )
    return export.SerializeToString()


def _cpu_ms(work: Callable[[], object], rounds: int = 20) -> float:
    """The median milliseconds of CPU ``work`` takes: a busy machine makes the mean drift."""
    times = []
    for _ in range(rounds):
        started = time.thread_time()
        work()
        times.append(time.thread_time() - started)
    return statistics.median(times) * 1000


def _mapping_cost(body: bytes) -> float:
    """Milliseconds of CPU to decode one export and map its spans to events."""

    def decode_and_map() -> None:
        mapped = otlp.calls_from_export(otlp.decode_export(body, "protobuf"), "bench")
        assert len(mapped.calls) == EXPORT_SPANS and not mapped.rejected, mapped.rejected[:1]

    return _cpu_ms(decode_and_map)


def _batch_decoding_cost(body: bytes) -> float:
    """Milliseconds of CPU to decode one batch as ``POST /v1/llm/events`` does: the baseline."""

    def decode() -> None:
        for raw in batch_decoder.decode(body).events:
            event_decoder.decode(raw)

    return _cpu_ms(decode)


def _otlp_wrk(url: str, body: bytes, key: str, seconds: int, workdir: Path) -> Figures:
    path = workdir / "export.pb"
    path.write_bytes(body)
    script = (
        f'headers = {{["Content-Type"] = "{otlp.PROTOBUF}", ["Authorization"] = "Bearer {key}"}}\n'
        f'local file = io.open("{path}", "rb"); body = file:read("*a"); file:close()\n'
        'function request() return wrk.format("POST", "/v1/traces", headers, body) end\n'
    )
    return _run_wrk(url, script, seconds, CONCURRENCY, workdir)


def _otlp_asyncio(port: int, body: bytes, key: str, seconds: int) -> Figures:
    head = (
        f"POST /v1/traces HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: {otlp.PROTOBUF}\r\nAuthorization: Bearer {key}\r\n\r\n"
    )
    request = head.encode() + body
    return asyncio.run(_raw_load(port, lambda _: request, seconds, CONCURRENCY))


def main() -> None:
    seconds = int(os.environ.get("BENCH_SECONDS", "10"))
    use_wrk = shutil.which("wrk") is not None
    print(f"load generator: {'wrk' if use_wrk else 'asyncio raw HTTP/1.1'}; {seconds} s per phase")
    body = export_body()
    print(f"one export: {EXPORT_SPANS} spans, {len(body):,} bytes of protobuf")
    print(f"protobuf backend: {api_implementation.Type()}")
    mapping = _mapping_cost(body)
    decoding = _batch_decoding_cost(_batch_body())
    per_span = mapping * 1000 / EXPORT_SPANS
    print(
        f"decode + map one export in this process: {mapping:.1f} ms of CPU ({per_span:.1f} µs per span, "
        f"{per_span / 2:.1f} per event); decoding a batch of {BATCH_EVENTS} as the batch endpoint does: "
        f"{decoding * 1000 / BATCH_EVENTS:.1f} µs per event"
    )
    with local_stack("bench-otlp-", 3) as (workdir, broker, postgres):
        with psycopg.connect(postgres.dsn) as conn:
            key = create_key(conn, "bench", "ingest").key
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server, _ = _start_server(broker.address, postgres.dsn, True, port, workdir / "server.log")
        try:
            process = psutil.Process(server.pid)

            def measured(load: Callable[[], Figures]) -> Figures:
                """``load``'s figures, with the server's CPU seconds while it ran."""
                before = sum(process.cpu_times()[:2])
                figures = load()
                figures.server_cpu_seconds = sum(process.cpu_times()[:2]) - before
                return figures

            def exports(duration: int) -> Figures:
                if use_wrk:
                    return measured(lambda: _otlp_wrk(url, body, key, duration, workdir))
                return measured(lambda: _otlp_asyncio(port, body, key, duration))

            def batches(duration: int) -> Figures:
                if use_wrk:
                    return measured(
                        lambda: _wrk_body(
                            url, "/v1/llm/events", _batch_body(), duration, BATCH_CONCURRENCY, workdir, key
                        )
                    )
                return measured(
                    lambda: _asyncio_body(
                        port, "/v1/llm/events", _batch_body(), duration, BATCH_CONCURRENCY, key
                    )
                )

            exports(2)  # warm-up: connections, producer id, the key's cache entry
            baseline = batches(seconds)
            _report(f"baseline: batches of {BATCH_EVENTS} (c={BATCH_CONCURRENCY})", baseline, BATCH_EVENTS)
            figures = exports(seconds)
            _report(f"OTLP exports of {EXPORT_SPANS} spans (c={CONCURRENCY})", figures, 2 * EXPORT_SPANS)
            spans_per_second = figures.requests_per_second * EXPORT_SPANS
            print(
                f"OTLP: {spans_per_second:,.0f} spans/s, p99 {figures.p99_ms:.1f} ms per export; "
                f"events/s against the batch endpoint: "
                f"{2 * spans_per_second / (baseline.requests_per_second * BATCH_EVENTS):.2f}"
            )
            print("target: ≥ 50,000 spans/s (≥ 100,000 events/s)")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
