"""Tenants' dimension settings (docs/dimensions.md) through the query API and the CLI, the
``manage`` scope (docs/api.md), and the migration of ``api_keys`` to it; real Postgres."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from starlette.testclient import TestClient

from api.auth import TENANT_NOT_ALLOWED, generate_key
from api.keys import create_key
from api.query import create_app
from schemas.config import Settings
from schemas.database import ensure_schema
from schemas.tenant_settings import changes, decide, record_default
from tests.support.auth_app import make_app, request_event
from tests.support.metric_windows import T0, RawCall, Window, insert_windows
from tests.support.servers import serving
from tests.support.stacks import Postgres, empty_database, signal_postgres

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 60
PATH = "/v1/tenants/{}/dimensions"
JSON = {"Content-Type": "application/json"}


class Keys:
    """acme's keys of every scope, and a manage key of globex."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.acme_ingest = create_key(conn, "acme", "ingest").key
        self.acme_read = create_key(conn, "acme", "read").key
        self.acme_manage = create_key(conn, "acme", "manage").key
        self.globex_manage = create_key(conn, "globex", "manage").key


@pytest.fixture
def keys(postgres_dsn: str) -> Keys:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        return Keys(conn)


def start(dsn: str, **settings: Any) -> Any:
    """The query API under uvicorn (so paths are decoded as in production) and a client of it."""
    return serving(create_app(Settings(postgres_dsn=dsn, **settings)), "the query API")


@pytest.fixture
def client(postgres_dsn: str) -> Iterator[httpx.Client]:
    with start(postgres_dsn, window_seconds=WINDOW) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def put(client: httpx.Client, key: str, names: Any, tenant: str = "acme") -> httpx.Response:
    return client.put(PATH.format(tenant), json={"dimensions": names}, headers=bearer(key))


def get(client: httpx.Client, key: str, tenant: str = "acme") -> httpx.Response:
    return client.get(PATH.format(tenant), headers=bearer(key))


def seconds(text: str) -> float:
    """Unix seconds of an RFC 3339 time the API answered, which is always UTC."""
    moment = datetime.fromisoformat(text)
    assert text.endswith("Z") and moment.utcoffset() == timedelta(0), text
    return moment.timestamp()


def next_boundary(moment: float, window: int = WINDOW) -> int:
    """The first multiple of ``window`` strictly after ``moment``."""
    boundary = int(moment) - int(moment) % window
    while boundary <= moment:
        boundary += window
    return boundary


def test_a_manage_key_sets_dimensions_from_the_next_window_boundary(client: httpx.Client, keys: Keys) -> None:
    before = time.time()
    answer = put(client, keys.acme_manage, ["provider", "metadata.country"])
    after = time.time()
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert set(body) == {"tenant_id", "dimensions", "effective_from", "source", "changes"}
    assert (body["tenant_id"], body["dimensions"], body["source"]) == (
        "acme",
        ["provider", "metadata.country"],
        "tenant",
    )
    effective = seconds(body["effective_from"])
    assert effective % WINDOW == 0
    assert before < effective <= after + WINDOW
    assert effective in {next_boundary(before), next_boundary(after)}
    [change] = body["changes"]
    assert change["dimensions"] == ["provider", "metadata.country"]
    assert change["effective_from"] == body["effective_from"]
    requested = seconds(change["requested_at"])
    assert before - 0.001 <= requested <= after + 0.001
    assert requested < effective <= requested + WINDOW

    # GET answers the same, with a read key as with a manage key.
    assert get(client, keys.acme_read).json() == body
    assert get(client, keys.acme_manage).json() == body


def test_a_second_change_before_the_boundary_replaces_the_first(client: httpx.Client, keys: Keys) -> None:
    before = time.time()
    first = put(client, keys.acme_manage, ["provider"]).json()
    second = put(client, keys.acme_manage, ["user", "finish_reason"]).json()
    after = time.time()
    assert second["dimensions"] == ["user", "finish_reason"]
    if next_boundary(before) == next_boundary(after):
        assert second["effective_from"] == first["effective_from"]
        assert [c["dimensions"] for c in second["changes"]] == [["user", "finish_reason"]]
    else:  # the clock crossed a boundary between the two: each applies from its own
        assert seconds(second["effective_from"]) == seconds(first["effective_from"]) + WINDOW
        assert [c["dimensions"] for c in second["changes"]] == [["provider"], ["user", "finish_reason"]]
    assert get(client, keys.acme_read).json() == second


