"""``GET /v1/metrics?dimension=…``: a dimension's rows, filtered by value and rolled up within each
value, against a real Postgres holding rows built here from raw calls, through the real app."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from fastdigest import TDigest, merge_all

import api.query
from api.params import BUCKETS
from api.query import create_app
from schemas.config import Settings
from schemas.database import ensure_schema
from schemas.rows import DIMENSION_ROW_FIELDS, ROW_FIELDS
from schemas.tenant_settings import set_dimensions
from tests.support import dimension_store as store
from tests.support.expected import bucket_start, check_bucket
from tests.support.metric_windows import MINUTE, T0, RawCall, Window, insert_windows, random_calls, rfc3339
from tests.support.rollup_cache import cached_parts, slow_merging
from tests.support.servers import serving
from tests.support.stacks import Postgres, signal_postgres

# A Postgres of a test's own, to freeze.

COUNTRY = "metadata.country"
ROUTES = ("/chat", "/search")
MODELS = ("gpt-4o", "claude-sonnet-4-5")
# Code-point order: '(' < 'D' < 'd' < 'f' < 'Ω', which a locale's collation may not keep.
COUNTRIES: tuple[str | None, ...] = (None, "de", "DE", "fr", "Ω", "(other)")
# Tenants without a setting of their own have this one (DIMENSIONS).
DEFAULT = "provider"
PERCENTILES = (("p50_latency_ms", 0.5), ("p95_latency_ms", 0.95), ("p99_latency_ms", 0.99))


class Data:
    """The main windows of every key and minute, and their rows per dimension and value, built
    from the same raw calls: each call is given one value per dimension."""

    def __init__(self) -> None:
        self.main: list[Window] = []
        self.rows: list[Window] = []

    def add(self, window: Window, values: dict[str, Sequence[str | None]], rnd: random.Random) -> None:
        self.main.append(window)
        for dimension, choices in values.items():
            self.rows += store.split_by(window, dimension, choices, rnd)

    def of(self, tenant: str, dimension: str) -> list[Window]:
        return [w for w in self.rows if w.tenant_id == tenant and w.extra["dimension"] == dimension]


def insert_dimension_rows(dsn: str, rows: Sequence[Window]) -> None:
    store.insert_dimension_rows(dsn, [window.column_values() for window in rows])


@pytest.fixture
def data() -> Data:
    """acme: 12 minutes from 10:54 (buckets straddle the hour) for 2 routes x 2 models, sliced by
    country and by provider; a window of timeouts only; globex: one key sliced by team."""
    rnd = random.Random(5)
    made = Data()
    for minute in range(12):
        for route in ROUTES:
            for model in MODELS:
                window = Window(
                    "acme",
                    route,
                    model,
                    T0 - 6 * MINUTE + minute * MINUTE,
                    random_calls(rnd, rnd.randint(1, 40), median_ms=rnd.choice((200, 900))),
                    revision=rnd.randint(1, 3),
                )
                made.add(window, {COUNTRY: COUNTRIES, DEFAULT: ("openai", "anthropic")}, rnd)
    timeouts = Window("acme", "/chat", "gpt-4o", T0 + 6 * MINUTE, [RawCall(latency_ms=None, error=True)] * 3)
    made.add(timeouts, {COUNTRY: ("de",), DEFAULT: ("openai",)}, rnd)
    for minute in range(3):
        window = Window("globex", "/chat", "gpt-4o", T0 + minute * MINUTE, random_calls(rnd, 8))
        made.add(window, {"metadata.team": ("red", "blue")}, rnd)
    return made


def start_app(dsn: str, defaults: tuple[str, ...] = (DEFAULT,)) -> Any:
    return serving(create_app(Settings(postgres_dsn=dsn, auth=False, dimensions=defaults)), "the query API")


@pytest.fixture
def stored(postgres_dsn: str, data: Data) -> str:
    """The database with the rows, acme set to slice by country and globex by team."""
    insert_windows(postgres_dsn, data.main)
    insert_dimension_rows(postgres_dsn, data.rows)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        set_dimensions(conn, "acme", (COUNTRY,), 60)
        set_dimensions(conn, "globex", ("metadata.team",), 60)
    return postgres_dsn


@pytest.fixture
def client(stored: str) -> Iterator[httpx.Client]:
    with start_app(stored) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def get(client: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    response = client.get("/v1/metrics", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == len(body["metrics"])
    return body["metrics"]


def refused(client: httpx.Client, query: str) -> str:
    """The 400's detail for ``query``."""
    response = client.get(f"/v1/metrics?{query}")
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_parameter"
    detail: str = response.json()["detail"]
    return detail


