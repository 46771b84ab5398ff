"""``GET /v1/evaluations`` against a real Postgres: stored rows as they are, roll-ups merged.

Rows are written as the dataflow writes them (its sink's statement, digests of the
scores); what the API answers is compared with the test's own computation from the
scores and labels each window was given.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from fastdigest import TDigest
from psycopg.types.json import Jsonb
from starlette.testclient import TestClient

from api.query import create_app
from dataflows.evaluations import EvaluationStats, ValueStats, dimension_emission
from dataflows.sinks import (
    UPSERT_EVALUATION_DIMENSIONS_SQL,
    UPSERT_EVALUATIONS_SQL,
    evaluation_dimension_values,
)
from schemas.config import Settings
from schemas.events import LLMEvaluation

BASE = datetime(2026, 3, 2, 10, 0, tzinfo=UTC).timestamp()
KEYS = (("acme", "/chat", "m-a"), ("acme", "/chat", "m-b"), ("acme", "/search", "m-a"))
NAMES = ("judge", "thumbs")
LABELS = [f"label-{n:02d}" for n in range(30)]


def _window(rng: random.Random) -> tuple[list[float], list[str]]:
    scores = [round(rng.uniform(-1, 1), 4) for _ in range(rng.randrange(0, 40))]
    labels = [rng.choice(LABELS[: rng.randrange(1, 30)]) for _ in range(rng.randrange(0, 30))]
    return scores, labels


@pytest.fixture
def stored(postgres_dsn: str) -> dict[tuple[Any, ...], tuple[list[float], list[str]]]:
    """10 minutes of windows for three keys and two names, one other tenant's."""
    rng = random.Random(4)
    windows: dict[tuple[Any, ...], tuple[list[float], list[str]]] = {}
    rows = []
    for minute in range(10):
        for key in (*KEYS, ("globex", "/chat", "m-a")):
            for name in NAMES:
                scores, labels = _window(rng)
                if not scores and not labels:
                    continue
                start = BASE + 60 * minute
                windows[(*key, start, name)] = (scores, labels)
                digest = TDigest(max_centroids=1000)
                if scores:
                    digest.batch_update(sorted(scores))
                counts = Counter(labels)
                kept = dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:20])
                if sum(counts.values()) > sum(kept.values()):
                    kept["(other)"] = sum(counts.values()) - sum(kept.values())
                count = max(len(scores), len(labels))
                rows.append(
                    (
                        *key,
                        datetime.fromtimestamp(start, UTC),
                        datetime.fromtimestamp(start + 60, UTC),
                        name,
                        count,
                        len(scores),
                        math.fsum(scores) if scores else None,
                        math.fsum(scores) / len(scores) if scores else None,
                        min(scores, default=None),
                        max(scores, default=None),
                        digest.quantile(0.5) if scores else None,
                        digest.quantile(0.9) if scores else None,
                        Jsonb(kept),
                        digest.to_bytes() if scores else None,
                        count,
                    )
                )
    with psycopg.connect(postgres_dsn) as conn, conn.cursor() as cursor:
        cursor.executemany(UPSERT_EVALUATIONS_SQL, rows)
    return windows


@pytest.fixture
def client(postgres_dsn: str) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(postgres_dsn=postgres_dsn, auth=False))) as client:
        yield client


def _expected_labels(labels: list[str]) -> dict[str, int]:
    counts = Counter(labels)
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = dict(ordered[:20])
    if len(ordered) > 20:
        kept["(other)"] = sum(n for _, n in ordered[20:])
    return kept


def test_stored_rows_newest_first_filtered_by_name(
    client: TestClient, stored: dict[tuple[Any, ...], Any]
) -> None:
    answer = client.get("/v1/evaluations", params={"tenant_id": "acme", "name": "judge", "limit": 1000})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    wanted = sorted(
        (key for key in stored if key[0] == "acme" and key[4] == "judge"),
        key=lambda key: (-key[3], key[1], key[2]),
    )
    assert body["count"] == len(wanted)
    got = [
        (
            r["tenant_id"],
            r["route"],
            r["model"],
            datetime.fromisoformat(r["window_start"]).timestamp(),
            r["name"],
        )
        for r in body["evaluations"]
    ]
    assert got == wanted
    for row, key in zip(body["evaluations"], wanted, strict=True):
        scores, labels = stored[key]
        assert row["scores"] == len(scores)
        assert row["labels"] == _expected_labels(labels)