def test_an_empty_list_turns_dimensions_off(client: httpx.Client, keys: Keys) -> None:
    answer = put(client, keys.acme_manage, [])
    assert answer.status_code == 200, answer.text
    assert (answer.json()["dimensions"], answer.json()["source"]) == ([], "tenant")


def test_the_change_applies_after_the_windows_the_dataflow_has_decided(
    postgres_dsn: str, client: httpx.Client, keys: Keys
) -> None:
    # The dataflow has already opened windows up to ten minutes ahead of the wall clock.
    horizon = (int(time.time()) // WINDOW + 10) * WINDOW
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert decide(conn, {"acme": horizon}).histories == {"acme": []}
        answer = put(client, keys.acme_manage, ["provider"])
        assert answer.status_code == 200, answer.text
        effective = seconds(answer.json()["effective_from"])
        assert effective > horizon
        assert effective == horizon + WINDOW
        # Every later decision, a replay's included, sees the change at that boundary.
        seen = decide(conn, {"acme": horizon - 5 * WINDOW}).histories
        assert seen == {"acme": [(effective, ("provider",))]}
        assert decide(conn, {"acme": effective}).histories == {"acme": [(effective, ("provider",))]}


def test_tenants_without_a_setting_show_the_dimensions_default(postgres_dsn: str, keys: Keys) -> None:
    with (
        start(postgres_dsn, dimensions=("provider", "metadata.team")) as url,
        httpx.Client(base_url=url) as client,
    ):
        answer = get(client, keys.acme_read)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "tenant_id": "acme",
            "dimensions": ["provider", "metadata.team"],
            "effective_from": None,
            "source": "default",
            "changes": [],
        }