def value_order(value: str | None) -> tuple[bool, str]:
    """Null first, then code-point order."""
    return (value is not None, value or "")


def row_order(
    key: tuple[str, str | None, str | None, str | None],
) -> tuple[float, str, str, tuple[bool, str]]:
    start, route, model, value = key
    return (-datetime.fromisoformat(start).timestamp(), route or "", model or "", value_order(value))


def key_of(row: dict[str, Any]) -> tuple[str, str | None, str | None, str | None]:
    return (row["window_start"], row["route"], row["model"], row["value"])


def stored_key(window: Window) -> tuple[str, str | None, str | None, str | None]:
    return (rfc3339(window.start), window.route, window.model, window.extra["value"])


def check_stored(row: dict[str, Any], window: Window) -> None:
    stored = window.column_values()
    for name in DIMENSION_ROW_FIELDS:
        if name in ("window_start", "window_end"):
            assert row[name] == rfc3339(stored[name])
        else:
            assert row[name] == pytest.approx(stored[name]), name


def test_a_dimensions_rows_are_the_stored_rows_newest_first_then_route_model_and_value(
    client: httpx.Client, data: Data
):
    rows = get(client, tenant_id="acme", dimension=COUNTRY, limit=1000)
    expected = sorted(data.of("acme", COUNTRY), key=lambda w: row_order(stored_key(w)))
    assert [key_of(row) for row in rows] == [stored_key(w) for w in expected]
    assert list(rows[0]) == list(DIMENSION_ROW_FIELDS)
    for row, window in zip(rows, expected, strict=True):
        assert row["dimension"] == COUNTRY
        check_stored(row, window)
    # Null first, then code-point order, within one window and key.
    first = [row["value"] for row in rows if key_of(row)[:3] == key_of(rows[0])[:3]]
    assert first == sorted(first, key=value_order)
    # The main rows are still the main rows.
    main = get(client, tenant_id="acme", limit=1000)
    assert len(main) == len([w for w in data.main if w.tenant_id == "acme"])
    assert list(main[0]) == list(ROW_FIELDS)


def test_filters_and_limit_apply_to_a_dimensions_rows(client: httpx.Client, data: Data):
    chosen = [
        w
        for w in data.of("acme", COUNTRY)
        if w.model == "gpt-4o" and T0 - 2 * MINUTE <= w.start < T0 + 2 * MINUTE
    ]
    expected = sorted(chosen, key=lambda w: row_order(stored_key(w)))
    window = {"from": rfc3339(T0 - 2 * MINUTE), "to": rfc3339(T0 + 2 * MINUTE)}
    rows = get(client, tenant_id="acme", dimension=COUNTRY, model="gpt-4o", limit=1000, **window)
    assert [key_of(row) for row in rows] == [stored_key(w) for w in expected]
    # limit counts rows, not windows.
    assert [key_of(row) for row in get(client, tenant_id="acme", dimension=COUNTRY, limit=7)] == [
        stored_key(w) for w in sorted(data.of("acme", COUNTRY), key=lambda w: row_order(stored_key(w)))[:7]
    ]


