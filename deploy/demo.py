"""The whole pipeline on this machine: ``python -m deploy.demo`` (``just demo``).

Starts the local broker and Postgres (as ``just up``), then the ingestion API,
the dataflow and the query API as child processes with short windows, sends
generated traffic, waits until every call is counted in a closed window and
prints the metrics per tenant, route and model, read through the query API,
and the address of the query API's dashboard with a read key to paste into it.
The services keep running until Ctrl-C, which stops everything the demo
started (``DEMO_EXIT=1``: right after the table). Logs go to ``<local>/logs/``.

It also runs the alert service and a webhook receiver (:mod:`deploy.receiver`) in
this process, makes one alert rule for the first tenant (its error rate over a
minute above 45 %, with a ``manage`` key, revoked when the demo stops) and has that
tenant's calls all fail for the traffic's first seconds: the rule fires, then
resolves, and the receiver prints both.

The services run with API keys on, as in production. The demo stores an
``ingest`` and a ``read`` key per tenant in the stack's Postgres (what
``just create-key`` does), sends each tenant's traffic with its ingest key,
reads the metrics with the read keys and prints a ``curl`` line carrying one.
It revokes these keys when it stops.

Environment (all optional): ``DEMO_LOCAL`` (default ``.local``), ``DEMO_DURATION``
seconds of traffic (20), ``DEMO_RATE`` calls per second (50), ``DEMO_TENANTS`` (3),
``DEMO_WINDOW_SECONDS`` (10), ``DEMO_GRACE_SECONDS`` (2), ``DEMO_INGESTION_PORT`` (8080)
and ``DEMO_METRICS_PORT`` (8081; a taken port, or 0, means any free one),
``DEMO_EVALUATION_DELAY`` (60: the latest users' feedback comes this many seconds after
its call), ``DEMO_EXIT=1`` to stop right after the tables.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode
from urllib.request import Request, urlopen

import msgspec
import psycopg

from api.auth import NewKey
from api.keys import create_key, revoke_key
from deploy import stack, traffic
from deploy.receiver import WebhookReceiver, describe
from schemas.tenant_settings import set_dimensions

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
# After the windows should have closed, how long to keep waiting for the last calls.
COUNT_SLACK_SECONDS = 60.0
# The demo's alert rule: the first tenant's error rate over a minute above this, and the
# share of its calls that fail at first, for this share of the first window.
DEMO_ALERT_THRESHOLD = 0.45
SPIKE_ERROR_SHARE = 1.0
SPIKE_WINDOW_SHARE = 0.6
DEMO_WEBHOOK_SECRET = "streamlens-demo-webhook-secret"


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where to look."""


