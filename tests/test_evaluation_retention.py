"""Retention of evaluation rows: an hour's windows replaced by one hour row, answers unchanged.

The hour function (:func:`schemas.evaluation_retention.hour_of`) is checked against a
plain computation; then three days of evaluation windows (main rows and rows per
value of a dimension), two of them before the retention horizon, are asked for in
hourly and daily roll-ups before and after :func:`retire_evaluations` replaced the
windows there: the answers must be equal to the last bit, and agree with the test's
own computation from the raw scores and labels. Then the same with the compaction
killed at a random moment and run again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastdigest import TDigest, merge_all
from starlette.testclient import TestClient

from api.evaluations import fetch_evaluations, parse_evaluation_query
from api.params import InvalidParameter
from api.queries import Deadline
from api.query import create_app
from dataflows.evaluations import EvaluationStats, ValueStats, dimension_emission, emission
from dataflows.sinks import (
    UPSERT_EVALUATION_DIMENSIONS_SQL,
    UPSERT_EVALUATIONS_SQL,
    evaluation_dimension_values,
    evaluation_values,
)
from schemas.config import Settings
from schemas.evaluation_retention import Scores, hour_of, hour_of_values, retire_evaluations
from schemas.events import LLMEvaluation
from schemas.rollups import NO_HORIZON

logger = logging.getLogger(__name__)

DAY0 = datetime(2026, 1, 10, tzinfo=UTC)
HORIZON = DAY0 + timedelta(days=2)
HOURS = 72
KEYS = (("acme", "/chat", "m-a"), ("acme", "/chat", "m-b"), ("acme", "/search", "m-a"))
NAMES = ("judge", "thumbs")
LABELS = [f"label-{n:02d}" for n in range(25)]
COUNTRIES = ("SE", "DE", "FR", None)
DIMENSION = "metadata.country"
HOUR_SQL = "date_bin('1 hour', window_start, timestamptz 'epoch')"
NOT_AN_HOUR = f"(window_start <> {HOUR_SQL} OR window_end <> window_start + interval '1 hour')"
TABLES = ("llm_evaluation_metrics", "llm_evaluation_dimension_windows")


# -- the hour function ---------------------------------------------------------------------------


def _scores(rng: random.Random, revision: int | None = None) -> Scores:
    values = [rng.uniform(-1, 1) for _ in range(rng.choice((0, 1, 5, 30)))]
    labels = Counter(rng.choice(LABELS) for _ in range(rng.randrange(0, 40)))
    digest = TDigest(max_centroids=1000)
    if values:
        digest.batch_update(sorted(values))
    total = math.fsum(values) if values else None
    return Scores(
        evaluations=len(values) + rng.randrange(0, 5),
        scores=len(values),
        score_sum=total,
        score_avg=total / len(values) if total is not None else None,
        score_min=min(values, default=None),
        score_max=max(values, default=None),
        score_p50=digest.quantile(0.5) if values else None,
        score_p90=digest.quantile(0.9) if values else None,
        labels=dict(labels),
        score_digest=digest.to_bytes() if values else None,
        revision=rng.randrange(1, 100) if revision is None else revision,
    )


def test_an_hour_is_its_windows_added_up() -> None:
    rng = random.Random(11)
    for _ in range(200):
        rows = [_scores(rng) for _ in range(rng.randrange(2, 8))]
        hour = hour_of(rows)
        scored = [row for row in rows if row.scores]
        labels: Counter[str] = Counter()
        for row in rows:
            labels.update(row.labels)
        assert hour.evaluations == sum(row.evaluations for row in rows)
        assert hour.scores == sum(row.scores for row in rows)
        assert hour.revision == sum(row.revision for row in rows)
        assert hour.labels == dict(labels)  # not cut: more than 20 labels stay
        if not scored:
            assert (hour.score_sum, hour.score_avg, hour.score_min, hour.score_p50) == (None,) * 4
            assert hour.score_digest is None
            continue
        assert hour.score_sum == math.fsum(row.score_sum for row in scored)
        assert hour.score_avg == hour.score_sum / hour.scores
        assert hour.score_min == min(row.score_min for row in scored)
        assert hour.score_max == max(row.score_max for row in scored)
        blobs = [row.score_digest for row in scored]
        expected = (
            blobs[0] if len(blobs) == 1 else merge_all([TDigest.from_bytes(b) for b in blobs]).to_bytes()
        )
        assert hour.score_digest == expected
        assert hour.score_p50 == TDigest.from_bytes(expected).quantile(0.5)
        assert hour.score_p90 == TDigest.from_bytes(expected).quantile(0.9)


def test_an_hour_of_one_window_is_that_window_as_it_is() -> None:
    rng = random.Random(12)
    for _ in range(20):
        row = _scores(rng)
        # A stored p50 that merging would not give: it must survive unchanged.
        row = row._replace(score_p50=12345.0, score_avg=-7.0)
        assert hour_of([row]) is row


def test_a_packed_hour_merges_each_value_in_value_order() -> None:
    rng = random.Random(13)
    windows = [
        {value: _scores(rng, revision=revision) for value in rng.sample(COUNTRIES, rng.randrange(1, 4))}
        for revision in (3, 5, 9)
    ]
    merged = hour_of_values(windows, 17)
    assert list(merged) == sorted(merged, key=lambda value: (value is not None, value or ""))
    assert merged.keys() == {value for window in windows for value in window}
    for value, scores in merged.items():
        own = [window[value] for window in windows if value in window]
        assert scores == hour_of(own)._replace(revision=17)


# -- against Postgres and the query API -----------------------------------------------------------

# A window's raw evaluations: (score or None, label or None, country).
Raw = list[tuple[float | None, str | None, str | None]]


def _evaluations(rng: random.Random) -> Raw:
    out: Raw = []
    for _ in range(rng.randrange(1, 12)):
        score = rng.uniform(-1, 1) if rng.random() < 0.7 else None
        label = rng.choice(LABELS) if score is None or rng.random() < 0.6 else None
        out.append((score, label, rng.choice(COUNTRIES)))
    return out


def _stats(key: tuple[str, str, str], name: str, start: datetime, raw: Raw) -> EvaluationStats:
    stats = EvaluationStats()
    for number, (score, label, _) in enumerate(raw):
        stats.add(
            LLMEvaluation(
                request_id=f"r{number}",
                tenant_id=key[0],
                name=name,
                timestamp=start,
                score=score,
                label=label,
            )
        )
    return stats


def write_windows(dsn: str, seed: int = 5) -> dict[tuple[Any, ...], Raw]:
    """Three days from DAY0 of windows: 0 to 6 a key, name and hour (often one alone), each
    with a row per value of ``metadata.country`` too, written with the sink's statements."""
    rng = random.Random(seed)
    stored: dict[tuple[Any, ...], Raw] = {}
    main, packed = [], []
    for hour in range(HOURS):
        for key in KEYS:
            for name in NAMES:
                count = rng.choice((0, 1, 1, 2, 3, 4, 6))
                for minute in sorted(rng.sample(range(60), count)):
                    start = DAY0 + timedelta(hours=hour, minutes=minute)
                    raw = _evaluations(rng)
                    stored[(*key, name, start)] = raw
                    seconds = int(start.timestamp())
                    main.append(
                        evaluation_values(emission(key, seconds, 60, name, _stats(key, name, start, raw)))
                    )
                    group = ValueStats()
                    for value in COUNTRIES:
                        mine = [item for item in raw if item[2] == value]
                        if mine:
                            group.values[value] = _stats(key, name, start, mine)
                    emitted = dimension_emission(key, seconds, 60, name, DIMENSION, group, len(raw), 50)
                    packed.append(evaluation_dimension_values(emitted))
    with psycopg.connect(dsn) as conn, conn.cursor() as cursor:
        cursor.executemany(UPSERT_EVALUATIONS_SQL, main)
        cursor.executemany(UPSERT_EVALUATION_DIMENSIONS_SQL, packed)
        cursor.execute("UPDATE retention_horizon SET windows_before = %s", (HORIZON,))
    return stored


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def queries(few: bool = False) -> list[dict[str, str]]:
    """What is asked before and after: hourly and daily roll-ups, variously grouped and cut
    on bucket boundaries, main rows and a dimension's; and rows after the horizon. ``few``:
    a handful of them."""
    asked: list[dict[str, str]] = []
    for bucket in ("1h", "1d"):
        for extra in (
            {},
            {"group_by": "route"},
            {"group_by": "model"},
            {"group_by": ""},
            {"name": "judge"},
            {"route": "/search"},
            {"from": _iso(DAY0 + timedelta(days=1)), "to": _iso(HORIZON + timedelta(days=1))},
        ):
            asked.append({"bucket": bucket, **extra})
            asked.append({"bucket": bucket, "dimension": DIMENSION, **extra})
        asked.append({"bucket": bucket, "dimension": DIMENSION, "value": "SE"})
        asked.append({"bucket": bucket, "dimension": DIMENSION, "value": "", "group_by": "route"})
    asked.append(
        {"bucket": "1h", "from": _iso(DAY0 + timedelta(hours=30)), "to": _iso(HORIZON + timedelta(hours=5))}
    )
    # Cutting a daily bucket after the horizon: its windows are there.
    asked.append({"bucket": "1d", "dimension": DIMENSION, "to": _iso(HORIZON + timedelta(hours=5))})
    # After the horizon only: the windows are there, before and after.
    asked += [
        {},
        {"bucket": "15m"},
        {"group_by": "route"},
        {"dimension": DIMENSION},
        {"bucket": "5m", "dimension": DIMENSION},
    ]
    if few:
        asked = [params for params in asked if params.get("group_by") in (None, "") and len(params) <= 2]
    return [{"tenant_id": "acme", "limit": "1000", **params} for params in asked]


