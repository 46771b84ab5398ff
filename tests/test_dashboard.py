"""The built-in dashboard in a real headless Chromium against a running query API.

The page is driven as a person would (key typed in, controls changed); what the
charts plot is read from the uPlot instances the page exposes, and compared
with the query API's own answer for the same query, which in turn is checked
against sums computed here from the windows written to Postgres. The Quality
section's charts and label counts are compared with the scores and labels the
evaluation rows written to Postgres were made of.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastdigest import TDigest
from psycopg.types.json import Jsonb
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from api.auth import Scope
from api.dashboard import STATIC
from api.keys import create_key
from api.params import BUCKETS
from api.query import create_app
from dataflows import alert_store
from dataflows.alerting import RuleState, Transition, transition_id
from dataflows.sinks import UPSERT_EVALUATIONS_SQL, UPSERT_SQL, values_of
from dataflows.windows import WindowRow
from schemas.alert_rules import rules_of_tenants
from schemas.config import Settings
from schemas.rows import MetricsRow
from tests.support import dimension_store as store
from tests.support.metric_windows import Window, insert_windows, random_calls, rfc3339
from tests.support.servers import serving

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = (
    "the dashboard tests need Chromium and its WebDriver: on Debian/Ubuntu "
    "`apt-get install chromium chromium-driver` (.ci/run installs them)"
)
PAGE_WEIGHT_LIMIT = 300 * 1024
WAIT_SECONDS = 20.0
ROUTES = ("/chat", "/search")
MODELS = ("gpt-4o", "claude-sonnet-4-5")


def _browser_paths() -> tuple[str, str]:
    browser = next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = ", ".join(
            name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path
        )
        pytest.fail(f"{missing} not found: {INSTALL_HINT}", pytrace=False)
    return browser, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    # The driver given: nothing is downloaded.
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    # Every page load fetches every asset, so its weight is seen whole.
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
    try:
        yield driver
    finally:
        driver.quit()


@contextmanager
def query_api(dsn: str, auth: bool = True) -> Iterator[str]:
    """The query API (keys on unless told), under uvicorn in a thread, on a free port."""
    with serving(create_app(Settings(postgres_dsn=dsn, auth=auth)), "the query API") as url:
        yield url


def this_minute() -> datetime:
    now = datetime.now(UTC)
    return now.replace(second=0, microsecond=0)


def new_key(dsn: str, tenant: str = "acme", scope: Scope = "read") -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return create_key(conn, tenant, scope).key


def wait(browser: WebDriver, condition: Any, what: str, timeout: float = WAIT_SECONDS) -> Any:
    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda driver: condition(driver))
    except TimeoutException:
        state = browser.execute_script(
            "return [window.streamlens && window.streamlens.state, document.body.innerText]"
        )
        raise AssertionError(
            f"timed out waiting for {what}; page state {state[0]!r}:\n{state[1][:2000]}"
        ) from None


def page_state(browser: WebDriver) -> str:
    return browser.execute_script("return window.streamlens.state")


def open_dashboard(browser: WebDriver, url: str, key: str, view: str = "") -> None:
    """A fresh page of the dashboard at ``view`` (its fragment), the key typed in."""
    # Another page of the same origin, to forget a key the session may hold.
    browser.get(f"{url}/health")
    browser.execute_script("sessionStorage.clear()")
    browser.get(f"{url}/dashboard#{view}")
    key_input = wait(
        browser,
        lambda d: d.find_element(By.ID, "key") if d.find_element(By.ID, "key").is_displayed() else None,
        "the key field",
    )
    key_input.send_keys(key)
    browser.find_element(By.ID, "open").click()


def wait_loaded(browser: WebDriver, states: tuple[str, ...] = ("ok",)) -> None:
    wait(browser, lambda d: page_state(d) in states, f"state {' or '.join(states)}")


def plotted(browser: WebDriver) -> dict[str, dict[str, Any]]:
    """Each chart's title, series labels and plotted data, read from its uPlot instance."""
    return browser.execute_script(
        """
        const out = {};
        for (const [id, u] of Object.entries(window.streamlens.charts)) {
          out[id] = {
            title: u.root.closest('.chart').querySelector('h3').textContent,
            labels: u.series.slice(1).map((s) => s.label),
            data: u.data.map((column) => Array.from(column)),
          };
        }
        return out;
        """
    )