def _env_number(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise DemoError(f"{name}={raw!r}: expected a number ≥ {minimum:g}")
    return value


@dataclass(frozen=True)
class DemoConfig:
    local: Path
    duration: float
    rate: float
    tenants: int
    window_seconds: int
    grace_seconds: int
    ingestion_port: int
    metrics_port: int
    exit_after_table: bool
    evaluation_delay: float = 60.0

    @classmethod
    def from_env(cls) -> DemoConfig:
        return cls(
            local=Path(os.environ.get("DEMO_LOCAL") or ".local").resolve(),
            duration=_env_number("DEMO_DURATION", 20, 1),
            rate=_env_number("DEMO_RATE", 50, 1),
            tenants=int(_env_number("DEMO_TENANTS", 3, 1)),
            window_seconds=int(_env_number("DEMO_WINDOW_SECONDS", 10, 1)),
            grace_seconds=int(_env_number("DEMO_GRACE_SECONDS", 2, 0)),
            ingestion_port=int(_env_number("DEMO_INGESTION_PORT", 8080, 0)),
            metrics_port=int(_env_number("DEMO_METRICS_PORT", 8081, 0)),
            exit_after_table=os.environ.get("DEMO_EXIT", "") == "1",
            evaluation_delay=_env_number("DEMO_EVALUATION_DELAY", 60, 1),
        )


def port_or_free(preferred: int) -> int:
    """``preferred`` when nothing listens there, else a free port (0: any free port)."""
    if not preferred:
        return stack.free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return stack.free_port()
    return preferred


@dataclass
class Service:
    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        with open(self.log, "ab") as out:
            # A session of its own: Ctrl-C reaches the demo only, which stops
            # the services in order.
            self.process = subprocess.Popen(
                self.argv,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-1500:]
            raise DemoError(
                f"{self.name} exited with code {self.process.returncode}; the end of {self.log}:\n{tail}"
            )

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass(frozen=True)
class TenantKeys:
    ingest: NewKey
    read: NewKey


def create_demo_keys(dsn: str, tenants: list[str]) -> dict[str, TenantKeys]:
    """An ingest and a read key per tenant, stored in Postgres as ``just create-key`` does."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {
            tenant: TenantKeys(
                ingest=create_key(conn, tenant, "ingest"), read=create_key(conn, tenant, "read")
            )
            for tenant in tenants
        }


# The first tenant slices its calls by these (traffic.py puts them in every request's metadata).
DEMO_DIMENSIONS = ("metadata.experiment", "metadata.country")


def set_demo_dimensions(dsn: str, tenant: str, window_seconds: int) -> datetime:
    """Give ``tenant`` the demo's dimensions, as ``just dimensions`` does; from when they apply."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        change = set_dimensions(conn, tenant, DEMO_DIMENSIONS, window_seconds)
    return change.effective_from


def fetch_dimension(
    metrics_url: str, tenant: str, dimension: str, since: datetime, read_key: str
) -> list[dict[str, Any]]:
    """One row per value of ``dimension`` since ``since``, over all routes and models."""
    query = urlencode(
        {
            "tenant_id": tenant,
            "from": since.isoformat(),
            "bucket": "1d",
            "group_by": "",
            "dimension": dimension,
            "limit": 1000,
        }
    )
    return _get_json(f"{metrics_url}/v1/metrics?{query}", api_key=read_key)["metrics"]


def dimension_table(dimension: str, rows: list[dict[str, Any]]) -> str:
    """Per value of one dimension: calls, errors, p95 and cost (a demo across midnight has two
    daily buckets: their sums, and the larger p95)."""
    merged: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"calls": 0, "errors": 0, "p95": None, "cost": 0.0}
    )
    for row in rows:
        line = merged["(none)" if row["value"] is None else row["value"]]
        line["calls"] += row["requests"]
        line["errors"] += row["errors"]
        if row["p95_latency_ms"] is not None:
            line["p95"] = max(line["p95"] or 0.0, row["p95_latency_ms"])
        line["cost"] += row["estimated_cost_usd"]
    header = (dimension, "calls", "errors", "p95 ms", "cost USD")
    body = [
        (
            value,
            str(line["calls"]),
            str(line["errors"]),
            "-" if line["p95"] is None else f"{line['p95']:.0f}",
            f"{line['cost']:.4f}",
        )
        for value, line in sorted(merged.items(), key=lambda item: (-item[1]["calls"], item[0]))
    ]
    return _render(header, body, numeric_from=1)