@pytest.mark.parametrize("value", ["de", "DE", "Ω", "(other)", ""])
def test_value_keeps_one_value_and_empty_keeps_the_calls_without_one(
    client: httpx.Client, data: Data, value: str
):
    wanted = value or None
    expected = sorted(
        (w for w in data.of("acme", COUNTRY) if w.extra["value"] == wanted),
        key=lambda w: row_order(stored_key(w)),
    )
    assert expected
    rows = get(client, tenant_id="acme", dimension=COUNTRY, value=value, limit=1000)
    assert [key_of(row) for row in rows] == [stored_key(w) for w in expected]
    for row, window in zip(rows, expected, strict=True):
        check_stored(row, window)


def test_a_value_nobody_has_gives_no_rows(client: httpx.Client):
    assert get(client, tenant_id="acme", dimension=COUNTRY, value="xx") == []
    assert get(client, tenant_id="acme", dimension=COUNTRY, value="de", route="/nowhere") == []


def expected_groups(
    rows: Sequence[Window], seconds: int, group_by: Sequence[str]
) -> dict[tuple, list[Window]]:
    groups: dict[tuple, list[Window]] = defaultdict(list)
    for window in rows:
        key = (
            rfc3339(bucket_start(window.start, seconds)),
            window.route if "route" in group_by else None,
            window.model if "model" in group_by else None,
            window.extra["value"],
        )
        groups[key].append(window)
    return groups


def key_revision(row: dict[str, Any], rows: Sequence[Window], seconds: int) -> int:
    """The highest revision of the windows of ``row``'s keys in its bucket, whatever their value:
    what hourly and daily buckets of a dimension report (an hour keeps one revision)."""
    return max(
        window.revision
        for window in rows
        if rfc3339(bucket_start(window.start, seconds)) == row["window_start"]
        and row["route"] in (None, window.route)
        and row["model"] in (None, window.model)
    )


def check_merged(
    row: dict[str, Any], members: Sequence[Window], rows: Sequence[Window] = (), seconds: int | None = None
) -> None:
    """A roll-up row against the raw calls of its rows, and its percentiles against their
    digests merged here (few calls: a merged digest holds every one, in any order). For an
    hourly or daily bucket, its revision against all ``rows`` of the dimension."""
    assert row["dimension"] == COUNTRY
    hourly = seconds is not None and seconds >= 3600
    check_bucket(row, members, key_revision(row, rows, seconds) if hourly and seconds else None)
    digests = [TDigest.from_bytes(blob) for w in members if (blob := w.column_values()["latency_digest"])]
    merged = merge_all(digests) if digests else None
    for name, quantile in PERCENTILES:
        if merged is None:
            assert row[name] is None, name
        else:
            assert row[name] == pytest.approx(merged.quantile(quantile), rel=1e-9), name


@pytest.mark.parametrize("bucket", list(BUCKETS))
def test_buckets_merge_within_each_value(stored: str, client: httpx.Client, data: Data, bucket: str):
    seconds = BUCKETS[bucket]
    groups = expected_groups(data.of("acme", COUNTRY), seconds, ("route", "model"))
    rows = get(client, tenant_id="acme", dimension=COUNTRY, bucket=bucket, limit=1000)
    assert [key_of(row) for row in rows] == sorted(groups, key=row_order)
    for row in rows:
        check_merged(row, groups[key_of(row)], data.of("acme", COUNTRY), seconds)
        assert row["window_end"] == rfc3339(
            datetime.fromisoformat(row["window_start"]) + timedelta(seconds=seconds)
        )
    # Dimension roll-ups are merged from their rows every time: nothing is kept.
    assert cached_parts(stored) == {}