def test_hourly_rollup_across_models_merges_scores_and_labels(
    client: TestClient, stored: dict[tuple[Any, ...], Any]
) -> None:
    answer = client.get("/v1/evaluations", params={"tenant_id": "acme", "bucket": "1h", "group_by": "route"})
    assert answer.status_code == 200, answer.text
    rows = answer.json()["evaluations"]
    expected: dict[tuple[str, str], tuple[list[float], list[str], int]] = {}
    for (tenant, route, _model, _start, name), (scores, labels) in stored.items():
        if tenant != "acme":
            continue
        kept = expected.setdefault((route, name), ([], [], 0))
        expected[(route, name)] = (
            kept[0] + scores,
            kept[1] + labels,
            kept[2] + max(len(scores), len(labels)),
        )
    assert [(r["route"], r["name"]) for r in rows] == sorted(expected)
    for row in rows:
        scores, labels, count = expected[(row["route"], row["name"])]
        assert row["model"] is None
        assert row["window_start"] == "2026-03-02T10:00:00Z" and row["window_end"] == "2026-03-02T11:00:00Z"
        assert (row["evaluations"], row["scores"], row["revision"]) == (count, len(scores), count)
        assert math.isclose(row["score_avg"], math.fsum(scores) / len(scores), rel_tol=1e-12)
        assert (row["score_min"], row["score_max"]) == (min(scores), max(scores))
        ordered = sorted(scores)
        for q, column in ((0.5, "score_p50"), (0.9, "score_p90")):
            rank = q * (len(ordered) - 1)
            low = ordered[max(0, math.floor(rank) - 1)]
            high = ordered[min(len(ordered) - 1, math.ceil(rank) + 1)]
            assert low <= row[column] <= high, (column, row[column], low, high)
        # Merged from each window's 20 most frequent and "(other)": labels beyond a window's
        # 20 count under "(other)", and the merge keeps the 20 most frequent again.
        assert sum(row["labels"].values()) == len(labels)
        assert len(row["labels"]) <= 21


@pytest.mark.parametrize(
    ("params", "names"),
    [
        ({"name": ""}, "name: must not be empty"),
        ({"name": "x" * 65}, "name: longer than 64"),
        ({"name": "a\x01"}, "name: contains a control character"),
        ({"dimension": "colour"}, "dimension: 'colour' is not a dimension"),
        ({"value": "SE"}, "value: needs dimension"),
        ({"bucket": "2h"}, "bucket:"),
        ({"nmae": "judge"}, "nmae: unknown parameter"),
    ],
)
def test_bad_parameters_are_named(client: TestClient, params: dict[str, str], names: str) -> None:
    answer = client.get("/v1/evaluations", params={"tenant_id": "acme", **params})
    assert answer.status_code == 400
    assert answer.json()["detail"].startswith(names), answer.json()