def answers(client: TestClient, few: bool = False) -> list[Any]:
    out = []
    for params in queries(few):
        answer = client.get("/v1/evaluations", params=params)
        assert answer.status_code == 200, (params, answer.text)
        out.append(answer.json())
    return out


@pytest.fixture
def client(postgres_dsn: str) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(postgres_dsn=postgres_dsn, auth=False))) as client:
        yield client


def _top(labels: Counter[str]) -> dict[str, int]:
    ordered = sorted(labels.items(), key=lambda item: (-item[1], item[0]))
    kept = dict(ordered[:20])
    if len(ordered) > 20:
        kept["(other)"] = sum(n for _, n in ordered[20:])
    return kept


def expected_buckets(
    stored: dict[tuple[Any, ...], Raw], params: dict[str, str]
) -> dict[tuple[Any, ...], Any]:
    """The test's own roll-up of the raw evaluations: per bucket key, the scores, labels,
    evaluations and revision."""
    size = {"1h": 3600, "1d": 86400}[params["bucket"]]
    kept = params.get("group_by", "route,model").split(",")
    per_value = "dimension" in params
    start = datetime.fromisoformat(params["from"]).timestamp() if "from" in params else -math.inf
    end = datetime.fromisoformat(params["to"]).timestamp() if "to" in params else math.inf
    out: dict[tuple[Any, ...], Any] = {}
    # A value's hours carry the revisions of all the dimension's rows of the hour.
    hour_revisions: Counter[tuple[Any, ...]] = Counter()
    for (_, route, model, name, moment), raw in stored.items():
        seconds = moment.timestamp()
        if not start <= seconds < end or params.get("name", name) != name:
            continue
        if params.get("route", route) != route:
            continue
        hour_revisions[(route, model, name, seconds // 3600)] += len(raw)
        values = (
            sorted({item[2] for item in raw}, key=lambda v: (v is not None, v or "")) if per_value else [None]
        )
        for value in values:
            if "value" in params and value != (params["value"] or None):
                continue
            mine = [item for item in raw if not per_value or item[2] == value]
            key = (
                seconds // size * size,
                route if "route" in kept else None,
                model if "model" in kept else None,
                name,
                value,
            )
            bucket = out.setdefault(
                key, {"scores": [], "labels": Counter(), "evaluations": 0, "revision": 0, "hours": set()}
            )
            bucket["scores"] += [item[0] for item in mine if item[0] is not None]
            bucket["labels"].update(item[1] for item in mine if item[1] is not None)
            bucket["evaluations"] += len(mine)
            bucket["hours"].add((route, model, name, seconds // 3600))
            bucket["revision"] += len(raw)
    if per_value:  # the revisions of the dimension's rows of each hour, not the value's own
        for bucket in out.values():
            bucket["revision"] = sum(hour_revisions[hour] for hour in bucket["hours"])
    return out


def check_against_raw(stored: dict[tuple[Any, ...], Raw], params: dict[str, str], body: Any) -> None:
    expected = expected_buckets(stored, params)
    rows = body["evaluations"]
    assert len(rows) == min(len(expected), 1000)
    for row in rows:
        key = (
            datetime.fromisoformat(row["window_start"]).timestamp(),
            row["route"],
            row["model"],
            row["name"],
            row.get("value"),
        )
        want = expected[key]
        scores = want["scores"]
        assert (row["evaluations"], row["scores"], row["revision"]) == (
            want["evaluations"],
            len(scores),
            want["revision"],
        ), (params, key)
        assert row["labels"] == _top(want["labels"]), (params, key)
        if scores:
            assert math.isclose(row["score_avg"], math.fsum(scores) / len(scores), rel_tol=1e-9)
            assert (row["score_min"], row["score_max"]) == (min(scores), max(scores))
        else:
            assert row["score_avg"] is None and row["score_p50"] is None


def _window_rows_before(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return sum(
            conn.execute(
                f"SELECT count(*) FROM {table} WHERE window_start < %s AND {NOT_AN_HOUR}", (HORIZON,)
            ).fetchone()[0]
            for table in TABLES
        )


def _rows_from(dsn: str) -> list[Any]:
    with psycopg.connect(dsn) as conn:
        return [
            conn.execute(
                f"SELECT count(*), sum(revision) FROM {table} WHERE window_start >= %s", (HORIZON,)
            ).fetchone()
            for table in TABLES
        ]


def test_hour_rows_answer_as_their_windows_did(postgres_dsn: str, client: TestClient) -> None:
    stored = write_windows(postgres_dsn)
    before = answers(client)
    for params, body in zip(queries(), before, strict=True):
        if params.get("bucket") in ("1h", "1d"):
            check_against_raw(stored, params, body)
    windows = _window_rows_before(postgres_dsn)
    later = _rows_from(postgres_dsn)
    assert windows > 1000

    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        replaced = retire_evaluations(conn, NO_HORIZON, HORIZON, lambda: None)
        assert replaced == windows
        assert retire_evaluations(conn, NO_HORIZON, HORIZON, lambda: None) == 0
        # Only hour rows before the horizon, one per key, name (dimension) and hour with windows.
        hours = {(key[:4], key[4].replace(minute=0)) for key in stored if key[4] < HORIZON}
        for table in TABLES:
            count = conn.execute(
                f"SELECT count(*) FROM {table} WHERE window_start < %s", (HORIZON,)
            ).fetchone()
            assert count == (len(hours),)
    assert _window_rows_before(postgres_dsn) == 0
    assert _rows_from(postgres_dsn) == later  # the windows after the horizon are untouched

    assert answers(client) == before


def test_a_range_cutting_a_bucket_before_the_horizon_is_refused(postgres_dsn: str) -> None:
    write_windows(postgres_dsn)

    async def ask(params: dict[str, list[str]]) -> Any:
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
            return await fetch_evaluations(conn, parse_evaluation_query(params), Deadline(10))

    cut = _iso(DAY0 + timedelta(hours=5, minutes=30))
    for name, bucket, moment in (("from", "1h", cut), ("to", "1d", _iso(DAY0 + timedelta(hours=5)))):
        params = {"tenant_id": ["acme"], "bucket": [bucket], name: [moment]}
        with pytest.raises(
            InvalidParameter, match=rf"^{name}: windows before .* are deleted .* bucket boundary"
        ):
            asyncio.run(ask(params))
    # On a boundary, or cutting a bucket after the horizon, or a shorter bucket: answered.
    assert asyncio.run(ask({"tenant_id": ["acme"], "bucket": ["1d"], "from": [_iso(DAY0)]}))
    assert asyncio.run(
        ask({"tenant_id": ["acme"], "bucket": ["1d"], "to": [_iso(HORIZON + timedelta(hours=3))]})
    )
    assert asyncio.run(ask({"tenant_id": ["acme"], "bucket": ["15m"], "from": [cut]}))


def test_a_cut_range_before_the_horizon_answers_400(postgres_dsn: str, client: TestClient) -> None:
    write_windows(postgres_dsn)
    params = {"tenant_id": "acme", "bucket": "1h", "from": _iso(DAY0 + timedelta(minutes=30))}
    answer = client.get("/v1/evaluations", params=params)
    assert answer.status_code == 400
    assert answer.json()["detail"].startswith("from: windows before ")


def _until_gone(dsn: str, application: str) -> None:
    """Wait until Postgres ended the backend of a killed client (a COMMIT it sent may still land)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(500):
            found = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (application,)
            ).fetchone()
            if found == (0,):
                return
            time.sleep(0.01)
    raise AssertionError(f"the backend of {application} is still there")


_COMPACT = textwrap.dedent(
    """
    import sys, time
    import psycopg
    from datetime import datetime
    from schemas import evaluation_retention
    from schemas.rollups import NO_HORIZON

    evaluation_retention.HOURS_PER_BATCH = 2
    with psycopg.connect(sys.argv[1], autocommit=True, application_name="killed-compaction") as conn:
        print("started", flush=True)
        evaluation_retention.retire_evaluations(
            conn, NO_HORIZON, datetime.fromisoformat(sys.argv[2]), lambda: time.sleep(0.001))
    print("done", flush=True)
    """
)


def test_compaction_killed_at_any_moment_then_run_again(postgres_dsn: str, client: TestClient) -> None:
    write_windows(postgres_dsn)
    before = answers(client, few=True)
    windows = _window_rows_before(postgres_dsn)
    seed = random.Random().randrange(2**32)
    delay = random.Random(seed).uniform(0, 0.7)
    logger.warning("killing the compaction %.3f s after it started (seed %d)", delay, seed)
    process = subprocess.Popen(
        [sys.executable, "-c", _COMPACT, postgres_dsn, HORIZON.isoformat()],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "started"
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    _until_gone(postgres_dsn, "killed-compaction")
    left = _window_rows_before(postgres_dsn)
    logger.warning("seed %d: %d of %d windows left before the horizon", seed, left, windows)
    assert answers(client, few=True) == before, f"seed {seed}"

    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert retire_evaluations(conn, NO_HORIZON, HORIZON, lambda: None) == left
    assert _window_rows_before(postgres_dsn) == 0
    assert answers(client, few=True) == before, f"seed {seed}"