def api_rows(url: str, key: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row of a query, straight from the API, in pages of 1,000 as any client would."""
    rows: list[dict[str, Any]] = []
    to = params.get("to")
    while True:
        query = {**params, "limit": 1000} | ({"to": to} if to else {})
        response = httpx.get(f"{url}/v1/metrics", params=query, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text
        page = response.json()["metrics"]
        if len(page) < 1000:
            return rows + page
        # The oldest bucket may be cut short by the limit: read it again whole.
        oldest = page[-1]["window_start"]
        rows += [row for row in page if row["window_start"] != oldest]
        to = rfc3339(datetime.fromisoformat(oldest) + timedelta(seconds=BUCKETS[params["bucket"]]))


def epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


# The charts as the dashboard is meant to draw them, written out here on their own.
CHART_SERIES: dict[str, list[tuple[str, Any]]] = {
    "calls": [
        ("calls", lambda r: r["requests"]),
        ("errors (not timeouts)", lambda r: r["errors"] - r["timeouts"]),
        ("timeouts", lambda r: r["timeouts"]),
    ],
    "latency": [
        ("p50", lambda r: r["p50_latency_ms"]),
        ("p95", lambda r: r["p95_latency_ms"]),
        ("p99", lambda r: r["p99_latency_ms"]),
    ],
    "ttft": [("time to first token", lambda r: r["avg_time_to_first_token_ms"])],
    "tokens": [
        ("prompt", lambda r: r["prompt_tokens"]),
        ("completion", lambda r: r["completion_tokens"]),
        ("cache read", lambda r: r["cache_read_tokens"]),
    ],
    "cost": [("cost", lambda r: r["estimated_cost_usd"])],
}
SPLIT_VALUE: dict[str, Any] = {
    "calls": lambda r: r["requests"],
    "latency": lambda r: r["p95_latency_ms"],
    "ttft": lambda r: r["avg_time_to_first_token_ms"],
    "tokens": lambda r: r["prompt_tokens"] + r["completion_tokens"],
    "cost": lambda r: r["estimated_cost_usd"],
}


def value_order(value: str | None) -> tuple[bool, bool, str]:
    """The order of a dimension's values: calls without one first, the merged rest last."""
    return (value is not None, value == "(other)", value or "")


def value_label(value: str | None) -> str:
    return "(none)" if value is None else value


def expected_charts(rows: list[dict[str, Any]], split: str) -> dict[str, dict[str, Any]]:
    xs = sorted({epoch(row["window_start"]) for row in rows})
    position = {x: i for i, x in enumerate(xs)}
    charts = {}
    for chart, series in CHART_SERIES.items():
        if split == "value":
            values = sorted({row["value"] for row in rows}, key=value_order)
            labels = [value_label(value) for value in values]
            columns = {label: [None] * len(xs) for label in labels}
            for row in rows:
                at = position[epoch(row["window_start"])]
                columns[value_label(row["value"])][at] = SPLIT_VALUE[chart](row)
        elif split:
            labels = sorted({row[split] for row in rows})
            columns = {label: [None] * len(xs) for label in labels}
            for row in rows:
                columns[row[split]][position[epoch(row["window_start"])]] = SPLIT_VALUE[chart](row)
        else:
            labels = [label for label, _ in series]
            columns = {label: [None] * len(xs) for label in labels}
            for row in rows:
                for label, value in series:
                    columns[label][position[epoch(row["window_start"])]] = value(row)
        charts[chart] = {"labels": labels, "data": [xs, *(columns[label] for label in labels)]}
    return charts


def assert_charts_match(browser: WebDriver, url: str, key: str, split: str) -> dict[str, Any]:
    """The plotted data equals the API's answer to the page's own query; that query returned.

    ``split`` is ``route``, ``model``, ``value`` (a dimension's) or empty."""
    query = browser.execute_script("return window.streamlens.query")
    assert query["group_by"] == ("" if split == "value" else split)
    rows = api_rows(url, key, query)
    expected = expected_charts(rows, split)
    shown = plotted(browser)
    assert set(shown) == set(expected)
    for chart, want in expected.items():
        assert shown[chart]["labels"] == want["labels"], chart
        got = shown[chart]["data"]
        assert got[0] == want["data"][0], chart
        for label, got_column, want_column in zip(want["labels"], got[1:], want["data"][1:], strict=True):
            assert len(got_column) == len(want_column), (chart, label)
            for got_value, want_value in zip(got_column, want_column, strict=True):
                # None is a bucket without a value (no window, or no latency in it).
                assert got_value == want_value or (
                    None not in (got_value, want_value) and math.isclose(got_value, want_value, rel_tol=1e-12)
                ), (chart, label, got_column, want_column)
    return {"query": query, "rows": rows, "shown": shown}


def select(browser: WebDriver, element_id: str, value: str) -> None:
    Select(browser.find_element(By.ID, element_id)).select_by_value(value)


def make_windows(start: datetime, minutes: range, tenant: str = "acme", seed: int = 5) -> list[Window]:
    rnd = random.Random(seed)
    return [
        Window(
            tenant, route, model, start - minute * timedelta(minutes=1), random_calls(rnd, rnd.randint(1, 12))
        )
        for minute in minutes
        for route in ROUTES
        for model in MODELS
    ]


def totals(windows: list[Window]) -> dict[str, float]:
    values = [w.column_values() for w in windows]
    return {
        name: sum(v[name] for v in values)
        for name in (
            "requests",
            "errors",
            "timeouts",
            "prompt_tokens",
            "completion_tokens",
            "estimated_cost_usd",
        )
    }


def test_charts_and_table_show_the_apis_numbers_for_range_bucket_filters_and_split(
    browser: WebDriver, postgres_dsn: str
):
    now = this_minute()
    recent = make_windows(now, range(1, 41))
    # Two hours back: outside the last hour the page is asked for.
    old = make_windows(now, range(120, 123), seed=9)
    other_tenant = make_windows(now, range(1, 5), tenant="globex", seed=11)
    insert_windows(postgres_dsn, recent + old + other_tenant)
    key = new_key(postgres_dsn)
    with query_api(postgres_dsn) as url:
        open_dashboard(browser, url, key, "range=1h&bucket=5m")
        wait_loaded(browser)
        assert browser.find_element(By.ID, "tenant-name").text == "acme"
        # The key is in the session's storage, never in the address.
        assert key not in browser.current_url
        assert browser.execute_script("return sessionStorage.getItem('streamlens.readKey')") == key

        seen = assert_charts_match(browser, url, key, split="")
        query = seen["query"]
        assert query["bucket"] == "5m" and query["tenant_id"] == "acme"
        start = epoch(query["from"])
        # The last hour, from a bucket boundary.
        assert start % 300 == 0 and 3600 <= time.time() - start < 3600 + 300 + 60
        # What the API said is what the windows hold: the recent ones, not the old ones.
        assert sum(seen["shown"]["calls"]["data"][1]) == totals(recent)["requests"]
        assert sum(seen["shown"]["calls"]["data"][3]) == totals(recent)["timeouts"]
        assert sum(seen["shown"]["tokens"]["data"][1]) == totals(recent)["prompt_tokens"]
        assert all(x >= start for x in seen["shown"]["calls"]["data"][0])

        # Split by route: one line per route.
        select(browser, "split", "route")
        wait_loaded(browser)
        seen = assert_charts_match(browser, url, key, split="route")
        assert seen["shown"]["calls"]["labels"] == sorted(ROUTES)
        assert seen["shown"]["latency"]["title"] == "p95 latency by route, ms"
        for route, column in zip(sorted(ROUTES), seen["shown"]["calls"]["data"][1:], strict=True):
            assert sum(c for c in column if c) == totals([w for w in recent if w.route == route])["requests"]

        # One route, split by model; then a bucket of 1 minute.
        select(browser, "route", "/search")
        wait_loaded(browser)
        select(browser, "split", "model")
        wait_loaded(browser)
        seen = assert_charts_match(browser, url, key, split="model")
        assert seen["query"]["route"] == "/search"
        assert seen["shown"]["cost"]["labels"] == sorted(MODELS)
        for model, column in zip(sorted(MODELS), seen["shown"]["cost"]["data"][1:], strict=True):
            chosen = [w for w in recent if w.route == "/search" and w.model == model]
            assert sum(c for c in column if c) == pytest.approx(totals(chosen)["estimated_cost_usd"])
        select(browser, "bucket", "1m")
        wait_loaded(browser)
        seen = assert_charts_match(browser, url, key, split="model")
        assert len(seen["shown"]["calls"]["data"][0]) == 40
        # The view is in the address (the key is not): a reload shows the same.
        assert "route=%2Fsearch" in browser.current_url and "split=model" in browser.current_url

        # The table: routes x models over the range, filtered by the chosen route.
        table = browser.execute_script("return window.streamlens.table")
        assert {(line["route"], line["model"]) for line in table} == {("/search", m) for m in MODELS}
        select(browser, "route", "")
        select(browser, "split", "")
        wait_loaded(browser)
        table = browser.execute_script("return window.streamlens.table")
        assert len(table) == len(ROUTES) * len(MODELS)
        query = browser.execute_script("return window.streamlens.query")
        daily = api_rows(url, key, {"tenant_id": "acme", "from": query["from"], "bucket": "1d"})
        for line in table:
            pair = (line["route"], line["model"])
            chosen = totals([w for w in recent if (w.route, w.model) == pair])
            assert line["calls"] == chosen["requests"]
            assert line["error_rate"] == pytest.approx(chosen["errors"] / chosen["requests"])
            assert line["tokens"] == chosen["prompt_tokens"] + chosen["completion_tokens"]
            assert line["cost"] == pytest.approx(chosen["estimated_cost_usd"])
            # The range's p95: the highest of its days' merged p95s (one day, unless it spans midnight).
            p95s = [row["p95_latency_ms"] for row in daily if (row["route"], row["model"]) == pair]
            assert line["p95"] == max(p for p in p95s if p is not None)
        # Sorted by calls, most first; a click on the header turns it round.
        calls = [line["calls"] for line in table]
        assert calls == sorted(calls, reverse=True)
        browser.find_element(By.CSS_SELECTOR, "th[data-key=calls]").click()
        ascending = [line["calls"] for line in browser.execute_script("return window.streamlens.table")]
        assert ascending == sorted(calls)
        rendered = [
            row.find_elements(By.TAG_NAME, "td")[2].text.replace(",", "")
            for row in browser.find_elements(By.CSS_SELECTOR, "#table tbody tr")
        ]
        assert rendered == [str(count) for count in ascending]


COUNTRY = "metadata.country"
COUNTRIES: tuple[str | None, ...] = ("DE", "FR", None, "(other)")


def country_windows(start: datetime, minutes: range, seed: int = 13) -> tuple[list[Window], list[Window]]:
    """Main windows of tenant acme and their rows of dimension metadata.country, made of the
    same calls: each value's calls are a part of the window's, and not every value is in
    every window."""
    rnd = random.Random(seed)
    main: list[Window] = []
    by_value: list[Window] = []
    for minute in minutes:
        when = start - minute * timedelta(minutes=1)
        for route in ROUTES:
            for model in MODELS:
                parts = {value: random_calls(rnd, rnd.randint(0, 5)) for value in COUNTRIES}
                parts = {value: calls for value, calls in parts.items() if calls}
                if not parts:
                    parts = {"DE": random_calls(rnd, 1)}
                every_call = [call for calls in parts.values() for call in calls]
                main.append(Window("acme", route, model, when, every_call))
                by_value += [
                    Window(
                        "acme",
                        route,
                        model,
                        when,
                        calls,
                        extra={"dimension": COUNTRY, "value": value, "window_revision": 1},
                    )
                    for value, calls in parts.items()
                ]
    return main, by_value


def insert_dimension_rows(dsn: str, windows: list[Window]) -> None:
    store.insert_dimension_rows(dsn, [window.column_values() for window in windows])


def set_dimensions(url: str, dsn: str, tenant: str, names: list[str]) -> None:
    """The tenant's dimensions, set as its operators would: PUT with a manage key."""
    manage = new_key(dsn, tenant, scope="manage")
    response = httpx.put(
        f"{url}/v1/tenants/{tenant}/dimensions",
        json={"dimensions": names},
        headers={"Authorization": f"Bearer {manage}"},
    )
    assert response.status_code == 200, response.text


def per_bucket(windows: list[Window], start: float, bucket: int, column: str) -> dict[float, float]:
    """Each bucket's sum of ``column`` over the windows from ``start`` on."""
    sums: dict[float, float] = defaultdict(float)
    for window in windows:
        if window.start.timestamp() >= start:
            sums[float(int(window.start.timestamp()) // bucket * bucket)] += window.column_values()[column]
    return dict(sums)


def value_of(window: Window) -> str | None:
    return window.extra["value"]


def since(windows: list[Window], start: float) -> list[Window]:
    return [window for window in windows if window.start.timestamp() >= start]


def selected_option(browser: WebDriver, element_id: str) -> WebElement:
    return Select(browser.find_element(By.ID, element_id)).first_selected_option


def column_of(shown: dict[str, Any], label: str) -> dict[float, float]:
    """One series of a chart as {time: value}, the buckets without a value left out."""
    column = shown["data"][1 + shown["labels"].index(label)]
    return {x: value for x, value in zip(shown["data"][0], column, strict=True) if value is not None}


def dimension_choices(browser: WebDriver) -> list[tuple[str, str]]:
    options = browser.find_elements(By.CSS_SELECTOR, "#dimension option")
    return [(option.get_attribute("value") or "", option.text) for option in options]


def test_split_and_filter_by_a_dimension_of_the_tenant(browser: WebDriver, postgres_dsn: str):
    now = this_minute()
    main, by_value = country_windows(now, range(1, 31))
    insert_windows(postgres_dsn, main)
    insert_dimension_rows(postgres_dsn, by_value)
    key = new_key(postgres_dsn)
    with query_api(postgres_dsn) as url:
        set_dimensions(url, postgres_dsn, "acme", [COUNTRY, "provider"])
        open_dashboard(browser, url, key, "range=1h&bucket=5m")
        wait_loaded(browser)
        wait(browser, lambda d: d.execute_script("return window.streamlens.dimensions"), "the dimensions")
        assert dimension_choices(browser) == [("", "none"), (COUNTRY, COUNTRY), ("provider", "provider")]
        assert not browser.find_element(By.ID, "value-field").is_displayed()

        # Choosing the dimension splits the charts by its values.
        select(browser, "dimension", COUNTRY)
        wait_loaded(browser)
        assert selected_option(browser, "split").get_attribute("value") == "value"
        seen = assert_charts_match(browser, url, key, split="value")
        query = seen["query"]
        assert query["dimension"] == COUNTRY and "value" not in query
        start = epoch(query["from"])
        calls, cost = seen["shown"]["calls"], seen["shown"]["cost"]
        assert calls["labels"] == ["(none)", "DE", "FR", "(other)"]
        assert calls["title"] == f"Calls by {COUNTRY}"
        for value in COUNTRIES:
            chosen = [w for w in by_value if value_of(w) == value]
            assert column_of(calls, value_label(value)) == per_bucket(chosen, start, 300, "requests")
            want_cost = per_bucket(chosen, start, 300, "estimated_cost_usd")
            got_cost = column_of(cost, value_label(value))
            assert got_cost.keys() == want_cost.keys()
            assert all(got_cost[x] == pytest.approx(want_cost[x], rel=1e-12) for x in want_cost)
        # A bucket's values add up to the whole tenant's.
        every_value = sum(sum(c for c in column if c) for column in calls["data"][1:])
        assert every_value == totals(since(main, start))["requests"]
        assert "dimension=metadata.country" in browser.current_url and "split=value" in browser.current_url

        # The table: one line per route, model and value, with the value's column.
        header = browser.find_element(By.ID, "value-column")
        assert header.is_displayed() and header.text.startswith(COUNTRY)
        table = browser.execute_script("return window.streamlens.table")
        recent = since(by_value, start)
        lines = {(w.route, w.model, value_of(w)) for w in recent}
        assert {(line["route"], line["model"], line.get("value")) for line in table} == lines
        for line in table:
            shown = (line["route"], line["model"], line.get("value"))
            chosen = [w for w in recent if (w.route, w.model, value_of(w)) == shown]
            assert line["calls"] == totals(chosen)["requests"]
            assert line["tokens"] == totals(chosen)["prompt_tokens"] + totals(chosen)["completion_tokens"]
            assert line["cost"] == pytest.approx(totals(chosen)["estimated_cost_usd"])
        shown_values = {
            row.find_elements(By.TAG_NAME, "td")[2].text
            for row in browser.find_elements(By.CSS_SELECTOR, "#table tbody tr")
        }
        assert shown_values == {"(none)", "DE", "FR", "(other)"}
        options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#value option")]
        assert options == ["all", "(none)", "DE", "FR", "(other)"]

        # Filtered to one value: that value alone, in the charts and in the table.
        select(browser, "value", "=DE")
        wait_loaded(browser)
        seen = assert_charts_match(browser, url, key, split="value")
        assert seen["query"]["value"] == "DE"
        assert seen["shown"]["calls"]["labels"] == ["DE"]
        german = [w for w in by_value if value_of(w) == "DE"]
        assert column_of(seen["shown"]["calls"], "DE") == per_bucket(german, start, 300, "requests")
        table = browser.execute_script("return window.streamlens.table")
        assert {line["value"] for line in table} == {"DE"}
        assert sum(line["calls"] for line in table) == totals(since(german, start))["requests"]

        # The calls without a value: `value=` with nothing after it.
        select(browser, "value", "-")
        wait_loaded(browser)
        seen = assert_charts_match(browser, url, key, split="value")
        assert seen["query"]["value"] == ""
        assert seen["shown"]["calls"]["labels"] == ["(none)"]
        unknown = [w for w in by_value if value_of(w) is None]
        assert column_of(seen["shown"]["calls"], "(none)") == per_bucket(unknown, start, 300, "requests")
        table = browser.execute_script("return window.streamlens.table")
        assert {line.get("value") for line in table} == {None}

        # One value, split by route: the value's calls of each route.
        select(browser, "value", "=FR")
        wait_loaded(browser)
        select(browser, "split", "route")
        wait_loaded(browser)
        seen = assert_charts_match(browser, url, key, split="route")
        assert (seen["query"]["dimension"], seen["query"]["value"]) == (COUNTRY, "FR")
        for route in ROUTES:
            chosen = [w for w in by_value if value_of(w) == "FR" and w.route == route]
            assert column_of(seen["shown"]["calls"], route) == per_bucket(chosen, start, 300, "requests")
        # The view is in the address: a reload shows the same.
        browser.refresh()
        wait_loaded(browser)
        reloaded = assert_charts_match(browser, url, key, split="route")
        assert reloaded["query"] == seen["query"]
        assert selected_option(browser, "value").text == "FR"

        # No dimension: the main rows again, and no value column.
        select(browser, "split", "value")
        wait_loaded(browser)
        select(browser, "dimension", "")
        wait_loaded(browser)
        seen = assert_charts_match(browser, url, key, split="")
        assert "dimension" not in seen["query"] and "dimension" not in browser.current_url
        assert not browser.find_element(By.ID, "value-field").is_displayed()
        assert not browser.find_element(By.ID, "value-column").is_displayed()
        assert sum(seen["shown"]["calls"]["data"][1]) == totals(since(main, start))["requests"]


def test_a_tenant_without_dimensions_sees_no_dimension_to_choose(browser: WebDriver, postgres_dsn: str):
    insert_windows(postgres_dsn, make_windows(this_minute(), range(1, 6), tenant="globex"))
    key = new_key(postgres_dsn, tenant="globex")
    with query_api(postgres_dsn) as url:
        # An address naming a dimension the tenant does not have: dropped, not refused.
        open_dashboard(browser, url, key, "range=1h&dimension=metadata.country&value=%3DDE&split=value")
        wait_loaded(browser)
        assert browser.execute_script("return window.streamlens.dimensions") == []
        control = browser.find_element(By.ID, "dimension")
        assert not control.is_enabled()
        assert dimension_choices(browser) == [("", "none configured")]
        assert not browser.find_element(By.ID, "value-field").is_displayed()
        assert not browser.find_element(By.ID, "split-value").is_enabled()
        seen = assert_charts_match(browser, url, key, split="")
        assert "dimension" not in seen["query"] and "dimension" not in browser.current_url
        assert not browser.find_element(By.ID, "value-column").is_displayed()
        # The rest works as ever.
        select(browser, "split", "model")
        wait_loaded(browser)
        assert_charts_match(browser, url, key, split="model")


def upsert(dsn: str, window: Window) -> None:
    """A window as the dataflow writes it: the sink's own upsert, with its revision rule."""
    values = window.column_values()
    digest = values.pop("latency_digest")
    ttft_count = values.pop("ttft_count")
    row = WindowRow(row=MetricsRow(**values), digest=digest, ttft_count=ttft_count)
    with psycopg.connect(dsn) as conn:
        conn.execute(UPSERT_SQL, values_of(row))


def calls_at(browser: WebDriver, moment: datetime) -> float | None:
    data = plotted(browser)["calls"]["data"]
    x = moment.timestamp()
    return data[1][data[0].index(x)] if x in data[0] else None


def test_auto_refresh_shows_new_windows_and_revisions_without_reloading(
    browser: WebDriver, postgres_dsn: str
):
    now = this_minute()
    first = make_windows(now, range(2, 6))
    insert_windows(postgres_dsn, first)
    key = new_key(postgres_dsn)
    with query_api(postgres_dsn) as url:
        open_dashboard(browser, url, key, "range=15m&bucket=1m&refresh=5")
        wait_loaded(browser)
        assert browser.find_element(By.ID, "auto-refresh").is_selected()
        browser.execute_script("window.notReloaded = true")
        target = now - timedelta(minutes=3)
        before = sum(w.column_values()["requests"] for w in first if w.start == target)
        assert calls_at(browser, target) == before
        assert calls_at(browser, now - timedelta(minutes=1)) is None

        # A late call revises one window (revision 2, one call more), and a new window closes.
        revised = next(w for w in first if w.start == target)
        revised.calls = [*revised.calls, *random_calls(random.Random(3), 1, timeout_share=0.0)]
        revised.revision = 2
        upsert(postgres_dsn, revised)
        newest = make_windows(now, range(1, 2), seed=21)
        for window in newest:
            upsert(postgres_dsn, window)
        wait(browser, lambda d: calls_at(d, target) == before + 1, "the revised window")
        wait(
            browser,
            lambda d: calls_at(d, now - timedelta(minutes=1)) == totals(newest)["requests"],
            "the new window",
        )
        assert browser.execute_script("return window.notReloaded") is True
        assert_charts_match(browser, url, key, split="")

        # Turned off, it is off in the address too.
        browser.find_element(By.ID, "auto-refresh").click()
        assert "refresh=" not in browser.current_url


def test_refused_keys_empty_tenant_and_database_away(browser: WebDriver, postgres_dsn: str):
    insert_windows(postgres_dsn, make_windows(this_minute(), range(1, 3)))
    ingest = new_key(postgres_dsn, scope="ingest")
    empty_tenant = new_key(postgres_dsn, tenant="hooli")
    key = new_key(postgres_dsn)
    with query_api(postgres_dsn) as url:

        def login_error() -> str:
            return wait(
                browser,
                lambda d: d.find_element(By.ID, "login-error").text or None,
                "the login error",
            )

        open_dashboard(browser, url, "sl_nosuchk_" + "x" * 43)
        assert login_error().startswith("The key was refused (401)")
        assert page_state(browser) == "refused"
        assert not browser.find_element(By.ID, "board").is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('streamlens.readKey')") is None

        open_dashboard(browser, url, ingest)
        assert login_error().startswith("This key may not read these metrics (403)")
        assert "scope 'ingest'" in login_error()

        open_dashboard(browser, url, empty_tenant)
        wait_loaded(browser, ("empty",))
        assert browser.find_element(By.ID, "status").text == "No windows for hooli in this range."
        assert browser.find_element(By.ID, "tenant-name").text == "hooli"
        assert not browser.find_element(By.ID, "charts").is_displayed()

        # The database goes away while the page is open, then comes back.
        browser.execute_script("sessionStorage.clear()")
        open_dashboard(browser, url, key)
        wait_loaded(browser)
        database = postgres_dsn.rsplit("/", 1)[1]
        admin = postgres_dsn.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false')
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,)
            )
            try:
                browser.find_element(By.ID, "refresh").click()
                wait_loaded(browser, ("unavailable",))
                assert "(503)" in browser.find_element(By.ID, "status").text
                # What was drawn stays on screen.
                assert plotted(browser)["calls"]["data"][0]
            finally:
                conn.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
        # It retries on its own and recovers.
        wait_loaded(browser)


def test_time_to_first_chart_and_page_weight_on_a_day_of_windows(browser: WebDriver, postgres_dsn: str):
    """1 day of 1-minute windows for 20 route/model pairs; the figures are printed."""
    now = this_minute()
    pairs = [(f"/route-{r}", f"model-{m}") for r in range(5) for m in range(4)]
    rows = []
    rnd = random.Random(1)
    for minute in range(1, 1441):
        start = now - timedelta(minutes=minute)
        for route, model in pairs:
            count = rnd.randint(1, 4)
            latencies = sorted(rnd.uniform(100, 900) for _ in range(count))
            rows.append((route, model, start, count, latencies))
    copy_windows(postgres_dsn, rows)
    key = new_key(postgres_dsn)
    with query_api(postgres_dsn) as url:
        figures = {}
        # At bucket=1m, and at the bucket a 24 h range starts with (15m).
        for view, bucket in (("range=24h&bucket=1m", 60), ("range=24h", 900)):
            open_dashboard(browser, url, key, view)
            wait_loaded(browser)
            shown = plotted(browser)["calls"]["data"]
            start = epoch(browser.execute_script("return window.streamlens.query.from"))
            in_range = [(when, count) for _, _, when, count, _ in rows if when.timestamp() >= start]
            assert shown[0] == sorted({int(when.timestamp()) // bucket * bucket for when, _ in in_range})
            assert sum(shown[1]) == sum(count for _, count in in_range)
            figures[view] = browser.execute_script("return window.streamlens.timings")
        weight = browser.execute_script(
            """
            const entries = [...performance.getEntriesByType('navigation'),
                             ...performance.getEntriesByType('resource')];
            return entries.filter((e) => e.initiatorType !== 'fetch')
                          .map((e) => [e.name, e.decodedBodySize]);
            """
        )
    assets = {re.split(r"[?#]", name)[0]: size for name, size in weight}
    # Everything comes from the query API itself: the page works offline.
    assert all(name.startswith(url) for name in assets), assets
    assert {Path(name).name for name in assets} >= {
        "dashboard",
        "dashboard.js",
        "dashboard.css",
        "uPlot.iife.min.js",
        "uPlot.min.css",
    }
    total = sum(assets.values())
    print(f"\ndashboard, 1 day x 20 route/model pairs of 1-minute windows ({len(rows):,} rows):")
    for view, label in (
        ("range=24h&bucket=1m", "bucket=1m (1,440 points)"),
        ("range=24h", "the 24 h range's 15m"),
    ):
        timings = figures[view]
        print(
            f"  {label}: first chart {timings['firstChartMs']:.0f} ms after the key"
            f" (rows read in {timings['readMs']:.0f} ms, charts drawn in {timings['drawMs']:.1f} ms)"
        )
    print(f"  page weight {total / 1024:.1f} KiB uncompressed (limit {PAGE_WEIGHT_LIMIT // 1024} KiB)")
    assert total <= PAGE_WEIGHT_LIMIT


def copy_windows(dsn: str, rows: list[tuple[str, str, datetime, int, list[float]]]) -> None:
    """Many small windows at once, by COPY: every call answered, 100 prompt and 10 completion tokens."""
    columns = (
        "tenant_id, route, model, window_start, window_end, requests, errors, timeouts, avg_latency_ms, "
        "p50_latency_ms, p95_latency_ms, p99_latency_ms, avg_time_to_first_token_ms, ttft_count, "
        "prompt_tokens, completion_tokens, cache_read_tokens, reasoning_tokens, avg_prompt_tokens, "
        "avg_completion_tokens, estimated_cost_usd, unpriced_requests, latency_digest, revision"
    )
    with (
        psycopg.connect(dsn) as conn,
        conn.cursor() as cursor,
        cursor.copy(f"COPY llm_metrics ({columns}) FROM STDIN") as copy,
    ):
        for route, model, start, count, latencies in rows:
            digest = TDigest.from_values(latencies)
            copy.write_row(
                (
                    "acme",
                    route,
                    model,
                    start,
                    start + timedelta(minutes=1),
                    count,
                    0,
                    0,
                    sum(latencies) / count,
                    digest.quantile(0.5),
                    digest.quantile(0.95),
                    digest.quantile(0.99),
                    None,
                    0,
                    100 * count,
                    10 * count,
                    0,
                    0,
                    100.0,
                    10.0,
                    0.001 * count,
                    0,
                    digest.to_bytes(),
                    1,
                )
            )


def test_with_keys_off_it_asks_for_the_tenant_and_shows_a_custom_range(browser: WebDriver, postgres_dsn: str):
    start = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    windows = make_windows(start, range(-30, 0))  # 10:01 to 10:30
    insert_windows(postgres_dsn, windows)
    with query_api(postgres_dsn, auth=False) as url:
        open_dashboard(browser, url, "anything")
        message = wait(browser, lambda d: d.find_element(By.ID, "login-error").text or None, "the prompt")
        assert message == "API keys are off on this server: type the tenant to show."
        browser.find_element(By.ID, "tenant").send_keys("acme")
        browser.find_element(By.ID, "open").click()
        wait_loaded(browser, ("ok", "empty"))
        assert browser.find_element(By.ID, "tenant-name").text == "acme"
        # The typed tenant's dimensions: the server's default, none.
        wait(
            browser,
            lambda d: d.execute_script("return window.streamlens.dimensions") is not None,
            "the dimensions",
        )
        assert dimension_choices(browser) == [("", "none configured")]
        # A custom range, 10:10 to 10:20, typed in the browser's own time zone.
        select(browser, "range", "custom")
        browser.execute_script(
            """
            const local = (ms) =>
              new Date(ms - new Date(ms).getTimezoneOffset() * 60000).toISOString().slice(0, 16);
            for (const [id, value] of [["from", arguments[0]], ["to", arguments[1]]]) {
              const input = document.getElementById(id);
              input.value = local(value);
              input.dispatchEvent(new Event("change", {bubbles: true}));
            }
            """,
            (start + timedelta(minutes=10)).timestamp() * 1000,
            (start + timedelta(minutes=20)).timestamp() * 1000,
        )
        select(browser, "bucket", "5m")
        wait_loaded(browser)
        seen = assert_charts_match(browser, url, "anything", split="")
        assert (seen["query"]["from"], seen["query"]["to"]) == (
            "2026-03-01T10:10:00.000Z",
            "2026-03-01T10:20:00.000Z",
        )
        in_range = [
            w for w in windows if start + timedelta(minutes=10) <= w.start < start + timedelta(minutes=20)
        ]
        assert seen["shown"]["calls"]["data"][0] == [
            (start + timedelta(minutes=m)).timestamp() for m in (10, 15)
        ]
        assert sum(seen["shown"]["calls"]["data"][1]) == totals(in_range)["requests"]


@dataclass
class Evaluated:
    """The evaluations of one name counted toward one window of one key: scores and labels."""

    tenant: str
    route: str
    model: str
    start: datetime
    name: str
    scores: list[float]
    labels: list[str]

    def values(self) -> tuple[Any, ...]:
        """The row as the dataflow's sink writes it, in the order of its upsert's parameters."""
        scores = self.scores
        digest = TDigest.from_values(sorted(scores)) if scores else None
        score_sum = math.fsum(scores) if scores else None
        count = max(len(scores), len(self.labels))
        return (
            self.tenant,
            self.route,
            self.model,
            self.start,
            self.start + timedelta(minutes=1),
            self.name,
            count,
            len(scores),
            score_sum,
            self.average,
            min(scores, default=None),
            max(scores, default=None),
            digest.quantile(0.5) if digest else None,
            digest.quantile(0.9) if digest else None,
            Jsonb(dict(Counter(self.labels))),
            digest.to_bytes() if digest else None,
            count,
        )

    @property
    def average(self) -> float | None:
        return math.fsum(self.scores) / len(self.scores) if self.scores else None

    @property
    def pair(self) -> str:
        return f"{self.route} · {self.model}"


def insert_evaluations(dsn: str, rows: list[Evaluated]) -> None:
    with psycopg.connect(dsn) as conn, conn.cursor() as cursor:
        cursor.executemany(UPSERT_EVALUATIONS_SQL, [row.values() for row in rows])


def make_evaluations(
    start: datetime, minutes: range, tenant: str = "acme", seed: int = 17
) -> list[Evaluated]:
    """Each key's windows of two names: "judge" with scores from 0 to 1, in most windows,
    and "verdict" with pass/fail labels only, in some."""
    rnd = random.Random(seed)
    rows = []
    for minute in minutes:
        when = start - minute * timedelta(minutes=1)
        for route in ROUTES:
            for model in MODELS:
                if rnd.random() < 0.8:
                    scores = [round(rnd.random(), 3) for _ in range(rnd.randint(1, 6))]
                    rows.append(Evaluated(tenant, route, model, when, "judge", scores, []))
                if rnd.random() < 0.6:
                    labels = [rnd.choice(("pass", "pass", "fail")) for _ in range(rnd.randint(1, 8))]
                    rows.append(Evaluated(tenant, route, model, when, "verdict", [], labels))
    return rows


# Errors thrown on the page, and console errors, kept where a test can read them.
ERROR_COLLECTOR = """
window.pageErrors = [];
addEventListener("error", (event) => window.pageErrors.push(String(event.message || event.type)), true);
addEventListener("unhandledrejection", (event) => window.pageErrors.push(String(event.reason)));
const consoleError = console.error;
console.error = (...args) => { window.pageErrors.push(args.map(String).join(" ")); consoleError(...args); };
"""


@contextmanager
def collecting_page_errors(browser: WebDriver) -> Iterator[None]:
    added = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_COLLECTOR})
    try:
        yield
    finally:
        browser.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": added["identifier"]}
        )