@pytest.mark.parametrize(("bucket", "group_by"), [("5m", "route"), ("1h", "model"), ("1d", ""), (None, "")])
def test_group_by_merges_across_keys_within_each_value(
    client: httpx.Client, data: Data, bucket: str | None, group_by: str
):
    kept = [name for name in group_by.split(",") if name]
    groups = expected_groups(data.of("acme", COUNTRY), BUCKETS[bucket] if bucket else 60, kept)
    params = {"bucket": bucket} if bucket else {}
    rows = get(client, tenant_id="acme", dimension=COUNTRY, group_by=group_by, limit=1000, **params)
    assert [key_of(row) for row in rows] == sorted(groups, key=row_order)
    for row in rows:
        assert (row["route"] is None) == ("route" not in kept)
        assert (row["model"] is None) == ("model" not in kept)
        check_merged(row, groups[key_of(row)], data.of("acme", COUNTRY), BUCKETS[bucket] if bucket else None)


def test_a_roll_up_of_one_value(client: httpx.Client, data: Data):
    for value in ("", "fr"):
        chosen = [w for w in data.of("acme", COUNTRY) if w.extra["value"] == (value or None)]
        groups = expected_groups(chosen, 3600, ())
        rows = get(client, tenant_id="acme", dimension=COUNTRY, value=value, bucket="1h", group_by="")
        assert [key_of(row) for row in rows] == sorted(groups, key=row_order)
        for row in rows:
            check_merged(row, groups[key_of(row)])


def test_limit_counts_roll_up_rows(client: httpx.Client, data: Data):
    groups = expected_groups(data.of("acme", COUNTRY), 300, ("route", "model"))
    rows = get(client, tenant_id="acme", dimension=COUNTRY, bucket="5m", limit=5)
    assert [key_of(row) for row in rows] == sorted(groups, key=row_order)[:5]


_SUMS = (
    "requests",
    "errors",
    "timeouts",
    "prompt_tokens",
    "completion_tokens",
    "cache_read_tokens",
    "reasoning_tokens",
    "unpriced_requests",
)


@pytest.mark.parametrize(("bucket", "group_by"), [(None, "route,model"), ("1h", ""), ("15m", "model")])
@pytest.mark.parametrize("dimension", [COUNTRY, DEFAULT])
def test_a_dimensions_rows_add_up_to_the_main_rows(
    client: httpx.Client, bucket: str | None, group_by: str, dimension: str
):
    params: dict[str, Any] = {"tenant_id": "acme", "group_by": group_by, "limit": 1000}
    if bucket:
        params["bucket"] = bucket
    main = {(row["window_start"], row["route"], row["model"]): row for row in get(client, **params)}
    totals: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in get(client, dimension=dimension, **params):
        total = totals[key_of(row)[:3]]
        for name in (*_SUMS, "estimated_cost_usd"):
            total[name] += row[name]
        total["revision"] = max(total["revision"], row["revision"])
        answered = row["requests"] - row["timeouts"]
        if row["avg_latency_ms"] is not None:
            total["latency"] += row["avg_latency_ms"] * answered
            total["answered"] += answered
    assert set(totals) == set(main)
    for key, total in totals.items():
        for name in _SUMS:
            assert total[name] == main[key][name], (key, name)
        assert total["estimated_cost_usd"] == pytest.approx(main[key]["estimated_cost_usd"], rel=1e-9)
        if total["answered"]:
            assert total["latency"] / total["answered"] == pytest.approx(
                main[key]["avg_latency_ms"], rel=1e-9
            )
        else:
            assert main[key]["avg_latency_ms"] is None


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("tenant_id=acme&dimension=", "dimension"),
        ("tenant_id=acme&dimension=country", "dimension"),
        ("tenant_id=acme&dimension=metadata.", "dimension"),
        ("tenant_id=acme&dimension=metadata." + "k" * 129, "dimension"),
        ("tenant_id=acme&dimension=metadata.a%0Ab", "dimension"),
        ("tenant_id=acme&dimension=route", "dimension"),
        ("tenant_id=acme&dimension=provider&dimension=user", "dimension"),
        ("tenant_id=acme&value=de", "value"),
        ("tenant_id=acme&value=", "value"),
        ("tenant_id=acme&dimension=provider&value=a%00b", "value"),
        ("tenant_id=acme&dimension=provider&value=" + "v" * 129, "value"),
        ("tenant_id=acme&dimension=provider&value=a&value=b", "value"),
        # Valid names the tenant does not have.
        ("tenant_id=acme&dimension=user", "dimension"),
        ("tenant_id=acme&dimension=metadata.plan", "dimension"),
    ],
)
def test_bad_dimensions_and_values_are_rejected_naming_them(client: httpx.Client, query: str, named: str):
    assert refused(client, query).startswith(f"{named}: ")
    assert refused(client, query + "&bucket=1d").startswith(f"{named}: ")


