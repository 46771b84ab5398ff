"""The Grafana dashboard's SQL, every panel and variable, run against the real Postgres.

Grafana itself does not run here, so this test does what its Postgres data source
does before a query reaches the database: it substitutes the template variables
(``${tenant:sqlstring}``, ``$__interval``) and expands the time macros
(``$__timeFilter``, ``$__timeGroupAlias``, ...) as Grafana documents them. A
macro or variable it does not know fails the test, as would a panel whose SQL
Postgres refuses. Results are checked against values computed here from the
raw calls behind the windows, and behind their rows per dimension value, and from the
raw evaluations behind the evaluation rows.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from statistics import fmean
from typing import Any, TypeVar

import psycopg
import pytest
import yaml
from fastdigest import TDigest
from psycopg.types.json import Jsonb

from tests.support import dimension_store as store
from tests.support.metric_windows import Window, insert_windows, random_calls

GRAFANA = Path(__file__).parent.parent / "deploy" / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "streamlens.json").read_text())
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
RANGE = (T0, T0 + timedelta(minutes=10))
ROUTES = ("/chat", "/search")
MODELS = ("gpt-4o", "claude-sonnet-4-5")
INTERVALS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
REGION = "metadata.region"
REGIONS: tuple[str | None, ...] = ("eu", "us", None, "(other)")
# How the dashboard names the calls without a value.
NO_VALUE = "(none)"
# acme's evaluation names in the time range, on these route/models.
EVALUATION_NAMES = ("judge", "toxicity")
EVALUATED = (("/chat", "gpt-4o"), ("/search", "claude-sonnet-4-5"), ("/search", "gpt-4o"))
# An evaluation row keeps its most frequent labels, the rest under "(other)".
LABELS_KEPT = 20
OTHER_LABELS = "(other)"


class UnknownTemplate(AssertionError):
    pass


def seconds_of(interval: str) -> int:
    match = re.fullmatch(r"([0-9]+)([smhd])", interval)
    if match is None:
        raise UnknownTemplate(f"interval {interval!r} is not Grafana's <number><s|m|h|d>")
    return int(match[1]) * INTERVALS[match[2]]


def grafana_time(moment: datetime) -> str:
    # Grafana's Postgres macros write times as RFC 3339 in UTC.
    return "'" + moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") + "'"


def sqlstring(values: Sequence[str]) -> str:
    return ",".join("'" + value.replace("'", "''") + "'" for value in values)


# ``${name}``, ``${name:format}`` or ``$name``; ``$__...`` are Grafana's own.
_VARIABLE = re.compile(r"\$\{(?P<braced>\w+)(?::(?P<format>\w+))?\}|\$(?!__)(?P<plain>\w+)")
_MACRO = re.compile(r"\$__(?P<macro>[A-Za-z]+)\((?P<args>[^()]*)\)")


def expand(
    sql: str, variables: dict[str, Sequence[str]], interval: str, time_range: tuple[datetime, datetime]
) -> str:
    """``sql`` as Grafana's Postgres data source sends it to the database."""

    def variable(match: re.Match[str]) -> str:
        name = match["braced"] or match["plain"]
        if name not in variables:
            raise UnknownTemplate(f"variable ${name} is not defined by the dashboard")
        if match["format"] not in (None, "sqlstring"):
            raise UnknownTemplate(f"format :{match['format']} of ${name} is not expanded here")
        values = variables[name]
        return sqlstring(values) if match["format"] == "sqlstring" else ",".join(values)

    start, end = time_range

    def macro(match: re.Match[str]) -> str:
        name = match["macro"]
        args = [arg.strip() for arg in match["args"].split(",")] if match["args"].strip() else []
        if name == "timeFilter" and len(args) == 1:
            return f"{args[0]} BETWEEN {grafana_time(start)} AND {grafana_time(end)}"
        if name == "timeFrom" and not args:
            return grafana_time(start)
        if name == "timeTo" and not args:
            return grafana_time(end)
        if name in ("timeGroup", "timeGroupAlias") and len(args) == 2:
            step = seconds_of(args[1].strip("'"))
            grouped = f"floor(extract(epoch from {args[0]})/{step})*{step}"
            return grouped + (' AS "time"' if name == "timeGroupAlias" else "")
        if name == "time" and len(args) == 1:
            return f'{args[0]} AS "time"'
        raise UnknownTemplate(f"macro $__{name}({match['args']}) is not expanded here")

    sql = _VARIABLE.sub(variable, sql.replace("$__interval", interval))
    sql = _MACRO.sub(macro, sql)
    if "$" in sql:
        raise UnknownTemplate(f"left unexpanded: {sql[sql.index('$') :][:60]!r}")
    return sql


