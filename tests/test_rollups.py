"""Roll-ups: windows merged into buckets, checked against the raw calls behind them."""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastdigest import TDigest
from starlette.testclient import TestClient

import api.queries
import api.query
from api.params import BUCKETS
from dataflows.sinks import COLUMNS, UPSERT_SQL
from tests.support.expected import bucket_start, check_bucket, nearest_rank_neighbours
from tests.support.metric_windows import (
    MINUTE,
    T0,
    RawCall,
    Window,
    get,
    insert_windows,
    random_calls,
    rfc3339,
)
from tests.support.rollup_cache import cached_parts, slow_merging

ROUTES = ("/chat", "/search")
MODELS = ("gpt-4o", "claude-sonnet-4-5")
Key = Callable[[Window], tuple]


def exact_percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def expected_buckets(
    windows: Sequence[Window], seconds: int, group_by: Sequence[str]
) -> dict[tuple, list[Window]]:
    groups: dict[tuple, list[Window]] = defaultdict(list)
    for window in windows:
        key = (
            rfc3339(bucket_start(window.start, seconds)),
            window.route if "route" in group_by else None,
            window.model if "model" in group_by else None,
        )
        groups[key].append(window)
    return groups


@pytest.fixture
def windows() -> list[Window]:
    """12 minutes from 10:54 (buckets straddle the hour) for 2 routes x 2 models."""
    rnd = random.Random(11)
    start = T0 - 6 * MINUTE
    made = [
        Window(
            "acme",
            route,
            model,
            start + minute * MINUTE,
            random_calls(rnd, rnd.randint(0, 40), median_ms=rnd.choice((200, 900))),
            revision=rnd.randint(1, 3),
        )
        for minute in range(12)
        for route in ROUTES
        for model in MODELS
    ]
    # A window of timeouts only: it counts, but has no latency, digest or averages.
    made.append(
        Window("acme", "/chat", "gpt-4o", start + 12 * MINUTE, [RawCall(latency_ms=None, error=True)] * 3)
    )
    made.append(Window("other", "/chat", "gpt-4o", start, random_calls(rnd, 10)))
    return made


@pytest.fixture
def client(postgres_dsn: str, windows: list[Window], client_for: Any) -> TestClient:
    insert_windows(postgres_dsn, [w for w in windows if w.calls])
    return client_for(postgres_dsn)


@pytest.fixture
def acme(windows: list[Window]) -> list[Window]:
    return [w for w in windows if w.tenant_id == "acme" and w.calls]


def ordered(groups: dict[tuple, Any]) -> list[tuple]:
    return sorted(groups, key=lambda k: (-datetime.fromisoformat(k[0]).timestamp(), k[1] or "", k[2] or ""))


@pytest.mark.parametrize("bucket", ["1m", "5m", "15m", "1h", "1d"])
def test_buckets_sum_and_weight_exactly(client: TestClient, acme: list[Window], bucket: str):
    seconds = BUCKETS[bucket]
    groups = expected_buckets(acme, seconds, ("route", "model"))
    body = get(client, tenant_id="acme", bucket=bucket, limit=1000)
    assert [(r["window_start"], r["route"], r["model"]) for r in body["metrics"]] == (ordered(groups))
    for row in body["metrics"]:
        members = groups[(row["window_start"], row["route"], row["model"])]
        check_bucket(row, members)
        start = datetime.fromisoformat(row["window_start"])
        assert row["window_end"] == rfc3339(start + timedelta(seconds=seconds))


@pytest.mark.parametrize("group_by", ["route", "model", "", "route,model", "model,route"])
def test_group_by_merges_across_the_dimension_left_out(client: TestClient, acme: list[Window], group_by: str):
    kept = [name for name in group_by.split(",") if name]
    groups = expected_buckets(acme, 300, kept)
    body = get(client, tenant_id="acme", bucket="5m", group_by=group_by, limit=1000)
    assert [(r["window_start"], r["route"], r["model"]) for r in body["metrics"]] == (ordered(groups))
    for row in body["metrics"]:
        assert (row["route"] is None) == ("route" not in kept)
        assert (row["model"] is None) == ("model" not in kept)
        check_bucket(row, groups[(row["window_start"], row["route"], row["model"])])