def page_errors(browser: WebDriver) -> list[str]:
    return browser.execute_script("return window.pageErrors")


def quality(browser: WebDriver) -> dict[str, Any]:
    """The Quality section: its names, each scored name's chart (title, series labels and
    plotted data, from its uPlot instance), the label counts exposed and as rendered, the note."""
    return browser.execute_script(
        """
        const quality = window.streamlens.quality;
        const charts = {};
        for (const [name, u] of Object.entries(quality.charts)) {
          charts[name] = {
            title: u.root.closest('.chart').querySelector('h3').textContent,
            labels: u.series.slice(1).map((s) => s.label),
            data: u.data.map((column) => Array.from(column)),
          };
        }
        const boxes = {};
        for (const box of document.querySelectorAll('#quality-charts .chart')) {
          const table = box.querySelector('table.labels');
          boxes[box.dataset.chart] = {
            title: box.querySelector('h3').textContent,
            plotted: !box.querySelector('div').hidden && Boolean(box.querySelector('.uplot')),
            labels: table.hidden ? null : [...table.tBodies[0].rows].map(
              (row) => [...row.cells].map((cell) => cell.textContent)),
          };
        }
        const note = document.getElementById('quality-note');
        return {names: quality.names, query: quality.query, charts, labels: quality.labels, boxes,
                note: note.hidden ? null : note.textContent};
        """
    )


