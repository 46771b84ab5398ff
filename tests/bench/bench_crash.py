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

from tests.bench.stack import local_stack
from tests.support.crash import CrashRun, run

CALLS = 50_000
KILLS = 6
POSTING_SECONDS = 60.0


def _once(kills: int, seed: int) -> CrashRun:
    with local_stack("streamlens-bench-crash-") as (work, broker, postgres):
        return run(work, broker.address, postgres.dsn, CALLS, kills, POSTING_SECONDS, seed)


def main() -> None:
    seed = random.randrange(2**32)
    crashed = _once(KILLS, seed)
    baseline = _once(0, seed)
    print(
        f"{crashed.calls:,} calls, {crashed.events:,} events posted over "
        f"{crashed.posting_seconds:.1f} s; seed {seed}"
    )
    print(
        f"kill -9 x{KILLS} at {crashed.kills} s: every row exact, revisions never down; "
        f"exact {crashed.settle_seconds:.1f} s after the last event, "
        f"{crashed.emissions:,} llm.metrics records for {crashed.windows} windows"
    )
    print(
        f"baseline, no kill (same run): exact {baseline.settle_seconds:.1f} s after the last "
        f"event, {baseline.emissions:,} llm.metrics records"
    )


if __name__ == "__main__":
    main()