def revoke_demo_keys(dsn: str, keys: dict[str, TenantKeys]) -> None:
    """The demo's keys stop working with it, also in a stack that outlives it (``just up``)."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for tenant_keys in keys.values():
                revoke_key(conn, tenant_keys.ingest.prefix)
                revoke_key(conn, tenant_keys.read.prefix)
    except psycopg.Error as error:
        prefixes = ", ".join(
            k.prefix for tenant_keys in keys.values() for k in (tenant_keys.ingest, tenant_keys.read)
        )
        print(f"warning: could not revoke the demo's keys ({prefixes}): {error}", file=sys.stderr)


def create_demo_rule(
    dsn: str, metrics_url: str, tenant: str, webhook_url: str, window_seconds: int
) -> NewKey:
    """The demo's alert rule, made through the query API with a new ``manage`` key of the
    tenant's (returned, to revoke when the demo stops)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        manage = create_key(conn, tenant, "manage")
    span = -(-60 // window_seconds) * window_seconds  # a minute, in whole windows
    rule = {
        "tenant_id": tenant,
        "name": "error spike",
        "metric": "error_rate",
        "span_seconds": span,
        "op": ">",
        "threshold": DEMO_ALERT_THRESHOLD,
        "min_calls": 5,
        "webhook_url": webhook_url,
        "webhook_secret": DEMO_WEBHOOK_SECRET,
    }
    request = Request(
        f"{metrics_url}/v1/alerts/rules",
        data=msgspec.json.encode(rule),
        headers={"Authorization": f"Bearer {manage.key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urlopen(request, timeout=10):
            pass
    except HTTPError as error:
        raise DemoError(
            f"POST /v1/alerts/rules answered {error.code}: {error.read()[:300].decode(errors='replace')}"
        ) from None
    return manage


def print_alerts(receiver: WebhookReceiver, wait_for_firing: float = 0.0) -> None:
    """Print what the receiver got; first wait up to ``wait_for_firing`` seconds for a firing."""
    deadline = time.monotonic() + wait_for_firing
    fired = False
    while True:
        try:
            alert = receiver.alerts.get(timeout=max(0.0, deadline - time.monotonic()) if not fired else 0.0)
        except queue.Empty:
            return
        fired = fired or alert.body.get("state") == "firing"
        print(f"  {describe(alert)}", flush=True)


def revoke_manage_key(dsn: str, manage: NewKey) -> None:
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            revoke_key(conn, manage.prefix)
    except psycopg.Error as error:
        print(f"warning: could not revoke the demo's manage key {manage.prefix}: {error}", file=sys.stderr)


def _get_json(url: str, timeout: float = 5.0, api_key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urlopen(Request(url, headers=headers), timeout=timeout) as response:
            return msgspec.json.decode(response.read())
    except HTTPError as error:
        # A refusal is an answer, not an outage: say what the service said.
        raise DemoError(
            f"GET {url} answered {error.code}: {error.read()[:300].decode(errors='replace')}"
        ) from None


def wait_ready(url: str, services: list[Service]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        for service in services:
            service.check_alive()
        try:
            _get_json(f"{url}/ready", timeout=1.0)
            return
        except (DemoError, URLError, OSError, ValueError):
            time.sleep(0.2)
    raise DemoError(f"{url}/ready did not answer within {READY_TIMEOUT:.0f}s")


class Counting(NamedTuple):
    """What the demo waits to see counted: rows of ``/v1/<path>``, adding up ``field``."""

    path: str
    field: str
    noun: str


CALLS = Counting("metrics", "requests", "calls")
EVALUATIONS = Counting("evaluations", "evaluations", "evaluations")


def fetch_totals(
    metrics_url: str, tenant: str, since: datetime, read_key: str, what: Counting = CALLS
) -> list[dict[str, Any]]:
    """The day's roll-up of the tenant since ``since``: one row per route and model (and name)."""
    query = urlencode({"tenant_id": tenant, "from": since.isoformat(), "bucket": "1d", "limit": 1000})
    return _get_json(f"{metrics_url}/v1/{what.path}?{query}", api_key=read_key)[what.path]


def wait_counted(
    metrics_url: str,
    sent: dict[str, int],
    read_keys: dict[str, str],
    since: datetime,
    deadline: float,
    services: list[Service],
    what: Counting = CALLS,
) -> dict[str, list[dict[str, Any]]]:
    """Poll until everything sent is counted in a window, or the deadline passes."""
    total = sum(sent.values())
    interactive = sys.stderr.isatty()
    while True:
        for service in services:
            service.check_alive()
        rows = {
            tenant: fetch_totals(metrics_url, tenant, since, read_keys[tenant], what)
            for tenant in sorted(sent)
        }
        done = sum(row[what.field] for tenant_rows in rows.values() for row in tenant_rows)
        line = f"windows closing: {done}/{total} {what.noun} counted"
        print(
            f"\r{line}\x1b[K" if interactive else line,
            end="" if interactive else "\n",
            file=sys.stderr,
            flush=True,
        )
        if done >= total or time.monotonic() > deadline:
            if interactive:
                print(file=sys.stderr)
            if done < total:
                print(
                    f"warning: {total - done} {what.noun} not counted yet; see the dataflow's log",
                    file=sys.stderr,
                )
            return rows
        time.sleep(1.0)


def quality_table(rows: dict[str, list[dict[str, Any]]]) -> str:
    """Per tenant, route and model: judged calls and their average score, user feedback and
    its pass share."""
    merged: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for tenant, tenant_rows in rows.items():
        for row in tenant_rows:
            merged[(tenant, row["route"], row["model"])][row["name"]] = row
    body = []
    for (tenant, route, model), names in sorted(merged.items()):
        judge = names.get("judge")
        feedback = names.get("user_feedback")
        passed = feedback["labels"].get("pass", 0) if feedback else 0
        body.append(
            (
                tenant,
                route,
                model,
                str(judge["scores"]) if judge else "0",
                f"{judge['score_avg']:.3f}" if judge and judge["score_avg"] is not None else "-",
                str(feedback["evaluations"]) if feedback else "0",
                f"{100 * passed / feedback['evaluations']:.0f} %" if feedback else "-",
            )
        )
    return _render(("tenant", "route", "model", "judged", "avg score", "feedback", "pass"), body, 3)


def table(rows: dict[str, list[dict[str, Any]]]) -> str:
    """Per tenant, route and model: calls, errors, p95, tokens and cost, summed over buckets."""
    merged: dict[tuple[str, str, str], dict[str, Any]] = defaultdict(
        lambda: {"calls": 0, "errors": 0, "p95": None, "tokens": 0, "cost": 0.0}
    )
    for tenant, tenant_rows in rows.items():
        for row in tenant_rows:
            line = merged[(tenant, row["route"], row["model"])]
            line["calls"] += row["requests"]
            line["errors"] += row["errors"]
            # A demo across midnight has two daily buckets; the larger p95 is the honest one.
            if row["p95_latency_ms"] is not None:
                line["p95"] = max(line["p95"] or 0.0, row["p95_latency_ms"])
            line["tokens"] += row["prompt_tokens"] + row["completion_tokens"]
            line["cost"] += row["estimated_cost_usd"]
    header = ("tenant", "route", "model", "calls", "errors", "p95 ms", "tokens", "cost USD")
    body = [
        (
            tenant,
            route,
            model,
            str(line["calls"]),
            str(line["errors"]),
            "-" if line["p95"] is None else f"{line['p95']:.0f}",
            str(line["tokens"]),
            f"{line['cost']:.4f}",
        )
        for (tenant, route, model), line in sorted(merged.items())
    ]
    return _render(header, body, numeric_from=3)


def _render(header: tuple[str, ...], body: list[tuple[str, ...]], numeric_from: int) -> str:
    """A plain-text table: text columns left-aligned, numbers (from ``numeric_from``) right."""
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]

    def render(cells: tuple[str, ...]) -> str:
        return "  ".join(
            cell.rjust(width) if i >= numeric_from else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(cells) for cells in body)])


@contextmanager
def local_stack(local: Path) -> Iterator[dict[str, str]]:
    """``just up`` for the demo; on the way out, ``just down`` for what it started itself."""
    started_here = not (
        (os.environ.get("KAFKA_BROKERS") and os.environ.get("POSTGRES_DSN"))
        or stack.Broker.running(local / "broker")
        or stack.Postgres.running(local / "postgres")
    )
    env = stack.up(local)
    try:
        yield env
    finally:
        if started_here:
            stack.down(local)


def _stop_on_sigterm() -> None:
    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run(config: DemoConfig) -> None:
    logs = config.local / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"starting the broker and Postgres under {config.local} ...", flush=True)
    with local_stack(config.local) as stack_env:
        dsn = stack_env["POSTGRES_DSN"]
        tenants = traffic.tenant_names(config.tenants)
        keys = create_demo_keys(dsn, tenants)
        sliced = sorted(tenants)[0]
        sliced_from = set_demo_dimensions(dsn, sliced, config.window_seconds)
        print(
            f"{sliced} slices its calls by {', '.join(DEMO_DIMENSIONS)} from {sliced_from.isoformat()} "
            f"(just dimensions {sliced} …)",
            flush=True,
        )
        try:
            _run_services(config, stack_env, logs, keys, sliced, sliced_from)
        finally:
            revoke_demo_keys(dsn, keys)


def _print_keys(keys: dict[str, TenantKeys]) -> None:
    width = max(len(tenant) for tenant in keys)
    print("auth: on; API keys created for the demo (revoked when it stops):", flush=True)
    for tenant, tenant_keys in keys.items():
        print(f"  {tenant:<{width}}  ingest {tenant_keys.ingest.prefix}…  read {tenant_keys.read.prefix}…")


def _run_services(
    config: DemoConfig,
    stack_env: dict[str, str],
    logs: Path,
    keys: dict[str, TenantKeys],
    sliced: str,
    sliced_from: datetime,
) -> None:
    ingestion_port = port_or_free(config.ingestion_port)
    metrics_port = port_or_free(config.metrics_port)
    env = {
        **os.environ,
        **stack_env,
        # On whatever the caller's environment says: the demo shows the real thing.
        "AUTH": "on",
        "WINDOW_SECONDS": str(config.window_seconds),
        "GRACE_SECONDS": str(config.grace_seconds),
        # The demo's webhook receiver listens on loopback, which alerts may not reach otherwise.
        "ALERT_WEBHOOK_ALLOW": "127.0.0.1",
    }
    env.pop("HTTP_PORT", None)
    python = sys.executable
    services = [
        Service(
            "ingestion API",
            [
                python,
                "-m",
                "uvicorn",
                "api.ingestion:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(ingestion_port),
                "--no-access-log",
            ],
            logs / "ingestion.log",
        ),
        Service(
            "dataflow",
            [python, "-m", "dataflows.run", "--recovery-dir", str(config.local / "recovery"), "--reset"],
            logs / "processor.log",
        ),
        Service(
            "query API",
            [
                python,
                "-m",
                "uvicorn",
                "api.query:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(metrics_port),
                "--no-access-log",
            ],
            logs / "metrics-api.log",
        ),
        Service("alert service", [python, "-m", "dataflows.alert_service"], logs / "alerts.log"),
        Service("retention", [python, "-m", "schemas.retention", "--every", "3600"], logs / "retention.log"),
    ]
    ingestion_url = f"http://127.0.0.1:{ingestion_port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}"
    receiver = WebhookReceiver(secret=DEMO_WEBHOOK_SECRET).start()
    manage: NewKey | None = None
    alerting = sorted(keys)[0]
    try:
        for service in services:
            service.start(env)
        print(
            f"started the ingestion API ({ingestion_url}), the dataflow "
            f"({config.window_seconds}s windows), the query API ({metrics_url}) and the alert "
            f"service; logs in {logs}",
            flush=True,
        )
        wait_ready(ingestion_url, services)
        wait_ready(metrics_url, services)
        _print_keys(keys)
        manage = create_demo_rule(
            stack_env["POSTGRES_DSN"], metrics_url, alerting, receiver.url, config.window_seconds
        )
        spike = traffic.Spike(
            alerting,
            min(SPIKE_WINDOW_SHARE * config.window_seconds, 0.75 * config.duration),
            SPIKE_ERROR_SHARE,
        )
        print(
            f"alert rule 'error spike': {alerting}'s error rate over a minute above "
            f"{DEMO_ALERT_THRESHOLD:.0%}, delivered to {receiver.url}; {alerting}'s calls all fail "
            f"for the first {spike.seconds:g}s",
            flush=True,
        )
        # Windows are selected by start; the one holding the first call starts here.
        since = datetime.fromtimestamp(int(time.time()) // config.window_seconds * config.window_seconds, UTC)
        # The dimensions apply from a window boundary: the traffic starts there, so that
        # every call of the demo is sliced.
        wait = sliced_from.timestamp() - time.time()
        if wait > 0:
            print(f"waiting {wait:.1f}s for {sliced}'s dimensions to apply ...", flush=True)
            time.sleep(wait)
            since = sliced_from
        print(
            f"sending {config.rate:g} calls/s for {config.duration:g}s across {config.tenants} tenants ...",
            flush=True,
        )
        started = time.monotonic()
        totals = traffic.run(
            ingestion_url,
            config.rate,
            config.duration,
            list(keys),
            api_keys={tenant: tenant_keys.ingest.key for tenant, tenant_keys in keys.items()},
            progress=traffic.bar_progress(config.duration),
            evaluation_delay=config.evaluation_delay,
            spike=spike,
        )
        if sys.stderr.isatty():
            print(file=sys.stderr)  # ends the progress line
        print(traffic.summary(totals, config.duration, time.monotonic() - started), flush=True)
        deadline = time.monotonic() + config.window_seconds + config.grace_seconds + COUNT_SLACK_SECONDS
        read_keys = {tenant: tenant_keys.read.key for tenant, tenant_keys in keys.items()}
        rows = wait_counted(metrics_url, dict(totals.calls_by_tenant), read_keys, since, deadline, services)
        print()
        print(table(rows))
        print()
        deadline = time.monotonic() + config.window_seconds + config.grace_seconds + COUNT_SLACK_SECONDS
        evaluated = dict(totals.evaluations_by_tenant)
        scored = wait_counted(metrics_url, evaluated, read_keys, since, deadline, services, EVALUATIONS)
        print("quality: the judge's average score and the users' pass share, per route and model")
        print(quality_table(scored))
        print()
        example = sorted(totals.calls_by_tenant)[0]
        if example == sliced:
            print(f"{example}'s calls by its dimensions (set from {sliced_from.isoformat()}):")
            for dimension in DEMO_DIMENSIONS:
                values = fetch_dimension(metrics_url, example, dimension, since, read_keys[example])
                print(dimension_table(dimension, values))
                print()
        header = f"-H 'Authorization: Bearer {keys[example].read.key}'"
        print(f"Query it yourself with {example}'s read key, per window or rolled up:")
        print(f"  curl -s {header} '{metrics_url}/v1/metrics?tenant_id={example}&limit=5'")
        print(f"  curl -s {header} '{metrics_url}/v1/metrics?tenant_id={example}&bucket=1h&group_by=model'")
        print(f"  curl -s {header} '{metrics_url}/v1/evaluations?tenant_id={example}&name=judge&bucket=1h'")
        if example == sliced:
            print(
                f"  curl -s {header} "
                f"'{metrics_url}/v1/metrics?tenant_id={example}&dimension={DEMO_DIMENSIONS[-1]}&bucket=1h'"
            )
        print(f"  the API's description, with the same key: {metrics_url}/openapi.json")
        print(f"Alerts received by {receiver.url} (GET /v1/alerts?tenant_id={alerting} lists them):")
        print_alerts(receiver, wait_for_firing=config.window_seconds + config.grace_seconds + 30)
        print(f"\nThe dashboard: {metrics_url}/dashboard")
        print(f"  paste {example}'s read key there: {keys[example].read.key}", flush=True)
        if config.exit_after_table:
            return
        print(
            f"\nthe services keep running; more traffic with {example}'s ingest key:\n"
            f"  python -m deploy.traffic --url {ingestion_url} "
            f"--api-key {example}={keys[example].ingest.key}\n"
            "Ctrl-C stops everything",
            flush=True,
        )
        try:
            while True:
                for service in services:
                    service.check_alive()
                print_alerts(receiver)
                time.sleep(1.0)
        except KeyboardInterrupt:
            print(file=sys.stderr)  # Ctrl-C is how this phase ends: not a failure
    finally:
        print("stopping the services ...", flush=True)
        for service in services:
            service.stop()
        receiver.shutdown()
        if manage is not None:
            revoke_manage_key(stack_env["POSTGRES_DSN"], manage)


def main() -> int:
    _stop_on_sigterm()
    try:
        config = DemoConfig.from_env()
        run(config)
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
        return 130
    except (DemoError, traffic.SendError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
