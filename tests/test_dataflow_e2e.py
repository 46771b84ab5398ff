"""The whole dataflow against a real broker and Postgres: outcome, several processes.

Crashes are in ``test_crash.py``, arrival orders and backlogs in ``test_arrival.py``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from tests.support import dataflow as h
from tests.support.stacks import Broker

pytestmark = pytest.mark.slow


def _processor(tmp_path: Path, broker: Broker, dsn: str, processes: int = 1) -> h.Processor:
    return h.Processor.in_directory(
        broker.address,
        dsn,
        tmp_path,
        processes=processes,
    )


def _run(
    tmp_path: Path, broker: Broker, dsn: str, processes: int = 1, on_step=None
) -> tuple[h.DataSet, h.Scenario]:
    data = h.generate()
    processor = _processor(tmp_path, broker, dsn, processes).start()
    scenario = h.Scenario(data, processor, broker.address, dsn)
    if on_step is not None:
        scenario.on_step = lambda step: on_step(scenario, step)
    try:
        scenario.run()
    finally:
        scenario.processor.stop()
    return data, scenario


def _check_outputs(
    data: h.DataSet, scenario: h.Scenario, broker: Broker, dsn: str, exact_dead_letters: bool
) -> None:
    expected = h.expected_rows(data)
    h.check_rows(h.postgres_rows(dsn), expected)
    h.check_rows(h.latest_metrics(broker.address), expected)
    h.check_dead_letters(data, h.dead_letters(broker.address), scenario.markers, exact=exact_dead_letters)


def test_end_to_end_rows_and_dead_letters(tmp_path: Path, broker: Broker, postgres_dsn: str) -> None:
    data, scenario = _run(tmp_path, broker, postgres_dsn)
    _check_outputs(data, scenario, broker, postgres_dsn, exact_dead_letters=True)
    # Each emission is one llm.metrics record: first rows, then one per later update.
    records = h.records_on(broker.address, h.METRICS)
    assert len(records) >= len(h.expected_rows(data))


def test_two_processes_give_the_same_rows(tmp_path: Path, broker: Broker, postgres_dsn: str) -> None:
    data, scenario = _run(tmp_path, broker, postgres_dsn, processes=2)
    _check_outputs(data, scenario, broker, postgres_dsn, exact_dead_letters=True)


def test_sigterm_stops_the_runner_and_its_processes(
    tmp_path: Path, broker: Broker, postgres_dsn: str
) -> None:
    processor = _processor(tmp_path, broker, postgres_dsn, processes=2).start()
    try:
        # Running for real: invalid records come back as dead letters.
        h.Scenario(h.generate(calls=10), processor, broker.address, postgres_dsn).barrier()
        assert processor.process is not None
        children = psutil.Process(processor.process.pid).children(recursive=True)
        assert len(children) >= 2
        os.kill(processor.process.pid, signal.SIGTERM)  # the runner only, not its group
        assert processor.process.wait(20) == 0
        _gone, alive = psutil.wait_procs(children, timeout=5)
        assert alive == []
    finally:
        processor.stop()
