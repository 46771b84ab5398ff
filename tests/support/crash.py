"""A crash run: calls posted through the ingestion API in shuffled batches while the processor
(``python -m dataflows.run`` with its defaults) is killed with SIGKILL at moments drawn from a
seed and started again at once; then every final row, on Postgres and on the topics (with
dimensions and evaluations when asked), checked against a computation of its own. For
tests/test_crash.py and ``just bench crash``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.rows import dict_row

from schemas.topics import EVALUATION_DIMENSION_METRICS, EVALUATION_METRICS, EVALUATIONS
from tests.support import dataflow as h
from tests.support.servers import ServerThread

BATCH = 500  # events per POST /v1/llm/events
WINDOW_SECONDS = 60  # the default
KEYS = (*h.NORMAL_KEYS, ("initech", "/agent", "test-model-a"))


def _metadata(rng: random.Random) -> dict[str, Any]:
    """What applications put in ``metadata``: a country among 30 (skewed, some calls
    without), an experiment, a flag, a number; some values long or with control characters."""
    metadata: dict[str, Any] = {"experiment": rng.choice(["prompt_v3", "prompt_v4", None])}
    if rng.random() < 0.9:
        metadata["country"] = f"C{min(rng.randrange(30), rng.randrange(30)):02d}"
    metadata["beta"] = rng.random() < 0.3
    metadata["shard"] = rng.choice([1, 2, 2.5])
    if rng.random() < 0.02:
        metadata["country"] = "X" * 200 if rng.random() < 0.5 else "tab\there\x01"
    return metadata


def _calls(rng: random.Random, now: float, calls: int) -> tuple[list[dict[str, Any]], list[h.Counted]]:
    """Events of ``calls`` calls over five minutes ending a minute ago, shuffled, with repeats.

    Requests left without a response are stamped in the first half-minute, so their
    timeouts (JOIN_TIMEOUT_SECONDS 300 by default) come due while the test runs. Requests
    carry metadata and a user, responses a finish reason, drawn apart (``extras``) so that
    the calls themselves are those of the seed whatever is added.
    """
    extras = random.Random(rng.random())
    events: list[dict[str, Any]] = []
    counted: list[h.Counted] = []
    for n in range(calls):
        rid = f"crash-{n:06d}-{rng.getrandbits(32):08x}"
        key = rng.choice(KEYS)
        unanswered = n % 50 == 0
        ts = now - 360 + (rng.uniform(0, 30) if unanswered else rng.uniform(0, 300))
        request = {
            "type": "request",
            "request_id": rid,
            "tenant_id": key[0],
            "route": key[1],
            "model": key[2],
            "timestamp": h.timestamp(ts),
            "prompt_tokens": rng.randrange(0, 4000),
            "metadata": _metadata(extras),
            "user_id_hash": f"user-{extras.randrange(400):03d}",
        }
        events.append(request)
        if unanswered:
            counted.append(h.Counted(key, ts, None, request, late=False))
            continue
        completion = rng.randrange(0, 900)
        response: dict[str, Any] = {
            "type": "response",
            "request_id": rid,
            "timestamp": h.timestamp(ts + rng.uniform(0.05, 4.0)),
            "completion_tokens": completion,
            "cache_read_tokens": rng.randrange(0, request["prompt_tokens"] + 1),
            "reasoning_tokens": rng.randrange(0, completion + 1),
        }
        if rng.random() < 0.7:
            response["latency_ms"] = round(rng.uniform(20, 5000), 3)
        if rng.random() < 0.5:
            response["time_to_first_token_ms"] = round(rng.uniform(5, 900), 3)
        if rng.random() < 0.06:
            response["error"] = "upstream 500"
        finish_reason = extras.choice(["stop", "stop", "length", None])
        if finish_reason is not None:
            response["finish_reason"] = finish_reason
        events.append(response)
        counted.append(h.Counted(key, ts, response, request, late=False))
        if rng.random() < 0.03:  # a client retrying: the same events again
            events += [dict(request), dict(response)]
    rng.shuffle(events)
    return events, counted


# Evaluations count until this long after their call's window ended (shortened, so that
# some of the data set's come too late).
EVALUATION_LATENESS_SECONDS = 90


@dataclass
class Evaluations:
    """Evaluations of part of the calls, and what must come of them."""

    events: list[dict[str, Any]]
    rows: dict[tuple[str, str, str, float, str], list[dict[str, Any]]]  # counted, per row
    letters: Counter[str]  # dead letters by reason


def _evaluations(rng: random.Random, counted: list[h.Counted], now: float) -> Evaluations:
    """A numeric judge score (some with a label) for half the calls and a pass/fail label
    for a third, made up to 200 s after the call: some beyond EVALUATION_LATENESS_SECONDS
    after its window, some repeated, a few of another tenant, a few of calls never made."""
    out = Evaluations([], {}, Counter())
    for call in counted:
        start = call.request_ts // WINDOW_SECONDS * WINDOW_SECONDS
        rid = call.request["request_id"]
        for name, share in (("judge", 0.5), ("thumbs", 0.3)):
            if rng.random() >= share:
                continue
            at = min(call.request_ts + rng.uniform(0, 200), now - 1)
            evaluation: dict[str, Any] = {
                "type": "evaluation",
                "request_id": rid,
                "tenant_id": call.key[0],
                "name": name,
                "timestamp": h.timestamp(at),
            }
            if name == "judge":
                evaluation["score"] = round(rng.uniform(0, 1), 3)
                evaluation["evaluator"] = "llm-judge"
            if name == "thumbs" or rng.random() < 0.2:
                evaluation["label"] = rng.choice(["pass", "fail", "unsure"])
            copies = 2 if rng.random() < 0.03 else 1
            out.events += [dict(evaluation) for _ in range(copies)]
            if at > start + WINDOW_SECONDS + EVALUATION_LATENESS_SECONDS:
                out.letters["too_late"] += copies
            else:
                out.rows.setdefault((*call.key, start, name), []).append(evaluation)
        if rng.random() < 0.01:
            out.events.append(
                {
                    "type": "evaluation",
                    "request_id": rid,
                    "tenant_id": "umbrella",
                    "name": "judge",
                    "score": 1.0,
                    "timestamp": h.timestamp(call.request_ts + 1),
                }
            )
            out.letters["invalid"] += 1
    for n in range(5):
        out.events.append(
            {
                "type": "evaluation",
                "request_id": f"never-{n}-{rng.getrandbits(32):08x}",
                "tenant_id": "acme",
                "name": "judge",
                "score": 0.5,
                "timestamp": h.timestamp(now - 3000),
            }
        )
        out.letters["orphan_evaluation"] += 1
    return out


def check_evaluation_rows(
    actual: dict[tuple[Any, ...], dict[str, Any]],
    expected: dict[tuple[Any, ...], list[dict[str, Any]]],
    revisions: dict[tuple[Any, ...], int] | None = None,
) -> None:
    """Rows (Postgres columns or llm.evaluation-metrics fields) against the evaluations
    each must hold (and the revision each must have, when known: by default their count)."""
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for key, evaluations in expected.items():
        row = actual[key]
        scores = sorted(e["score"] for e in evaluations if "score" in e)
        labels = Counter(e["label"] for e in evaluations if "label" in e)
        revision = len(evaluations) if revisions is None else revisions.get(key, row["revision"])
        assert (row["evaluations"], row["scores"], row["revision"]) == (
            len(evaluations),
            len(scores),
            revision,
        ), key
        assert row["labels"] == dict(labels), key
        if not scores:
            assert row["score_avg"] is None and row["score_p50"] is None, key
            continue
        assert math.isclose(row["score_avg"], math.fsum(scores) / len(scores), rel_tol=1e-12), key
        assert (row["score_min"], row["score_max"]) == (scores[0], scores[-1]), key
        for q, column in ((0.5, "score_p50"), (0.9, "score_p90")):
            rank = q * (len(scores) - 1)
            low = scores[max(0, math.floor(rank) - 1)]
            high = scores[min(len(scores) - 1, math.ceil(rank) + 1)]
            assert low <= row[column] <= high, (key, column, row[column], scores)


def _evaluation_key(row: dict[str, Any]) -> tuple[str, str, str, float, str]:
    return (*h.window_of(row), row["name"])


def postgres_evaluation_rows(dsn: str) -> dict[tuple[str, str, str, float, str], dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        rows = conn.execute("SELECT * FROM llm_evaluation_metrics").fetchall()
    return {_evaluation_key(row): row for row in rows}


def latest_evaluation_metrics(brokers: str) -> dict[tuple[str, str, str, float, str], dict[str, Any]]:
    """The highest revision of each row on ``llm.evaluation-metrics``; revisions never go down."""
    latest: dict[tuple[str, str, str, float, str], dict[str, Any]] = {}
    for key, value, _, _ in sorted(h.records_on(brokers, EVALUATION_METRICS), key=lambda r: (r[2], r[3])):
        row = json.loads(value)
        found = _evaluation_key(row)
        start = datetime.fromisoformat(row["window_start"]).isoformat()
        assert key == f"{row['tenant_id']}|{row['route']}|{row['model']}|{start}|{row['name']}".encode()
        assert found not in latest or latest[found]["revision"] <= row["revision"], found
        latest[found] = row
    return latest


ValueRows = dict[tuple[Any, ...], list[dict[str, Any]]]


def expected_evaluation_values(
    judged: Evaluations, counted: list[h.Counted], names: Callable[[str, float], tuple[str, ...]], limit: int
) -> tuple[ValueRows, dict[tuple[Any, ...], int]]:
    """The evaluation rows per dimension value (docs/evaluations.md): per row and dimension of its
    tenant at the window's start, the evaluations of each value's calls (a call's value as
    its rows have it), the ``limit`` most evaluated apart and the rest under "(other)"; and
    the revisions known in advance (a dimension read from the requests: the row's count;
    under finish_reason a timed-out call answered later adds its evaluations once more)."""
    calls = {call.request["request_id"]: call for call in counted}
    rows: ValueRows = {}
    revisions: dict[tuple[Any, ...], int] = {}
    for (tenant, route, model, start, name), evaluations in judged.rows.items():
        for dimension in names(tenant, start):
            by_value: dict[str | None, list[dict[str, Any]]] = {}
            for evaluation in evaluations:
                value = h.dimension_value(dimension, calls[evaluation["request_id"]])
                by_value.setdefault(value, []).append(evaluation)
            ranked = sorted(
                (v for v in by_value if v != h.OTHER),
                key=lambda v: (-len(by_value[v]), v is not None, v or ""),
            )
            kept = {value: by_value[value] for value in ranked[:limit]}
            rest = [e for value in ranked[limit:] for e in by_value[value]] + by_value.get(h.OTHER, [])
            if rest:
                kept[h.OTHER] = rest
            for value, members in kept.items():
                key = (tenant, route, model, start, name, dimension, value)
                rows[key] = members
                if dimension != "finish_reason":
                    revisions[key] = len(evaluations)
    return rows, revisions


def _evaluation_value_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (*_evaluation_key(row), row["dimension"], row["value"])


def postgres_evaluation_values(dsn: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        rows = conn.execute("SELECT * FROM llm_evaluation_dimension_metrics").fetchall()
    return {_evaluation_value_key(row): row for row in rows}


def latest_evaluation_values(brokers: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The rows of the highest revision of each window, key, name and dimension on
    ``llm.evaluation-dimension-metrics``, written in order."""
    latest: dict[bytes, dict[str, Any]] = {}
    records = h.records_on(brokers, EVALUATION_DIMENSION_METRICS)
    for key, value, _, _ in sorted(records, key=lambda r: (r[2], r[3])):
        record = json.loads(value)
        start = datetime.fromisoformat(record["window_start"]).isoformat()
        assert (
            key
            == (
                f"{record['tenant_id']}|{record['route']}|{record['model']}|{start}|{record['name']}|"
                f"{record['dimension']}"
            ).encode()
        )
        assert key not in latest or latest[key]["revision"] <= record["revision"], key
        latest[key] = record
    return {_evaluation_value_key(row): row for record in latest.values() for row in record["rows"]}


