"""kill -9 at random moments at a larger size than the suite's crash test.

50,000 calls (about 100,000 events, shuffled, with client retries) are posted
through the ingestion API over 60 s while the processor, run with its defaults,
is killed with SIGKILL six times at moments drawn from a random seed (printed).
Every final row is checked against an independent computation, as in
``tests/test_crash.py``. The baseline, in the same run, is the same data posted
the same way with no kill: how long the rows take to be exact after the last
event, and how many rows ``llm.metrics`` carries.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from deploy.stack import Broker, Postgres
from schemas.database import ensure_schema
from schemas.topics import ensure_topics
from tests.conftest import TEST_PARTITIONS
from tests.test_crash import CrashRun, run

CALLS = 50_000
KILLS = 6
POSTING_SECONDS = 60.0


def _once(work: Path, kills: int, seed: int) -> CrashRun:
    broker = Broker(work / "broker").start()
    postgres = Postgres(work / "postgres").start()
    try:
        ensure_topics(broker.address, TEST_PARTITIONS)
        ensure_schema(postgres.dsn)
        return run(work, broker.address, postgres.dsn, CALLS, kills, POSTING_SECONDS, seed)
    finally:
        broker.stop()
        postgres.stop()


def main() -> None:
    seed = random.randrange(2**32)
    with tempfile.TemporaryDirectory(prefix="streamlens-bench-crash-") as work:
        crashed = _once(Path(work) / "crashed", KILLS, seed)
        baseline = _once(Path(work) / "baseline", 0, seed)
    print(f"{crashed.calls:,} calls, {crashed.events:,} events posted over "
          f"{crashed.posting_seconds:.1f} s; seed {seed}")
    print(f"kill -9 x{KILLS} at {crashed.kills} s: every row exact, revisions never down; "
          f"exact {crashed.settle_seconds:.1f} s after the last event, "
          f"{crashed.emissions:,} llm.metrics records for {crashed.windows} windows")
    print(f"baseline, no kill (same run): exact {baseline.settle_seconds:.1f} s after the last "
          f"event, {baseline.emissions:,} llm.metrics records")


if __name__ == "__main__":
    main()