def test_group_by_without_bucket_merges_per_window(client: TestClient, acme: list[Window]):
    groups = expected_buckets(acme, 60, ["model"])
    body = get(client, tenant_id="acme", group_by="model", limit=1000)
    assert len(body["metrics"]) == len(groups)
    for row in body["metrics"]:
        assert row["route"] is None
        check_bucket(row, groups[(row["window_start"], None, row["model"])])


def test_a_bucket_of_timeouts_only_has_null_latencies(client: TestClient, acme: list[Window]):
    body = get(client, tenant_id="acme", bucket="1m", route="/chat", model="gpt-4o", limit=1)
    row = body["metrics"][0]
    assert row["window_start"] == rfc3339(T0 + 6 * MINUTE)
    assert row["requests"] == row["timeouts"] == row["errors"] == 3
    assert row["p95_latency_ms"] is None
    assert row["avg_latency_ms"] is None


def test_filters_and_limit_apply_to_rollups(client: TestClient, acme: list[Window]):
    chosen = [w for w in acme if w.model == "gpt-4o" and T0 - 5 * MINUTE <= w.start < T0 + MINUTE]
    groups = expected_buckets(chosen, 3600, ["route"])
    body = get(
        client,
        tenant_id="acme",
        model="gpt-4o",
        bucket="1h",
        group_by="route",
        **{"from": rfc3339(T0 - 5 * MINUTE), "to": rfc3339(T0 + MINUTE)},
    )
    assert [(r["window_start"], r["route"], r["model"]) for r in body["metrics"]] == (ordered(groups))
    for row in body["metrics"]:
        check_bucket(row, groups[(row["window_start"], row["route"], None)])
    # limit counts buckets, newest first.
    limited = get(client, tenant_id="acme", bucket="5m", limit=3)
    every = get(client, tenant_id="acme", bucket="5m", limit=1000)
    assert limited["metrics"] == every["metrics"][:3]
    assert get(client, tenant_id="nobody", bucket="1h") == {"metrics": [], "count": 0}


def test_percentiles_come_from_merged_digests_not_averaged(postgres_dsn: str, client_for: Any):
    # One fast window and one slow one: averaging their p95s would land in the gap.
    fast = [RawCall(latency_ms=10.0 + i * 0.01) for i in range(90)]
    slow = [RawCall(latency_ms=1000.0 + i) for i in range(10)]
    insert_windows(
        postgres_dsn,
        [Window("acme", "/chat", "gpt-4o", T0, fast), Window("acme", "/chat", "gpt-4o", T0 + MINUTE, slow)],
    )
    row = get(client_for(postgres_dsn), tenant_id="acme", bucket="5m")["metrics"][0]
    latencies = [c.latency_ms for c in fast + slow]
    for name, q in (("p50_latency_ms", 0.5), ("p95_latency_ms", 0.95)):
        low, high = nearest_rank_neighbours(latencies, q)
        assert low <= row[name] <= high
    assert row["p50_latency_ms"] < 11.0
    assert row["p95_latency_ms"] > 1000.0


def test_many_calls_merge_within_one_percent(postgres_dsn: str, client_for: Any):
    # 60 windows of 200 calls: more values than a digest keeps, so the merge compresses.
    rnd = random.Random(3)
    windows = [
        Window(
            "acme",
            "/chat",
            "gpt-4o",
            T0 + i * MINUTE,
            random_calls(rnd, 200, median_ms=rnd.choice((300, 700)), timeout_share=0),
        )
        for i in range(60)
    ]
    insert_windows(postgres_dsn, windows)
    row = get(client_for(postgres_dsn), tenant_id="acme", bucket="1h")["metrics"][0]
    latencies = [c.latency_ms for w in windows for c in w.calls]
    assert row["requests"] == 12_000
    for name, q in (("p50_latency_ms", 0.5), ("p95_latency_ms", 0.95), ("p99_latency_ms", 0.99)):
        assert row[name] == pytest.approx(exact_percentile(latencies, q), rel=0.01), name


def poison_cache(dsn: str) -> None:
    """Every cached digest replaced by one that no real bucket could merge to."""
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE llm_metrics_rollups SET digest = %s", (POISON.to_bytes(),))


POISON = TDigest.from_values([987_654.0])


