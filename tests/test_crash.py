"""kill -9 at moments the test does not choose: the final rows are still exact.

Calls are posted through the ingestion API in shuffled batches while the processor
(`python -m dataflows.run` with its defaults, as `just processor` runs it) is killed
with SIGKILL at moments drawn at random (seeded; the seed and the moments are
printed) and started again at once. No barrier, no sleep waiting for a snapshot:
the kills land wherever they land. The final Postgres rows must equal a
computation of the test's own, field by field; on ``llm.metrics`` a key's revision
never decreases and its highest revision equals the Postgres row.

``STREAMLENS_CRASH_SEED`` repeats a run; ``just bench crash`` makes a larger one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.support.crash import Dimensions, run
from tests.support.stacks import Broker

pytestmark = pytest.mark.slow

CALLS = 10_000
KILLS = 3
POSTING_SECONDS = 30.0  # the batches are spread over this long


def test_kill_9_with_dimensions_gives_exact_dimension_rows(
    tmp_path: Path, broker: Broker, postgres_dsn: str
) -> None:
    """Three dimensions for every tenant (one of them from the responses, one with hundreds of
    values), one tenant switching to others at a recorded boundary, few values a window so
    that most windows merge some into "(other)": every dimension row, in Postgres and on
    ``llm.dimension-metrics``, equals the test's own computation; so does every evaluation
    row per dimension value. A short join timeout and responses held back make timeouts
    that their answers replace, moving the calls (and their evaluations) to their
    ``finish_reason``."""
    seed = int(os.environ.get("STREAMLENS_CRASH_SEED", str(random.randrange(2**32))))
    dimensions = Dimensions(
        default=("metadata.country", "finish_reason", "user"),
        values=8,
        tenant="globex",
        own=("metadata.experiment", "metadata.beta", "metadata.shard", "metadata.country"),
    )
    run(
        tmp_path,
        broker.address,
        postgres_dsn,
        CALLS // 2,
        KILLS,
        POSTING_SECONDS / 2,
        seed,
        dimensions,
        evaluations=True,
        join_timeout=20,
    )


def test_kill_9_at_random_moments_gives_exact_rows(tmp_path: Path, broker: Broker, postgres_dsn: str) -> None:
    seed = int(os.environ.get("STREAMLENS_CRASH_SEED", str(random.randrange(2**32))))
    run(tmp_path, broker.address, postgres_dsn, CALLS, KILLS, POSTING_SECONDS, seed)
