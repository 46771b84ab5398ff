"""The alert service end to end (docs/alerts.md): rows written through the dataflow's own sink
(Postgres first, then ``llm.metrics``) on a real broker and Postgres, rules made through
the query API with a manage key, deliveries to a real HTTP receiver in the test.

What should fire and resolve is worked out here from the rows the test writes, with the
plain reading of the rules in tests/support/expected.py.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg
import pytest
from fastdigest import TDigest
from prometheus_client import REGISTRY

from api.keys import create_key
from api.query import create_app
from dataflows import alert_store
from dataflows.alert_service import serve
from dataflows.alerting import RuleState, Transition, transition_id
from dataflows.evaluations import EvaluationEmission
from dataflows.sinks import EvaluationRowsSink, RowsSink
from dataflows.windows import DimensionEmission, WindowRow
from schemas.alert_rules import rules_of_tenants
from schemas.config import Settings
from schemas.database import ensure_schema
from schemas.rows import VALUE_STATISTICS, DimensionRows, EvaluationRow, MetricsRow
from schemas.webhooks import parse_allow
from tests.support.alerts import Delivery, Receiver
from tests.support.expected import expected_transitions
from tests.support.ports import free_port
from tests.support.servers import serving
from tests.support.stacks import TEST_PARTITIONS, Broker, Postgres

W = 60
SECRET = "the-tests-secret-0123456789abcdef"
LOOPBACK = parse_allow("127.0.0.0/8")


def first_window() -> int:
    """The next minute, when the rest of the UTC day holds the test's windows (a day's budget
    sums them all), else 01:00 tomorrow: after the rules are made either way."""
    now = int(time.time())
    following = now - now % W + W
    return following if following + 40 * W < now - now % 86_400 + 86_400 else now - now % 86_400 + 90_000


def window_row(start: int, route: str, calls: int, errors: int, cost: float, revision: int = 1) -> WindowRow:
    latencies = [100.0 + 10 * index for index in range(calls)]
    begin = datetime.fromtimestamp(start, UTC)
    return WindowRow(
        row=MetricsRow(
            tenant_id="acme",
            route=route,
            model="m",
            window_start=begin,
            window_end=datetime.fromtimestamp(start + W, UTC),
            requests=calls,
            errors=errors,
            timeouts=0,
            avg_latency_ms=sum(latencies) / calls,
            p50_latency_ms=None,
            p95_latency_ms=None,
            p99_latency_ms=None,
            avg_time_to_first_token_ms=None,
            prompt_tokens=10 * calls,
            completion_tokens=20 * calls,
            cache_read_tokens=0,
            reasoning_tokens=0,
            avg_prompt_tokens=10.0,
            avg_completion_tokens=20.0,
            estimated_cost_usd=cost,
            unpriced_requests=0,
            revision=revision,
        ),
        digest=TDigest.from_values(latencies).to_bytes(),
        ttft_count=0,
    )


def make_rules(dsn: str, rules: list[dict[str, Any]]) -> list[str]:
    """The rules made through the query API with a manage key of acme's; their ids."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        key = create_key(conn, "acme", "manage").key
    app = create_app(Settings(postgres_dsn=dsn, window_seconds=W, alert_webhook_allow=LOOPBACK))
    ids = []
    with serving(app, "the query API") as url:
        for rule in rules:
            answer = httpx.post(
                f"{url}/v1/alerts/rules", json=rule, headers={"Authorization": f"Bearer {key}"}, timeout=30
            )
            assert answer.status_code == 201, answer.text
            ids.append(answer.json()["id"])
    return ids


@contextmanager
def alert_service(broker: Broker, dsn: str) -> Iterator[None]:
    """The alert service (judging and delivering) in threads of this process."""
    settings = Settings(
        kafka_brokers=broker.address, postgres_dsn=dsn, window_seconds=W, alert_webhook_allow=LOOPBACK
    )
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(settings, stop), name="alert-service", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "the alert service did not stop"