def test_another_tenants_dimension_does_not_leak(client: httpx.Client):
    # globex slices by team, with rows stored; acme does not.
    assert get(client, tenant_id="globex", dimension="metadata.team")
    detail = refused(client, "tenant_id=acme&dimension=metadata.team")
    assert detail.startswith("dimension: ")
    assert "team" not in detail.split("(it has:")[1]
    assert refused(client, "tenant_id=acme&dimension=metadata.team&bucket=1h&group_by=")
    assert refused(client, "tenant_id=globex&dimension=metadata.country").startswith("dimension: ")


def test_the_default_is_every_tenants_own_and_past_settings_stay_readable(
    stored: str, client: httpx.Client, data: Data
):
    # acme's own setting (country) does not hide the default (provider)...
    rows = get(client, tenant_id="acme", dimension=DEFAULT, limit=1000)
    assert len(rows) == len(data.of("acme", DEFAULT))
    # ...nor from a tenant without any setting, which has no rows.
    assert get(client, tenant_id="initech", dimension=DEFAULT) == []
    assert refused(client, "tenant_id=initech&dimension=metadata.country").startswith("dimension: ")
    # A later change away from country: the rows written under the earlier one stay readable.
    with psycopg.connect(stored, autocommit=True) as conn:
        # A boundary past the first change's, so the change does not replace it.
        conn.execute("UPDATE dimension_horizons SET decided_through = now() + interval '1 hour'")
        set_dimensions(conn, "acme", ("user",), 60)
    assert len(get(client, tenant_id="acme", dimension=COUNTRY, limit=1000)) == len(data.of("acme", COUNTRY))
    assert get(client, tenant_id="acme", dimension="user") == []


def test_with_no_default_a_tenant_without_a_setting_has_no_dimension(stored: str):
    with start_app(stored, defaults=()) as url, httpx.Client(base_url=url) as client:
        assert refused(client, f"tenant_id=initech&dimension={DEFAULT}").startswith("dimension: ")
        assert refused(client, f"tenant_id=acme&dimension={DEFAULT}").startswith("dimension: ")
        assert get(client, tenant_id="acme", dimension=COUNTRY, value="de")


def timed(client: httpx.Client, query: str) -> tuple[int, str, float]:
    started = time.monotonic()
    response = client.get(f"/v1/metrics?{query}")
    error = response.json()["error"] if response.status_code != 200 else ""
    return response.status_code, error, time.monotonic() - started


def test_a_stalled_settings_lookup_or_stalled_rows_answer_503_within_5_s(stored: str, client: httpx.Client):
    lookup = f"tenant_id=acme&dimension={COUNTRY}"
    with psycopg.connect(stored) as blocker:
        blocker.execute("LOCK TABLE tenant_dimensions IN ACCESS EXCLUSIVE MODE")
        for query in (lookup, lookup + "&bucket=1d", f"tenant_id=acme&dimension={COUNTRY}&value="):
            status, error, seconds = timed(client, query)
            assert (status, error) == (503, "unavailable"), query
            assert seconds < 5.0, (query, seconds)
        # The default needs no lookup, so it does not wait for one.
        assert timed(client, f"tenant_id=acme&dimension={DEFAULT}")[0] == 200
    with psycopg.connect(stored) as blocker:
        blocker.execute("LOCK TABLE llm_dimension_metrics IN ACCESS EXCLUSIVE MODE")
        status, error, seconds = timed(client, lookup)
        assert (status, error) == (503, "unavailable")
        assert seconds < 5.0
        status, error, seconds = timed(client, lookup + "&bucket=1d")
        assert (status, error) == (503, "deadline_exceeded")
        assert seconds < 5.0
    assert get(client, tenant_id="acme", dimension=COUNTRY, bucket="1d")


