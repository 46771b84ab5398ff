"""Alerts: how long after a window ends its alerts reach their webhook, in a live run.

A broker, a Postgres, the processor and the alert service of their own, at the
defaults a user runs (60 s windows, ``GRACE_SECONDS`` 10): calls of 100 tenants (two
routes each) are produced at 10,000 a second, stamped with the wall clock as they
are sent, while 1,000 rules — ten a tenant, on every kind of metric, some on one
route — breach in every window and, with ``repeat_seconds`` 60, are told in every
window (a firing, then reminders). A receiver in this process notes when each
delivery arrives: that minus the window's end is the figure (target ≤
``GRACE_SECONDS`` + 5 s). The same-run reference is when the window's first row
was on ``llm.metrics`` (published right after Postgres took it), the least any
alert can take; only windows that started after the traffic did count.

``python -m tests.bench.bench_alerts [--rate 10000] [--seconds 200] [--tenants 100] [--rules 10]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import msgspec
import psutil
import psycopg

from deploy.receiver import Alert, WebhookReceiver
from schemas.alert_rules import create_rule
from schemas.alerts import RuleBody
from tests.bench.bench_freshness import records_with_time, send_calls
from tests.bench.stack import local_stack
from tests.support import dataflow as h
from tests.support.stacks import TEST_PARTITIONS

RATE = 10_000
SECONDS = 200.0
TENANTS = 100
RULES_PER_TENANT = 10
GRACE = 10  # GRACE_SECONDS's default, which the run keeps
TARGET = GRACE + 5
SECRET = "bench-secret-0123456789"
# What the rules watch: each breaches in every window of live traffic.
CONDITIONS = [
    ("calls", ">", 0),
    ("errors", ">=", 0),
    ("error_rate", ">=", 0),
    ("timeout_rate", ">=", 0),
    ("p50_latency_ms", ">", 0),
    ("p99_latency_ms", ">", 0),
    ("estimated_cost_usd", ">=", 0),
    ("prompt_tokens", ">", 0),
    ("completion_tokens", ">", 0),
    ("calls", ">=", 1),
]


def percentile(values: list[float], share: float) -> float:
    return values[min(len(values) - 1, int(share * len(values)))]


async def make_rules(dsn: str, tenants: int, per_tenant: int, url: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for tenant in range(tenants):
            for number in range(per_tenant):
                metric, op, threshold = CONDITIONS[number % len(CONDITIONS)]
                body = {
                    "tenant_id": f"tenant-{tenant}",
                    "name": f"rule {number}",
                    "metric": metric,
                    "op": op,
                    "threshold": threshold,
                    "span_seconds": 60,
                    "repeat_seconds": 60,
                    "webhook_url": url,
                    "webhook_secret": SECRET,
                    **({"route": "/route-0"} if number % 3 == 0 else {}),
                }
                await create_rule(conn, msgspec.convert(body, RuleBody))
    return tenants * per_tenant


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_alerts")
    parser.add_argument("--rate", type=int, default=RATE, help="calls per second")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="of traffic")
    parser.add_argument("--tenants", type=int, default=TENANTS)
    parser.add_argument("--rules", type=int, default=RULES_PER_TENANT, help="rules per tenant")
    args = parser.parse_args(argv if argv is not None else [])
    run(args.rate, args.seconds, args.tenants, args.rules)


def run(rate: int, seconds: float, tenants: int, per_tenant: int) -> None:
    keys = [(f"tenant-{n}", f"/route-{r}", "test-model-a") for n in range(tenants) for r in range(2)]
    receiver = WebhookReceiver(secret=SECRET).start()
    with local_stack("streamlens-bench-alerts-") as (directory, broker, postgres):
        rules = asyncio.run(make_rules(postgres.dsn, tenants, per_tenant, receiver.url))
        processor = h.Processor(
            broker.address,
            postgres.dsn,
            directory / "recovery",
            h.write_prices(directory / "prices.json"),
            directory / "dataflow.log",
            settings={},
        ).start()
        environ = {
            **os.environ,
            "KAFKA_BROKERS": broker.address,
            "POSTGRES_DSN": postgres.dsn,
            "TOPIC_PARTITIONS": str(TEST_PARTITIONS),
            "ALERT_WEBHOOK_ALLOW": "127.0.0.1",
        }
        with open(directory / "alerts.log", "ab") as log:
            service = subprocess.Popen(
                [sys.executable, "-m", "dataflows.alert_service"],
                env=environ,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[2],
            )
        try:
            time.sleep(3)  # the services' start is not what is measured
            started = time.time()
            sent = send_calls(broker.address, rate, seconds, keys)
            sending = time.time() - started
            time.sleep(60 + GRACE + 15)  # the last window closes on the wall clock, then its alerts
            processor.check_alive()
            assert service.poll() is None, (directory / "alerts.log").read_text()[-3000:]
            cpu = psutil.Process(service.pid).cpu_times()
        finally:
            service.terminate()
            service.wait(30)
            processor.stop()
        first_row: dict[str, float] = {}
        for _key, value, _partition, _offset, stamp in records_with_time(broker.address):
            row = json.loads(value)
            end = datetime.fromisoformat(row["window_end"]).timestamp()
            first_row[row["window_start"]] = min(first_row.get(row["window_start"], stamp - end), stamp - end)
    receiver.shutdown()
    alerts: list[Alert] = []
    while True:
        try:
            alerts.append(receiver.alerts.get_nowait())
        except queue.Empty:
            break
    per_window: dict[str, int] = defaultdict(int)
    delays = []
    for alert in alerts:
        start = datetime.fromisoformat(alert.body["window_start"]).timestamp()
        if start < started or alert.repeat:
            continue
        per_window[alert.body["window_start"]] += 1
        delays.append(alert.received_at - datetime.fromisoformat(alert.body["window_end"]).timestamp())
    delays.sort()
    rows = sorted(
        delay for start, delay in first_row.items() if datetime.fromisoformat(start).timestamp() >= started
    )
    wrong = sum(alert.signed is False for alert in alerts)
    print(
        f"{sent:,} calls at {rate:,}/s for {seconds:.0f} s (sent at {sent / sending:,.0f}/s), "
        f"{len(keys)} keys of {tenants} tenants; {rules:,} rules told in every window; "
        f"60 s windows, GRACE_SECONDS {GRACE}"
    )
    print(
        f"whole windows: {len(per_window)}, transitions delivered in each: "
        f"{', '.join(str(count) for _, count in sorted(per_window.items()))} (of {rules:,}); "
        f"{len(alerts) - len(delays)} other deliveries (partial windows, repeats); {wrong} bad signatures"
    )
    if delays:
        print(
            f"window end → webhook received: median {statistics.median(delays):.2f} s, "
            f"p99 {percentile(delays, 0.99):.2f} s, max {delays[-1]:.2f} s (target ≤ {TARGET} s)"
        )
    if rows:
        print(
            f"reference, window end → first row on llm.metrics: median {statistics.median(rows):.2f} s, "
            f"p99 {percentile(rows, 0.99):.2f} s"
        )
    print(f"alert service CPU: {cpu.user + cpu.system:.1f} s over {sending + 60 + GRACE + 15:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