def read_up_to(dsn: str, records: int, topic: str = "llm.metrics", timeout: float = 60) -> None:
    """Wait until the service stored offsets past ``records`` records of ``topic``: all judged."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            found = conn.execute(
                "SELECT coalesce(sum(next_offset), 0) FROM alert_offsets WHERE topic = %s", (topic,)
            ).fetchone()
            if found is not None and found[0] >= records:
                return
            assert time.monotonic() < deadline, f"the service judged {found} of {records} records of {topic}"
            time.sleep(0.05)


def stored_transitions(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT id, rule_id, state, extract(epoch FROM window_start)::bigint, delivery, attempts "
            "FROM alert_transitions ORDER BY window_start, state"
        ).fetchall()


def prometheus_counts() -> dict[str, float]:
    """The alert service's Prometheus counters, as this process's registry holds them."""
    out = {}
    for state in ("firing", "resolved"):
        out[state] = REGISTRY.get_sample_value("streamlens_alert_transitions_total", {"state": state}) or 0.0
    for outcome in ("delivered", "retried"):
        out[outcome] = (
            REGISTRY.get_sample_value("streamlens_alert_deliveries_total", {"outcome": outcome}) or 0.0
        )
    return out


def by_key(deliveries: list[Delivery]) -> dict[str, dict[str, Any]]:
    """Each accepted delivery's body by its Idempotency-Key; the key must be the body's id."""
    out = {}
    for item in deliveries:
        body = json.loads(item.body)
        assert item.headers["idempotency-key"] == body["id"]
        out[body["id"]] = body
    return out


def test_rules_fire_and_resolve_at_the_windows_their_rows_say_and_a_budget_once(
    postgres_dsn: str, broker: Broker
) -> None:
    generator = random.Random(21)
    receiver = Receiver()
    start = first_window()
    # /chat breaches (errors > 10 %) in these windows; window 7 breaches once a late call lands.
    chat_breaches = [False, True, True, True, False, False, True, False, False, False, False, False]
    rows: dict[tuple[int, str], tuple[int, int, float]] = {}
    for index, breach in enumerate(chat_breaches):
        calls = generator.randint(10, 40)
        rows[(index, "/chat")] = (calls, calls // 4 if breach else calls // 20, generator.uniform(0.02, 0.06))
        # /search errs often: a rule that ignored its route would see other windows breach.
        rows[(index, "/search")] = (6, 3, generator.uniform(0.02, 0.06))
    late_calls, late_errors, late_cost = rows[(7, "/chat")]
    revised = (late_calls + 1, late_calls // 4 + 1, late_cost)  # the late call, an error
    assert late_errors / late_calls <= 0.1 < revised[1] / revised[0]

    with serving(receiver.app, "the receiver") as hook:
        error_rule, budget_rule, quiet_rule = make_rules(
            postgres_dsn,
            [
                {
                    "tenant_id": "acme",
                    "name": "errors on /chat",
                    "metric": "error_rate",
                    "route": "/chat",
                    "span_seconds": W,
                    "op": ">",
                    "threshold": 0.1,
                    "for_windows": 2,
                    "min_calls": 5,
                    "webhook_url": f"{hook}/hook",
                    "webhook_secret": SECRET,
                },
                {
                    "tenant_id": "acme",
                    "name": "daily spend",
                    "metric": "estimated_cost_usd",
                    "period": "day",
                    "op": ">=",
                    "threshold": 0.7,
                    "webhook_url": f"{hook}/hook",
                },
                {
                    "tenant_id": "acme",
                    "name": "another model",
                    "metric": "calls",
                    "model": "other",
                    "span_seconds": W,
                    "op": ">",
                    "threshold": 0,
                    "webhook_url": f"{hook}/hook",
                },
            ],
        )
        sink = RowsSink(postgres_dsn, broker.address).build("rows", 0, 1)
        counted_before = prometheus_counts()
        with alert_service(broker, postgres_dsn):
            for index in range(len(chat_breaches)):
                sink.write_batch(
                    [
                        window_row(start + index * W, route, *rows[(index, route)])
                        for route in ("/chat", "/search")
                    ]
                )
            sink.write_batch([window_row(start + 7 * W, "/chat", *revised, revision=2)])
            read_up_to(postgres_dsn, 2 * len(chat_breaches) + 1)
            accepted = receiver.wait_for(5, timeout=30)
        sink.close()

    rows[(7, "/chat")] = revised
    breaching = [rows[(index, "/chat")][1] / rows[(index, "/chat")][0] > 0.1 for index in range(12)]
    want = expected_transitions(breaching, 2)
    assert want == [("firing", 2), ("resolved", 4), ("firing", 7), ("resolved", 8)]
    spent, crossed = 0.0, None
    for index in range(12):
        spent += rows[(index, "/chat")][2] + rows[(index, "/search")][2]
        if spent >= 0.7 and crossed is None:
            crossed = index
    assert crossed is not None

    # Prometheus counted them (the counters are the process's: the difference is this run's).
    counted = prometheus_counts()
    assert {name: counted[name] - counted_before[name] for name in counted} == {
        "firing": 3,
        "resolved": 2,
        "delivered": 5,
        "retried": 0,
    }
    stored = stored_transitions(postgres_dsn)
    assert [
        (rule, state, (window - start) // W) for _, rule, state, window, _, _ in stored if rule == error_rule
    ] == [(error_rule, state, index) for state, index in want]
    assert [
        (state, (window - start) // W) for _, rule, state, window, _, _ in stored if rule == budget_rule
    ] == [("firing", crossed)]
    assert len(stored) == 5, stored
    bodies = by_key(accepted)
    assert set(bodies) == {item[0] for item in stored}
    assert all(item[4] == "delivered" for item in stored)

    for delivery in accepted:
        body = json.loads(delivery.body)
        index = (int(datetime.fromisoformat(body["window_start"]).timestamp()) - start) // W
        assert body["tenant_id"] == "acme" and body["threshold"] in (0.1, 0.7)
        assert (
            datetime.fromisoformat(body["window_end"]).timestamp()
            - datetime.fromisoformat(body["window_start"]).timestamp()
            == W
        )
        if body["rule_id"] == error_rule:
            calls, errors, _ = rows[(index, "/chat")]
            assert body["rule_name"] == "errors on /chat" and body["metric"] == "error_rate"
            assert body["value"] == pytest.approx(errors / calls)
            signed = hmac.new(SECRET.encode(), delivery.body, hashlib.sha256).hexdigest()
            assert delivery.headers["x-streamlens-signature"] == f"sha256={signed}"
        else:
            assert body["rule_id"] == budget_rule and body["state"] == "firing"
            total = sum(rows[(i, route)][2] for i in range(index + 1) for route in ("/chat", "/search"))
            assert body["value"] == pytest.approx(total)
            assert "x-streamlens-signature" not in delivery.headers

    # What GET /v1/alerts shows of it, to a read key of acme's; another tenant's key is refused.
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        read_key = create_key(conn, "acme", "read").key
        globex_key = create_key(conn, "globex", "read").key
    with serving(create_app(Settings(postgres_dsn=postgres_dsn, window_seconds=W)), "the query API") as url:
        answer = httpx.get(f"{url}/v1/alerts", headers={"Authorization": f"Bearer {read_key}"}, timeout=30)
        refused = httpx.get(
            f"{url}/v1/alerts?tenant_id=acme", headers={"Authorization": f"Bearer {globex_key}"}, timeout=30
        )
    assert answer.status_code == 200, answer.text
    assert refused.status_code == 403, refused.text
    shown = answer.json()
    # A budget fires in the UTC day it was reached in, as the wall clock counts days.
    budget_state = "firing" if start // 86_400 == time.time() // 86_400 else "ok"
    assert shown["tenant_id"] == "acme" and shown["firing"] == (budget_state == "firing")
    states = {rule["rule_id"]: rule for rule in shown["rules"]}
    assert [states[rule]["state"] for rule in (error_rule, budget_rule, quiet_rule)] == [
        "ok",
        budget_state,
        "ok",
    ]
    told = states[error_rule]["transitions"]
    assert [item["state"] for item in told] == [state for state, _ in reversed(want)]
    assert {(item["delivery"], item["attempts"]) for item in told} == {("delivered", 1)}
    assert [item["id"] for item in states[budget_rule]["transitions"]] == [
        item[0] for item in stored if item[1] == budget_rule
    ]
    assert states[quiet_rule]["transitions"] == []
    assert SECRET not in answer.text


def test_a_receiver_down_for_30_s_gets_the_transition_afterwards_under_the_same_key(
    postgres_dsn: str, broker: Broker
) -> None:
    receiver = Receiver()
    receiver.down_for = 30.0
    start = first_window()
    with serving(receiver.app, "the receiver") as hook:
        (rule_id,) = make_rules(
            postgres_dsn,
            [
                {
                    "tenant_id": "acme",
                    "name": "any error",
                    "metric": "errors",
                    "span_seconds": W,
                    "op": ">",
                    "threshold": 0,
                    "webhook_url": f"{hook}/hook",
                }
            ],
        )
        sink = RowsSink(postgres_dsn, broker.address).build("rows", 0, 1)
        with alert_service(broker, postgres_dsn):
            sink.write_batch([window_row(start, "/chat", 10, 1, 0.01)])
            accepted = receiver.wait_for(1, timeout=90)
        sink.close()
    assert len(accepted) == 1, receiver.deliveries
    attempts = receiver.deliveries
    assert {item.headers["idempotency-key"] for item in attempts} == {accepted[0].headers["idempotency-key"]}
    assert [item.status for item in attempts[:-1]] == [503] * (len(attempts) - 1) and len(attempts) >= 3
    assert accepted[0].at - attempts[0].at >= 30.0
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(attempts)]
    assert gaps == sorted(gaps), "the backoff did not grow"
    ((_, rule, state, _, delivery, tries),) = stored_transitions(postgres_dsn)
    assert (rule, state, delivery, tries) == (rule_id, "firing", "delivered", len(attempts))


def spawn_service(broker: Broker, dsn: str, log: Any, *arguments: str) -> subprocess.Popen[bytes]:
    environ = {
        **os.environ,
        "KAFKA_BROKERS": broker.address,
        "POSTGRES_DSN": dsn,
        "WINDOW_SECONDS": str(W),
        "TOPIC_PARTITIONS": str(TEST_PARTITIONS),
        "ALERT_WEBHOOK_ALLOW": "127.0.0.0/8",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "dataflows.alert_service", *arguments], env=environ, stdout=log, stderr=log
    )


@pytest.mark.parametrize(("seed", "flaky"), [(1, False), (2, True)])
def test_kill_9_of_the_alert_service_at_random_moments_loses_no_transition_and_sends_none_under_two_keys(
    postgres_dsn: str, broker: Broker, tmp_path: Path, seed: int, flaky: bool
) -> None:
    """Killed at seeded random moments while rows arrive and deliveries go out; with
    ``flaky`` the receiver also refuses a third of first attempts, so retries are pending
    when it dies."""
    generator = random.Random(seed)
    receiver = Receiver(refuse_first=(lambda key: int(key[:8], 16) % 3 == 0) if flaky else None)
    start = first_window()
    count = 30
    chat = []
    for _ in range(count):
        calls = generator.randint(10, 30)
        chat.append((calls, generator.choice([0, calls // 3]), 0.01))
    kills = [generator.uniform(0.3, 2.5) for _ in range(4)]
    print(f"seed {seed}: kill -9 after {', '.join(f'{moment:.2f}' for moment in kills)} s of each run")

    with serving(receiver.app, "the receiver") as hook:
        (rule_id, budget_id) = make_rules(
            postgres_dsn,
            [
                {
                    "tenant_id": "acme",
                    "name": "errors",
                    "metric": "error_rate",
                    "span_seconds": W,
                    "op": ">=",
                    "threshold": 0.3,
                    "webhook_url": f"{hook}/hook",
                    "webhook_secret": SECRET,
                },
                {
                    "tenant_id": "acme",
                    "name": "spend",
                    "metric": "estimated_cost_usd",
                    "period": "day",
                    "op": ">=",
                    "threshold": 0.145,
                    "webhook_url": f"{hook}/hook",
                },
            ],
        )
        sink = RowsSink(postgres_dsn, broker.address).build("rows", 0, 1)

        def write() -> None:
            for index, figures in enumerate(chat):
                sink.write_batch([window_row(start + index * W, "/chat", *figures)])
                time.sleep(generator.uniform(0.0, 0.2))  # rows as the dataflow writes them: now and then

        writer = threading.Thread(target=write, name="rows")
        with open(tmp_path / "alert-service.log", "ab") as log:
            writer.start()
            for moment in kills:
                process = spawn_service(broker, postgres_dsn, log)
                try:
                    process.wait(moment)
                    raise AssertionError(f"the alert service exited with {process.returncode}")
                except subprocess.TimeoutExpired:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
            writer.join()
        with open(tmp_path / "last-run.log", "w+b") as log:
            metrics_port = free_port()
            process = spawn_service(broker, postgres_dsn, log, "--metrics-port", str(metrics_port))
            try:
                deadline = time.monotonic() + 30
                while b"alert service: reading" not in (tmp_path / "last-run.log").read_bytes():
                    assert process.poll() is None and time.monotonic() < deadline, "the service did not start"
                    time.sleep(0.05)
                read_up_to(postgres_dsn, count)
                stored = stored_transitions(postgres_dsn)
                accepted = receiver.wait_for(len(stored), timeout=60)
                exposed = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            finally:
                process.send_signal(signal.SIGTERM)
                assert process.wait(30) == 0
        sink.close()

    breaching = [errors / calls >= 0.3 for calls, errors, _ in chat]
    want = [(rule_id, state, index) for state, index in expected_transitions(breaching, 1)]
    assert want, "the data set should fire the rule"
    crossed = next(index for index in range(count) if sum(0.01 for _ in range(index + 1)) >= 0.145)
    want.append((budget_id, "firing", crossed))
    assert sorted((rule, state, (window - start) // W) for _, rule, state, window, _, _ in stored) == sorted(
        want
    )
    assert {item[0] for item in stored} == set(by_key(accepted)), "a transition was not delivered"
    # Every attempt, however often the service died, carried the one key of its transition.
    keys = {item.headers["idempotency-key"] for item in receiver.deliveries}
    assert keys == {item[0] for item in stored}
    with psycopg.connect(postgres_dsn) as conn:
        delivery = conn.execute("SELECT delivery, count(*) FROM alert_transitions GROUP BY 1").fetchall()
    assert delivery == [("delivered", len(want))]
    if flaky:
        assert any(item.status == 503 for item in receiver.deliveries)
    # Its Prometheus endpoint serves the two counters, without tenant labels.
    assert "# TYPE streamlens_alert_transitions_total counter" in exposed
    assert "# TYPE streamlens_alert_deliveries_total counter" in exposed
    assert not [
        line for line in exposed.splitlines() if line.startswith("streamlens_alert") and "tenant" in line
    ]


def evaluation_row(start: int, route: str, scores: list[float]) -> EvaluationEmission:
    return EvaluationEmission(
        row=EvaluationRow(
            tenant_id="acme",
            route=route,
            model="m",
            window_start=datetime.fromtimestamp(start, UTC),
            window_end=datetime.fromtimestamp(start + W, UTC),
            name="judge",
            evaluations=len(scores),
            scores=len(scores),
            score_avg=sum(scores) / len(scores),
            score_min=min(scores),
            score_max=max(scores),
            score_p50=None,
            score_p90=None,
            labels={},
            revision=len(scores),
        ),
        score_sum=sum(scores),
        digest=None,
    )


def country_row(start: int, countries: dict[str | None, tuple[int, int]]) -> WindowRow:
    """A window of acme's /chat whose calls are sliced by country: value -> (calls, errors)."""
    row = window_row(
        start,
        "/chat",
        sum(calls for calls, _ in countries.values()),
        sum(e for _, e in countries.values()),
        0.0,
    )
    per_value = [
        {name: getattr(row.row, name) for name in VALUE_STATISTICS} | {"requests": calls, "errors": errors}
        for calls, errors in countries.values()
    ]
    rows = DimensionRows(
        tenant_id="acme",
        route="/chat",
        model="m",
        window_start=row.row.window_start,
        window_end=row.row.window_end,
        revision=1,
        dimension="metadata.country",
        values=list(countries),
        **{name: [one[name] for one in per_value] for name in VALUE_STATISTICS},
    )
    count = len(countries)
    emission = DimensionEmission(rows=rows, ttft_count=[0] * count, latency_digest=[row.digest] * count)
    return msgspec.structs.replace(row, dimensions=[emission])


