"""A restarted local broker is a new, empty broker: the processor never resumes into it silently.

`just up` → processor → events → `just down` → `just up` → processor → new events,
with the commands the justfile runs (``python -m deploy.stack``, ``python -m
dataflows.run``). The new rows must be exact, the old ones intact, and what the
processor says about its recovery state must be plain. Recovery state of the old
broker put back in place is refused with one line, and so is state whose topics
were deleted and created again.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from schemas.topics import REQUESTS, RESPONSES, ensure_topics
from tests.support import dataflow as h
from tests.support.stacks import TEST_PARTITIONS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _stack(action: str, local: Path, dsn: str) -> str:
    env = {**os.environ, "POSTGRES_DSN": dsn, "TOPIC_PARTITIONS": str(TEST_PARTITIONS)}
    env.pop("KAFKA_BROKERS", None)
    done = subprocess.run(
        [sys.executable, "-m", "deploy.stack", action, "--local", str(local)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def _brokers(local: Path) -> str:
    values = dict(line.split("=", 1) for line in (local / "env").read_text().splitlines())
    return values["KAFKA_BROKERS"]


def _count_calls(
    log: Path, local: Path, dsn: str, prices: Path, calls: tuple[list[h.Event], list[h.Counted]]
) -> tuple[dict, str]:
    """A processor with `just processor`'s recovery directory, run until ``calls`` are rows:
    their expected rows, and what it logged."""
    events, counted = calls
    processor = h.Processor(
        _brokers(local), dsn, local / "recovery", prices, log, settings=h.SHORT_GRACE_SETTINGS
    ).start()
    h.produce(processor.brokers, events)
    expected = h.expected_rows_of(counted)
    try:
        h.wait_for_rows(processor, dsn, expected)
    finally:
        processor.stop()
    return expected, log.read_text()


def _refusal(log: Path, local: Path, dsn: str, prices: Path, recovery_dir: Path) -> str:
    """The one line of a processor that refuses ``recovery_dir`` (and exits 2)."""
    refused = h.Processor(_brokers(local), dsn, recovery_dir, prices, log).start()
    assert refused.process is not None and refused.process.wait(60) == 2
    [line] = [ln for ln in log.read_text().splitlines() if "recovery:" in ln]
    return line


def test_a_restarted_local_broker_gets_fresh_recovery_and_old_state_is_refused(
    tmp_path: Path, postgres_dsn: str
) -> None:
    rng = random.Random(11)
    local = tmp_path / "local"
    prices = h.write_prices(tmp_path / "prices.json")
    _stack("up", local, postgres_dsn)
    try:
        old_expected, said = _count_calls(
            tmp_path / "first.log", local, postgres_dsn, prices, h.answered_calls(rng, "before", h.BASE, 200)
        )
        assert "recovery: new state" in said
        kept = tmp_path / "old-recovery"
        shutil.copytree(local / "recovery", kept)

        _stack("down", local, postgres_dsn)
        said = _stack("up", local, postgres_dsn)
        assert "dropped the processor's recovery state" in said
        new_expected, said = _count_calls(
            tmp_path / "second.log",
            local,
            postgres_dsn,
            prices,
            h.answered_calls(rng, "after", h.BASE + 60, 150),
        )
        assert "recovery: new state" in said
        made_here = tmp_path / "second-recovery"
        shutil.copytree(local / "recovery", made_here)
        h.check_rows(h.postgres_rows(postgres_dsn), {**old_expected, **new_expected})

        # The old broker's state, put back: refused, in one line, with what to do.
        shutil.rmtree(local / "recovery")
        shutil.copytree(kept, local / "recovery")
        line = _refusal(tmp_path / "refused.log", local, postgres_dsn, prices, local / "recovery")
        assert "refusing to resume" in line and "cluster" in line and "--reset" in line

        # The same broker, its input topics deleted and created again: refused too.
        admin = AdminClient({"bootstrap.servers": _brokers(local)})
        for future in admin.delete_topics([REQUESTS, RESPONSES]).values():
            future.result(10)
        ensure_topics(_brokers(local), TEST_PARTITIONS)
        line = _refusal(tmp_path / "recreated.log", local, postgres_dsn, prices, made_here)
        assert "refusing to resume" in line and "created again" in line
    finally:
        _stack("down", local, postgres_dsn)