def upsert_like_the_sink(dsn: str, windows: Sequence[Window]) -> None:
    """The dataflow's own upsert statement, so the cache is checked against its real writes."""
    rows = [window.column_values() for window in windows]
    with psycopg.connect(dsn) as conn, conn.cursor() as cursor:
        cursor.executemany(UPSERT_SQL, [tuple(row[name] for name in COLUMNS) for row in rows])


@pytest.mark.parametrize("bucket", ["1h", "1d"])
def test_whole_buckets_keep_their_merged_digests_per_key(
    client: TestClient, acme: list[Window], postgres_dsn: str, bucket: str
):
    seconds = BUCKETS[bucket]
    first = get(client, tenant_id="acme", bucket=bucket, limit=1000)
    # Keeping a bucket keeps its hours and their days: a day is merged from its hours.
    expected = defaultdict(int)
    for window in acme:
        for kept in (3600, 86400):
            expected[(window.route, window.model, kept, rfc3339(bucket_start(window.start, kept)))] += 1
    assert cached_parts(postgres_dsn) == expected
    # Read again: from the kept digests, the same rows, still right against the raw calls.
    again = get(client, tenant_id="acme", bucket=bucket, limit=1000)
    assert again == first
    groups = expected_buckets(acme, seconds, ("route", "model"))
    for row in again["metrics"]:
        check_bucket(row, groups[(row["window_start"], row["route"], row["model"])])
    merged = get(client, tenant_id="acme", bucket=bucket, group_by="", limit=1000)
    for row in merged["metrics"]:
        check_bucket(row, expected_buckets(acme, seconds, ())[(row["window_start"], None, None)])


def test_a_matching_kept_digest_is_what_the_answer_uses(client: TestClient, postgres_dsn: str):
    get(client, tenant_id="acme", bucket="1h", limit=1000)
    poison_cache(postgres_dsn)
    rows = get(client, tenant_id="acme", bucket="1h", limit=1000)["metrics"]
    assert {row["p50_latency_ms"] for row in rows if row["p50_latency_ms"] is not None} == {987_654.0}


def _revised(window: Window, rnd: random.Random) -> Window:
    return Window(
        window.tenant_id,
        window.route,
        window.model,
        window.start,
        window.calls + random_calls(rnd, 5, median_ms=5000, timeout_share=0),
        revision=window.revision + 1,
    )


def _rewritten(window: Window, rnd: random.Random) -> Window:
    # Same revision, other calls: what a dataflow started afresh could write.
    return Window(
        window.tenant_id,
        window.route,
        window.model,
        window.start,
        random_calls(rnd, 7, median_ms=3000, timeout_share=0),
        revision=window.revision,
    )


def _added(window: Window, rnd: random.Random) -> Window:
    # A window of the same hour that did not exist yet.
    return Window(
        window.tenant_id,
        window.route,
        window.model,
        window.start + 29 * MINUTE,
        random_calls(rnd, 4, median_ms=4000, timeout_share=0),
    )


@pytest.mark.parametrize("change", [_revised, _rewritten, _added])
def test_any_write_to_a_bucket_stops_its_kept_digest_being_used(
    client: TestClient,
    acme: list[Window],
    postgres_dsn: str,
    change: Callable[[Window, random.Random], Window],
):
    get(client, tenant_id="acme", bucket="1h", limit=1000)
    poison_cache(postgres_dsn)
    # A window of /chat gpt-4o in the 10:00 bucket.
    target = min(
        (w for w in acme if (w.route, w.model) == ("/chat", "gpt-4o") and w.start >= T0 + MINUTE),
        key=lambda w: w.start,
    )
    changed = change(target, random.Random(5))
    upsert_like_the_sink(postgres_dsn, [changed])
    now = [w for w in acme if w is not target or changed.start != target.start] + [changed]
    body = get(client, tenant_id="acme", bucket="1h", route="/chat", model="gpt-4o")
    groups = expected_buckets(now, 3600, ("route", "model"))
    changed_bucket = rfc3339(bucket_start(changed.start, 3600))
    for row in body["metrics"]:
        if row["window_start"] == changed_bucket:
            check_bucket(row, groups[(row["window_start"], "/chat", "gpt-4o")])
        else:  # untouched: still the kept (poisoned) digest
            assert row["p50_latency_ms"] == 987_654.0
    assert changed_bucket in {row["window_start"] for row in body["metrics"]}


