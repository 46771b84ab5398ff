"""The watermark: event time that never goes back and idles with the wall clock."""

from __future__ import annotations

import math
import pickle

from hypothesis import given
from hypothesis import strategies as st

from dataflows.clock import Watermark

NOW = 1_900_000_000.0


def test_it_starts_before_every_event() -> None:
    assert Watermark().current(NOW) == -math.inf


def test_it_is_the_largest_event_time_seen() -> None:
    watermark = Watermark()
    watermark.observe(100.0, NOW)
    watermark.observe(90.0, NOW)  # an older event does not move it back
    assert watermark.current(NOW) == 100.0
    watermark.observe(120.0, NOW)
    assert watermark.current(NOW) == 120.0


def test_it_advances_with_the_wall_clock_while_quiet() -> None:
    watermark = Watermark()
    watermark.observe(100.0, NOW)
    assert watermark.current(NOW + 30) == 130.0
    # An event older than the idled time does not pull it back either.
    watermark.observe(110.0, NOW + 30)
    assert watermark.current(NOW + 30) == 130.0
    assert watermark.current(NOW + 35) == 135.0


def test_a_newer_event_restarts_the_quiet_time() -> None:
    watermark = Watermark()
    watermark.observe(100.0, NOW)
    watermark.observe(500.0, NOW + 10)
    assert watermark.current(NOW + 10) == 500.0
    assert watermark.current(NOW + 12) == 502.0


def test_a_wall_clock_going_back_does_not_move_it_back() -> None:
    watermark = Watermark()
    watermark.observe(100.0, NOW)
    assert watermark.current(NOW - 50) == 100.0


def test_a_snapshot_keeps_event_time_and_not_the_downtime() -> None:
    watermark = Watermark()
    watermark.observe(100.0, NOW)
    watermark.current(NOW + 20)
    restored = pickle.loads(pickle.dumps(watermark))
    # Resumed an hour later: idle time counts from the resume, not from the crash.
    later = NOW + 3600
    assert restored.current(later) == 100.0
    assert restored.current(later + 5) == 105.0
    assert len(pickle.dumps(watermark)) < 64


@given(st.lists(st.tuples(st.floats(0, 1e6), st.floats(0, 100)), min_size=1, max_size=50))
def test_it_never_goes_back(steps: list[tuple[float, float]]) -> None:
    watermark = Watermark()
    now, last = NOW, -math.inf
    for event_time, pause in steps:
        now += pause
        watermark.observe(event_time, now)
        current = watermark.current(now)
        assert current >= last
        assert current >= event_time
        last = current
