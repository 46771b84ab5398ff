"""The query API against a real Postgres holding windows built here from raw calls."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from starlette.testclient import TestClient

import api.query
from api.params import PARAMETERS
from schemas.database import ensure_schema
from schemas.rows import ROW_FIELDS
from tests.support.metric_windows import (
    MINUTE,
    T0,
    Window,
    get,
    insert_windows,
    random_calls,
    rfc3339,
)
from tests.support.ports import free_port
from tests.support.stacks import Postgres, signal_postgres

# Two tenants; tenant "acme" has 2 routes x 2 models x 5 minutes, "globex" 1 key x 2 minutes.
ROUTES = ("/chat", "/search")
MODELS = ("gpt-4o", "claude-sonnet-4-5")


@pytest.fixture
def windows() -> list[Window]:
    rnd = random.Random(7)
    made = [
        Window("acme", route, model, T0 + minute * MINUTE, random_calls(rnd, rnd.randint(1, 30)))
        for minute in range(5)
        for route in ROUTES
        for model in MODELS
    ]
    made += [
        Window("globex", "/chat", "gpt-4o", T0 + minute * MINUTE, random_calls(rnd, 5)) for minute in range(2)
    ]
    return made


@pytest.fixture
def client(postgres_dsn: str, windows: list[Window], client_for: Any) -> TestClient:
    insert_windows(postgres_dsn, windows)
    return client_for(postgres_dsn)


def expected_keys(windows: Sequence[Window], tenant: str, **match: str) -> list[tuple]:
    """Independent order: newest first, then route, then model (code-point order)."""
    chosen = [
        w
        for w in windows
        if w.tenant_id == tenant and all(getattr(w, name) == value for name, value in match.items())
    ]
    chosen.sort(key=lambda w: (-w.start.timestamp(), w.route, w.model))
    return [(rfc3339(w.start), w.route, w.model) for w in chosen]


def keys(body: dict[str, Any]) -> list[tuple]:
    return [(row["window_start"], row["route"], row["model"]) for row in body["metrics"]]


def test_rows_newest_first_then_route_and_model(client: TestClient, windows: list[Window]):
    body = get(client, tenant_id="acme")
    assert keys(body) == expected_keys(windows, "acme")
    assert body["count"] == 20


def test_row_fields_and_values_are_the_stored_window(client: TestClient, windows: list[Window]):
    body = get(client, tenant_id="globex")
    newest = max((w for w in windows if w.tenant_id == "globex"), key=lambda w: w.start)
    row = body["metrics"][0]
    assert list(row) == list(ROW_FIELDS)
    stored = newest.column_values()
    for name in ROW_FIELDS:
        if name in ("window_start", "window_end"):
            assert row[name] == rfc3339(stored[name])
        else:
            assert row[name] == pytest.approx(stored[name]), name
    assert row["window_end"].endswith("Z")


@pytest.mark.parametrize(
    "match",
    [
        {"route": "/search"},
        {"model": "gpt-4o"},
        {"route": "/chat", "model": "claude-sonnet-4-5"},
    ],
)
def test_filters_match_exactly(client: TestClient, windows: list[Window], match: dict):
    assert keys(get(client, tenant_id="acme", **match)) == expected_keys(windows, "acme", **match)


def test_filters_that_match_nothing_give_an_empty_list(client: TestClient):
    assert get(client, tenant_id="nobody") == {"metrics": [], "count": 0}
    assert get(client, tenant_id="acme", model="gpt-4") == {"metrics": [], "count": 0}
    assert get(client, tenant_id="acme", route="/CHAT") == {"metrics": [], "count": 0}


def test_from_is_inclusive_and_to_exclusive(client: TestClient):
    body = get(client, tenant_id="acme", **{"from": rfc3339(T0 + MINUTE), "to": rfc3339(T0 + 3 * MINUTE)})
    starts = sorted({row["window_start"] for row in body["metrics"]})
    assert starts == [rfc3339(T0 + MINUTE), rfc3339(T0 + 2 * MINUTE)]
    # One microsecond past a window's start excludes it; 'to' at a start excludes it too.
    body = get(client, tenant_id="acme", **{"from": "2026-03-01T10:01:00.000001Z"})
    assert min(row["window_start"] for row in body["metrics"]) == rfc3339(T0 + 2 * MINUTE)
    body = get(client, tenant_id="acme", to=rfc3339(T0 + MINUTE))
    assert {row["window_start"] for row in body["metrics"]} == {rfc3339(T0)}


def test_timestamps_with_any_offset_mean_the_same_instant(client: TestClient):
    utc = get(client, tenant_id="acme", **{"from": "2026-03-01T10:03:00Z"})
    offset = get(client, tenant_id="acme", **{"from": "2026-03-01T12:03:00+02:00"})
    assert keys(utc) == keys(offset)
    assert utc["count"] == 8


def test_limit_bounds(client: TestClient, windows: list[Window]):
    assert keys(get(client, tenant_id="acme", limit="1")) == expected_keys(windows, "acme")[:1]
    assert get(client, tenant_id="acme", limit="1000")["count"] == 20
    assert get(client, tenant_id="acme", limit="7")["count"] == 7


def test_default_limit_is_60(postgres_dsn: str, client_for: Any):
    rnd = random.Random(1)
    insert_windows(
        postgres_dsn,
        [Window("acme", "/chat", "gpt-4o", T0 + i * MINUTE, random_calls(rnd, 2)) for i in range(70)],
    )
    body = get(client_for(postgres_dsn), tenant_id="acme")
    assert body["count"] == 60
    assert body["metrics"][0]["window_start"] == rfc3339(T0 + 69 * MINUTE)


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("", "tenant_id"),
        ("tenant_id=", "tenant_id"),
        ("tenant_id=" + "x" * 129, "tenant_id"),
        ("tenant_id=a&tenant_id=b", "tenant_id"),
        ("tenant_id=ac%0Ame", "tenant_id"),
        ("tenant_id=acme&route=", "route"),
        ("tenant_id=acme&route=%2Fchat%00", "route"),
        ("tenant_id=acme&model=%00", "model"),
        ("tenant_id=acme&model=", "model"),
        ("tenant_id=acme&limit=0", "limit"),
        ("tenant_id=acme&limit=1001", "limit"),
        ("tenant_id=acme&limit=abc", "limit"),
        ("tenant_id=acme&limit=-1", "limit"),
        ("tenant_id=acme&limit=1.5", "limit"),
        ("tenant_id=acme&limit=", "limit"),
        ("tenant_id=acme&from=yesterday", "from"),
        ("tenant_id=acme&from=2026-03-01", "from"),
        ("tenant_id=acme&from=2026-03-01T10:00:00", "from"),
        ("tenant_id=acme&to=2026-03-01T10:00:00", "to"),
        ("tenant_id=acme&to=2026-13-01T10:00:00Z", "to"),
        ("tenant_id=acme&from=2026-03-01T10:00:00Z&to=2026-03-01T10:00:00Z", "from"),
        ("tenant_id=acme&from=2026-03-01T11:00:00Z&to=2026-03-01T10:00:00Z", "from"),
        ("tenant_id=acme&bucket=2m", "bucket"),
        ("tenant_id=acme&bucket=", "bucket"),
        ("tenant_id=acme&group_by=tenant", "group_by"),
        ("tenant_id=acme&group_by=route,route", "group_by"),
        ("tenant_id=acme&group_by=route,", "group_by"),
        ("tenant_id=acme&modle=gpt-4o", "modle"),
        ("tenant_id=acme&limit=5&from=2026-03-01T10:00:00Z&extra=1", "extra"),
    ],
)
def test_malformed_parameters_are_rejected_naming_them(client: TestClient, query: str, named: str):
    response = client.get(f"/v1/metrics?{query}")
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == "invalid_parameter"
    assert body["detail"].startswith(f"{named}: ")


def test_an_unencoded_plus_in_an_offset_gets_a_hint(client: TestClient):
    response = client.get("/v1/metrics?tenant_id=acme&from=2026-03-01T10:00:00+01:00")
    assert response.status_code == 400
    assert "%2B" in response.json()["detail"]
    encoded = client.get("/v1/metrics?tenant_id=acme&from=2026-03-01T10:00:00%2B01:00")
    assert encoded.status_code == 200


def test_health_and_ready(client: TestClient):
    assert client.get("/health").json() == {"status": "ok"}
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


def test_openapi_lists_every_parameter_and_row_field(client: TestClient):
    document = client.get("/openapi.json").json()
    operation = document["paths"]["/v1/metrics"]["get"]
    assert [p["name"] for p in operation["parameters"]] == list(PARAMETERS)
    assert set(PARAMETERS) == {
        "tenant_id",
        "route",
        "model",
        "from",
        "to",
        "limit",
        "bucket",
        "group_by",
        "dimension",
        "value",
    }
    row = document["components"]["schemas"]["MetricsRow"]
    assert set(row["properties"]) == set(ROW_FIELDS)
    assert {"/health", "/ready", "/openapi.json"} <= set(document["paths"])


def test_database_errors_answer_503_json(client: TestClient, postgres_dsn: str):
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE llm_metrics RENAME TO llm_metrics_gone")
    for query in ("tenant_id=acme", "tenant_id=acme&bucket=1h"):
        response = client.get(f"/v1/metrics?{query}")
        assert response.status_code == 503
        assert response.json()["error"] == "unavailable"
        assert response.headers["retry-after"]


def test_ready_is_503_when_postgres_does_not_answer(
    client_for: Any, monkeypatch: pytest.MonkeyPatch, postgres_dsn: str
):
    monkeypatch.setattr(api.query, "READY_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(api.query, "QUERY_SECONDS", 0.5)
    client = client_for(postgres_dsn)
    # Point the running app at a port nobody listens on.
    dead = api.query.psycopg_pool.AsyncConnectionPool(
        f"postgresql://postgres@127.0.0.1:{free_port()}/streamlens",
        open=False,
        min_size=0,
        max_size=1,
        kwargs={"connect_timeout": 1},
    )
    client.portal.call(dead.open)
    live = client.app.state.pool
    client.app.state.pool = dead
    try:
        assert client.get("/health").status_code == 200
        response = client.get("/ready")
        assert response.status_code == 503
        assert response.json()["error"] == "unavailable"
        assert client.get("/v1/metrics?tenant_id=acme").status_code == 503
    finally:
        client.app.state.pool = live
        client.portal.call(dead.close)


def test_unknown_paths_and_methods_answer_json(client: TestClient):
    missing = client.get("/v1/metric")
    assert missing.status_code == 404
    assert missing.json() == {"error": "not_found", "detail": "no such path: /v1/metric"}
    wrong = client.post("/v1/metrics?tenant_id=acme")
    assert wrong.status_code == 405
    assert wrong.json()["error"] == "method_not_allowed"


def test_sessions_have_a_statement_timeout_and_utc(client: TestClient):
    async def settings() -> tuple[str, str]:
        async with client.app.state.pool.connection() as conn:
            timeout = await (await conn.execute("SHOW statement_timeout")).fetchone()
            zone = await (await conn.execute("SHOW TimeZone")).fetchone()
        return timeout[0], zone[0]

    assert client.portal.call(settings) == ("2s", "UTC")


def test_starts_before_its_database_exists_and_becomes_ready(
    postgres_server: Any, client_for: Any, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(api.query, "SCHEMA_RETRY_SECONDS", 0.2)
    monkeypatch.setattr(api.query, "READY_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(api.query, "QUERY_SECONDS", 0.5)
    name = f"late_{free_port()}"
    dsn = postgres_server.dsn.rsplit("/", 1)[0] + f"/{name}"
    client = client_for(dsn)
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 503
    assert client.get("/v1/metrics?tenant_id=acme").status_code == 503
    admin = postgres_server.dsn.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    deadline = time.monotonic() + 10
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "never became ready"
        time.sleep(0.1)
    assert get(client, tenant_id="acme") == {"metrics": [], "count": 0}


def timed_get(client: TestClient, path: str) -> tuple[int, str, float]:
    started = time.monotonic()
    response = client.get(path)
    return (
        response.status_code,
        response.json()["error"] if response.status_code != 200 else "",
        (time.monotonic() - started),
    )


def test_a_frozen_postgres_answers_503_within_5_s_even_to_a_query_already_running(
    own_postgres: Postgres, client_for: Any
):
    dsn = own_postgres.dsn
    ensure_schema(dsn)
    insert_windows(
        dsn,
        [
            Window("acme", "/chat", "gpt-4o", T0 + i * MINUTE, random_calls(random.Random(i), 3))
            for i in range(3)
        ],
    )
    client = client_for(dsn)
    assert get(client, tenant_id="acme", bucket="1h")["count"] == 1
    rollup = "/v1/metrics?tenant_id=acme&bucket=1d"
    # A roll-up already running when Postgres freezes: it waits on a lock held here.
    blocker = psycopg.connect(dsn)
    blocker.execute("LOCK TABLE llm_metrics IN ACCESS EXCLUSIVE MODE")
    results: dict[str, tuple[int, str, float]] = {}

    def ask(name: str, path: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.__setitem__(name, timed_get(client, path)))
        thread.start()
        return thread

    running = ask("running", rollup)
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    deadline = time.monotonic() + 5
    while blocker.execute(waiting).fetchone()[0] == 0:
        assert time.monotonic() < deadline, "the roll-up never reached Postgres"
    signal_postgres(own_postgres, signal.SIGSTOP)
    try:
        threads = [
            running,
            ask("plain", "/v1/metrics?tenant_id=acme"),
            ask("rollup", rollup),
            ask("ready", "/ready"),
        ]
        for thread in threads:
            thread.join(15)
        assert client.get("/health").status_code == 200
    finally:
        signal_postgres(own_postgres, signal.SIGCONT)
        blocker.close()
    for name in ("running", "plain", "rollup", "ready"):
        status, error, seconds = results[name]
        assert (status, error) == (503, "unavailable"), name
        assert seconds < 5.0, (name, seconds)
    # Thawed, it answers again by itself.
    deadline = time.monotonic() + 20
    while client.get("/ready").status_code != 200 or client.get(rollup).status_code != 200:
        assert time.monotonic() < deadline, "did not recover after Postgres came back"
    assert get(client, tenant_id="acme", bucket="1d")["metrics"][0]["requests"] == 9
