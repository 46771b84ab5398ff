"""The demo, shortened, end to end: its own stack, the three services with API keys on,
traffic, the table. And the traffic generator: its calls, and its keys per tenant against
the real ingestion API."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import msgspec
import psycopg
import pytest

from api.auth import hash_key
from api.ingestion import create_app
from api.keys import create_key
from deploy import traffic
from deploy.traffic import (
    COUNTRIES,
    EXPERIMENTS,
    MODELS,
    ApiKeysError,
    CallGenerator,
    keys_by_tenant,
    parse_api_keys,
)
from schemas.config import Settings
from schemas.events import check_cache_read, request_decoder, response_decoder
from schemas.topics import REQUESTS, RESPONSES
from tests.support.servers import serving
from tests.support.stacks import TEST_PARTITIONS, Broker, Postgres
from tests.support.topics import read_topic

TENANTS = ("acme", "globex", "initech")
DEMO_TIMEOUT = 150.0
KEY = re.compile(r"sl_[a-z0-9]{8}_[A-Za-z0-9_-]{43}")


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


def dimension_tables(output: str) -> dict[str, dict[str, int]]:
    """Calls per value of each printed dimension table (``metadata.… calls errors …``)."""
    lines = output.splitlines()
    tables: dict[str, dict[str, int]] = {}
    for number, line in enumerate(lines):
        cells = line.split()
        if len(cells) > 1 and cells[0].startswith("metadata.") and cells[1] == "calls":
            values = tables[cells[0]] = {}
            for row in lines[number + 2 :]:
                if not row.strip():
                    break
                value, calls = row.split()[:2]
                values[value] = int(calls)
    return tables


def status_without_key(method: str, url: str) -> int:
    body = b'{"events": []}' if method == "POST" else None
    request = Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urlopen(request, timeout=5) as response:
            return response.status
    except HTTPError as error:
        return error.code


def quality_rows(stdout: str) -> dict[tuple[str, str, str], tuple[int, float, int]]:
    """The demo's quality table: (tenant, route, model) -> (judged, average score, feedback)."""
    block = stdout.split("quality: ", 1)[1].split("\n\n", 1)[0].splitlines()[3:]
    rows = {}
    for line in block:
        tenant, route, model, judged, score, feedback, *_ = line.split()
        average = float(score) if score != "-" else math.nan
        rows[(tenant, route, model)] = (int(judged), average, int(feedback))
    return rows


