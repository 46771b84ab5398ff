"""A frozen Postgres is noticed, logged and waited out, as a stopped one is.

Every process of the test's own Postgres is stopped with SIGSTOP: its kernel still
accepts connections and acknowledges what is sent, but nothing answers, and no
connection breaks. The processor runs with its default timeouts
(:mod:`dataflows.connections`): the rows sink's write in flight must time out, the
outage be logged once when it starts (while the server is still frozen) and once
when it ends (after SIGCONT), and the rows end exact, in Postgres and on
``llm.metrics``.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from dataflows import connections
from schemas.database import ensure_schema
from tests.support import dataflow as h
from tests.support.stacks import Broker, Postgres, signal_postgres

pytestmark = pytest.mark.slow

STARTED = "postgres unavailable, retrying until it is back"
ENDED = "postgres back after"


def test_a_frozen_postgres_is_noticed_logged_and_waited_out(
    tmp_path: Path, broker: Broker, own_postgres: Postgres
) -> None:
    rng = random.Random(11)
    dsn = own_postgres.dsn
    ensure_schema(dsn)
    processor = h.Processor.in_directory(
        broker.address,
        dsn,
        tmp_path,
        settings=h.SHORT_GRACE_SETTINGS,
    ).start()

    def log() -> str:
        return processor.log.read_text(errors="replace") if processor.log.exists() else ""

    counted: list[h.Counted] = []
    try:
        events, calls = h.answered_calls(rng, "acme", h.BASE, 100)
        counted += calls
        h.produce(broker.address, events)
        h.wait_for_rows(processor, dsn, h.expected_rows_of(counted))

        # More calls of the window just written (within its lateness, and no new window
        # to open): its row is emitted again, and the sink's write meets a frozen server.
        signal_postgres(own_postgres, signal.SIGSTOP)
        try:
            events, calls = h.answered_calls(rng, "acme", h.BASE, 100)
            counted += calls
            h.produce(broker.address, events)
            # Noticed while still frozen: after the answer timeout, not at the thaw.
            h.wait_for(
                lambda: STARTED in log(),
                connections.ANSWER_TIMEOUT_SECONDS + 30,
                "the outage logged while Postgres is frozen",
                processor.check_alive,
                processor.log_tail,
            )
        finally:
            signal_postgres(own_postgres, signal.SIGCONT)

        expected = h.expected_rows_of(counted)
        h.wait_for_rows(processor, dsn, expected)
        h.check_rows(h.postgres_rows(dsn), expected)
        h.check_rows(h.latest_metrics(broker.address), expected)
        assert h.dead_letters(broker.address) == []
        h.wait_for(lambda: ENDED in log(), 30, "the end of the outage logged", processor.check_alive)
    finally:
        processor.stop()
    text = log()
    assert text.count(STARTED) == 1, text[-3000:]
    assert f"no answer from postgres in {connections.ANSWER_TIMEOUT_SECONDS:g} s" in text, text[-3000:]
    assert text.count(ENDED) == 1, text[-3000:]
    assert "Traceback" not in text and "panicked" not in text, text[-3000:]