def test_the_default_shown_is_the_one_the_dataflow_recorded(postgres_dsn: str, keys: Keys) -> None:
    horizon = (int(time.time()) // WINDOW + 3) * WINDOW
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        record_default(conn, ("user",), WINDOW)
        decide(conn, {"globex": horizon})
        boundary = record_default(conn, ("provider",), WINDOW)
    assert boundary == horizon + WINDOW
    # This API process runs with another DIMENSIONS: the dataflow's, as recorded, is shown.
    with start(postgres_dsn, dimensions=("metadata.team",)) as url, httpx.Client(base_url=url) as client:
        answer = get(client, keys.acme_read)
        assert answer.status_code == 200, answer.text
        assert answer.json()["dimensions"] == ["provider"]
        assert answer.json()["source"] == "default"
        assert seconds(answer.json()["effective_from"]) == boundary


def test_a_read_key_reads_but_cannot_change(client: httpx.Client, keys: Keys) -> None:
    assert get(client, keys.acme_read).status_code == 200
    refused = put(client, keys.acme_read, ["provider"])
    assert refused.status_code == 403
    assert refused.json() == {
        "error": "forbidden",
        "detail": "this key has scope 'read'; this endpoint needs 'manage'",
    }
    assert 'error="insufficient_scope", scope="manage"' in refused.headers["www-authenticate"]
    assert get(client, keys.acme_read).json()["source"] == "default"


def test_an_ingest_key_neither_reads_nor_changes(client: httpx.Client, keys: Keys) -> None:
    for answer in (get(client, keys.acme_ingest), put(client, keys.acme_ingest, ["provider"])):
        assert answer.status_code == 403, answer.text
        assert answer.json()["detail"].startswith("this key has scope 'ingest'")


def test_another_tenants_key_is_refused(client: httpx.Client, keys: Keys) -> None:
    for answer in (get(client, keys.globex_manage), put(client, keys.globex_manage, ["provider"])):
        assert (answer.status_code, answer.json()) == (
            403,
            {"error": "forbidden", "detail": TENANT_NOT_ALLOWED},
        )
    assert put(client, keys.acme_manage, ["provider"], tenant="globex").status_code == 403
    assert get(client, keys.acme_manage).json()["source"] == "default"
    assert get(client, keys.globex_manage, tenant="globex").json()["source"] == "default"


def test_no_key_or_a_bad_key_is_401(client: httpx.Client) -> None:
    for answer in (
        client.get(PATH.format("acme")),
        client.put(PATH.format("acme"), json={"dimensions": []}),
        get(client, generate_key().key),
        put(client, generate_key().key, []),
        client.put(PATH.format("acme"), content=b"{", headers=JSON),  # 401 before the body is read
    ):
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"] == "unauthorized"
        assert answer.headers["www-authenticate"].startswith('Bearer realm="streamlens"')


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code", "named"),
    [
        (b'{"dimensions": ["provider"', "application/json", 400, "invalid_json", "not valid JSON"),
        (b"\xff", "application/json", 400, "invalid_json", "not valid JSON"),
        (b'{"dimensions": ["\xff"]}', "application/json", 400, "invalid_json", "UTF-8"),
        (b"", "application/json", 400, "empty_body", "empty"),
        (b'{"dimensions": ["provider"]}', "text/plain", 415, "unsupported_media_type", "text/plain"),
        (b'{"dimensions": ["provider"]}', None, 415, "unsupported_media_type", "Content-Type"),
        (b"{}", "application/json", 400, "invalid_body", "missing required field `dimensions`"),
        (b"[]", "application/json", 400, "invalid_body", "Expected `object`"),
        (b'{"dimensions": "provider"}', "application/json", 400, "invalid_body", "`$.dimensions`"),
        (b'{"dimensions": [1]}', "application/json", 400, "invalid_body", "`$.dimensions[0]`"),
        (b'{"dimensions": ["bogus"]}', "application/json", 400, "invalid_body", "'bogus' is not a dimension"),
        (b'{"dimensions": ["metadata."]}', "application/json", 400, "invalid_body", "names a key"),
        (b'{"dimensions": ["metadata.a\\u0001"]}', "application/json", 400, "invalid_body", "control"),
        (
            b'{"dimensions": ["provider", "user", "finish_reason", "metadata.a", "metadata.b"]}',
            "application/json",
            400,
            "invalid_body",
            "length <= 4 - at `$.dimensions`",
        ),
        (
            b'{"dimensions": ["user", "user"]}',
            "application/json",
            400,
            "invalid_body",
            "'user' is given twice",
        ),
        (
            b'{"dimensions": ["user"], "dimension": "x"}',
            "application/json",
            400,
            "invalid_body",
            "unknown field `dimension`",
        ),
    ],
)
def test_a_bad_body_is_refused_naming_the_problem(
    client: httpx.Client,
    keys: Keys,
    body: bytes,
    content_type: str | None,
    status: int,
    code: str,
    named: str,
) -> None:
    headers = bearer(keys.acme_manage)
    if content_type is not None:
        headers["Content-Type"] = content_type
    answer = client.put(PATH.format("acme"), content=body, headers=headers)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == code
    assert named in answer.json()["detail"]
    assert get(client, keys.acme_manage).json()["changes"] == []


def test_a_bad_tenant_id_in_the_path_is_400(client: httpx.Client, keys: Keys) -> None:
    for tenant in ("a%01b", "x" * 129, "a%7Fb"):
        for answer in (get(client, keys.acme_manage, tenant), put(client, keys.acme_manage, [], tenant)):
            assert answer.status_code == 400, (tenant, answer.text)
            assert answer.json()["error"] == "invalid_parameter"
            assert answer.json()["detail"].startswith("tenant_id: ")


def test_a_tenant_id_may_hold_a_slash(postgres_dsn: str, client: httpx.Client) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        key = create_key(conn, "team/a", "manage").key
    answer = put(client, key, ["user"], tenant="team%2Fa")
    assert answer.status_code == 200, answer.text
    assert answer.json()["tenant_id"] == "team/a"
    with psycopg.connect(postgres_dsn) as conn:
        assert [c.dimensions for c in changes(conn, "team/a")] == [["user"]]


def test_other_methods_are_405(client: httpx.Client, keys: Keys) -> None:
    answer = client.post(PATH.format("acme"), json={"dimensions": []}, headers=bearer(keys.acme_manage))
    assert answer.status_code == 405
    assert answer.json()["error"] == "method_not_allowed"


