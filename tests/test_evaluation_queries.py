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

from api.metrics import create_app
from dataflows.sinks import UPSERT_EVALUATIONS_SQL
from schemas.config import Settings

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
        ({"dimension": "user"}, "dimension: evaluation rows are kept per window"),
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
    assert "name" in parameters and "dimension" not in parameters
    assert "EvaluationRow" in document["components"]["schemas"]
