"""Reading in step: which partition may hand over what (pure logic, a clock of the test's own)."""

from __future__ import annotations

import math

from dataflows.progress import ReadProgress

A, B, C = ("llm.requests", 0), ("llm.responses", 0), ("llm.responses", 1)
NOW = 1_000_000.0


def progress(*parts: tuple[str, int]) -> ReadProgress:
    board = ReadProgress(read_ahead=2.0, idle_after=0.5)
    for part in parts:
        board.register(part, NOW)
    return board


def test_a_partition_never_polled_holds_the_others_back_until_it_is_idle() -> None:
    board = progress(A, B)
    # B has not delivered anything yet: A may go no further than -inf + 2 ...
    assert board.limit(A, NOW) == -math.inf
    # ... until B's poll comes back empty for longer than idle_after.
    board.polled(B, False, NOW + 0.4)
    assert board.limit(A, NOW + 0.4) == -math.inf
    assert board.limit(A, NOW + 0.6) == math.inf


def test_a_busy_partition_bounds_the_others_at_where_it_stands_plus_read_ahead() -> None:
    board = progress(A, B, C)
    for part, at in ((A, 100.0), (B, 40.0), (C, 70.0)):
        board.polled(part, True, NOW)
        board.stands_at(part, at)
    assert board.limit(A, NOW) == 42.0  # B is furthest behind
    assert board.limit(B, NOW) == 72.0  # C, for B itself
    # B goes idle (caught up): C now bounds A.
    assert board.limit(A, NOW + 0.6) == math.inf  # every other is idle by then
    board.polled(C, True, NOW + 0.6)
    assert board.limit(A, NOW + 0.6) == 72.0


def test_the_partition_holding_the_earliest_record_can_always_go_on() -> None:
    # Each holds a record far ahead of what the other handed over; the one whose
    # next record is earliest is bounded by the other's next record, so it proceeds.
    board = progress(A, B)
    board.polled(A, True, NOW)
    board.polled(B, True, NOW)
    board.stands_at(A, 500.0)  # A's next record
    board.stands_at(B, 900.0)  # B's next record
    assert board.limit(A, NOW) >= 500.0
    assert board.limit(B, NOW) < 900.0
