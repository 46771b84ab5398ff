"""The demo, shortened, end to end: its own stack, the three services, traffic, the table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from deploy.stack import Broker, Postgres

TENANTS = ("acme", "globex", "initech")


def table_calls(output: str) -> dict[str, int]:
    """Calls per tenant, summed from the printed table's ``calls`` column."""
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["tenant", "route",
                                                                              "model"])
    calls: dict[str, int] = {}
    for line in lines[header + 2:]:
        if not line.strip():
            break
        cells = line.split()
        calls[cells[0]] = calls.get(cells[0], 0) + int(cells[3])
    return calls


def test_demo_counts_every_tenants_calls_and_stops_everything(tmp_path: Path):
    local = tmp_path / "local"
    env = {key: value for key, value in os.environ.items()
           if key not in ("KAFKA_BROKERS", "POSTGRES_DSN", "HTTP_PORT")}
    env |= {"DEMO_LOCAL": str(local), "DEMO_EXIT": "1", "DEMO_DURATION": "4",
            "DEMO_RATE": "25", "DEMO_TENANTS": str(len(TENANTS)),
            "DEMO_INGESTION_PORT": "0", "DEMO_METRICS_PORT": "0"}
    done = subprocess.run([sys.executable, "-m", "deploy.demo"], env=env, capture_output=True,
                          text=True, timeout=150, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    sent = dict(re.findall(r"(\w+) (\d+)", done.stdout.split("calls per tenant:")[1]
                           .splitlines()[0]))
    assert set(sent) == set(TENANTS)
    counted = table_calls(done.stdout)
    for tenant in TENANTS:
        assert counted.get(tenant, 0) > 0, done.stdout
        # Each call generated is counted once by the pipeline: nothing lost, nothing twice.
        assert counted[tenant] == int(sent[tenant]), (tenant, done.stdout)
    assert "curl -s 'http://127.0.0.1:" in done.stdout

    assert {path.name for path in (local / "logs").iterdir()} == {
        "ingestion.log", "processor.log", "metrics-api.log"}
    assert Broker.running(local / "broker") is None
    assert Postgres.running(local / "postgres") is None
    assert not (local / "env").exists()