def expected_scores(rows: list[Evaluated], start: float, bucket: int) -> dict[str, Any]:
    """The "judge" chart: one series per route · model, its buckets' average scores, each
    from every score of the bucket's windows."""
    chosen = [row for row in rows if row.name == "judge" and row.start.timestamp() >= start]
    scores: dict[tuple[float, str], list[float]] = defaultdict(list)
    for row in chosen:
        scores[(float(int(row.start.timestamp()) // bucket * bucket), row.pair)] += row.scores
    xs = sorted({x for x, _ in scores})
    pairs = [f"{route} · {model}" for route, model in sorted({(row.route, row.model) for row in chosen})]
    columns = [
        [math.fsum(scores[(x, pair)]) / len(scores[(x, pair)]) if (x, pair) in scores else None for x in xs]
        for pair in pairs
    ]
    return {"labels": pairs, "data": [xs, *columns]}


def expected_labels(rows: list[Evaluated], start: float) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for row in rows:
        if row.name == "verdict" and row.start.timestamp() >= start:
            counts.update(row.labels)
    return dict(counts)


def test_quality_charts_the_average_scores_and_counts_the_labels_of_each_evaluation_name(
    browser: WebDriver, postgres_dsn: str
):
    now = this_minute()
    insert_windows(postgres_dsn, make_windows(now, range(1, 21)))
    recent = make_evaluations(now, range(1, 21))
    # Two hours back, outside the range; another tenant's, with a name acme has none of.
    old = make_evaluations(now, range(120, 123), seed=19)
    other_tenant = [
        Evaluated("globex", "/chat", "gpt-4o", now - timedelta(minutes=m), "toxicity", [0.5], ["ok"])
        for m in range(1, 4)
    ]
    insert_evaluations(postgres_dsn, recent + old + other_tenant)
    # What the test counts on: gaps in the judge's series, labels beyond one bucket.
    assert 0 < len([row for row in recent if row.name == "judge"]) < 20 * len(ROUTES) * len(MODELS)
    key = new_key(postgres_dsn)
    with collecting_page_errors(browser), query_api(postgres_dsn) as url:
        open_dashboard(browser, url, key, "range=1h&bucket=1m")
        wait_loaded(browser)
        shown = quality(browser)
        query = shown["query"]
        assert (query["tenant_id"], query["bucket"], query["group_by"]) == ("acme", "1m", "route,model")
        assert query["from"] == browser.execute_script("return window.streamlens.query.from")
        start = epoch(query["from"])
        assert shown["names"] == ["judge", "verdict"] and shown["note"] is None
        # A chart for the scored name; the labelled one has its labels' counts alone.
        assert set(shown["charts"]) == {"judge"}
        assert shown["boxes"]["judge"]["plotted"] and shown["boxes"]["judge"]["labels"] is None
        assert not shown["boxes"]["verdict"]["plotted"]
        judge = shown["charts"]["judge"]
        assert judge["title"] == "judge: average score by route · model"
        want = expected_scores(recent, start, 60)
        assert (
            judge["labels"]
            == want["labels"]
            == [f"{r} · {m}" for r in sorted(ROUTES) for m in sorted(MODELS)]
        )
        # Each point is its window's stored score_avg, exactly; no window, no point.
        assert judge["data"] == want["data"]
        stored = {(row.start.timestamp(), row.pair): row.average for row in recent if row.name == "judge"}
        for pair, column in zip(judge["labels"], judge["data"][1:], strict=True):
            for x, value in zip(judge["data"][0], column, strict=True):
                assert value == stored.get((x, pair)), (pair, x)
        assert None in [value for column in judge["data"][1:] for value in column]
        # The label counts over the range: every window's pass and fail added up.
        counts = expected_labels(recent, start)
        assert set(counts) == {"pass", "fail"}
        assert shown["labels"] == {"verdict": counts}
        rendered = shown["boxes"]["verdict"]["labels"]
        assert [(label, int(count.replace(",", ""))) for label, count, _ in rendered] == sorted(
            counts.items(), key=lambda item: -item[1]
        )
        assert shown["boxes"]["verdict"]["title"] == "verdict: labels"

        # Buckets of 5 minutes: each point the average of all the bucket's scores.
        select(browser, "bucket", "5m")
        wait_loaded(browser)
        shown = quality(browser)
        assert shown["query"]["bucket"] == "5m"
        start = epoch(shown["query"]["from"])
        want = expected_scores(recent, start, 300)
        judge = shown["charts"]["judge"]
        assert judge["labels"] == want["labels"] and judge["data"][0] == want["data"][0]
        for got_column, want_column in zip(judge["data"][1:], want["data"][1:], strict=True):
            assert [g is None for g in got_column] == [w is None for w in want_column]
            for got_value, want_value in zip(got_column, want_column, strict=True):
                assert got_value == want_value or math.isclose(got_value, want_value, rel_tol=1e-12)
        assert shown["labels"] == {"verdict": expected_labels(recent, start)}

        # The route filter applies to the evaluations too.
        select(browser, "route", "/search")
        wait_loaded(browser)
        shown = quality(browser)
        assert shown["query"]["route"] == "/search"
        searched = [row for row in recent if row.route == "/search"]
        want = expected_scores(searched, start, 300)
        assert (
            shown["charts"]["judge"]["labels"] == want["labels"] == [f"/search · {m}" for m in sorted(MODELS)]
        )
        assert shown["labels"] == {"verdict": expected_labels(searched, start)}

        # A new name is shown at the next refresh, without reloading.
        browser.execute_script("window.notReloaded = true")
        insert_evaluations(
            postgres_dsn,
            [Evaluated("acme", "/search", "gpt-4o", now, "safety", [], ["safe", "safe", "unsafe"])],
        )
        browser.find_element(By.ID, "refresh").click()
        wait(browser, lambda d: "safety" in quality(d)["names"], "the new evaluation name")
        shown = quality(browser)
        assert shown["names"] == ["judge", "safety", "verdict"]
        assert shown["labels"]["safety"] == {"safe": 2, "unsafe": 1}
        assert browser.execute_script("return window.notReloaded") is True
        assert page_errors(browser) == []


def test_quality_without_evaluations_says_so(browser: WebDriver, postgres_dsn: str):
    now = this_minute()
    insert_windows(postgres_dsn, make_windows(now, range(1, 6)))
    # Another tenant's evaluations only.
    insert_evaluations(postgres_dsn, make_evaluations(now, range(1, 6), tenant="globex"))
    key = new_key(postgres_dsn)
    with collecting_page_errors(browser), query_api(postgres_dsn) as url:
        open_dashboard(browser, url, key, "range=1h")
        wait_loaded(browser)
        shown = quality(browser)
        assert shown["note"] == "No evaluations yet for acme in this range."
        assert browser.find_element(By.ID, "quality-note").is_displayed()
        assert (shown["names"], shown["charts"], shown["labels"], shown["boxes"]) == ([], {}, {}, {})
        # The rest of the page as ever.
        assert_charts_match(browser, url, key, split="")
        # A tenant without windows either: both say so.
        browser.execute_script("sessionStorage.clear()")
        open_dashboard(browser, url, new_key(postgres_dsn, tenant="hooli"))
        wait_loaded(browser, ("empty",))
        assert quality(browser)["note"] == "No evaluations yet for hooli in this range."
        assert page_errors(browser) == []


def test_the_vendored_chart_library_is_the_pinned_npm_release():
    lock = json.loads((STATIC.parent / "package-lock.json").read_text())
    version = lock["packages"]["node_modules/uplot"]["version"]
    assert json.loads((STATIC.parent / "package.json").read_text())["dependencies"]["uplot"] == version
    header = (STATIC / "vendor" / "uPlot.iife.min.js").read_text()[:200]
    assert re.search(rf"uPlot \(v{re.escape(version)}\)", header), header
    assert "MIT" in (STATIC / "vendor" / "uPlot.LICENSE").read_text()


def test_the_page_is_open_its_data_is_not(postgres_dsn: str):
    with query_api(postgres_dsn) as url:
        page = httpx.get(f"{url}/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for asset in re.findall(r'(?:src|href)="([^"]+)"', page.text):
            assert httpx.get(f"{url}/{asset}").status_code == 200, asset
        assert httpx.get(f"{url}/dashboard/tenant").status_code == 401


def test_firing_alerts_are_shown_at_the_top_marked_on_their_chart_and_the_rules_listed(
    browser: WebDriver, postgres_dsn: str
):
    now = this_minute()
    insert_windows(postgres_dsn, make_windows(now, range(1, 31)))
    manage = new_key(postgres_dsn, scope="manage")
    hook = "https://93.184.215.14/hooks/streamlens"  # an address: nothing to resolve
    rules = [
        {
            "name": "chat errors",
            "metric": "error_rate",
            "route": "/chat",
            "span_seconds": 300,
            "op": ">",
            "threshold": 0.05,
        },
        {"name": "slow", "metric": "p99_latency_ms", "span_seconds": 60, "op": ">", "threshold": 4000},
    ]
    minute = timedelta(minutes=1)
    # What the alert service would have stored for the first rule: fired 25 minutes ago,
    # resolved 20 minutes ago, firing again since 8 minutes ago.
    told = [("firing", 25), ("resolved", 20), ("firing", 8)]
    with collecting_page_errors(browser), query_api(postgres_dsn) as url:
        for rule in rules:
            made = httpx.post(
                f"{url}/v1/alerts/rules",
                json={"tenant_id": "acme", "webhook_url": hook, **rule},
                headers={"Authorization": f"Bearer {manage}"},
                timeout=30,
            )
            assert made.status_code == 201, made.text
        with psycopg.connect(postgres_dsn) as conn:
            errors_rule = next(
                rule for rule in rules_of_tenants(conn, ["acme"])["acme"] if rule.name == "chat errors"
            )
            alert_store.locked_states(conn, [errors_rule.id])  # makes its row, as the service does
            transitions = []
            for kind, ago in told:
                start = int((now - ago * minute).timestamp())
                transitions.append(
                    Transition(transition_id(errors_rule.id, kind, start), kind, start, start + 60, 0.1)
                )
            alert_store.save(
                conn, [(errors_rule, RuleState(True, transitions[-1].window_start, None, None), transitions)]
            )
            conn.commit()

        open_dashboard(browser, url, new_key(postgres_dsn), "range=1h")
        wait_loaded(browser)
        banner = browser.find_element(By.ID, "firing")
        assert banner.is_displayed()
        items = [item.text for item in banner.find_elements(By.TAG_NAME, "li")]
        assert len(items) == 1 and items[0].startswith("chat errors - error_rate > 0.05 on /chat"), items
        shown = browser.execute_script("return window.streamlens.alerts")
        assert shown["firing"] == ["chat errors"]
        at = lambda ago: (now - ago * minute).timestamp()  # noqa: E731
        assert shown["marks"] == {"calls": [[at(25), at(20)], [at(8), None]], "latency": []}
        table = [
            [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in browser.find_elements(By.CSS_SELECTOR, "#rules tbody tr")
        ]
        assert [(row[0], row[1], row[2], row[3]) for row in table] == [
            ("chat errors", "error_rate > 0.05", "/chat", "firing"),
            ("slow", "p99_latency_ms > 4000", "all routes and models", "ok"),
        ]
        assert table[0][5] == "pending" and table[1][4] == "none yet"
        # The shading is drawn: inside a span the top of the calls chart is tinted, outside it is not.
        tint = browser.execute_script(
            """
            const u = window.streamlens.charts.calls;
            const pixel = (seconds) => Array.from(u.ctx.getImageData(
              Math.round(u.valToPos(seconds, 'x', true)), Math.round(u.bbox.top + 2), 1, 1).data);
            return [pixel(arguments[0]), pixel(arguments[1])];
            """,
            at(22.5),
            at(15),
        )
        inside, outside = tint
        assert inside[0] > inside[2] and inside[3] > 0, tint
        assert outside[3] == 0 or outside[0] == outside[2], tint
        assert page_errors(browser) == []


def test_usage_per_day_is_shown_for_the_days_of_the_range(browser: WebDriver, postgres_dsn: str):
    now = this_minute()
    windows = make_windows(now, range(1, 90))
    insert_windows(postgres_dsn, windows)
    today = now.date()
    yesterday = today - timedelta(days=1)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.cursor().executemany(
            "INSERT INTO ingestion_usage (tenant_id, day, accepted, refused) VALUES (%s, %s, %s, %s)",
            [("acme", yesterday, 1_234_567, 89), ("acme", today, 4_321, 0), ("globex", today, 999, 9)],
        )
    calls: Counter[str] = Counter()
    for window in windows:
        calls[window.start.astimezone(UTC).date().isoformat()] += window.column_values()["requests"]
    with collecting_page_errors(browser), query_api(postgres_dsn) as url:
        open_dashboard(browser, url, new_key(postgres_dsn), "range=24h")
        wait_loaded(browser)
        rows = [
            [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in browser.find_elements(By.CSS_SELECTOR, "#usage tbody tr")
        ]
        expected = [
            [today.isoformat(), "4,321", "0", f"{calls[today.isoformat()]:,}"],
            [yesterday.isoformat(), "1,234,567", "89", f"{calls.get(yesterday.isoformat(), 0):,}"],
        ]
        assert rows == expected
        assert page_errors(browser) == []