def test_a_frozen_postgres_answers_503_within_5_s_to_a_lookup_already_running(own_postgres: Postgres):
    dsn = own_postgres.dsn
    ensure_schema(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        set_dimensions(conn, "acme", (COUNTRY,), 60)
    query = f"tenant_id=acme&dimension={COUNTRY}&bucket=1h"
    with start_app(dsn) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert timed(client, query)[0] == 200
        # The lookup is waiting on a lock held here when Postgres freezes.
        blocker = psycopg.connect(dsn)
        blocker.execute("LOCK TABLE tenant_dimensions IN ACCESS EXCLUSIVE MODE")
        results: list[tuple[int, str, float]] = []
        thread = threading.Thread(target=lambda: results.append(timed(client, query)))
        thread.start()
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        deadline = time.monotonic() + 5
        while blocker.execute(waiting).fetchone() == (0,):
            assert time.monotonic() < deadline, "the lookup never reached Postgres"
        signal_postgres(own_postgres, signal.SIGSTOP)
        try:
            thread.join(15)
        finally:
            signal_postgres(own_postgres, signal.SIGCONT)
            blocker.close()
        [(status, error, seconds)] = results
        assert (status, error) == (503, "unavailable")
        assert seconds < 5.0
        deadline = time.monotonic() + 20
        while timed(client, query)[0] != 200:
            assert time.monotonic() < deadline, "did not recover after Postgres came back"


def test_a_dimension_roll_up_out_of_time_answers_503_and_asks_for_less(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch
):
    slow_merging(monkeypatch)
    response = client.get(
        "/v1/metrics", params={"tenant_id": "acme", "dimension": COUNTRY, "bucket": "1d", "limit": 1000}
    )
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "deadline_exceeded"
    assert "shorter range" in response.json()["detail"]
    assert "one route, model or value" in response.json()["detail"]
    assert response.headers["retry-after"]


def test_openapi_describes_the_parameters_and_the_dimension_row(client: httpx.Client):
    document = client.get("/openapi.json").json()
    operation = document["paths"]["/v1/metrics"]["get"]
    names = [p["name"] for p in operation["parameters"]]
    assert names[-2:] == ["dimension", "value"]
    described = {p["name"]: p["description"] for p in operation["parameters"]}
    assert "value=" in described["value"] and "null" in described["value"]
    row = document["components"]["schemas"]["DimensionRow"]
    assert set(row["properties"]) == set(DIMENSION_ROW_FIELDS)
    assert set(row["required"]) >= {"dimension", "value"}
    ok = operation["responses"]["200"]
    assert "value (null first)" in ok["description"]
    items = ok["content"]["application/json"]["schema"]["properties"]["metrics"]["items"]
    assert {"$ref": "#/components/schemas/DimensionRow"} in items["anyOf"]


def test_the_lookup_is_bounded_by_the_requests_deadline(stored: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(api.query, "QUERY_SECONDS", 0.3)
    with start_app(stored) as url, httpx.Client(base_url=url) as client, psycopg.connect(stored) as blocker:
        blocker.execute("LOCK TABLE tenant_dimensions IN ACCESS EXCLUSIVE MODE")
        status, _, seconds = timed(client, f"tenant_id=acme&dimension={COUNTRY}")
    assert status == 503
    assert seconds < 1.5