def test_a_manage_key_reads_metrics_and_the_api_description(
    postgres_dsn: str, client: httpx.Client, keys: Keys
) -> None:
    insert_windows(postgres_dsn, [Window("acme", "/chat", "gpt-4o", T0, [RawCall(latency_ms=100.0)] * 3)])
    answer = client.get("/v1/metrics", params={"tenant_id": "acme"}, headers=bearer(keys.acme_manage))
    assert answer.status_code == 200, answer.text
    assert [row["requests"] for row in answer.json()["metrics"]] == [3]
    other = client.get("/v1/metrics", params={"tenant_id": "globex"}, headers=bearer(keys.acme_manage))
    assert (other.status_code, other.json()["detail"]) == (403, TENANT_NOT_ALLOWED)

    document = client.get("/openapi.json", headers=bearer(keys.acme_manage))
    assert document.status_code == 200
    operations = document.json()["paths"]["/v1/tenants/{tenant_id}/dimensions"]
    assert set(operations) == {"get", "put"}
    assert operations["put"]["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "dimensions"
    ]


def test_a_manage_key_reads_but_sends_no_events(postgres_dsn: str, keys: Keys) -> None:
    with TestClient(make_app(Settings(postgres_dsn=postgres_dsn))) as client:
        sent = client.post("/v1/llm/request", json=request_event("acme"), headers=bearer(keys.acme_manage))
        assert (sent.status_code, sent.json()["detail"]) == (
            403,
            "this key has scope 'manage'; this endpoint needs 'ingest'",
        )
        assert 'scope="ingest"' in sent.headers["www-authenticate"]
        read = client.get("/v1/metrics", params={"tenant_id": "acme"}, headers=bearer(keys.acme_manage))
        assert read.status_code == 200, read.text


# The CLI, as `just dimensions` runs it.


def cli(dsn: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.tenants", "dimensions", *args],
        cwd=ROOT,
        env={**os.environ, "POSTGRES_DSN": dsn, "WINDOW_SECONDS": str(WINDOW), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_cli_sets_and_shows_dimensions(postgres_dsn: str) -> None:
    shown = cli(postgres_dsn, "acme", DIMENSIONS="user")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "acme: user (the DIMENSIONS default; none of its own)\n"

    before = time.time()
    made = cli(postgres_dsn, "acme", "provider", "metadata.country")
    after = time.time()
    assert made.returncode == 0, made.stderr
    with psycopg.connect(postgres_dsn) as conn:
        [change] = changes(conn, "acme")
    assert change.dimensions == ["provider", "metadata.country"]
    boundary = change.effective_from.timestamp()
    assert boundary in {next_boundary(before), next_boundary(after)}
    stamp = change.effective_from.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert made.stdout.startswith(f"acme: provider, metadata.country from {stamp},")

    shown = cli(postgres_dsn, "acme")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"acme: provider, metadata.country from {stamp}"
    assert lines[1].startswith(f"  from {stamp}  provider, metadata.country  (requested ")

    off = cli(postgres_dsn, "acme", "--none")
    assert off.returncode == 0, off.stderr
    with psycopg.connect(postgres_dsn) as conn:
        assert changes(conn, "acme")[-1].dimensions == []


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("acme", "bogus"), "'bogus' is not a dimension"),
        (("acme", "user", "user"), "'user' is given twice"),
        (("acme", "user", "provider", "finish_reason", "metadata.a", "metadata.b"), "at most 4"),
        (("acme", "user", "--none"), "--none"),
        (("a\x01b", "user"), "invalid tenant"),
    ],
)
def test_the_cli_refuses_bad_names_with_one_line(
    postgres_dsn: str, args: tuple[str, ...], named: str
) -> None:
    refused = cli(postgres_dsn, *args)
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert len(refused.stderr.splitlines()) == 1
    assert named in refused.stderr
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM tenant_dimensions").fetchone() == (0,)


