"""Ingestion quotas and usage (docs/quotas.md): the bucket's rules, the shared bucket in a real
Postgres, 429s from the real ingestion API (single, batch, OTLP) with nothing of a
refused request on the broker, a change applied without a restart, two ingestion
processes sharing one quota, ingestion going on with the store stopped, and usage
read back through the query API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from api.ingestion import create_app
from api.keys import create_key
from api.query import create_app as create_query_app
from api.quotas import LIMITS_REFRESH_SECONDS, set_quota
from schemas.config import Settings
from schemas.database import ensure_schema
from schemas.quotas import Limits, LocalBucket, lease_size, retry_after
from schemas.topics import REQUESTS
from tests.support.ports import free_port
from tests.support.servers import serving, wait_answering
from tests.support.stacks import TEST_PARTITIONS, Broker, Postgres

ROOT = Path(__file__).resolve().parent.parent


def a_request(tenant: str) -> dict[str, Any]:
    return {
        "request_id": str(uuid.uuid4()),
        "tenant_id": tenant,
        "route": "/chat",
        "model": "gpt-4o",
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "prompt_tokens": 10,
    }


def requests_on_topic(brokers: str) -> Counter[str]:
    """Requests on llm.requests per tenant, read to the end."""
    consumer = Consumer(
        {"bootstrap.servers": brokers, "group.id": "quota-readback", "enable.auto.commit": False}
    )
    partitions = consumer.list_topics(REQUESTS, timeout=10).topics[REQUESTS].partitions
    consumer.assign([TopicPartition(REQUESTS, p, OFFSET_BEGINNING) for p in partitions])
    found: Counter[str] = Counter()
    quiet = time.monotonic()
    try:
        while time.monotonic() - quiet < 1.0:
            for message in consumer.consume(1000, 0.1):
                assert message.error() is None
                found[json.loads(message.value())["tenant_id"]] += 1
                quiet = time.monotonic()
    finally:
        consumer.close()
    return found


# -- the rules ------------------------------------------------------------------------


def test_a_local_bucket_gives_its_burst_then_its_rate() -> None:
    bucket = LocalBucket(Limits(10.0, 5), now=100.0)
    assert [bucket.take(1, 100.0) for _ in range(6)] == [0.0] * 5 + [1.0]
    assert bucket.take(3, 100.2) == pytest.approx(1.0)  # 0.2 s made 2 events
    assert bucket.take(2, 100.2) == 0.0
    assert bucket.take(10, 200.0) == pytest.approx(5.0)  # never more than the burst
    assert LocalBucket(Limits(1.0, 0), now=0.0).take(1, 0.0) == 0.0  # a burst of 0 still lets one through


def test_leases_and_retry_after() -> None:
    assert lease_size(Limits(1000.0, 10), need=1) == 50.0
    assert lease_size(Limits(1000.0, 10), need=80) == 80.0
    assert lease_size(Limits(2.0, 1), need=1) == 1.0
    # What a process holds may be a fraction: the lease covers the rest whole.
    assert lease_size(Limits(2.0, 10), need=1.6) == 1.6
    assert retry_after(0.1, Limits(10.0, 1)) == 1
    assert retry_after(25.0, Limits(10.0, 1)) == 3


def test_the_shared_bucket_fills_at_its_rate_up_to_its_capacity(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:

        def lease(need: float, want: float) -> tuple[float, float]:
            record = conn.execute(
                "SELECT granted, short FROM quota_lease('acme', 10, 20, %s, %s)", (need, want)
            ).fetchone()
            assert record is not None
            return round(record[0], 6), round(record[1], 6)

        def age(seconds: float) -> None:
            """As if the last lease were ``seconds`` older."""
            conn.execute("UPDATE quota_buckets SET at = at - make_interval(secs => %s)", (seconds,))

        assert lease(5, 8) == (8, 0)  # a new bucket is full: 20
        assert lease(5, 8) == (8, 0)  # 12 -> 4 left
        granted, short = lease(5, 5)
        assert granted == 0 and 0.9 < short <= 1  # 4 and a little, short of 5
        age(0.5)  # 5 more: 9 and a little
        granted, short = lease(5, 9)
        assert granted == pytest.approx(9, abs=0.1) and short == 0
        age(100)  # far past full: capped at the capacity
        assert lease(1, 100)[0] == pytest.approx(20, abs=0.01)


# -- the ingestion API ------------------------------------------------------------------


@contextmanager
def ingestion(broker: Broker, dsn: str, **settings: Any) -> Iterator[httpx.Client]:
    app = create_app(
        Settings(kafka_brokers=broker.address, postgres_dsn=dsn, topic_partitions=TEST_PARTITIONS, **settings)
    )
    with serving(app, "the ingestion API") as url, httpx.Client(base_url=url, timeout=20) as client:
        yield client


def otlp_span(tenant_request_id: str) -> dict[str, Any]:
    start = time.time_ns() - 5_000_000_000
    attributes = [
        {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
        {"key": "gen_ai.request.model", "value": {"stringValue": "gpt-4o"}},
        {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "12"}},
    ]
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": uuid.UUID(tenant_request_id).hex,
                                "spanId": uuid.UUID(tenant_request_id).hex[:16],
                                "name": "chat gpt-4o",
                                "kind": 3,
                                "startTimeUnixNano": str(start),
                                "endTimeUnixNano": str(start + 300_000_000),
                                "attributes": attributes,
                            }
                        ]
                    }
                ],
            }
        ]
    }


def test_a_tenant_over_its_quota_gets_429s_another_none_and_nothing_refused_reaches_kafka(
    broker: Broker, postgres_dsn: str
) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        set_quota(conn, "acme", Limits(2.0, 10))
        keys = {tenant: create_key(conn, tenant, "ingest").key for tenant in ("acme", "globex")}
        reader = create_key(conn, "acme", "read").key
    answers: dict[str, list[httpx.Response]] = {"acme": [], "globex": []}
    with ingestion(broker, postgres_dsn) as client:
        started = time.monotonic()
        for _ in range(25):
            for tenant in ("acme", "globex"):
                answers[tenant].append(
                    client.post(
                        "/v1/llm/request",
                        json=a_request(tenant),
                        headers={"Authorization": f"Bearer {keys[tenant]}"},
                    )
                )
        elapsed = time.monotonic() - started
        acme = Counter(answer.status_code for answer in answers["acme"])
        assert set(acme) == {202, 429}
        # The burst, and what the rate made while the requests went out (a lease may hold one more).
        assert 10 <= acme[202] <= 10 + 2 * elapsed + 1, (acme, elapsed)
        assert Counter(answer.status_code for answer in answers["globex"]) == {202: 25}
        refused = next(answer for answer in answers["acme"] if answer.status_code == 429)
        assert refused.json()["error"] == "over_quota" and "'acme'" in refused.json()["detail"]
        assert refused.headers["Retry-After"] == "1"  # short of one event at 2 a second

        acme_key = {"Authorization": f"Bearer {keys['acme']}"}
        batch = client.post(
            "/v1/llm/events",
            json={"events": [{"type": "request", **a_request("acme")} for _ in range(11)]},
            headers=acme_key,
        )
        assert batch.status_code == 429 and "burst of 10" in batch.json()["detail"], batch.text
        exported = client.post("/v1/traces", json=otlp_span(str(uuid.uuid4())), headers=acme_key)
        assert exported.status_code == 429, exported.text
        assert (
            exported.json()["code"] == 8 and "over_quota" in exported.json()["message"]
        )  # RESOURCE_EXHAUSTED
        assert int(exported.headers["Retry-After"]) >= 1
    # The server stopped: its usage was added up on the way out.
    on_topic = requests_on_topic(broker.address)
    assert on_topic == {"acme": acme[202], "globex": 25}
    query = create_query_app(Settings(postgres_dsn=postgres_dsn))
    with serving(query, "the query API") as url:
        shown = httpx.get(f"{url}/v1/usage", headers={"Authorization": f"Bearer {reader}"}, timeout=20)
    assert shown.status_code == 200, shown.text
    today = datetime.now(UTC).date().isoformat()
    assert shown.json() == {
        "tenant_id": "acme",
        "days": [
            {
                "day": today,
                "events_accepted": acme[202],
                "events_refused": acme[429] + 11 + 2,  # the batch's 11, the export's span (2 events)
                "calls_counted": 0,
            }
        ],
    }


def test_a_changed_quota_holds_within_10_seconds_without_a_restart(broker: Broker, postgres_dsn: str) -> None:
    with ingestion(broker, postgres_dsn, auth=False) as client:
        assert client.post("/v1/llm/request", json=a_request("acme")).status_code == 202
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            set_quota(conn, "acme", Limits(1.0, 1))
        changed = time.monotonic()
        while True:
            answer = client.post("/v1/llm/request", json=a_request("acme"))
            if answer.status_code == 429:
                break
            assert answer.status_code == 202
            assert time.monotonic() - changed < 10, "the new quota did not hold within 10 s"
            time.sleep(0.05)
        assert time.monotonic() - changed <= 2 * LIMITS_REFRESH_SECONDS
        # Back to no limit.
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            set_quota(conn, "acme", None)
        deadline = time.monotonic() + 10
        while client.post("/v1/llm/request", json=a_request("acme")).status_code != 202:
            assert time.monotonic() < deadline, "the quota was not lifted within 10 s"
            time.sleep(0.05)


def ingestion_process(broker: Broker, dsn: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    environ = {
        **os.environ,
        "KAFKA_BROKERS": broker.address,
        "POSTGRES_DSN": dsn,
        "TOPIC_PARTITIONS": str(TEST_PARTITIONS),
        "AUTH": "off",
        "INGEST_RATE": "200",
        "INGEST_BURST": "100",
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.ingestion:app", "--port", str(port), "--no-access-log"],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


def test_two_ingestion_processes_share_one_quota_within_10_percent(
    broker: Broker, postgres_dsn: str, tmp_path: Path
) -> None:
    """INGEST_RATE 200, INGEST_BURST 100 for every tenant; two processes, each sent batches
    of 10 of one tenant's events as fast as a client can for 30 s."""
    ports = [free_port(), free_port()]
    processes = [
        ingestion_process(broker, postgres_dsn, port, tmp_path / f"ingestion-{port}.log") for port in ports
    ]
    accepted = Counter[int]()
    try:
        for port, process in zip(ports, processes, strict=True):
            wait_answering(f"http://127.0.0.1:{port}/ready", process, tmp_path / f"ingestion-{port}.log")
        stop = threading.Event()

        def hammer(port: int) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
                while not stop.is_set():
                    batch = {"events": [{"type": "request", **a_request("acme")} for _ in range(10)]}
                    answer = client.post("/v1/llm/events", json=batch)
                    assert answer.status_code in (202, 429), answer.text
                    if answer.status_code == 202:
                        accepted[port] += 10

        threads = [threading.Thread(target=hammer, args=(port,)) for port in ports for _ in range(2)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(30)  # the measured span: how long the clients send
        stop.set()
        for thread in threads:
            thread.join(30)
        elapsed = time.monotonic() - started
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)
    allowed = 200 * elapsed + 100
    total = sum(accepted.values())
    print(
        f"accepted {total} events in {elapsed:.1f} s ({dict(accepted)} by process): "
        f"{total / allowed:.3f} of allowed"
    )
    assert all(accepted[port] > 0 for port in ports), accepted
    assert 0.9 * allowed <= total <= 1.1 * allowed, (total, allowed, accepted)
    assert requests_on_topic(broker.address) == {"acme": total}


def test_with_the_quota_store_stopped_ingestion_goes_on_within_the_last_known_limits(
    broker: Broker, own_postgres: Postgres, capfd: pytest.CaptureFixture[str]
) -> None:
    ensure_schema(own_postgres.dsn)
    with ingestion(broker, own_postgres.dsn, auth=False, ingest_rate=20.0, ingest_burst=20) as client:
        assert client.post("/v1/llm/request", json=a_request("acme")).status_code == 202
        own_postgres.stop()
        try:
            stopped = time.monotonic()
            answers = Counter(
                client.post("/v1/llm/request", json=a_request("acme")).status_code for _ in range(60)
            )
            elapsed = time.monotonic() - stopped
        finally:
            own_postgres.start(own_postgres.port)
    # Never a 503: the events go on, within this process's own bucket at 20 a second.
    assert set(answers) <= {202, 429} and answers[202] >= 20, answers
    assert answers[202] <= 20 + 20 * elapsed + 1, (answers, elapsed)
    assert "quota store unreachable" in capfd.readouterr().err  # and said so in its log