@pytest.fixture
def reader_dsn(postgres_dsn: str) -> str:
    """The database with Grafana's read-only role, as the Compose file's Postgres sets it up."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute((GRAFANA / "reader.sql").read_text())
    return postgres_dsn.replace("postgresql://postgres@", "postgresql://grafana_reader@", 1)


def run(dsn: str, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    with psycopg.connect(dsn) as conn:
        cursor = conn.execute(sql)
        assert cursor.description is not None
        return [column.name for column in cursor.description], cursor.fetchall()


def make_windows() -> list[Window]:
    rnd = random.Random(17)
    windows = [
        Window(
            "acme", route, model, T0 + minute * timedelta(minutes=1), random_calls(rnd, rnd.randint(1, 25))
        )
        for minute in range(-3, 14)
        for route in ROUTES
        for model in MODELS
    ]
    windows += [
        Window("globex", "/chat", "gpt-4o", T0 + m * timedelta(minutes=1), random_calls(rnd, 5))
        for m in range(5)
    ]
    # Windows whose calls all timed out: no latency, no time to first token.
    windows += [
        Window("acme", "/batch", "gpt-4o", T0 + timedelta(minutes=m), random_calls(rnd, 3, timeout_share=1.0))
        for m in (2, 3)
    ]
    return windows


def make_dimension_rows(windows: Sequence[Window]) -> list[Window]:
    """Rows of acme's and globex's region; of acme's provider, the same calls again, some
    also without a value (a panel that did not keep to one dimension would count them
    twice); and of a dimension acme had only after the time range."""
    rnd = random.Random(23)
    rows = []
    for window in windows:
        rows += store.split_by(window, REGION, REGIONS, rnd)
        if window.tenant_id == "acme":
            rows += store.split_by(window, "provider", ("openai", None), rnd)
            if window.start >= RANGE[1] + timedelta(minutes=2):
                rows += store.split_by(window, "metadata.team", ("search", None), rnd)
    return rows


def insert_dimension_rows(dsn: str, windows: Sequence[Window]) -> None:
    store.insert_dimension_rows(dsn, [window.column_values() for window in windows])


@dataclass
class Evaluated:
    """The evaluations of one name counted toward the calls of one window, each a
    (score, label); the row of ``llm_evaluation_metrics`` they make."""

    tenant_id: str
    route: str
    model: str
    start: datetime
    name: str
    evaluations: list[tuple[float | None, str | None]]

    @property
    def scores(self) -> list[float]:
        return [score for score, _ in self.evaluations if score is not None]

    def labels(self) -> dict[str, int]:
        counts = Counter(label for _, label in self.evaluations if label is not None)
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        kept = dict(ranked[:LABELS_KEPT])
        if len(ranked) > LABELS_KEPT:
            kept[OTHER_LABELS] = sum(count for _, count in ranked[LABELS_KEPT:])
        return kept

    def column_values(self) -> dict[str, Any]:
        scores = self.scores
        digest = TDigest.from_values(scores) if scores else None
        return {
            "tenant_id": self.tenant_id,
            "route": self.route,
            "model": self.model,
            "window_start": self.start,
            "window_end": self.start + timedelta(minutes=1),
            "name": self.name,
            "evaluations": len(self.evaluations),
            "scores": len(scores),
            "score_sum": math.fsum(scores) if scores else None,
            "score_avg": fmean(scores) if scores else None,
            "score_min": min(scores, default=None),
            "score_max": max(scores, default=None),
            "score_p50": digest.quantile(0.5) if digest else None,
            "score_p90": digest.quantile(0.9) if digest else None,
            "labels": Jsonb(self.labels()),
            "score_digest": digest.to_bytes() if digest else None,
            "revision": len(self.evaluations),
        }


def make_evaluations() -> list[Evaluated]:
    """acme's evaluations of two names on three route/models, most windows with some: a
    window holds 1, 2 or 30 of them around a mean of its own, so an average of the windows'
    averages is not the average of their scores. Some judge evaluations have a label only,
    all of one window's; one window has more labels than its row keeps. Besides: a name acme
    had only after the time range, and globex's evaluations."""
    rnd = random.Random(29)
    rows = []
    for minute in range(-3, 14):
        start = T0 + timedelta(minutes=minute)
        for index, (route, model) in enumerate(EVALUATED):
            for name in EVALUATION_NAMES:
                if rnd.random() < 0.2:
                    continue
                center = rnd.random()
                evaluations: list[tuple[float | None, str | None]] = []
                for _ in range(rnd.choice((1, 2, 30))):
                    score = min(1.0, max(0.0, rnd.gauss(center, 0.15)))
                    if name == "toxicity":
                        evaluations.append((score, rnd.choice(("safe", "unsafe", None))))
                    elif rnd.random() < 0.2 or (minute, index) == (4, 0):
                        evaluations.append((None, rnd.choice(("pass", "fail"))))
                    else:
                        evaluations.append((score, "pass" if score >= 0.5 else "fail"))
                if (minute, index, name) == (6, 1, "judge"):
                    evaluations += [(None, f"reason {n:02d}") for n in range(LABELS_KEPT + 3)]
                rows.append(Evaluated("acme", route, model, start, name, evaluations))
    rows.append(
        Evaluated("acme", "/chat", "gpt-4o", RANGE[1] + timedelta(minutes=2), "relevance", [(1.0, None)])
    )
    rows += [
        Evaluated(
            "globex", "/chat", "gpt-4o", T0 + timedelta(minutes=m), name, [(0.0, "fail"), (0.5, "pass")]
        )
        for m in range(5)
        for name in ("judge", "helpfulness")
    ]
    return rows


