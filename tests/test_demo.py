"""The demo, shortened, end to end: its own stack, the three services, traffic, the table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from deploy.stack import Broker, Postgres
from deploy.traffic import MODELS, CallGenerator
from schemas.events import check_cache_read, request_decoder, response_decoder

TENANTS = ("acme", "globex", "initech")


def table_calls(output: str) -> dict[str, int]:
    """Calls per tenant, summed from the printed table's ``calls`` column."""
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["tenant", "route", "model"])
    calls: dict[str, int] = {}
    for line in lines[header + 2 :]:
        if not line.strip():
            break
        cells = line.split()
        calls[cells[0]] = calls.get(cells[0], 0) + int(cells[3])
    return calls


def test_demo_counts_every_tenants_calls_and_stops_everything(tmp_path: Path):
    local = tmp_path / "local"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("KAFKA_BROKERS", "POSTGRES_DSN", "HTTP_PORT")
    }
    env |= {
        "DEMO_LOCAL": str(local),
        "DEMO_EXIT": "1",
        "DEMO_DURATION": "4",
        "DEMO_RATE": "25",
        "DEMO_TENANTS": str(len(TENANTS)),
        "DEMO_INGESTION_PORT": "0",
        "DEMO_METRICS_PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "deploy.demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    sent = dict(re.findall(r"(\w+) (\d+)", done.stdout.split("calls per tenant:")[1].splitlines()[0]))
    assert set(sent) == set(TENANTS)
    counted = table_calls(done.stdout)
    for tenant in TENANTS:
        assert counted.get(tenant, 0) > 0, done.stdout
        # Each call generated is counted once by the pipeline: nothing lost, nothing twice.
        assert counted[tenant] == int(sent[tenant]), (tenant, done.stdout)
    assert "curl -s 'http://127.0.0.1:" in done.stdout

    assert {path.name for path in (local / "logs").iterdir()} == {
        "ingestion.log",
        "processor.log",
        "metrics-api.log",
    }
    assert Broker.running(local / "broker") is None
    assert Postgres.running(local / "postgres") is None
    assert not (local / "env").exists()


def test_generated_events_are_valid_and_realistic():
    generator = CallGenerator(["acme", "globex"], error_share=0.05, seed=5)
    start = datetime(2026, 3, 1, tzinfo=UTC)
    calls = [generator.call(start + timedelta(milliseconds=i), 0.0) for i in range(4000)]
    requests = [request_decoder.decode(msgspec.json.encode(c.request)) for c in calls]
    responses = [response_decoder.decode(msgspec.json.encode(c.response)) for c in calls]
    for request, response in zip(requests, responses, strict=True):
        assert request.request_id == response.request_id
        assert check_cache_read(request, response) is None
        assert response.timestamp >= request.timestamp
    assert len({r.request_id for r in requests}) == len(requests)
    assert {r.tenant_id for r in requests} == {"acme", "globex"}
    models = {r.model: r.provider for r in requests}
    assert models["claude-sonnet-4-5"] == "anthropic"
    assert models["gpt-4.1-mini"] == models["gpt-4o"] == "openai"
    assert any(provider is None for provider in models.values())
    failed = sum(response.failed for response in responses) / len(responses)
    assert 0.03 < failed < 0.07
    assert sum(r.time_to_first_token_ms is not None for r in responses) > 1000
    assert sum(r.cache_read_tokens > 0 for r in responses) > 500
    # The same seed, the same traffic.
    again = CallGenerator(["acme", "globex"], error_share=0.05, seed=5)
    assert again.call(start, 0.0).request == calls[0].request


def test_the_price_table_knows_the_priced_models():
    from genai_prices import Usage, calc_price

    for model in MODELS:
        if model.provider is None:
            continue
        price = calc_price(
            Usage(input_tokens=1000, output_tokens=100), model_ref=model.name, provider_id=model.provider
        )
        assert price.total_price > 0, model.name
