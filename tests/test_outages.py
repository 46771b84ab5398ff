"""Outages of Postgres and of the broker, longer than any retry budget, are waited out.

The processor runs against a Postgres server and a broker of this test's own.
Postgres is stopped for 20 s while calls keep arriving, then started again; later
the broker is frozen (SIGSTOP: a memory broker that restarted would come back
empty) for 20 s. The processor must stay up, say once per outage that it is
waiting and once that it is back, and end with exact rows. Then SIGTERM stops it
cleanly: exit 0, no traceback.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from schemas.database import ensure_schema
from tests.support import dataflow as h
from tests.support.stacks import Broker, Postgres

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 12.0  # longer than the 8.7 s over which the old sink gave up (five retries)


def test_postgres_and_broker_outages_are_waited_out(tmp_path: Path, broker: Broker) -> None:
    rng = random.Random(3)
    postgres = Postgres(tmp_path / "postgres").start()
    dsn = postgres.dsn
    ensure_schema(dsn)
    processor = h.Processor.in_directory(
        broker.address,
        dsn,
        tmp_path,
        settings=h.SHORT_GRACE_SETTINGS,
    ).start()
    counted: list[h.Counted] = []
    try:
        events, calls = h.answered_calls(rng, "before", h.BASE, 100)
        counted += calls
        h.produce(broker.address, events)
        h.wait_for_rows(processor, dsn, h.expected_rows_of(counted))

        # Postgres away: calls keep arriving, for windows already written and new ones.
        postgres.stop()
        events, calls = h.answered_calls(rng, "during-pg", h.BASE, 100)
        more, more_calls = h.answered_calls(rng, "during-pg", h.BASE + 5, 100)
        counted += calls + more_calls
        h.produce(broker.address, events + more)
        deadline = time.monotonic() + OUTAGE_SECONDS
        while time.monotonic() < deadline:
            processor.check_alive()
            time.sleep(0.5)
        postgres.start(postgres.port)
        h.wait_for_rows(processor, dsn, h.expected_rows_of(counted))

        # The broker frozen: nothing is read, written or acknowledged meanwhile.
        events, calls = h.answered_calls(rng, "during-kafka", h.BASE + 10, 100)
        counted += calls
        h.produce(broker.address, events)
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + OUTAGE_SECONDS
            while time.monotonic() < deadline:
                processor.check_alive()
                time.sleep(0.5)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        expected = h.expected_rows_of(counted)
        h.wait_for_rows(processor, dsn, expected)
        h.check_rows(h.postgres_rows(dsn), expected)
        h.check_rows(h.latest_metrics(broker.address), expected)
        assert h.dead_letters(broker.address) == []

        assert processor.process is not None
        os.kill(processor.process.pid, signal.SIGTERM)
        assert processor.process.wait(30) == 0
    finally:
        processor.stop()
        postgres.stop()
    log = processor.log.read_text(errors="replace")
    assert log.count("postgres unavailable") == 1, log[-3000:]
    assert log.count("postgres back after") == 1, log[-3000:]
    assert "Traceback" not in log and "panicked" not in log, log[-3000:]
    assert "SIGTERM: stopping after the current batch" in log  # the signal it was sent, told