def evaluation_letters(brokers: str) -> Counter[str]:
    """Dead letters of ``llm.evaluations`` records by reason, each record once (a replay after
    a crash may write one again)."""
    seen = {
        (letter["partition"], letter["offset"]): letter["reason"]
        for letter in h.dead_letters(brokers)
        if letter["source_topic"] == EVALUATIONS
    }
    return Counter(seen.values())


def _post(client: httpx.Client, batch: list[dict[str, Any]]) -> None:
    while True:
        answer = client.post("/v1/llm/events", json={"events": batch})
        if answer.status_code == 202:
            return
        assert answer.status_code == 503, answer.text  # the broker was slow: send again
        time.sleep(float(answer.headers.get("Retry-After", "1")))


def _published_in_order(brokers: str) -> dict[tuple[str, str, str, float], list[int]]:
    """Every llm.metrics revision of each window, in the order they were written."""
    by_key: dict[tuple[str, str, str, float], list[tuple[int, int, int]]] = {}
    for _key, value, partition, offset in h.records_on(brokers, h.METRICS):
        row = json.loads(value)
        by_key.setdefault(h.window_of(row), []).append((partition, offset, row["revision"]))
    return {key: [revision for _, _, revision in sorted(items)] for key, items in by_key.items()}


@dataclass
class CrashRun:
    seed: int
    calls: int
    events: int
    kills: list[float]  # seconds into the posting
    posting_seconds: float  # from the first batch to the last acknowledged
    settle_seconds: float  # from the last batch to exact rows in Postgres
    emissions: int  # llm.metrics records
    windows: int


