"""Authentication and tenant isolation, through a small Starlette app against real Postgres.

The app of tests/support/auth_app.py uses :mod:`api.auth` the way the ingestion and query APIs do:
the key store on ``app.state``, :data:`AUTHENTICATION` in its middleware, each endpoint
declared with :func:`requires`, errors raised as :class:`ApiError`,
:func:`check_event` per event and :func:`forbidden_tenant` per query. It records
what it accepted so the tests can see what would have reached Kafka.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.testclient import TestClient

from api import ingestion
from api import query as query_api
from api.auth import (
    TENANT_NOT_ALLOWED,
    KeyStore,
    generate_key,
    open_key_store,
)
from api.keys import create_key, revoke_key
from schemas.config import Settings
from schemas.topics import REQUESTS, RESPONSES
from tests.support.auth_app import make_app, request_event
from tests.support.metric_windows import T0, RawCall, Window, insert_windows
from tests.support.ports import free_port
from tests.support.stacks import Broker
from tests.support.topics import read_topic

RESPONSE = {"timestamp": "2026-01-01T00:00:01Z", "completion_tokens": 3}
REALM = 'Bearer realm="streamlens"'


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def response_event(request_id: str = "r1", tenant: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"request_id": request_id, **RESPONSE}
    if tenant is not None:
        event["tenant_id"] = tenant
    return event


class Keys:
    """One ingest and one read key for tenants acme and globex."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.acme_ingest = create_key(conn, "acme", "ingest").key
        self.acme_read = create_key(conn, "acme", "read").key
        self.globex_ingest = create_key(conn, "globex", "ingest").key
        self.globex_read = create_key(conn, "globex", "read").key