def test_buckets_cut_by_the_range_are_merged_but_not_kept(
    client: TestClient, acme: list[Window], postgres_dsn: str
):
    start, end = T0 - 5 * MINUTE, T0 + 3 * MINUTE  # cuts both the 09:00 and the 10:00 bucket
    chosen = [w for w in acme if start <= w.start < end]
    body = get(client, tenant_id="acme", bucket="1h", **{"from": rfc3339(start), "to": rfc3339(end)})
    groups = expected_buckets(chosen, 3600, ("route", "model"))
    assert len(body["metrics"]) == len(groups)
    for row in body["metrics"]:
        check_bucket(row, groups[(row["window_start"], row["route"], row["model"])])
    assert cached_parts(postgres_dsn) == {}
    # A range covering the 10:00 bucket whole keeps it, not the cut 09:00 one.
    get(client, tenant_id="acme", bucket="1h", **{"from": rfc3339(start), "to": rfc3339(T0 + 60 * MINUTE)})
    assert {key[3] for key in cached_parts(postgres_dsn) if key[2] == 3600} == {rfc3339(T0)}


def test_short_buckets_are_not_kept(client: TestClient, postgres_dsn: str):
    for bucket in ("1m", "5m", "15m"):
        get(client, tenant_id="acme", bucket=bucket, limit=1000)
    get(client, tenant_id="acme", group_by="model", limit=1000)
    assert cached_parts(postgres_dsn) == {}


def test_a_rollup_out_of_time_keeps_what_it_merged_and_a_retry_goes_on(
    client: TestClient, acme: list[Window], postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
):
    slow_merging(monkeypatch)
    kept: list[int] = []
    for _ in range(20):
        response = client.get("/v1/metrics", params={"tenant_id": "acme", "bucket": "1h", "limit": 1000})
        if response.status_code == 200:
            break
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "deadline_exceeded"
        assert "retry" in response.json()["detail"]
        assert response.headers["retry-after"] == "1"
        kept.append(len(cached_parts(postgres_dsn)))
    assert response.status_code == 200
    assert len(kept) >= 2 and kept == sorted(set(kept)) and kept[0] > 0, kept
    groups = expected_buckets(acme, 3600, ("route", "model"))
    assert response.json()["count"] == len(groups)
    for row in response.json()["metrics"]:
        check_bucket(row, groups[(row["window_start"], row["route"], row["model"])])


def test_a_rollup_whose_statement_cannot_finish_answers_within_its_deadline(
    client: TestClient, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(api.query, "QUERY_SECONDS", 0.5)
    # Another session holds the table: the roll-up's statement waits until its timeout.
    with psycopg.connect(postgres_dsn) as blocker:
        blocker.execute("LOCK TABLE llm_metrics IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        response = client.get("/v1/metrics", params={"tenant_id": "acme", "bucket": "1d"})
        elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "deadline_exceeded"
    assert "shorter range" in response.json()["detail"]
    assert elapsed < 2.0


def test_a_short_bucket_roll_up_out_of_time_asks_for_less_rather_than_a_retry(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
):
    # Nothing of a 5m roll-up is kept, so a retry could not go further: say what to change.
    slow_merging(monkeypatch)
    response = client.get("/v1/metrics", params={"tenant_id": "acme", "bucket": "5m", "limit": 1000})
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "deadline_exceeded"
    assert "shorter range" in response.json()["detail"]


def test_roll_ups_beyond_the_slots_wait_their_turn_within_the_deadline(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(api.query, "QUERY_SECONDS", 0.3)
    slots = client.app.state.rollup_slots
    for _ in range(api.query.ROLLUPS_AT_ONCE):  # as if that many roll-ups were running
        client.portal.call(slots.acquire)
    try:
        started = time.monotonic()
        response = client.get("/v1/metrics", params={"tenant_id": "acme", "bucket": "1h"})
        assert time.monotonic() - started < 1.0
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "deadline_exceeded"
        assert "other roll-ups" in response.json()["detail"]
        # Reading windows as they are does not wait for a slot.
        assert get(client, tenant_id="acme", limit=5)["count"] == 5
    finally:
        for _ in range(api.query.ROLLUPS_AT_ONCE):
            slots.release()
    monkeypatch.undo()  # the usual deadline again
    assert get(client, tenant_id="acme", bucket="1h")["count"] > 0