def test_the_just_recipe_runs_the_cli() -> None:
    just = shutil.which("just") or str(ROOT / ".venv" / "bin" / "just")
    if not Path(just).exists():
        pytest.skip("just is not installed")
    dry = subprocess.run(
        [just, "--dry-run", "dimensions", "acme", "provider", "user"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert dry.returncode == 0, dry.stderr
    assert "exec python -m api.tenants dimensions acme provider user" in dry.stderr


def test_create_key_makes_manage_keys(postgres_dsn: str) -> None:
    made = subprocess.run(
        [sys.executable, "-m", "api.keys", "create", "acme", "--scope", "manage"],
        cwd=ROOT,
        env={**os.environ, "POSTGRES_DSN": postgres_dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    with (
        start(postgres_dsn, window_seconds=WINDOW) as url,
        httpx.Client(base_url=url) as client,
    ):
        assert put(client, made.stdout.strip(), ["user"]).status_code == 200


# The api_keys migration.

OLD_API_KEYS = """
CREATE TABLE api_keys (
    key_hash    bytea       PRIMARY KEY,
    key_prefix  text        NOT NULL UNIQUE,
    tenant_id   text        NOT NULL,
    scope       text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CHECK (octet_length(key_hash) = 32),
    CHECK (key_prefix ~ '^sl_[a-z0-9]{8}$'),
    CHECK (scope IN ('ingest', 'read')),
    CHECK (revoked_at IS NULL OR revoked_at >= created_at)
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id, created_at);
"""


def scope_checks(conn: psycopg.Connection) -> list[tuple[str, str]]:
    return conn.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = 'api_keys'::regclass AND contype = 'c' "
        "AND pg_get_constraintdef(oid) LIKE '%scope%'"
    ).fetchall()


def assert_scopes_are_ingest_read_manage(conn: psycopg.Connection) -> None:
    [(name, definition)] = scope_checks(conn)
    assert name == "api_keys_scope_known"
    assert all(scope in definition for scope in ("'ingest'", "'read'", "'manage'"))
    create_key(conn, "acme", "manage")
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO api_keys (key_hash, key_prefix, tenant_id, scope) VALUES (%s, %s, 'acme', 'admin')",
            (b"\x00" * 32, "sl_zzzzzzzz"),
        )


def test_the_api_keys_schema_applies_twice(postgres_dsn: str) -> None:
    ensure_schema(postgres_dsn)
    ensure_schema(postgres_dsn)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert_scopes_are_ingest_read_manage(conn)


def test_a_table_made_before_the_manage_scope_is_migrated(postgres_server: Postgres) -> None:
    dsn = empty_database(postgres_server)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(OLD_API_KEYS)
        with pytest.raises(psycopg.errors.CheckViolation):
            create_key(conn, "acme", "manage")
        reader = create_key(conn, "acme", "read")
    # Several services starting at once, each migrating.
    failures: list[BaseException] = []

    def migrate() -> None:
        try:
            ensure_schema(dsn)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    ensure_schema(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert_scopes_are_ingest_read_manage(conn)
        # The keys made before are still there.
        assert conn.execute(
            "SELECT tenant_id, scope FROM api_keys WHERE key_prefix = %s", (reader.prefix,)
        ).fetchone() == ("acme", "read")


def test_applying_the_schema_again_takes_no_lock_that_would_stop_key_lookups(postgres_dsn: str) -> None:
    # A long transaction that has read api_keys: an ALTER TABLE would wait for it,
    # and every key lookup would queue behind the ALTER.
    with psycopg.connect(postgres_dsn) as reader:
        reader.execute("SELECT count(*) FROM api_keys").fetchone()
        ensure_schema(postgres_dsn + "?options=-c%20lock_timeout%3D3000")
        reader.rollback()


# A stalled database.


def test_a_frozen_postgres_answers_503_within_5_s(own_postgres: Postgres) -> None:
    dsn = own_postgres.dsn
    ensure_schema(dsn)
    with start(dsn, auth=False) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.put(PATH.format("acme"), json={"dimensions": ["user"]}).status_code == 200
        signal_postgres(own_postgres, signal.SIGSTOP)
        try:
            for method, body in (("GET", None), ("PUT", {"dimensions": ["provider"]})):
                started = time.monotonic()
                answer = client.request(method, PATH.format("acme"), json=body)
                elapsed = time.monotonic() - started
                assert (answer.status_code, answer.json()["error"]) == (503, "unavailable"), method
                assert answer.headers["retry-after"].isdigit()
                assert elapsed < 5.0, (method, elapsed)
        finally:
            signal_postgres(own_postgres, signal.SIGCONT)
        deadline = time.monotonic() + 20
        while (answer := client.get(PATH.format("acme"))).status_code != 200:
            assert time.monotonic() < deadline, "did not recover after Postgres came back"
            time.sleep(0.1)
        assert answer.json()["dimensions"] == ["user"]