@pytest.fixture
def conn(postgres_dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
def keys(conn: psycopg.Connection) -> Keys:
    return Keys(conn)


@pytest.fixture
def client(postgres_dsn: str) -> Iterator[TestClient]:
    with TestClient(make_app(Settings(postgres_dsn=postgres_dsn))) as test_client:
        yield test_client


def app_of(client: TestClient) -> Starlette:
    """The app ``client`` drives: one :func:`make_app` built."""
    app = client.app
    assert isinstance(app, Starlette)
    return app


def accepted(client: TestClient) -> list[tuple[str, str | None]]:
    return app_of(client).state.accepted


def assert_unauthorized(response: Any, *, key_given: bool) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "unauthorized"
    challenge = f'{REALM}, error="invalid_token"' if key_given else REALM
    assert response.headers["www-authenticate"] == challenge


def test_the_right_key_is_accepted(client: TestClient, keys: Keys) -> None:
    sent = client.post("/v1/llm/request", json=request_event("acme"), headers=bearer(keys.acme_ingest))
    assert sent.status_code == 202, sent.text
    read = client.get("/v1/metrics", params={"tenant_id": "acme"}, headers=bearer(keys.acme_read))
    assert read.status_code == 200, read.text
    assert read.json()["tenant_id"] == "acme"
    assert accepted(client) == [("r1", "acme")]


def test_no_key_is_401_and_health_stays_open(client: TestClient, keys: Keys) -> None:
    response = client.post("/v1/llm/request", json=request_event("acme"))
    assert_unauthorized(response, key_given=False)
    assert "Authorization: Bearer <key>" in response.json()["detail"]
    assert_unauthorized(client.get("/v1/metrics", params={"tenant_id": "acme"}), key_given=False)
    assert client.get("/health").status_code == 200
    assert accepted(client) == []


def test_malformed_authorization_headers_are_401(client: TestClient, keys: Keys) -> None:
    key = keys.acme_ingest
    no_bearer_key = ["Basic x", f"Basic {key}", "Bearer", "Bearer   ", "Token " + key, key]
    for header in no_bearer_key:
        response = client.post(
            "/v1/llm/request", json=request_event("acme"), headers={"Authorization": header}
        )
        assert_unauthorized(response, key_given=False)
    bad_key = [
        f"Bearer {key} extra",
        f"Bearer {key}x",
        f"Bearer {key[:-1]}",
        f"Bearer {key.upper()}",
        "Bearer sl_",
        "Bearer " + "x" * 10_000,
    ]
    for header in bad_key:
        response = client.post(
            "/v1/llm/request", json=request_event("acme"), headers={"Authorization": header}
        )
        assert_unauthorized(response, key_given=True)
    assert accepted(client) == []


def test_scheme_is_case_insensitive_and_spaces_before_the_key_are_allowed(
    client: TestClient, keys: Keys
) -> None:
    # RFC 7235: the scheme is case-insensitive and 1*SP separates it from the credentials.
    for header in (f"bearer {keys.acme_ingest}", f"BEARER   {keys.acme_ingest}"):
        response = client.post(
            "/v1/llm/request", json=request_event("acme"), headers={"Authorization": header}
        )
        assert response.status_code == 202, (header, response.text)


def test_unknown_key_is_401(client: TestClient, keys: Keys) -> None:
    unknown = generate_key().key
    assert_unauthorized(
        client.post("/v1/llm/request", json=request_event("acme"), headers=bearer(unknown)),
        key_given=True,
    )
    # The right prefix with another secret is unknown too: the whole hash must match.
    forged = keys.acme_ingest[:12] + generate_key().key[12:]
    assert_unauthorized(
        client.post("/v1/llm/request", json=request_event("acme"), headers=bearer(forged)),
        key_given=True,
    )
    assert accepted(client) == []


def test_wrong_scope_is_403(client: TestClient, keys: Keys) -> None:
    ingest = client.post("/v1/llm/request", json=request_event("acme"), headers=bearer(keys.acme_read))
    assert ingest.status_code == 403, ingest.text
    assert ingest.json() == {
        "error": "forbidden",
        "detail": "this key has scope 'read'; this endpoint needs 'ingest'",
    }
    assert 'error="insufficient_scope", scope="ingest"' in ingest.headers["www-authenticate"]
    query = client.get("/v1/metrics", params={"tenant_id": "acme"}, headers=bearer(keys.acme_ingest))
    assert query.status_code == 403, query.text
    assert 'scope="read"' in query.headers["www-authenticate"]
    assert accepted(client) == []


def test_another_tenants_events_and_queries_are_403(client: TestClient, keys: Keys) -> None:
    request = client.post("/v1/llm/request", json=request_event("globex"), headers=bearer(keys.acme_ingest))
    assert request.status_code == 403
    assert request.json() == {"error": "forbidden", "detail": TENANT_NOT_ALLOWED}
    response = client.post(
        "/v1/llm/response", json=response_event(tenant="globex"), headers=bearer(keys.acme_ingest)
    )
    assert response.status_code == 403
    assert response.json()["detail"] == TENANT_NOT_ALLOWED
    query = client.get("/v1/metrics", params={"tenant_id": "globex"}, headers=bearer(keys.acme_read))
    assert query.status_code == 403
    assert query.json()["detail"] == TENANT_NOT_ALLOWED
    assert accepted(client) == []


def test_responses_take_the_tenant_of_the_key(client: TestClient, keys: Keys) -> None:
    for key, tenant_sent in [
        (keys.acme_ingest, None),
        (keys.globex_ingest, None),
        (keys.acme_ingest, "acme"),
    ]:
        sent = client.post("/v1/llm/response", json=response_event(tenant=tenant_sent), headers=bearer(key))
        assert sent.status_code == 202, sent.text
    assert accepted(client) == [("r1", "acme"), ("r1", "globex"), ("r1", "acme")]


def test_a_batch_rejects_only_the_events_of_other_tenants(client: TestClient, keys: Keys) -> None:
    events = [
        {"type": "request", **request_event("acme", "a1")},
        {"type": "request", **request_event("globex", "g1")},
        {"type": "response", **response_event("a1")},
        {"type": "response", **response_event("g1", tenant="globex")},
        {"type": "response", **response_event("a2", tenant="acme")},
    ]
    sent = client.post("/v1/llm/events", json={"events": events}, headers=bearer(keys.acme_ingest))
    assert sent.status_code == 207, sent.text
    assert sent.json() == {
        "accepted": 3,
        "rejected": [
            {"index": 1, "error": TENANT_NOT_ALLOWED},
            {"index": 3, "error": TENANT_NOT_ALLOWED},
        ],
    }
    assert accepted(client) == [("a1", "acme"), ("a1", "acme"), ("a2", "acme")]


def test_a_revoked_key_stops_working_once_its_cache_entry_expires(
    postgres_dsn: str, conn: psycopg.Connection
) -> None:
    key = create_key(conn, "acme", "ingest").key
    ttl = 0.3
    with TestClient(make_app(Settings(postgres_dsn=postgres_dsn), cache_seconds=ttl)) as client:
        before = client.post("/v1/llm/request", json=request_event("acme"), headers=bearer(key))
        assert before.status_code == 202
        revoked_at = time.monotonic()
        revoke_key(conn, key[:11])
        time.sleep(ttl)
        after = client.post("/v1/llm/request", json=request_event("acme"), headers=bearer(key))
        assert_unauthorized(after, key_given=True)
        assert time.monotonic() - revoked_at < 5


def test_with_the_default_cache_a_revoked_key_stops_within_5_seconds(
    client: TestClient, conn: psycopg.Connection
) -> None:
    key = create_key(conn, "acme", "ingest").key
    assert client.post("/v1/llm/request", json=request_event("acme"), headers=bearer(key)).status_code == 202
    revoke_key(conn, key[:11])
    revoked_at = time.monotonic()
    while True:
        response = client.post("/v1/llm/request", json=request_event("acme"), headers=bearer(key))
        elapsed = time.monotonic() - revoked_at
        if response.status_code == 401:
            break
        assert response.status_code == 202
        assert elapsed < 5, "a revoked key still worked 5 s after revocation"
        time.sleep(0.05)
    assert elapsed <= 5


def test_answers_are_cached_both_ways_without_a_database_round_trip(
    postgres_dsn: str, conn: psycopg.Connection
) -> None:
    key = create_key(conn, "acme", "ingest").key
    unknown = generate_key()
    with TestClient(make_app(Settings(postgres_dsn=postgres_dsn), cache_seconds=60)) as client:
        store: KeyStore = app_of(client).state.key_store
        assert store.pool is not None
        assert (
            client.post("/v1/llm/request", json=request_event("acme"), headers=bearer(key)).status_code == 202
        )
        assert_unauthorized(
            client.post("/v1/llm/request", json=request_event("acme"), headers=bearer(unknown.key)),
            key_given=True,
        )
        checkouts = store.pool.get_stats().get("requests_num", 0)
        assert checkouts == 2
        # Delete the known key and add the unknown one: the cache still answers as before.
        conn.execute("DELETE FROM api_keys")
        conn.execute(
            "INSERT INTO api_keys (key_hash, key_prefix, tenant_id, scope) VALUES (%s, %s, 'acme', 'ingest')",
            (unknown.key_hash, unknown.prefix),
        )
        for _ in range(20):
            ok = client.post("/v1/llm/request", json=request_event("acme"), headers=bearer(key))
            assert ok.status_code == 202
            refused = client.post("/v1/llm/request", json=request_event("acme"), headers=bearer(unknown.key))
            assert refused.status_code == 401
        assert store.pool.get_stats().get("requests_num", 0) == checkouts


def test_concurrent_lookups_of_one_key_share_one_query(postgres_dsn: str, conn: psycopg.Connection) -> None:
    key = create_key(conn, "acme", "ingest").key

    async def run() -> tuple[list[Any], int]:
        async with open_key_store(Settings(postgres_dsn=postgres_dsn)) as store:
            assert store.pool is not None
            await store.pool.wait()
            principals = await asyncio.gather(*(store.lookup(key) for _ in range(50)))
            return principals, store.pool.get_stats().get("requests_num", 0)

    principals, checkouts = asyncio.run(run())
    assert {(p.tenant_id, p.scope) for p in principals} == {("acme", "ingest")}
    assert checkouts == 1


def test_auth_off_lets_everything_through_without_a_database() -> None:
    # Nothing listens on this port: any database access would fail the requests.
    settings = Settings(postgres_dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/none", auth=False)
    with TestClient(make_app(settings)) as client:
        store: KeyStore = app_of(client).state.key_store
        assert not store.enabled
        sent = client.post("/v1/llm/request", json=request_event("acme"))
        assert sent.status_code == 202
        garbage = client.post("/v1/llm/request", json=request_event("globex"), headers={"Authorization": "x"})
        assert garbage.status_code == 202
        # A client-sent tenant on a response is left as it is; none is stamped.
        assert client.post("/v1/llm/response", json=response_event(tenant="globex")).status_code == 202
        assert client.post("/v1/llm/response", json=response_event()).status_code == 202
        assert client.get("/v1/metrics", params={"tenant_id": "anyone"}).status_code == 200
        assert accepted(client) == [("r1", "acme"), ("r1", "globex"), ("r1", "globex"), ("r1", None)]


def test_an_unreachable_key_database_is_503_not_401() -> None:
    settings = Settings(postgres_dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/none")
    with TestClient(make_app(settings)) as client:
        response = client.post(
            "/v1/llm/request", json=request_event("acme"), headers=bearer(generate_key().key)
        )
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "unavailable"
        assert response.headers["retry-after"] == "1"
        # Malformed keys need no database and are refused at once.
        assert_unauthorized(
            client.post("/v1/llm/request", json=request_event("acme"), headers=bearer("sl_nope")),
            key_given=True,
        )
        assert accepted(client) == []


# Tenants are any identifiers, including ones that differ only by case, spaces or accents.
tenant_ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=6
) | st.sampled_from(["acme", "Acme", "acme ", "acmé", "a"])
operations = st.lists(
    st.tuples(
        st.integers(0, 3),  # which tenant's key
        st.sampled_from(["ingest", "read"]),  # which of its keys
        st.sampled_from(["request", "response", "batch", "query"]),
        st.lists(st.integers(-1, 3), min_size=1, max_size=4),  # targets; -1: no tenant_id
    ),
    min_size=1,
    max_size=6,
)


def test_no_key_of_one_tenant_reads_or_writes_another(postgres_dsn: str, conn: psycopg.Connection) -> None:
    with TestClient(make_app(Settings(postgres_dsn=postgres_dsn))) as client:

        @settings(max_examples=100, deadline=None)
        @example(  # Near-identical tenants, each key trying the others in every way.
            tenants=["acme", "Acme", "acme ", "acmé"],
            ops=[
                (a, s, k, [(a + d) % 4, a, -1])
                for a in range(4)
                for d in (1, 2, 3)
                for s in ("ingest", "read")
                for k in ("request", "response", "batch", "query")
            ],
        )
        @given(tenants=st.lists(tenant_ids, min_size=2, max_size=4, unique=True), ops=operations)
        def property(tenants: list[str], ops: list[tuple[int, str, str, list[int]]]) -> None:
            key_of = {
                (tenant, scope): create_key(conn, tenant, scope).key
                for tenant in tenants
                for scope in ("ingest", "read")
            }
            log = accepted(client)
            log.clear()
            expected_log: list[tuple[str, str | None]] = []
            for actor_index, scope, kind, target_indexes in ops:
                actor = tenants[actor_index % len(tenants)]
                headers = bearer(key_of[actor, scope])
                targets = [None if i < 0 else tenants[i % len(tenants)] for i in target_indexes]
                needed = "read" if kind == "query" else "ingest"
                if kind == "query":
                    target = targets[0] if targets[0] is not None else actor
                    answer = client.get("/v1/metrics", params={"tenant_id": target}, headers=headers)
                    allowed = scope == needed and target == actor
                    assert answer.status_code == (200 if allowed else 403), (actor, scope, target)
                    if allowed:
                        assert answer.json()["tenant_id"] == actor
                    continue
                if scope != needed:
                    answer = client.post("/v1/llm/request", json=request_event(actor), headers=headers)
                    assert answer.status_code == 403
                    continue
                if kind == "request":
                    target = targets[0] if targets[0] is not None else actor
                    answer = client.post("/v1/llm/request", json=request_event(target, "q"), headers=headers)
                    assert answer.status_code == (202 if target == actor else 403), (actor, target)
                    if target == actor:
                        expected_log.append(("q", actor))
                elif kind == "response":
                    answer = client.post(
                        "/v1/llm/response", json=response_event("q", targets[0]), headers=headers
                    )
                    allowed = targets[0] in (None, actor)
                    assert answer.status_code == (202 if allowed else 403), (actor, targets[0])
                    if allowed:
                        expected_log.append(("q", actor))
                else:
                    events = [
                        {"type": "request", **request_event(t, f"b{i}")}
                        if t is not None and i % 2 == 0
                        else {"type": "response", **response_event(f"b{i}", t)}
                        for i, t in enumerate(targets)
                    ]
                    answer = client.post("/v1/llm/events", json={"events": events}, headers=headers)
                    rejected = [i for i, t in enumerate(targets) if t not in (None, actor)]
                    body = answer.json()
                    assert answer.status_code == (207 if rejected else 202)
                    assert [r["index"] for r in body.get("rejected", [])] == rejected
                    expected_log += [(f"b{i}", actor) for i in range(len(targets)) if i not in rejected]
            # What would have reached Kafka: only the actors' own tenants, every response stamped.
            assert log == expected_log

        property()


def test_the_key_store_creates_a_missing_key_table(postgres_dsn: str, conn: psycopg.Connection) -> None:
    conn.execute("DROP TABLE api_keys")
    with TestClient(make_app(Settings(postgres_dsn=postgres_dsn))) as client:
        assert_unauthorized(
            client.post("/v1/llm/request", json=request_event("acme"), headers=bearer(generate_key().key)),
            key_given=True,
        )
    assert conn.execute("SELECT to_regclass('api_keys') IS NOT NULL").fetchone() == (True,)


# -- through the real apps ------------------------------------------------------


def test_ingestion_api_takes_only_its_tenants_events_and_stamps_responses(
    broker: Broker, postgres_dsn: str, keys: Keys
) -> None:
    settings = Settings(kafka_brokers=broker.address, postgres_dsn=postgres_dsn, topic_partitions=3)
    with TestClient(ingestion.create_app(settings)) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        assert_unauthorized(client.post("/v1/llm/request", json=request_event("acme")), key_given=False)
        assert_unauthorized(
            client.post("/v1/llm/events", json={"events": []}, headers=bearer(generate_key().key)),
            key_given=True,
        )
        wrong_scope = client.post(
            "/v1/llm/request", json=request_event("acme"), headers=bearer(keys.acme_read)
        )
        assert wrong_scope.status_code == 403
        other = client.post("/v1/llm/request", json=request_event("globex"), headers=bearer(keys.acme_ingest))
        assert (other.status_code, other.json()["detail"]) == (403, TENANT_NOT_ALLOWED)
        claimed = client.post(
            "/v1/llm/response", json=response_event("g9", tenant="globex"), headers=bearer(keys.acme_ingest)
        )
        assert (claimed.status_code, claimed.json()["detail"]) == (403, TENANT_NOT_ALLOWED)

        ok = client.post(
            "/v1/llm/request", json=request_event("acme", "a1"), headers=bearer(keys.acme_ingest)
        )
        assert ok.status_code == 202, ok.text
        ok = client.post("/v1/llm/response", json=response_event("a1"), headers=bearer(keys.acme_ingest))
        assert ok.status_code == 202, ok.text
        ok = client.post("/v1/llm/response", json=response_event("g1"), headers=bearer(keys.globex_ingest))
        assert ok.status_code == 202, ok.text
        events = [
            {"type": "request", **request_event("acme", "a2")},
            {"type": "request", **request_event("globex", "g2")},
            {"type": "response", **response_event("a2")},
            {"type": "response", **response_event("g2", tenant="globex")},
        ]
        batch = client.post("/v1/llm/events", json={"events": events}, headers=bearer(keys.acme_ingest))
        assert batch.status_code == 207, batch.text
        assert batch.json() == {
            "accepted": 2,
            "rejected": [
                {"index": 1, "error": TENANT_NOT_ALLOWED},
                {"index": 3, "error": TENANT_NOT_ALLOWED},
            ],
        }
    requests = read_topic(broker.address, REQUESTS, 2)
    responses = read_topic(broker.address, RESPONSES, 3)
    assert sorted((key, value["tenant_id"]) for key, value in requests) == [("a1", "acme"), ("a2", "acme")]
    assert sorted((key, value["tenant_id"]) for key, value in responses) == [
        ("a1", "acme"),
        ("a2", "acme"),
        ("g1", "globex"),
    ]


def test_query_api_reads_only_the_keys_tenant(postgres_dsn: str, keys: Keys) -> None:
    insert_windows(
        postgres_dsn,
        [
            Window("acme", "/chat", "gpt-4o", T0, [RawCall(latency_ms=100.0)] * 3),
            Window("globex", "/chat", "gpt-4o", T0, [RawCall(latency_ms=200.0)] * 5),
        ],
    )
    with TestClient(query_api.create_app(Settings(postgres_dsn=postgres_dsn))) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        # Only /health and /ready go without a key; the API's description too needs one.
        assert_unauthorized(client.get("/openapi.json"), key_given=False)
        document = client.get("/openapi.json", headers=bearer(keys.acme_read)).json()
        assert document["paths"]["/v1/metrics"]["get"]["security"] == [{"apiKey": []}]
        assert document["paths"]["/openapi.json"]["get"]["security"] == [{"apiKey": []}]

        assert_unauthorized(client.get("/v1/metrics", params={"tenant_id": "acme"}), key_given=False)
        # 401 comes before any parameter is looked at.
        assert_unauthorized(client.get("/v1/metrics", params={"limit": "x"}), key_given=False)
        assert_unauthorized(
            client.get("/v1/metrics", params={"tenant_id": "acme"}, headers=bearer(generate_key().key)),
            key_given=True,
        )
        wrong_scope = client.get(
            "/v1/metrics", params={"tenant_id": "acme"}, headers=bearer(keys.acme_ingest)
        )
        assert wrong_scope.status_code == 403
        other = client.get("/v1/metrics", params={"tenant_id": "globex"}, headers=bearer(keys.acme_read))
        assert (other.status_code, other.json()["detail"]) == (403, TENANT_NOT_ALLOWED)
        rollup = client.get(
            "/v1/metrics", params={"tenant_id": "globex", "bucket": "1h"}, headers=bearer(keys.acme_read)
        )
        assert rollup.status_code == 403

        own = client.get("/v1/metrics", params={"tenant_id": "acme"}, headers=bearer(keys.acme_read))
        assert own.status_code == 200, own.text
        assert [(row["tenant_id"], row["requests"]) for row in own.json()["metrics"]] == [("acme", 3)]
        theirs = client.get("/v1/metrics", params={"tenant_id": "globex"}, headers=bearer(keys.globex_read))
        assert [(row["tenant_id"], row["requests"]) for row in theirs.json()["metrics"]] == [("globex", 5)]


def test_a_key_is_looked_up_only_by_an_endpoint_that_needs_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the key database unreachable, ``/health`` answers a request carrying a key the store
    never saw without asking for it; ``/v1/metrics`` asks, and answers 503."""
    app = make_app(Settings(postgres_dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"))
    key = generate_key().key
    with TestClient(app) as client:
        store: KeyStore = app.state.key_store
        asked: list[str] = []
        lookup = store.lookup

        async def counted(given: str) -> Any:
            asked.append(given)
            return await lookup(given)

        monkeypatch.setattr(store, "lookup", counted)
        health = client.get("/health", headers=bearer(key))
        assert health.status_code == 200
        assert asked == []
        query = client.get("/v1/metrics", params={"tenant_id": "acme"}, headers=bearer(key))
        assert query.status_code == 503, query.text
        assert query.json()["error"] == "unavailable"
        assert asked == [key]
