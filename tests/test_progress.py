"""Reading in step: which partition may hand over what (pure logic, a clock of the test's own)."""

from __future__ import annotations

import math

from dataflows.progress import ReadProgress

A, B, C = ("llm.requests", 0), ("llm.responses", 0), ("llm.responses", 1)
NOW = 1_000_000.0
LIVE = NOW  # records appended just now
OLD = NOW - 3600  # a backlog's records


def progress(*parts: tuple[str, int]) -> ReadProgress:
    board = ReadProgress(read_ahead=2.0, idle_after=0.5, backlog_idle_after=2.0)
    for part in parts:
        board.register(part, NOW)
    return board


def test_a_partition_not_read_yet_holds_the_others_back_until_it_is_idle() -> None:
    board = progress(A, B)
    # B has not delivered anything yet: A may hand over nothing ...
    assert board.limit(A, NOW) == -math.inf
    # ... until B has stayed empty as long as a backlog's fetch may take.
    board.polled(B, None, NOW + 1.9)
    assert board.limit(A, NOW + 1.9) == -math.inf
    assert board.limit(A, NOW + 2.1) == math.inf


def test_a_busy_partition_bounds_the_others_at_where_it_stands_plus_read_ahead() -> None:
    board = progress(A, B, C)
    for part, at in ((A, 100.0), (B, 40.0), (C, 70.0)):
        board.polled(part, LIVE, NOW)
        board.stands_at(part, at)
    assert board.limit(A, NOW) == 42.0  # B is furthest behind
    assert board.limit(B, NOW) == 72.0  # C, for B itself
    # Reading live traffic, B and C go idle half a second after their last records.
    assert board.limit(A, NOW + 0.6) == math.inf
    board.polled(C, LIVE + 0.6, NOW + 0.6)
    assert board.limit(A, NOW + 0.6) == 72.0


def test_a_partition_reading_a_backlog_is_not_idle_after_one_empty_moment() -> None:
    board = progress(A, B)
    board.polled(A, OLD, NOW)
    board.stands_at(A, 100.0)
    board.polled(B, OLD, NOW)
    board.stands_at(B, 10.0)
    # B's next fetch takes a second: it still holds A back.
    assert board.limit(A, NOW + 1.0) == 12.0
    assert board.limit(A, NOW + 2.1) == math.inf


def test_the_partition_holding_the_earliest_record_can_always_go_on() -> None:
    # Each holds a record far ahead of what the other handed over; the one whose
    # next record is earliest is bounded by the other's next record, so it proceeds.
    board = progress(A, B)
    board.polled(A, OLD, NOW)
    board.polled(B, OLD, NOW)
    board.stands_at(A, 500.0)  # A's next record
    board.stands_at(B, 900.0)  # B's next record
    assert board.limit(A, NOW) >= 500.0
    assert board.limit(B, NOW) < 900.0


def test_a_partition_that_reached_its_end_without_records_holds_nobody_back_at_once() -> None:
    # B's first fetch found B empty: nothing is on its way, no need to wait out the backlog's time.
    board = progress(A, B)
    board.polled(A, OLD, NOW)
    board.stands_at(A, 100.0)
    board.polled(B, None, NOW + 0.1)
    assert board.limit(A, NOW + 0.1) == -math.inf
    board.reached_end(B, NOW + 0.1)
    assert board.limit(A, NOW + 0.1) == math.inf
    # Records appended to B later make it busy again, where it stands.
    board.polled(B, OLD, NOW + 0.5)
    board.stands_at(B, 50.0)
    assert board.limit(A, NOW + 0.5) == 52.0


def test_the_end_of_a_backlog_makes_a_partition_idle_at_once() -> None:
    board = progress(A, B)
    for part, at in ((A, 100.0), (B, 10.0)):
        board.polled(part, OLD, NOW)
        board.stands_at(part, at)
    assert board.limit(A, NOW + 0.2) == 12.0
    board.reached_end(B, NOW + 0.2)
    assert board.limit(A, NOW + 0.2) == math.inf


def test_a_partition_reading_live_traffic_keeps_its_short_wait_at_its_end() -> None:
    # Live records may be appended any moment: the end says nothing is on its way only for now.
    board = progress(A, B)
    for part, at in ((A, 100.0), (B, 10.0)):
        board.polled(part, LIVE, NOW)
        board.stands_at(part, at)
    board.reached_end(B, NOW + 0.1)
    assert board.limit(A, NOW + 0.1) == 12.0
    assert board.limit(A, NOW + 0.6) == math.inf