def test_demo_counts_every_tenants_calls_with_keys_and_stops_everything(tmp_path: Path):
    local = tmp_path / "local"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("KAFKA_BROKERS", "POSTGRES_DSN", "HTTP_PORT")
    }
    env |= {
        "DEMO_LOCAL": str(local),
        "DEMO_DURATION": "4",
        "DEMO_RATE": "25",
        "DEMO_TENANTS": str(len(TENANTS)),
        "DEMO_INGESTION_PORT": "0",
        "DEMO_METRICS_PORT": "0",
        "DEMO_EVALUATION_DELAY": "5",
        # Whatever the caller's environment says, the demo's services check keys.
        "AUTH": "off",
        "PYTHONUNBUFFERED": "1",
    }
    with open(tmp_path / "stderr", "w") as stderr:
        demo = subprocess.Popen(
            [sys.executable, "-m", "deploy.demo"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
    watchdog = threading.Timer(DEMO_TIMEOUT, demo.kill)
    watchdog.start()
    lines: list[str] = []
    refused: dict[str, int] = {}
    served: dict[str, Any] = {}
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C stops everything"):
                # Still serving after the table: the dashboard, with the key printed for it.
                stdout = "".join(lines)
                dashboard = re.search(r"^The dashboard: (http://\S+/dashboard)$", stdout, re.M)
                pasted = re.search(rf"^  paste acme's read key there: ({KEY.pattern})$", stdout, re.M)
                assert dashboard is not None and pasted is not None, stdout
                served["page"] = status_without_key("GET", dashboard[1])
                with urlopen(
                    Request(f"{dashboard[1]}/tenant", headers={"Authorization": f"Bearer {pasted[1]}"}),
                    timeout=5,
                ) as response:
                    served["tenant"] = msgspec.json.decode(response.read())
                served["key"] = pasted[1]
                # What Ctrl-C does; SIGINT itself may be ignored by a test run in the background.
                demo.send_signal(signal.SIGTERM)
            if line.startswith("auth: on"):
                # The services are ready and the traffic not yet sent: without a key, 401.
                urls = re.search(
                    r"ingestion API \((http://[^)]+)\).*query API \((http://[^)]+)\)", "".join(lines)
                )
                assert urls is not None, lines
                ingestion_url, metrics_url = urls.groups()
                refused["query"] = status_without_key("GET", f"{metrics_url}/v1/metrics?tenant_id=acme")
                refused["events"] = status_without_key("POST", f"{ingestion_url}/v1/llm/events")
        demo.wait()
    finally:
        watchdog.cancel()
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    stdout = "".join(lines)
    assert demo.returncode == 0, stdout[-3000:] + (tmp_path / "stderr").read_text()[-3000:]
    assert refused == {"query": 401, "events": 401}, stdout
    assert served["page"] == 200 and served["tenant"] == {"tenant_id": "acme"}, stdout

    sent = dict(re.findall(r"(\w+) (\d+)", stdout.split("calls per tenant:")[1].splitlines()[0]))
    assert set(sent) == set(TENANTS)
    counted = table_calls(stdout)
    for tenant in TENANTS:
        assert counted.get(tenant, 0) > 0, stdout
        # Each call generated is counted once by the pipeline: nothing lost, nothing twice.
        assert counted[tenant] == int(sent[tenant]), (tenant, stdout)

    # acme slices its calls by the experiment and the country in the traffic's metadata (the
    # traffic starts at the boundary they apply from): a table per dimension, each adding up
    # to acme's calls.
    assert "acme's calls by its dimensions" in stdout, stdout
    by_dimension = dimension_tables(stdout)
    assert set(by_dimension) == {"metadata.experiment", "metadata.country"}, stdout
    assert set(by_dimension["metadata.experiment"]) <= set(EXPERIMENTS)
    assert set(by_dimension["metadata.country"]) <= set(COUNTRIES)
    totals = {sum(values.values()) for values in by_dimension.values()}
    assert totals == {counted["acme"]}, stdout

    # Every evaluation sent (a judge's scores, users' pass/fail) counted toward its call's
    # window: the quality table adds up to them, and shows a score for every tenant.
    sent_evaluations = re.search(r"^evaluations (\d+) ", stdout, re.M)
    assert sent_evaluations is not None, stdout
    evaluations = int(sent_evaluations[1])
    quality = quality_rows(stdout)
    assert evaluations > 0, stdout
    assert sum(judged + feedback for judged, _, feedback in quality.values()) == evaluations, stdout
    assert {key[0] for key, (judged, _, _) in quality.items() if judged} == set(TENANTS), stdout
    assert all(0 <= score <= 1 for judged, score, _ in quality.values() if judged), stdout

    # The curl lines carry a real read key of the tenant they query.
    curls = [line for line in lines if line.strip().startswith("curl -s")]
    assert len(curls) == 4, stdout
    assert "/v1/evaluations?" in curls[2] and "dimension=metadata.country" in curls[3], stdout
    read_key = re.search(rf"-H 'Authorization: Bearer ({KEY.pattern})' 'http://127\.0\.0\.1:\d+/", curls[0])
    assert read_key is not None, curls
    assert "tenant_id=acme" in curls[0]
    assert all(f"Bearer {read_key[1]}'" in curl for curl in curls)
    assert served["key"] == read_key[1]
    # Two whole keys are shown, acme's: the read key (the curl lines and the dashboard's)
    # and the ingest key (the line for more traffic); of the others, only prefixes.
    assert len(KEY.findall(stdout)) == 6 and len(set(KEY.findall(stdout))) == 2, stdout

    # The demo's alert rule fired on acme's error spike: its receiver printed the delivery,
    # signed with the rule's secret.
    assert re.search(
        r"^  alert firing: 'error spike' of acme - error_rate \S+ .*, signature ok$", stdout, re.M
    ), stdout

    assert {path.name for path in (local / "logs").iterdir()} == {
        "ingestion.log",
        "processor.log",
        "metrics-api.log",
        "alerts.log",
        "retention.log",
    }
    assert Broker.running(local / "broker") is None
    assert Postgres.running(local / "postgres") is None
    assert not (local / "env").exists()

    # The demo's Postgres, started again: one ingest and one read key per tenant, all
    # revoked once the demo stopped, the read key of the curl lines among them...
    postgres = Postgres(local / "postgres").start()
    try:
        with psycopg.connect(postgres.dsn) as conn:
            stored = conn.execute(
                "SELECT tenant_id, scope, key_hash, revoked_at IS NOT NULL FROM api_keys"
            ).fetchall()
    finally:
        postgres.stop()
    # and the manage key that made the alert rule.
    assert sorted((tenant, scope) for tenant, scope, _, _ in stored) == sorted(
        [(tenant, scope) for tenant in TENANTS for scope in ("ingest", "read")] + [("acme", "manage")]
    )
    assert all(revoked for _, _, _, revoked in stored), stored
    assert ("acme", "read", hash_key(read_key[1])) in {(t, s, bytes(h)) for t, s, h, _ in stored}


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


ACME_KEY = "sl_acme0001_" + "a" * 43
GLOBEX_KEY = "sl_globex01_" + "b" * 43


def test_api_key_arguments_are_one_key_or_a_key_per_tenant():
    assert parse_api_keys([]) is None
    assert parse_api_keys([ACME_KEY]) == ACME_KEY
    assert parse_api_keys([f"acme={ACME_KEY}", f"globex={GLOBEX_KEY}"]) == {
        "acme": ACME_KEY,
        "globex": GLOBEX_KEY,
    }
    # A tenant may hold "=", a key never does.
    assert parse_api_keys([f"a=b={ACME_KEY}"]) == {"a=b": ACME_KEY}
    refused = {
        "is not an API key": [f"acme={ACME_KEY[:-1]}"],
        "the key is not an API key": ["acme"],
        "the tenant is empty": [f"={ACME_KEY}"],
        "tenant 'acme' is given two keys": [f"acme={ACME_KEY}", f"acme={GLOBEX_KEY}"],
        "not both": [ACME_KEY, f"globex={GLOBEX_KEY}"],
        "2 bare keys given": [ACME_KEY, GLOBEX_KEY],
    }
    for message, values in refused.items():
        with pytest.raises(ApiKeysError, match=re.escape(message)):
            parse_api_keys(values)


def test_every_tenant_sending_needs_its_key():
    assert keys_by_tenant(None, ["acme", "globex"]) == {"acme": None, "globex": None}
    assert keys_by_tenant(ACME_KEY, ["acme"]) == {"acme": ACME_KEY}
    both = {"acme": ACME_KEY, "globex": GLOBEX_KEY}
    # A key for a tenant not sending is unused, not an error.
    assert keys_by_tenant(both, ["globex"]) == {"globex": GLOBEX_KEY}
    with pytest.raises(
        ApiKeysError, match=r"one key serves one tenant, but the traffic has 2 \(acme, globex\)"
    ):
        keys_by_tenant(ACME_KEY, ["acme", "globex"])
    with pytest.raises(ApiKeysError, match="no key for tenants globex, initech"):
        keys_by_tenant({"acme": ACME_KEY}, ["acme", "globex", "initech"])


def test_the_command_line_refuses_keys_that_do_not_fit_the_tenants(capsys: pytest.CaptureFixture[str]):
    cases = {
        "one key serves one tenant": ["--tenants", "2", "--api-key", ACME_KEY],
        "no key for tenant globex": ["--tenants", "acme,globex", "--api-key", f"acme={ACME_KEY}"],
        "the key of tenant 'acme' is not an API key": ["--api-key", "acme=oops"],
    }
    for message, argv in cases.items():
        # Refused before a connection is tried: nothing listens on this URL.
        with pytest.raises(SystemExit) as exit_:
            traffic.main(["--url", "http://127.0.0.1:9", "--duration", "1", *argv])
        assert exit_.value.code == 2
        assert f"--api-key: {message}" in capsys.readouterr().err


@contextmanager
def ingestion_api(broker: Broker, postgres_dsn: str) -> Iterator[str]:
    """The ingestion API with keys on, under uvicorn in a thread, on a free port."""
    settings = Settings(
        kafka_brokers=broker.address, postgres_dsn=postgres_dsn, topic_partitions=TEST_PARTITIONS
    )
    with serving(create_app(settings), "the ingestion API") as url:
        yield url


def test_traffic_sends_each_tenants_events_with_its_own_key(broker: Broker, postgres_dsn: str):
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        ingest = {tenant: create_key(conn, tenant, "ingest").key for tenant in ("acme", "globex", "initech")}
        acme_read = create_key(conn, "acme", "read")
    with ingestion_api(broker, postgres_dsn) as url:
        # Two tenants, a key each: the API takes a request only from its tenant's key and
        # stamps a response with the key's tenant, so every event must go with its own.
        several = traffic.run(
            url,
            rate=40,
            duration=1.0,
            tenants=["acme", "globex"],
            seed=23,
            api_keys=ingest,
            evaluation_delay=2.0,
        )
        # One key for a single tenant's traffic.
        single = traffic.run(
            url,
            rate=20,
            duration=0.5,
            tenants=["initech"],
            seed=19,
            api_keys=ingest["initech"],
            evaluation_delay=2.0,
        )
        with pytest.raises(traffic.SendError, match=rf"with the key {acme_read.prefix} answered 403"):
            traffic.run(url, rate=20, duration=0.2, tenants=["acme"], seed=13, api_keys=acme_read.key)
    for totals in (several, single):
        assert totals.rejected == 0, totals.first_rejection
        # A request and a response a call, and the evaluations of some.
        assert totals.accepted == totals.events_sent == 2 * totals.calls + totals.evaluations
    assert several.evaluations > 0
    assert set(several.calls_by_tenant) == {"acme", "globex"}
    assert all(count > 0 for count in several.calls_by_tenant.values())
    assert set(single.calls_by_tenant) == {"initech"}
    calls = several.calls + single.calls

    requests = dict(read_topic(broker.address, REQUESTS, calls))
    responses = dict(read_topic(broker.address, RESPONSES, calls))
    assert len(requests) == len(responses) == calls
    tenants = {request_id: request["tenant_id"] for request_id, request in requests.items()}
    # Each response reached Kafka with the tenant of its own call's request.
    assert {request_id: response["tenant_id"] for request_id, response in responses.items()} == tenants
    sent_per_tenant: dict[str, int] = {}
    for tenant in tenants.values():
        sent_per_tenant[tenant] = sent_per_tenant.get(tenant, 0) + 1
    assert sent_per_tenant == dict(several.calls_by_tenant) | dict(single.calls_by_tenant)