def insert_evaluations(dsn: str, rows: Sequence[Evaluated]) -> None:
    values = [row.column_values() for row in rows]
    columns = list(values[0])
    statement = (
        f"INSERT INTO llm_evaluation_metrics ({', '.join(columns)}) "
        f"VALUES ({', '.join(['%s'] * len(columns))})"
    )
    with psycopg.connect(dsn) as conn, conn.cursor() as cursor:
        cursor.executemany(statement, [[row[name] for name in columns] for row in values])


def label(window: Window) -> str:
    value: str | None = window.extra["value"]
    return NO_VALUE if value is None else value


# Windows, their rows per dimension value, or evaluation rows.
W = TypeVar("W", Window, Evaluated)


def selected(windows: Sequence[W], routes: Sequence[str], models: Sequence[str]) -> list[W]:
    start, end = RANGE
    # BETWEEN: both ends of Grafana's time range are inclusive.
    return [
        w
        for w in windows
        if w.tenant_id == "acme" and w.route in routes and w.model in models and start <= w.start <= end
    ]


def by_time(windows: Sequence[W], step: int) -> dict[float, list[W]]:
    groups: dict[float, list[W]] = defaultdict(list)
    for window in windows:
        groups[float(int(window.start.timestamp()) // step * step)].append(window)
    return dict(sorted(groups.items()))


def answered(windows: Sequence[Window]) -> list[float]:
    return [call.latency_ms for w in windows for call in w.calls if call.latency_ms is not None]


def mean_or_none(values: Sequence[float]) -> float | None:
    return fmean(values) if values else None


def highest(windows: Sequence[Window], column: str) -> float | None:
    values = [w.column_values()[column] for w in windows if w.column_values()[column] is not None]
    return max(values) if values else None


def total(windows: Sequence[Window], column: str) -> float:
    return sum(w.column_values()[column] for w in windows)


def per_time(
    compute: Callable[[list[Window]], tuple[Any, ...]],
) -> Callable[[list[Window], int], list[tuple[Any, ...]]]:
    return lambda windows, step: [(t, *compute(group)) for t, group in by_time(windows, step).items()]


def per_time_and(
    dimension: str, compute: Callable[[list[Window]], Any]
) -> Callable[[list[Window], int], list[tuple[Any, ...]]]:
    def rows(windows: list[Window], step: int) -> list[tuple[Any, ...]]:
        out = []
        for t, group in by_time(windows, step).items():
            for value in sorted({getattr(w, dimension) for w in group}):
                out.append((t, value, compute([w for w in group if getattr(w, dimension) == value])))
        return out

    return rows


def per_time_and_value(
    compute: Callable[[list[Window]], Any],
) -> Callable[[list[Window], int], list[tuple[Any, ...]]]:
    def rows(windows: list[Window], step: int) -> list[tuple[Any, ...]]:
        out = []
        for t, group in by_time(windows, step).items():
            for value in sorted({label(w) for w in group}):
                out.append((t, value, compute([w for w in group if label(w) == value])))
        return out

    return rows


def value_table(windows: list[Window], step: int) -> list[tuple[Any, ...]]:
    rows = []
    for value in sorted({label(w) for w in windows}):
        chosen = [w for w in windows if label(w) == value]
        calls = total(chosen, "requests")
        rows.append(
            (
                value,
                calls,
                total(chosen, "errors") / calls,
                highest(chosen, "p95_latency_ms"),
                total(chosen, "prompt_tokens") + total(chosen, "completion_tokens"),
                total(chosen, "estimated_cost_usd"),
            )
        )
    return sorted(rows, key=lambda row: (-row[1], row[0]))


def table(windows: list[Window], step: int) -> list[tuple[Any, ...]]:
    pairs = sorted({(w.route, w.model) for w in windows})
    rows = []
    for route, model in pairs:
        chosen = [w for w in windows if (w.route, w.model) == (route, model)]
        calls = total(chosen, "requests")
        rows.append(
            (
                route,
                model,
                calls,
                total(chosen, "errors") / calls,
                highest(chosen, "p95_latency_ms"),
                total(chosen, "prompt_tokens") + total(chosen, "completion_tokens"),
                total(chosen, "estimated_cost_usd"),
            )
        )
    return sorted(rows, key=lambda row: (-row[2], row[0], row[1]))


# What each panel shows, computed from the raw calls: a panel added without an
# expectation here fails the test.
EXPECTED: dict[str, Callable[[list[Window], int], list[tuple[Any, ...]]]] = {
    "Calls and errors": per_time(
        lambda g: (total(g, "requests"), total(g, "errors") - total(g, "timeouts"), total(g, "timeouts"))
    ),
    "Latency, ms": per_time(
        lambda g: (
            mean_or_none(answered(g)),
            highest(g, "p50_latency_ms"),
            highest(g, "p95_latency_ms"),
            highest(g, "p99_latency_ms"),
        )
    ),
    "Average time to first token, ms": per_time(
        lambda g: (
            mean_or_none(
                [c.ttft_ms for w in g for c in w.calls if c.latency_ms is not None and c.ttft_ms is not None]
            ),
        )
    ),
    "Tokens": per_time(
        lambda g: (total(g, "prompt_tokens"), total(g, "completion_tokens"), total(g, "cache_read_tokens"))
    ),
    "Cost, USD": per_time(lambda g: (total(g, "estimated_cost_usd"),)),
    "Calls by route": per_time_and("route", lambda g: total(g, "requests")),
    "Cost by model, USD": per_time_and("model", lambda g: total(g, "estimated_cost_usd")),
    "p95 latency by model (highest window), ms": per_time_and(
        "model", lambda g: highest(g, "p95_latency_ms")
    ),
    "Routes × models over the range": table,
}
# The panels of the chosen dimension's rows, computed from the calls of each value.
EXPECTED_BY_VALUE: dict[str, Callable[[list[Window], int], list[tuple[Any, ...]]]] = {
    "Calls by ${dimension}": per_time_and_value(lambda g: total(g, "requests")),
    "Cost by ${dimension}, USD": per_time_and_value(lambda g: total(g, "estimated_cost_usd")),
    "Values of ${dimension} over the range": value_table,
}


def average_score(rows: Sequence[Evaluated]) -> float | None:
    """The average of the scores themselves, however many each window has."""
    return mean_or_none([score for row in rows for score in row.scores])


def quality(rows: list[Evaluated], step: int) -> list[tuple[Any, ...]]:
    out = []
    for t, group in by_time(rows, step).items():
        for route, model in sorted({(row.route, row.model) for row in group}):
            chosen = [row for row in group if (row.route, row.model) == (route, model)]
            out.append((t, f"{route} · {model}", average_score(chosen)))
    return out


def label_table(rows: list[Evaluated], step: int) -> list[tuple[Any, ...]]:
    counts: Counter[str] = Counter()
    for row in rows:
        counts.update(row.labels())
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


# The panels of the chosen evaluation name's rows, computed from its evaluations.
EXPECTED_BY_EVALUATION: dict[str, Callable[[list[Evaluated], int], list[tuple[Any, ...]]]] = {
    "Quality: average score per route/model": quality,
    "Labels of ${evaluation} over the range": label_table,
}


def _order(row: tuple[Any, ...]) -> tuple[tuple[int, Any], ...]:
    # Grafana groups a time series' rows by time and series; their order within one
    # time is the database's to choose, so rows are compared in one order of ours.
    return tuple((0, "") if v is None else (1, v) if isinstance(v, str) else (2, float(v)) for v in row)


def same(got: Sequence[tuple[Any, ...]], want: Sequence[tuple[Any, ...]]) -> bool:
    if len(got) != len(want):
        return False
    for got_row, want_row in zip(sorted(got, key=_order), sorted(want, key=_order), strict=True):
        if len(got_row) != len(want_row):
            return False
        for a, b in zip(got_row, want_row, strict=True):
            if a is None or b is None or isinstance(a, str):
                if a != b:
                    return False
            elif not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9):
                return False
    return True


def test_every_panel_and_variable_runs_and_shows_the_windows_numbers(reader_dsn: str, postgres_dsn: str):
    windows = make_windows()
    insert_windows(postgres_dsn, windows)
    dimension_rows = make_dimension_rows(windows)
    insert_dimension_rows(postgres_dsn, dimension_rows)
    evaluations = make_evaluations()
    insert_evaluations(postgres_dsn, evaluations)
    variables_sql = {v["name"]: v["query"] for v in DASHBOARD["templating"]["list"]}
    assert set(variables_sql) == {"tenant", "route", "model", "dimension", "value", "evaluation"}

    # The variables, in order, each from the ones before it: "All" is every value listed.
    _, tenants = run(reader_dsn, expand(variables_sql["tenant"], {}, "1m", RANGE))
    assert [t for (t,) in tenants] == ["acme", "globex"]
    chosen: dict[str, Sequence[str]] = {"tenant": ["acme"]}
    for name in ("route", "model"):
        _, values = run(reader_dsn, expand(variables_sql[name], chosen, "1m", RANGE))
        chosen[name] = [value for (value,) in values]
    assert chosen["route"] == sorted({*ROUTES, "/batch"})
    assert chosen["model"] == sorted(MODELS)
    # The tenant's dimensions with rows in the time range; a single choice.
    _, dimensions = run(reader_dsn, expand(variables_sql["dimension"], chosen, "1m", RANGE))
    assert [d for (d,) in dimensions] == [REGION, "provider"]
    chosen["dimension"] = [REGION]
    _, values = run(reader_dsn, expand(variables_sql["value"], chosen, "1m", RANGE))
    chosen["value"] = [value for (value,) in values]
    # Postgres orders them by its collation, Grafana again by its own: compared as a set.
    assert len(chosen["value"]) == 4 and set(chosen["value"]) == {"eu", "us", NO_VALUE, "(other)"}
    # The tenant's evaluation names with rows in the time range; a single choice.
    _, names = run(reader_dsn, expand(variables_sql["evaluation"], chosen, "1m", RANGE))
    assert [n for (n,) in names] == list(EVALUATION_NAMES)

    panels = DASHBOARD["panels"]
    titles = set(EXPECTED) | set(EXPECTED_BY_VALUE) | set(EXPECTED_BY_EVALUATION)
    assert {panel["title"] for panel in panels} == titles
    for interval in ("1m", "5m"):
        for routes, values, evaluation in (
            (chosen["route"], chosen["value"], "judge"),
            (["/search"], ["eu", NO_VALUE], "judge"),
            (chosen["route"], ["us"], "toxicity"),
        ):
            variables = {**chosen, "route": routes, "value": values, "evaluation": [evaluation]}
            expected_windows = selected(windows, routes, chosen["model"])
            expected_rows = [
                w
                for w in selected(dimension_rows, routes, chosen["model"])
                if w.extra["dimension"] == REGION and label(w) in values
            ]
            expected_evaluations = [
                row for row in selected(evaluations, routes, chosen["model"]) if row.name == evaluation
            ]
            for panel in panels:
                (target,) = panel["targets"]
                assert target["datasource"]["uid"] == "streamlens-postgres"
                columns, rows = run(reader_dsn, expand(target["rawSql"], variables, interval, RANGE))
                if panel["type"] == "timeseries":
                    assert target["format"] == "time_series"
                    assert columns[0] == "time", panel["title"]
                    times = [row[0] for row in rows]
                    assert times == sorted(times), panel["title"]
                if panel["title"] in EXPECTED_BY_VALUE:
                    assert "FROM llm_dimension_metrics" in target["rawSql"], panel["title"]
                    want = EXPECTED_BY_VALUE[panel["title"]](expected_rows, seconds_of(interval))
                elif panel["title"] in EXPECTED_BY_EVALUATION:
                    assert "FROM llm_evaluation_metrics" in target["rawSql"], panel["title"]
                    want = EXPECTED_BY_EVALUATION[panel["title"]](expected_evaluations, seconds_of(interval))
                else:
                    want = EXPECTED[panel["title"]](expected_windows, seconds_of(interval))
                assert want, panel["title"]
                assert same(rows, want), (
                    panel["title"],
                    interval,
                    routes,
                    values,
                    evaluation,
                    rows[:3],
                    want[:3],
                )


def test_the_quality_panel_weighs_the_windows_it_merges_by_their_scores(reader_dsn: str, postgres_dsn: str):
    """Five windows to a point: the average of their scores, not of their averages; the
    labels add up to the evaluations with one, "(other)" included."""
    evaluations = make_evaluations()
    insert_evaluations(postgres_dsn, evaluations)
    panels = {panel["title"]: panel["targets"][0]["rawSql"] for panel in DASHBOARD["panels"]}
    routes = sorted({route for route, _ in EVALUATED})
    variables = {"tenant": ["acme"], "route": routes, "model": list(MODELS), "evaluation": ["judge"]}
    chosen = [row for row in selected(evaluations, routes, MODELS) if row.name == "judge"]
    sql = expand(panels["Quality: average score per route/model"], variables, "5m", RANGE)
    _, points = run(reader_dsn, sql)
    assert len(points) == len(
        {(t, row.route, row.model) for t, g in by_time(chosen, 300).items() for row in g}
    )
    merged = 0
    for t, group in by_time(chosen, 300).items():
        for route, model in EVALUATED:
            rows = [row for row in group if (row.route, row.model) == (route, model)]
            if not rows:
                continue
            (got,) = [p[2] for p in points if p[0] == t and p[1] == f"{route} · {model}"]
            want = average_score(rows)
            assert (got is None) if want is None else math.isclose(got, want, rel_tol=1e-9)
            averages = [row.column_values()["score_avg"] for row in rows if row.scores]
            if len(averages) > 1 and not math.isclose(fmean(averages), want, abs_tol=1e-3):
                merged += 1
    assert merged >= 3  # points an average of the windows' averages would get wrong
    # A window whose evaluations all had a label only: its point has no score.
    sql = expand(panels["Quality: average score per route/model"], variables, "1m", RANGE)
    _, points = run(reader_dsn, sql)
    assert (T0.timestamp() + 240, "/chat · gpt-4o", None) in points

    _, labels = run(
        reader_dsn, expand(panels["Labels of ${evaluation} over the range"], variables, "5m", RANGE)
    )
    counts = dict(labels)
    assert sum(counts.values()) == sum(label is not None for row in chosen for _, label in row.evaluations)
    # One window had more labels than its row keeps, each of the extra ones once.
    (crowded,) = [row for row in chosen if len(row.labels()) > LABELS_KEPT]
    extra = len({label for _, label in crowded.evaluations if label is not None}) - LABELS_KEPT
    assert counts[OTHER_LABELS] == extra and {"pass", "fail"} <= set(counts)
    assert not {"safe", "unsafe"} & set(counts)  # toxicity's
    assert [count for _, count in labels] == sorted(counts.values(), reverse=True)


def test_the_values_of_one_dimension_add_up_to_the_main_panels(reader_dsn: str, postgres_dsn: str):
    """Every value chosen: the dimension's calls and cost equal the main panels' over the range."""
    windows = make_windows()
    insert_windows(postgres_dsn, windows)
    insert_dimension_rows(postgres_dsn, make_dimension_rows(windows))
    panels = {panel["title"]: panel["targets"][0]["rawSql"] for panel in DASHBOARD["panels"]}
    variables = {"tenant": ["acme"], "route": [*ROUTES, "/batch"], "model": list(MODELS)}
    for dimension, values in (
        (REGION, ["eu", "us", NO_VALUE, "(other)"]),
        ("provider", ["openai", NO_VALUE]),
    ):
        chosen = {**variables, "dimension": [dimension], "value": values}
        _, by_value = run(reader_dsn, expand(panels["Calls by ${dimension}"], chosen, "1m", RANGE))
        _, main = run(reader_dsn, expand(panels["Calls and errors"], chosen, "1m", RANGE))
        calls: dict[Any, Any] = defaultdict(int)
        for t, _, count in by_value:
            calls[t] += count
        assert dict(calls) == {t: count for t, count, _, _ in main}
        _, cost = run(
            reader_dsn, expand(panels["Values of ${dimension} over the range"], chosen, "1m", RANGE)
        )
        _, main_cost = run(reader_dsn, expand(panels["Cost, USD"], chosen, "1m", RANGE))
        assert math.isclose(sum(row[-1] for row in cost), sum(c for _, c in main_cost), rel_tol=1e-9)


def test_the_reader_role_reads_metrics_and_nothing_else(reader_dsn: str):
    run(reader_dsn, "SELECT count(*) FROM llm_dimension_metrics")  # a view of the packed rows
    run(reader_dsn, "SELECT count(*) FROM llm_evaluation_metrics")
    for metrics in ("llm_metrics", "llm_dimension_windows", "llm_evaluation_metrics"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            run(reader_dsn, f"DELETE FROM {metrics}")
    run(reader_dsn, "SELECT count(*) FROM llm_metrics")
    for other in ("api_keys", "tenant_dimensions", "llm_dimension_windows"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            run(reader_dsn, f"SELECT count(*) FROM {other}")


def test_unknown_macros_and_variables_are_refused_by_the_expansion():
    with pytest.raises(UnknownTemplate, match=r"\$__timeFilterMs"):
        expand("SELECT 1 WHERE $__timeFilterMs(x)", {}, "1m", RANGE)
    with pytest.raises(UnknownTemplate, match=r"\$region"):
        expand("SELECT 1 WHERE r = ${region:sqlstring}", {}, "1m", RANGE)
    assert expand("x = ${t:sqlstring}", {"t": ["o'brien"]}, "1m", RANGE) == "x = 'o''brien'"


def test_provisioning_points_the_dashboard_at_the_datasource():
    (datasource,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "streamlens.yaml").read_text()
    )["datasources"]
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "streamlens.yaml").read_text())[
        "providers"
    ]
    assert datasource["type"] == "grafana-postgresql-datasource"
    assert datasource["user"] == "grafana_reader"
    uses = {t["datasource"]["uid"] for p in DASHBOARD["panels"] for t in p["targets"]}
    uses |= {v["datasource"]["uid"] for v in DASHBOARD["templating"]["list"]}
    assert uses == {datasource["uid"]}
    compose = yaml.safe_load((GRAFANA.parent / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    mounted = {volume.split(":")[1] for volume in grafana["volumes"]}
    assert {"/etc/grafana/provisioning", provider["options"]["path"]} <= mounted
    # The read-only role is applied before Grafana starts, from the file tested above.
    reader = compose["services"]["grafana-reader"]
    (mount,) = reader["volumes"]
    assert mount.split(":")[0] == "./grafana/reader.sql" and mount.split(":")[1] in reader["command"]
    assert grafana["depends_on"] == {"grafana-reader": {"condition": "service_completed_successfully"}}