@dataclass
class Dimensions:
    """Dimensions to run with: ``DIMENSIONS`` for every tenant, and one tenant (``tenant``)
    switching to ``own`` at a window boundary in the middle of the calls, stored as a change
    is before the processor starts."""

    default: tuple[str, ...]
    values: int  # DIMENSION_VALUES
    tenant: str
    own: tuple[str, ...]

    def settings(self) -> dict[str, str]:
        return {"DIMENSIONS": ",".join(self.default), "DIMENSION_VALUES": str(self.values)}

    def store(self, dsn: str, boundary: float) -> None:
        with psycopg.connect(dsn) as conn:
            conn.execute(
                "INSERT INTO tenant_dimensions (tenant_id, effective_from, dimensions) "
                "VALUES (%s, to_timestamp(%s), %s)",
                (self.tenant, boundary, list(self.own)),
            )

    def names(self, boundary: float) -> Callable[[str, float], tuple[str, ...]]:
        return lambda tenant, start: self.own if tenant == self.tenant and start >= boundary else self.default


def run(
    work: Path,
    brokers: str,
    dsn: str,
    calls: int,
    kills: int,
    posting_seconds: float,
    seed: int,
    dimensions: Dimensions | None = None,
    evaluations: bool = False,
    join_timeout: int | None = None,
) -> CrashRun:
    """Post ``calls`` shuffled calls over ``posting_seconds`` while ``kills`` kill -9s land at
    moments drawn from ``seed``; wait for the rows and check every one of them (with
    ``dimensions``, their rows too; with ``evaluations``, evaluations of the calls, shuffled
    among them, and their rows). With ``join_timeout`` (JOIN_TIMEOUT_SECONDS), a few responses
    come last, long after their requests: the join counts those calls as timeouts first,
    then their answers replace them."""
    rng = random.Random(seed)
    now = time.time()
    events, counted = _calls(rng, now, calls)
    expected = h.expected_rows_of(counted, WINDOW_SECONDS)
    judged = _evaluations(random.Random(rng.random()), counted, now) if evaluations else None
    if judged is not None:
        events += judged.events
        random.Random(seed + 1).shuffle(events)
        # The orphans among the first half: their shards see later evaluations after them.
        orphans = [event for event in events if event["request_id"].startswith("never-")]
        events = [event for event in events if not event["request_id"].startswith("never-")]
        for event in orphans:
            events.insert(rng.randrange(len(events) // 2), event)
    if join_timeout is not None:
        # After every kill (the last batch comes after the last): the state that holds these
        # calls' evaluations as timeouts' when their answers come is a resumed one.
        late = [event for event in events if event["type"] == "response" and rng.random() < 0.04]
        held = {id(event) for event in late}
        events = [event for event in events if id(event) not in held] + late
    boundary = (now - 200) // WINDOW_SECONDS * WINDOW_SECONDS
    if dimensions is not None:
        dimensions.store(dsn, boundary)
    values_wanted = None
    if dimensions is not None and judged is not None:
        values_wanted = expected_evaluation_values(
            judged, counted, dimensions.names(boundary), dimensions.values
        )
    batches = [events[i : i + BATCH] for i in range(0, len(events), BATCH)]
    # Moments while batches are still to come: the last one is due at this.
    last_due = posting_seconds * (len(batches) - 1) / len(batches)
    kill_at = sorted(rng.uniform(1.0, last_due) for _ in range(kills))
    done = CrashRun(
        seed, len(counted), len(events), [round(t, 2) for t in kill_at], 0.0, 0.0, 0, len(expected)
    )
    print(
        f"crash run: seed {seed}, {len(counted)} calls, {len(events)} events, "
        f"kill -9 at {done.kills} s into the posting",
        flush=True,
    )

    settings = {} if dimensions is None else dimensions.settings()
    if join_timeout is not None:
        settings["JOIN_TIMEOUT_SECONDS"] = str(join_timeout)
    if judged is not None:
        settings["EVALUATION_LATENESS_SECONDS"] = str(EVALUATION_LATENESS_SECONDS)
    processor = h.Processor.in_directory(
        brokers,
        dsn,
        work,
        settings=settings,
    )
    with ServerThread(brokers) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        processor.start()
        try:
            started = time.monotonic()
            for number, batch in enumerate(batches):
                # Spread the batches evenly, killing whenever a drawn moment has passed.
                due = started + posting_seconds * number / len(batches)
                while time.monotonic() < due or (kill_at and time.monotonic() - started >= kill_at[0]):
                    if kill_at and time.monotonic() - started >= kill_at[0]:
                        print(
                            f"kill -9 at {time.monotonic() - started:.2f} s "
                            f"(batch {number} of {len(batches)})",
                            flush=True,
                        )
                        kill_at.pop(0)
                        processor.kill()
                        processor.start()
                    else:
                        time.sleep(min(0.05, max(0.0, due - time.monotonic())))
                _post(client, batch)
            posted = time.monotonic()
            assert not kill_at, "every kill happened while events were arriving"

            def final() -> bool:
                rows = h.postgres_rows(dsn)
                if not all(
                    key in rows and rows[key]["revision"] >= row.revision for key, row in expected.items()
                ):
                    return False
                if judged is None:
                    return True
                scored = postgres_evaluation_rows(dsn)
                if not all(
                    key in scored and scored[key]["revision"] >= len(wanted)
                    for key, wanted in judged.rows.items()
                ):
                    return False
                if values_wanted is not None:
                    # A timed-out call answered late moves its evaluations after the last one.
                    values = postgres_evaluation_values(dsn)
                    if {key: row["evaluations"] for key, row in values.items()} != {
                        key: len(members) for key, members in values_wanted[0].items()
                    }:
                        return False
                return evaluation_letters(brokers) == judged.letters

            h.wait_for(final, 600, "the final rows", processor.check_alive)
            done.posting_seconds = posted - started
            done.settle_seconds = time.monotonic() - posted
        finally:
            processor.stop()

    log = processor.log.read_text(errors="replace")
    said = [line.split("recovery: ", 1)[1] for line in log.splitlines() if "recovery: " in line]
    # One line per start that got that far (a kill can land before it): state made
    # once, then resumed from, never made afresh or refused.
    assert said and said[0].startswith("new state"), log[-3000:]
    assert len(said) <= kills + 1, said
    assert all(line.startswith("resuming from") for line in said[1:]), said
    if kills:
        assert len(said) >= 2, said
    h.check_rows(h.postgres_rows(dsn), expected)
    h.check_rows(h.latest_metrics(brokers), expected)
    published = _published_in_order(brokers)
    for key, revisions in published.items():
        assert revisions == sorted(revisions), f"{key}: revisions went down: {revisions}"
    done.emissions = sum(len(revisions) for revisions in published.values())
    if dimensions is not None:
        wanted = h.expected_dimension_rows(
            counted, dimensions.names(boundary), dimensions.values, WINDOW_SECONDS
        )
        assert any(key[5] == h.OTHER for key in wanted) and any(key[5] is None for key in wanted)
        h.check_dimension_rows(h.postgres_dimension_rows(dsn), wanted)
        h.check_dimension_rows(h.latest_dimension_metrics(brokers), wanted)
        # Revisions moved values into "(other)" on the way: rows of their own that are gone
        # from Postgres and from the topic's latest records (checked above).
        dropped = [
            key
            for key, records in h.dimension_records(brokers).items()
            if set(map(str, records[0]["values"])) - set(map(str, records[-1]["values"]))
        ]
        assert dropped, "no value was merged into (other) by a revision: the data set missed that path"
    if judged is not None:
        assert all(judged.letters[reason] for reason in ("too_late", "invalid", "orphan_evaluation"))
        check_evaluation_rows(postgres_evaluation_rows(dsn), judged.rows)
        check_evaluation_rows(latest_evaluation_metrics(brokers), judged.rows)
        assert evaluation_letters(brokers) == judged.letters
    if values_wanted is not None:
        values, revisions = values_wanted
        assert any(key[6] == h.OTHER for key in values) and any(key[6] is None for key in values)
        check_evaluation_rows(postgres_evaluation_values(dsn), values, revisions)
        check_evaluation_rows(latest_evaluation_values(brokers), values, revisions)
    return done
