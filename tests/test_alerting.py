"""The alert rules on figures (dataflows/alerting.py): when a rule fires, resolves and reminds.

Expected transitions come from a plain reading of docs/alerts.md (tests/support/expected.py) or are
worked out by hand in the test.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

import msgspec
import pytest
from fastdigest import TDigest

from dataflows.alerting import (
    Figures,
    RuleState,
    Transition,
    first_window,
    judge,
    judge_budget,
    period_of,
    value_of,
)
from schemas.alerts import AlertRule
from tests.support.expected import expected_transitions

W = 60
CREATED = datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC)
START = int(CREATED.timestamp()) - 30  # the window the rules were created in


BASE_RULE = AlertRule(
    id="rule-1",
    tenant_id="acme",
    name="errors",
    metric="error_rate",
    op=">",
    threshold=0.1,
    webhook_url="https://hooks.example.com/x",
    route=None,
    model=None,
    dimension=None,
    value=None,
    span_seconds=W,
    period=None,
    for_windows=1,
    min_calls=1,
    repeat_seconds=None,
    webhook_secret_set=False,
    created_at=CREATED,
    updated_at=CREATED,
)


def rule(**fields: object) -> AlertRule:
    return msgspec.structs.replace(BASE_RULE, **fields)


def calls(total: int, errors: int) -> Figures:
    return Figures(calls=total, errors=errors)


def seen(transitions: list[Transition]) -> list[tuple[str, int]]:
    return [(item.state, (item.window_start - START) // W) for item in transitions]


@pytest.mark.parametrize("seed", range(6))
def test_fires_after_for_windows_breaching_and_resolves_whether_judged_at_once_or_window_by_window(
    seed: int,
) -> None:
    generator = random.Random(seed)
    for_windows = generator.choice([1, 2, 3])
    the_rule = rule(for_windows=for_windows)
    count = 40
    figures = {}
    breaching = []
    for index in range(count):
        total = generator.randint(1, 50)
        errors = generator.randint(0, total // 4)
        figures[START + index * W] = calls(total, errors)
        breaching.append(errors / total > 0.1)
    want = expected_transitions(breaching, for_windows)

    all_at_once, _ = judge(the_rule, RuleState(), figures, list(figures), START + (count - 1) * W, W)
    assert seen(all_at_once) == want

    state, one_by_one = RuleState(), []
    for index in range(count):
        window = START + index * W
        known = {start: found for start, found in figures.items() if start <= window}
        found, state = judge(the_rule, state, known, [window], window, W)
        one_by_one += found
    assert seen(one_by_one) == want
    assert [item.id for item in one_by_one] == [item.id for item in all_at_once]
    assert len({item.id for item in one_by_one}) == len(one_by_one)
    assert state.firing == (bool(want) and want[-1][0] == "firing")


def test_a_late_revision_of_a_closed_window_fires_it_and_the_next_window_resolves_it() -> None:
    the_rule = rule()
    figures = {START + index * W: calls(20, 1) for index in range(6)}
    found, state = judge(the_rule, RuleState(), figures, list(figures), START + 5 * W, W)
    assert found == [] and not state.firing

    figures[START + 3 * W] = calls(21, 4)  # a late call pushed window 3 over 10 %
    found, after = judge(the_rule, state, figures, [START + 3 * W], START + 5 * W, W)
    assert seen(found) == [("firing", 3), ("resolved", 4)]
    assert found[0].value == pytest.approx(4 / 21)
    assert found[0].window_end == START + 4 * W
    assert not after.firing

    # Judged again from the state before (a crash before it was stored): the same ids.
    again, _ = judge(the_rule, state, figures, [START + 3 * W], START + 5 * W, W)
    assert [item.id for item in again] == [item.id for item in found]
    # What was told is not told again, however often the window is revised.
    figures[START + 3 * W] = calls(22, 5)
    more, _ = judge(the_rule, after, figures, [START + 3 * W], START + 5 * W, W)
    assert more == []


def test_min_calls_keeps_a_thin_window_from_breaching() -> None:
    the_rule = rule(min_calls=10)
    figures = {START: calls(9, 9), START + W: calls(10, 2)}
    found, _ = judge(the_rule, RuleState(), figures, list(figures), START + W, W)
    assert seen(found) == [("firing", 1)]


def test_windows_before_the_rule_was_created_are_not_judged() -> None:
    the_rule = rule(for_windows=2)
    assert first_window(the_rule, W) == START
    figures = {START + index * W: calls(10, 5) for index in range(-3, 2)}
    found, _ = judge(the_rule, RuleState(), figures, list(figures), START + W, W)
    # Window -1 breached too: it counts toward the streak but fires nothing itself.
    assert seen(found) == [("firing", 0)]


def test_a_span_merges_its_windows_as_roll_ups_do() -> None:
    generator = random.Random(7)
    latencies = {
        START + index * W: [generator.lognormvariate(6, 0.5) for _ in range(200)] for index in range(6)
    }
    figures = {
        start: Figures(calls=len(values), digests=(TDigest.from_values(values).to_bytes(),))
        for start, values in latencies.items()
    }
    whole = [value for values in latencies.values() for value in values]
    merged_p99 = TDigest.from_values(whole[-600:]).quantile(0.99)  # the last three windows
    the_rule = rule(metric="p99_latency_ms", op=">=", threshold=0.0, span_seconds=3 * W)
    found, _ = judge(the_rule, RuleState(), figures, [START + 5 * W], START + 5 * W, W)
    assert len(found) == 1
    assert found[0].value == pytest.approx(merged_p99, rel=0.02)

    spans = rule(metric="errors", op=">=", threshold=6, span_seconds=3 * W)
    errors = {START + index * W: calls(10, 2) for index in range(4)}
    found, _ = judge(spans, RuleState(), errors, list(errors), START + 3 * W, W)
    # 2 errors a window: the span reaches 6 at the third window.
    assert seen(found) == [("firing", 2)] and found[0].value == 6


def test_a_firing_rule_with_repeat_seconds_is_told_again_while_it_breaches() -> None:
    the_rule = rule(repeat_seconds=3 * W)
    figures = {START + index * W: calls(10, 5) for index in range(10)}
    figures[START + 10 * W] = calls(10, 0)
    found, state = judge(the_rule, RuleState(), figures, list(figures), START + 10 * W, W)
    assert seen(found) == [("firing", 0), ("firing", 3), ("firing", 6), ("firing", 9), ("resolved", 10)]
    assert [item.reminder for item in found] == [False, True, True, True, False]
    assert len({item.id for item in found}) == 5
    assert not state.firing


def test_value_of_each_metric() -> None:
    figures = Figures(
        calls=4,
        errors=1,
        timeouts=2,
        estimated_cost_usd=0.5,
        prompt_tokens=7,
        completion_tokens=9,
        ttft_sum=300.0,
        ttft_count=2,
    )
    assert value_of("error_rate", figures) == (0.25, 4)
    assert value_of("timeout_rate", figures) == (0.5, 4)
    assert value_of("avg_time_to_first_token_ms", figures) == (150.0, 4)
    assert value_of("estimated_cost_usd", figures) == (0.5, 4)
    assert value_of("completion_tokens", figures) == (9.0, 4)
    assert value_of("error_rate", Figures()) == (None, 0)
    assert value_of("p50_latency_ms", Figures(calls=3)) == (None, 3)
    assert value_of("score_avg:judge", Figures(score_sum=3.0, scores=4)) == (0.75, 4)
    with pytest.raises(ValueError, match="unknown metric"):
        value_of("nonsense", figures)


def test_a_budget_fires_once_in_its_period_and_again_in_the_next() -> None:
    budget = rule(metric="estimated_cost_usd", op=">=", threshold=1.0, span_seconds=None, period="day")
    name, begin, end = period_of("day", START)
    assert (name, begin, end) == ("2026-03-01", START - 12 * 3600, START + 12 * 3600)
    state, told, spent = RuleState(), [], 0.0
    for index in range(30):
        spent += 0.1
        found, state = judge_budget(
            budget, state, Figures(calls=1, estimated_cost_usd=spent), START + index * W, W
        )
        told += [(item, index) for item in found]
    # 0.1 a window: the day reaches 1.0 at the tenth (float sums may land just under).
    reached = next(index for index in range(30) if sum(0.1 for _ in range(index + 1)) >= 1.0)
    assert [index for _, index in told] == [reached]
    tomorrow = begin + 86_400 + 5 * W
    found, state = judge_budget(budget, state, Figures(calls=1, estimated_cost_usd=2.0), tomorrow, W)
    assert len(found) == 1 and found[0].id != told[0][0].id and state.period == "2026-03-02"
    assert period_of("month", START) == ("2026-03", START - 12 * 3600, START - 12 * 3600 + 31 * 86_400)
    assert period_of("month", int(datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp()))[0] == "2026-12"