def test_score_rules_and_rules_on_a_dimension_value_judge_their_own_rows(
    postgres_dsn: str, broker: Broker
) -> None:
    generator = random.Random(8)
    receiver = Receiver()
    start = first_window()
    count = 10
    # The judge scores poorly in windows 1, 2 and 5; DE's calls err in windows 2, 4 and 5.
    poor, erring_windows = {1, 2, 5}, {2, 4, 5}
    scores = {
        (index, route): [
            generator.choice([0.1, 0.3, 0.45] if index in poor else [0.55, 0.8, 0.95])
            for _ in range(generator.randint(2, 4))
        ]
        for index in range(count)
        for route in ("/chat", "/search")
    }
    countries = {
        index: {
            "DE": (calls := generator.randint(6, 12), calls // 2 if index in erring_windows else calls // 6),
            "FR": (calls := generator.randint(4, 12), calls // 2),  # errs a lot: not the rule's value
            None: (3, 3),
        }
        for index in range(count)
    }
    with serving(receiver.app, "the receiver") as hook:
        score_rule, country_rule = make_rules(
            postgres_dsn,
            [
                {
                    "tenant_id": "acme",
                    "name": "judged poorly",
                    "metric": "score_avg:judge",
                    "span_seconds": W,
                    "op": "<",
                    "threshold": 0.5,
                    "min_calls": 4,
                    "webhook_url": f"{hook}/hook",
                },
                {
                    "tenant_id": "acme",
                    "name": "errors in DE",
                    "metric": "error_rate",
                    "dimension": "metadata.country",
                    "value": "DE",
                    "span_seconds": W,
                    "op": ">",
                    "threshold": 0.25,
                    "webhook_url": f"{hook}/hook",
                },
            ],
        )
        windows = RowsSink(postgres_dsn, broker.address).build("rows", 0, 1)
        evaluations = EvaluationRowsSink(postgres_dsn, broker.address).build("evaluation rows", 0, 1)
        with alert_service(broker, postgres_dsn):
            for index in range(count):
                windows.write_batch([country_row(start + index * W, countries[index])])
                evaluations.write_batch(
                    [
                        evaluation_row(start + index * W, route, scores[(index, route)])
                        for route in ("/chat", "/search")
                    ]
                )
            read_up_to(postgres_dsn, count)
            read_up_to(postgres_dsn, 2 * count, "llm.evaluation-metrics")
            stored = stored_transitions(postgres_dsn)
            accepted = receiver.wait_for(len(stored), timeout=30)
        windows.close()
        evaluations.close()

    def averages(index: int) -> tuple[float, int]:
        both = scores[(index, "/chat")] + scores[(index, "/search")]
        return sum(both) / len(both), len(both)

    judged_poorly = [average < 0.5 and scored >= 4 for average, scored in map(averages, range(count))]
    erring = [countries[index]["DE"][1] / countries[index]["DE"][0] > 0.25 for index in range(count)]
    want = sorted(
        [(score_rule, state, index) for state, index in expected_transitions(judged_poorly, 1)]
        + [(country_rule, state, index) for state, index in expected_transitions(erring, 1)]
    )
    assert any(rule == score_rule for rule, _, _ in want) and any(rule == country_rule for rule, _, _ in want)
    assert sorted((rule, state, (window - start) // W) for _, rule, state, window, _, _ in stored) == want
    bodies = by_key(accepted)
    assert set(bodies) == {item[0] for item in stored}
    for body in bodies.values():
        index = (int(datetime.fromisoformat(body["window_start"]).timestamp()) - start) // W
        if body["rule_id"] == score_rule:
            assert body["metric"] == "score_avg:judge" and body["value"] == pytest.approx(averages(index)[0])
        else:
            calls, errors = countries[index]["DE"]
            assert body["value"] == pytest.approx(errors / calls)


def test_a_deleted_rules_undelivered_transition_is_cancelled_not_sent(
    postgres_dsn: str, broker: Broker
) -> None:
    receiver = Receiver()
    with serving(receiver.app, "the receiver") as hook:
        (rule_id,) = make_rules(
            postgres_dsn,
            [
                {
                    "tenant_id": "acme",
                    "name": "soon gone",
                    "metric": "calls",
                    "span_seconds": W,
                    "op": ">",
                    "threshold": 0,
                    "webhook_url": f"{hook}/hook",
                }
            ],
        )
        with psycopg.connect(postgres_dsn) as conn:
            (rule,) = rules_of_tenants(conn, ["acme"])["acme"]
            start = first_window()
            told = Transition(transition_id(rule_id, "firing", start), "firing", start, start + W, 3.0)
            alert_store.locked_states(conn, [rule_id])
            alert_store.save(conn, [(rule, RuleState(True, start, start, None), [told])])
            conn.execute("DELETE FROM alert_rules WHERE id = %s", (rule_id,))
            conn.commit()
        with alert_service(broker, postgres_dsn):
            deadline = time.monotonic() + 30
            while stored_transitions(postgres_dsn)[0][4] == "pending":
                assert time.monotonic() < deadline, "the transition was never dealt with"
                time.sleep(0.05)
    ((_, _, _, _, delivery, _),) = stored_transitions(postgres_dsn)
    assert delivery == "cancelled" and receiver.deliveries == []


def test_postgres_away_and_back_the_service_waits_and_goes_on(
    broker: Broker, own_postgres: Postgres, capfd: pytest.CaptureFixture[str]
) -> None:
    """Postgres stopped under a running service: both of its parts say so and wait; started
    again, a row written then is judged and its alert delivered."""
    dsn = own_postgres.dsn
    ensure_schema(dsn)
    receiver = Receiver()
    logged = ""

    def wait_for_log(text: str) -> None:
        nonlocal logged
        deadline = time.monotonic() + 30
        while text not in logged:
            assert time.monotonic() < deadline, f"never logged {text!r}:\n{logged[-2000:]}"
            logged += capfd.readouterr().err
            time.sleep(0.05)

    with serving(receiver.app, "the receiver") as hook:
        make_rules(
            dsn,
            [
                {
                    "tenant_id": "acme",
                    "name": "any call",
                    "metric": "calls",
                    "span_seconds": W,
                    "op": ">",
                    "threshold": 0,
                    "webhook_url": f"{hook}/hook",
                }
            ],
        )
        with alert_service(broker, dsn):
            wait_for_log("alert service: reading")
            own_postgres.stop()
            wait_for_log("postgres unavailable, delivering waits")
            own_postgres.start(own_postgres.port)
            wait_for_log("postgres back after")
            sink = RowsSink(dsn, broker.address).build("rows", 0, 1)
            sink.write_batch([window_row(first_window(), "/chat", 5, 0, 0.01)])
            sink.close()
            accepted = receiver.wait_for(1, timeout=30)
            wait_for_log("judging goes on from what is stored")
    assert [json.loads(item.body)["state"] for item in accepted] == ["firing"]