def test_the_openapi_document_describes_it(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    parameters = {p["name"] for p in document["paths"]["/v1/evaluations"]["get"]["parameters"]}
    assert {"name", "dimension", "value"} <= parameters
    assert {"EvaluationRow", "EvaluationDimensionRow"} <= set(document["components"]["schemas"])


COUNTRIES = ("SE", "DE", None)


def _write_values(
    postgres_dsn: str,
    key: tuple[str, str, str],
    start: float,
    name: str,
    by_value: dict[Any, list[float]],
    revision: int,
) -> None:
    """One window's rows of metadata.country for ``name``, written as the dataflow writes them."""
    group = ValueStats()
    for value, scores in by_value.items():
        stats = group.values[value] = EvaluationStats()
        for score in scores:
            stats.add(
                LLMEvaluation(
                    request_id="r",
                    tenant_id=key[0],
                    name=name,
                    timestamp=datetime.fromtimestamp(start, UTC),
                    score=score,
                )
            )
    emitted = dimension_emission(key, int(start), 60, name, "metadata.country", group, revision, 50)
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute(UPSERT_EVALUATION_DIMENSIONS_SQL, evaluation_dimension_values(emitted))


@pytest.fixture
def stored_values(postgres_dsn: str) -> dict[tuple[Any, ...], list[float]]:
    """10 minutes of one key's judge scores by country (null: calls without one)."""
    rng = random.Random(9)
    stored: dict[tuple[Any, ...], list[float]] = {}
    for minute in range(10):
        start = BASE + 60 * minute
        by_value = {
            value: [round(rng.uniform(0, 1), 4) for _ in range(rng.randrange(1, 12))]
            for value in COUNTRIES
            if rng.random() < 0.8
        }
        _write_values(postgres_dsn, KEYS[0], start, "judge", by_value, sum(map(len, by_value.values())))
        for value, scores in by_value.items():
            stored[start, value] = scores
    return stored


def test_a_dimensions_rows_one_per_value_and_one_value_alone(
    client: TestClient, stored_values: dict[tuple[Any, ...], list[float]]
) -> None:
    params = {"tenant_id": "acme", "name": "judge", "dimension": "metadata.country", "limit": 1000}
    rows = client.get("/v1/evaluations", params=params).json()["evaluations"]
    wanted = sorted(stored_values, key=lambda key: (-key[0], key[1] is not None, key[1] or ""))
    assert [(datetime.fromisoformat(r["window_start"]).timestamp(), r["value"]) for r in rows] == wanted
    for row, key in zip(rows, wanted, strict=True):
        scores = stored_values[key]
        assert row["dimension"] == "metadata.country"
        assert (row["evaluations"], row["scores"]) == (len(scores), len(scores))
        assert math.isclose(row["score_avg"], math.fsum(scores) / len(scores), rel_tol=1e-12)
        assert (row["score_min"], row["score_max"]) == (min(scores), max(scores))
    for value, asked in (("SE", "SE"), (None, "")):
        alone = client.get("/v1/evaluations", params={**params, "value": asked}).json()["evaluations"]
        assert [r["value"] for r in alone] == [value] * sum(1 for key in stored_values if key[1] == value)


def test_a_dimensions_hourly_rollup_merges_each_value(
    client: TestClient, stored_values: dict[tuple[Any, ...], list[float]]
) -> None:
    params = {"tenant_id": "acme", "dimension": "metadata.country", "bucket": "1h"}
    rows = client.get("/v1/evaluations", params=params).json()["evaluations"]
    merged: dict[Any, list[float]] = {}
    for (_, value), scores in stored_values.items():
        merged.setdefault(value, []).extend(scores)
    assert [r["value"] for r in rows] == sorted(merged, key=lambda value: (value is not None, value or ""))
    for row in rows:
        scores = merged[row["value"]]
        assert row["evaluations"] == len(scores) and (row["route"], row["model"]) == KEYS[0][1:]
        assert math.isclose(row["score_avg"], math.fsum(scores) / len(scores), rel_tol=1e-12)
        ordered = sorted(scores)
        rank = 0.5 * (len(ordered) - 1)
        assert ordered[max(0, math.floor(rank) - 1)] <= row["score_p50"] <= ordered[math.ceil(rank) + 1]


def test_a_later_revision_replaces_a_dimensions_rows_whole(postgres_dsn: str, client: TestClient) -> None:
    start = BASE + 3600
    _write_values(postgres_dsn, KEYS[1], start, "judge", {"SE": [0.5], "DE": [0.25]}, 2)
    _write_values(postgres_dsn, KEYS[1], start, "judge", {"SE": [0.5], "(other)": [0.25, 1.0]}, 3)
    _write_values(postgres_dsn, KEYS[1], start, "judge", {"SE": [0.5]}, 1)  # a replay's older rows
    params = {
        "tenant_id": "acme",
        "model": KEYS[1][2],
        "dimension": "metadata.country",
        "from": "2026-03-02T11:00:00Z",
    }
    answer = client.get("/v1/evaluations", params=params)
    assert answer.status_code == 200, answer.text
    rows = answer.json()["evaluations"]
    assert [(r["value"], r["evaluations"], r["revision"]) for r in rows] == [("(other)", 2, 3), ("SE", 1, 3)]
