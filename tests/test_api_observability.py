"""``GET /metrics`` of both APIs, scraped during real runs (real broker, real Postgres), and their log lines.

Every expected figure is counted here, from what the test sent and what it read
back from the topics, and compared with the parsed exposition.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api import ingestion
from api import query as query_api
from api.keys import create_key
from schemas.config import Settings
from schemas.database import ensure_schema
from schemas.topics import REQUESTS, RESPONSES
from tests.support.metric_windows import T0, Window, insert_windows, random_calls
from tests.support.ports import free_port
from tests.support.servers import serving
from tests.support.spans import PROTOBUF, genai_specs, is_call, proto_export, recent, with_ids
from tests.support.stacks import TEST_PARTITIONS, Broker
from tests.support.topics import read_topic

TENANT = "tenant-metrics-qx7"
OTHER_TENANT = "tenant-metrics-zr2"
# Names that must not appear in /metrics either.
ROUTE = "/route-metrics-k31"
MODEL = "model-metrics-w88"
# Every label /metrics may carry: none of them names a tenant, route or model.
ALLOWED_LABELS = {"endpoint", "reason", "status", "kind", "le"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The apps bind the process-wide ``streamlens`` logger to this test's stderr: undo it."""
    logger = logging.getLogger("streamlens")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


class Lines(logging.Handler):
    """The ``streamlens`` log lines from now on (added after the app configured its logging)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        logging.getLogger("streamlens").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def matching(self, text: str) -> list[str]:
        return [message for message in self.messages if text in message]


def scrape(url: str) -> tuple[str, Samples]:
    """``/metrics`` without a key: its text, and every sample by (name, labels)."""
    answer = httpx.get(f"{url}/metrics", timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, sample
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return answer.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def assert_no_names(text: str) -> None:
    for name in (TENANT, OTHER_TENANT, ROUTE, MODEL):
        assert name not in text


def _ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


def request_event(request_id: str, tenant: str = TENANT, timestamp: str | None = None) -> dict[str, object]:
    return {
        "request_id": request_id,
        "tenant_id": tenant,
        "route": ROUTE,
        "model": MODEL,
        "timestamp": timestamp or _ago(10),
        "prompt_tokens": 12,
    }


def response_event(request_id: str) -> dict[str, object]:
    return {"request_id": request_id, "timestamp": _ago(9), "completion_tokens": 3}


def _keys(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        return {
            "ingest": create_key(conn, TENANT, "ingest").key,
            "read": create_key(conn, TENANT, "read").key,
        }


# -- the ingestion API ----------------------------------------------------------------


def test_ingestion_counts_what_was_sent_refused_and_acknowledged(broker: Broker, postgres_dsn: str) -> None:
    rng = random.Random()
    keys = _keys(postgres_dsn)
    auth = {"Authorization": f"Bearer {keys['ingest']}"}
    settings = Settings(
        kafka_brokers=broker.address, postgres_dsn=postgres_dsn, topic_partitions=TEST_PARTITIONS
    )
    statuses: Counter[tuple[str, int]] = Counter()
    bodies: dict[str, list[int]] = {endpoint: [] for endpoint in ("request", "response", "events", "traces")}
    rejected: Counter[tuple[str, str]] = Counter()
    accepted: Counter[str] = Counter()

    with (
        serving(ingestion.create_app(settings), "the ingestion API") as url,
        httpx.Client(base_url=url) as client,
    ):

        def post(
            endpoint: str, path: str, body: bytes, headers: dict[str, str], expected: int
        ) -> httpx.Response:
            answer = client.post(path, content=body, headers=headers)
            assert answer.status_code == expected, answer.text
            statuses[endpoint, expected] += 1
            if "Authorization" in headers:  # without a key the body is never read
                bodies[endpoint].append(len(body))
            return answer

        json_auth = {**auth, "Content-Type": "application/json"}
        counter = iter(range(10**6))

        def single(endpoint: str, event: dict[str, object], expected: int, reason: str | None = None) -> None:
            post(endpoint, f"/v1/llm/{endpoint}", json.dumps(event).encode(), json_auth, expected)
            if reason is None:
                accepted[endpoint] += 1
            else:
                rejected[endpoint, reason] += 1

        for _ in range(rng.randint(3, 8)):
            single("request", request_event(f"s{next(counter)}"), 202)
        for _ in range(rng.randint(2, 5)):
            single("response", response_event(f"s{next(counter)}"), 202)
        for _ in range(rng.randint(1, 3)):
            single("request", {**request_event(f"s{next(counter)}"), "prompt_tokens": -1}, 400, "invalid")
        post("response", "/v1/llm/response", b'{"request_id": ', json_auth, 400)
        rejected["response", "invalid"] += 1
        in_an_hour = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        for _ in range(rng.randint(1, 2)):
            event = request_event(f"s{next(counter)}", timestamp=in_an_hour)
            single("request", event, 400, "future_timestamp")
        for _ in range(rng.randint(1, 2)):
            single("request", request_event(f"s{next(counter)}", OTHER_TENANT), 403, "other_tenant")
        # Without a key: refused before the body is read, so no event is counted.
        post("request", "/v1/llm/request", json.dumps(request_event("nokey")).encode(), {}, 401)

        # A batch with every kind of event, and one refused as a whole.
        plan = (
            ["valid"] * rng.randint(5, 20)
            + ["invalid"] * rng.randint(1, 4)
            + ["future_timestamp"] * rng.randint(1, 3)
            + ["other_tenant"] * rng.randint(1, 3)
        )
        rng.shuffle(plan)
        events: list[dict[str, object]] = []
        for kind in plan:
            request_id = f"b{next(counter)}"
            if kind == "valid":
                accepted["events"] += 1
                events.append({"type": "response", **response_event(request_id)})
                continue
            rejected["events", kind] += 1
            event = {
                "invalid": {**request_event(request_id), "model": ""},
                "future_timestamp": request_event(request_id, timestamp=in_an_hour),
                "other_tenant": request_event(request_id, OTHER_TENANT),
            }[kind]
            events.append({"type": "request", **event})
        post("events", "/v1/llm/events", json.dumps({"events": events}).encode(), json_auth, 207)
        post("events", "/v1/llm/events", b'{"events": [', json_auth, 400)

        # An OTLP export: GenAI calls, spans that are not calls, one broken call, one of another tenant.
        specs = with_ids(genai_specs(recent(), route=ROUTE), 1400)
        calls = [spec for spec in specs if is_call(spec)]
        calls[1].attributes["gen_ai.usage.input_tokens"] = "many"
        calls[2].attributes["streamlens.tenant_id"] = OTHER_TENANT
        rejected["traces", "invalid"] += 1
        rejected["traces", "other_tenant"] += 1
        accepted["traces"] = len(calls) - 2
        post(
            "traces", "/v1/traces", proto_export(specs, "svc").SerializeToString(), {**auth, **PROTOBUF}, 200
        )

        text, samples = scrape(url)

    stored = accepted["request"] + accepted["response"] + accepted["events"] + 2 * accepted["traces"]
    on_topics = len(read_topic(broker.address, REQUESTS, 1)) + len(read_topic(broker.address, RESPONSES, 1))
    assert on_topics == stored

    for endpoint in ("request", "response", "events"):
        assert (
            value(samples, "streamlens_ingestion_events_accepted_total", endpoint=endpoint)
            == accepted[endpoint]
        )
        for reason in ("invalid", "future_timestamp", "other_tenant"):
            assert (
                value(samples, "streamlens_ingestion_events_rejected_total", endpoint=endpoint, reason=reason)
                == rejected[endpoint, reason]
            ), (endpoint, reason)
    assert value(samples, "streamlens_ingestion_spans_accepted_total") == accepted["traces"]
    for reason in ("invalid", "future_timestamp", "other_tenant"):
        assert (
            value(samples, "streamlens_ingestion_spans_rejected_total", reason=reason)
            == rejected["traces", reason]
        )

    answered = {
        (dict(labels)["endpoint"], int(dict(labels)["status"])): count
        for (name, labels), count in samples.items()
        if name == "streamlens_ingestion_responses_total"
    }
    assert answered == statuses
    for endpoint, sizes in bodies.items():
        requests = sum(count for (where, _), count in statuses.items() if where == endpoint)
        assert value(samples, "streamlens_ingestion_request_seconds_count", endpoint=endpoint) == requests
        assert value(samples, "streamlens_ingestion_body_bytes_count", endpoint=endpoint) == len(sizes)
        assert value(samples, "streamlens_ingestion_body_bytes_sum", endpoint=endpoint) == sum(sizes)
        assert value(samples, "streamlens_ingestion_body_bytes_bucket", endpoint=endpoint, le="+Inf") == len(
            sizes
        )
        assert value(samples, "streamlens_ingestion_body_bytes_bucket", endpoint=endpoint, le="256.0") == sum(
            size <= 256 for size in sizes
        )

    # One acknowledgement per record stored, each within the contract's 5 s.
    assert value(samples, "streamlens_ingestion_broker_ack_seconds_count") == stored
    assert value(samples, "streamlens_ingestion_broker_ack_seconds_bucket", le="5.0") == stored
    assert 0 < value(samples, "streamlens_ingestion_broker_ack_seconds_sum") < 5 * stored
    assert value(samples, "streamlens_ingestion_sends_in_flight") == 0
    assert_no_names(text)


def wait_ready(url: str, timeout: float = 30.0) -> list[int]:
    """``/ready`` asked every 50 ms until it answers 200; every status it gave."""
    answers: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answers.append(httpx.get(f"{url}/ready", timeout=5).status_code)
        if answers[-1] == 200:
            return answers
        time.sleep(0.05)
    raise AssertionError(f"/ready did not answer 200 in {timeout:g} s: {Counter(answers)}")


def test_ready_waits_for_a_broker_started_after_the_api_and_for_the_producer_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    settings = Settings(kafka_brokers=f"127.0.0.1:{port}", topic_partitions=TEST_PARTITIONS, auth=False)
    app = ingestion.create_app(settings)
    with serving(app, "the ingestion API") as url:
        started = [line for line in capsys.readouterr().err.splitlines() if "ingestion API started" in line]
        assert len(started) == 1, started
        assert started[0].endswith(
            f"INFO streamlens.ingestion: ingestion API started: HTTP_PORT unset (8080), "
            f"brokers 127.0.0.1:{port}, auth off"
        )
        answer = httpx.get(f"{url}/ready")
        assert answer.status_code == 503
        assert f"127.0.0.1:{port}" in answer.json()["detail"]
        assert app.state.ingestion.producer.initialised is False

        late = Broker(tmp_path / "late").start(port)  # empty: the API creates the topics
        try:
            answers = wait_ready(url)
            assert set(answers[:-1]) <= {503}
            # Ready means the broker gave this producer its id (librdkafka's statistics said so).
            assert app.state.ingestion.producer.initialised is True
            first = httpx.post(f"{url}/v1/llm/request", json=request_event("first", timestamp=_ago(1)))
            assert first.status_code == 202, first.text
            assert [key for key, _ in read_topic(late.address, REQUESTS, 1)] == ["first"]
        finally:
            late.stop()


def test_a_lost_broker_is_one_line_and_its_return_another_and_503s_are_counted(broker: Broker) -> None:
    settings = Settings(kafka_brokers=broker.address, topic_partitions=TEST_PARTITIONS, auth=False)
    with serving(ingestion.create_app(settings), "the ingestion API") as url:
        lines = Lines()
        broker.stop()
        refused = 4

        async def send_all() -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                answers = await asyncio.gather(
                    *(client.post("/v1/llm/request", json=request_event(f"lost{i}")) for i in range(refused))
                )
            return [answer.status_code for answer in answers]

        assert asyncio.run(send_all()) == [503] * refused
        _, samples = scrape(url)
        assert (
            value(samples, "streamlens_ingestion_responses_total", endpoint="request", status="503")
            == refused
        )
        assert value(samples, "streamlens_ingestion_events_accepted_total", endpoint="request") == 0
        assert value(samples, "streamlens_ingestion_broker_ack_seconds_count") == 0
        assert value(samples, "streamlens_ingestion_sends_in_flight") == 0

        broker.start(broker.port)  # empty again: the API creates the topics again
        wait_ready(url)
        assert httpx.post(f"{url}/v1/llm/request", json=request_event("back")).status_code == 202
        lost = lines.matching(f"broker {broker.address} lost")
        back = lines.matching(f"broker {broker.address} back")
        assert (len(lost), len(back)) == (1, 1), lines.messages
        assert lines.messages.index(lost[0]) < lines.messages.index(back[0])


# -- the query API ---------------------------------------------------------------------


def test_query_api_counts_queries_rows_and_database_errors(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random()
    keys = _keys(postgres_dsn)
    # Windows 25 minutes apart: the 1-hour roll-up's bucket count is worked out here.
    starts = [T0 + timedelta(minutes=25 * i) for i in range(rng.randint(3, 9))]
    insert_windows(
        postgres_dsn, [Window(TENANT, ROUTE, MODEL, start, random_calls(rng, 5)) for start in starts]
    )
    buckets = len({start.replace(minute=0) for start in starts})
    settings = Settings(postgres_dsn=postgres_dsn, log_format="json")
    with (
        serving(query_api.create_app(settings), "the query API") as url,
        httpx.Client(base_url=url) as client,
    ):
        # LOG_FORMAT=json: the start line is one JSON object (uvicorn's own lines are not ours).
        logged = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
        assert [(entry["level"], entry["logger"]) for entry in logged] == [("INFO", "streamlens.query")]
        host_port_db = postgres_dsn.split("@", 1)[1]
        assert (
            logged[0]["message"]
            == f"query API started: HTTP_PORT unset (8081), postgres {host_port_db}, auth on"
        )
        lines = Lines()
        auth = {"Authorization": f"Bearer {keys['read']}"}

        def query(expected: int, **parameters: str) -> None:
            answer = client.get("/v1/metrics", params={"tenant_id": TENANT, **parameters}, headers=auth)
            assert answer.status_code == expected, answer.text

        windows, rollups = rng.randint(1, 4), rng.randint(1, 3)
        for _ in range(windows):
            query(200)
        for _ in range(rollups):
            query(200, bucket="1h", group_by="")
        query(400, limit="0")  # not a query: no kind, not timed
        _, before = scrape(url)

        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE llm_metrics")
        query(503)
        query(503)
        query(503, bucket="1h")
        ensure_schema(postgres_dsn)
        query(200)
        text, after = scrape(url)

    assert value(before, "streamlens_query_request_seconds_count", kind="windows") == windows
    assert value(before, "streamlens_query_request_seconds_count", kind="rollup") == rollups
    assert value(before, "streamlens_query_rows_returned_total", kind="windows") == windows * len(starts)
    assert value(before, "streamlens_query_rows_returned_total", kind="rollup") == rollups * buckets
    for kind in ("windows", "rollup", "ready"):
        assert value(before, "streamlens_query_database_errors_total", kind=kind) == 0
    size = value(before, "streamlens_query_pool_connections")
    assert 1 <= size <= 10
    assert 0 <= value(before, "streamlens_query_pool_available") <= size
    assert value(before, "streamlens_query_pool_waiting") == 0

    assert value(after, "streamlens_query_database_errors_total", kind="windows") == 2
    assert value(after, "streamlens_query_database_errors_total", kind="rollup") == 1
    assert value(after, "streamlens_query_request_seconds_count", kind="windows") == windows + 3
    assert value(after, "streamlens_query_request_seconds_count", kind="rollup") == rollups + 1
    # The table came back empty: no more rows.
    assert value(after, "streamlens_query_rows_returned_total", kind="windows") == windows * len(starts)
    # Three failures, one outage: one line when it began and one when it ended.
    assert len(lines.matching("postgres lost: UndefinedTable")) == 1, lines.messages
    assert len(lines.matching("postgres back")) == 1, lines.messages
    assert_no_names(text)


def test_the_query_apis_start_line_shows_where_postgres_is_but_no_password() -> None:
    assert (
        query_api._where("postgresql://reader:s3cret@db.internal:5433/streamlens")
        == "db.internal:5433/streamlens"
    )
    assert query_api._where("host=10.0.0.7 dbname=x password=s3cret") == "10.0.0.7:5432/x"
    assert query_api._where("postgresql://[broken") == "(an unreadable POSTGRES_DSN)"
