"""Evaluations joined to their calls and folded per window (docs/evaluations.md): the rules, directly.

The call directory (:class:`EvaluationJoin`) and the evaluation windows
(:class:`EvaluationWindows`) are driven here without Kafka or Bytewax, in shuffled
orders; what they give is compared with the test's own computation of which
evaluation counts where (from timestamps alone) and of each row's fields.
"""

from __future__ import annotations

import json
import math
import pickle
import random
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from dataflows.batches import EventRun
from dataflows.evaluations import (
    ANSWERED,
    COUNTED,
    TIMED_OUT,
    CountedCalls,
    EvaluationDimensionEmission,
    EvaluationJoin,
    EvaluationStats,
    EvaluationWindows,
    Matched,
    Moved,
    bucket_score,
    dimension_text,
    emission,
    score_bucket,
)
from schemas.deadletter import DeadLetter
from schemas.events import LLMEvaluation
from schemas.topics import EVALUATIONS

WINDOW, GRACE, LATENESS, EVALUATION_LATENESS = 60, 10, 120, 600
BASE = 1_780_000_020.0  # a window boundary
KEYS = (("acme", "/chat", "m-a"), ("acme", "/search", "m-b"), ("globex", "/chat", "m-a"))
# The windows of these keys have dimensions: a request's and the response's.
DIMENSION_KEYS = {KEYS[0], KEYS[2]}
DIMENSIONS = ("metadata.country", "finish_reason")
COUNTRIES = ("SE", "DE", "FR", "US", "JP", "(other)", None)
VALUE_LIMIT = 3  # values with rows of their own: fewer than the countries, to merge some


def _evaluation(
    rid: str,
    tenant: str,
    name: str,
    at: float,
    score: float | None,
    label: str | None,
    evaluator: str | None = None,
) -> LLMEvaluation:
    return LLMEvaluation(
        request_id=rid,
        tenant_id=tenant,
        name=name,
        timestamp=datetime.fromtimestamp(at, UTC),
        score=score,
        label=label,
        evaluator=evaluator,
    )


def _run(evaluations: list[LLMEvaluation], first_offset: int) -> EventRun:
    return EventRun(
        EVALUATIONS,
        0,
        LLMEvaluation,
        list(range(first_offset, first_offset + len(evaluations))),
        list(evaluations),
        [e.timestamp.timestamp() for e in evaluations],
    )


def _scenario(seed: int) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """Calls and evaluations as (kind, item) steps in event-time phases, each phase
    shuffled; and what must come of them, computed from the timestamps.

    Calls of DIMENSION_KEYS carry a country and a finish_reason; some time out (no
    finish_reason), and some of those are answered in a later phase, which moves their
    evaluations to the answer's finish_reason wherever they came in."""
    rng = random.Random(seed)
    calls: dict[str, tuple[tuple[str, str, str], int]] = {}
    final_values: dict[str, tuple[Any, ...]] = {}  # the call's values once every answer is in
    answers: list[tuple[str, Any]] = []
    counted: list[tuple[str, Any]] = []

    def new_call(rid: str, key: tuple[str, str, str], start: int) -> tuple[str, Any]:
        calls[rid] = (key, start)
        if key not in DIMENSION_KEYS:
            return ("call", (rid, key, start, ""))
        country = rng.choice(COUNTRIES)
        if rng.random() < 0.25:  # a timeout, answered later half the time
            final_values[rid] = (country, None)
            if rng.random() < 0.5:
                reason = rng.choice(["stop", "length"])
                final_values[rid] = (country, reason)
                answers.append(
                    ("call", (rid, key, start, dimension_text(ANSWERED, DIMENSIONS, [country, reason])))
                )
            return ("call", (rid, key, start, dimension_text(TIMED_OUT, DIMENSIONS, [country, None])))
        reason = rng.choice(["stop", "length", None])
        final_values[rid] = (country, reason)
        return ("call", (rid, key, start, dimension_text(COUNTED, DIMENSIONS, [country, reason])))

    for n in range(300):
        key = rng.choice(KEYS)
        # Two windows: a phase spans less than an evaluation waits for its call.
        counted.append(new_call(f"call-{n}", key, int(BASE + WINDOW * rng.randrange(0, 2))))
    phase1: list[tuple[str, Any]] = list(counted)
    phase2: list[tuple[str, Any]] = []
    expected: dict[tuple[Any, ...], list[LLMEvaluation]] = {}
    letters: Counter[tuple[str, str]] = Counter()
    for rid, (key, start) in list(calls.items()):
        if rng.random() < 0.3:
            continue
        for name in ("judge", "thumbs"):
            if rng.random() < 0.3:
                continue
            end = start + WINDOW
            # Soon after the window (phase 1, possibly before the call), or long after.
            late = rng.random() < 0.3
            at = end + (rng.uniform(100, EVALUATION_LATENESS + 60) if late else rng.uniform(-50, 20))
            score = round(rng.uniform(-1, 5), 3) if name == "judge" else None
            label = rng.choice(["pass", "fail"]) if name == "thumbs" or rng.random() < 0.2 else None
            if score is None and label is None:
                label = "pass"
            evaluation = _evaluation(rid, key[0], name, at, score, label)
            copies = 2 if rng.random() < 0.1 else 1  # a client retrying: the very same again
            (phase2 if late else phase1).extend([("evaluation", evaluation)] * copies)
            if at > end + EVALUATION_LATENESS:
                letters["too_late", rid] += copies  # a dead-lettered one is no first
            else:
                expected.setdefault((key, start, name), []).append(evaluation)
    # Half the answers come with the evaluations soon after, half long after.
    rng.shuffle(answers)
    phase2 += answers[: len(answers) // 2]
    for n in range(10):  # about calls that never come
        phase1.append(
            ("evaluation", _evaluation(f"nobody-{n}", "acme", "judge", BASE + rng.uniform(0, 200), 1.0, None))
        )
        letters["orphan_evaluation", f"nobody-{n}"] += 1
    for rid in rng.sample(sorted(calls), 8):  # another tenant's
        key, start = calls[rid]
        other = "initech"
        phase1.append(("evaluation", _evaluation(rid, other, "judge", start + WINDOW, 9.0, None)))
        letters["invalid", rid] += 1
    # Calls counted late (timeouts, say), their evaluations - some repeated, some too late -
    # before and after them.
    phase3: list[tuple[str, Any]] = answers[len(answers) // 2 :]
    answered_before = len(answers)
    for n in range(40):
        rid, key = f"late-call-{n}", rng.choice(KEYS)
        start = int(BASE + WINDOW * rng.randrange(0, 2))
        phase3.append(new_call(rid, key, start))
        end = start + WINDOW
        at = end + EVALUATION_LATENESS + rng.uniform(-10, 10)
        evaluation = _evaluation(rid, key[0], "judge", at, round(rng.uniform(0, 1), 3), None)
        copies = rng.choice([1, 2, 3])
        phase3 += [("evaluation", evaluation)] * copies
        if at > end + EVALUATION_LATENESS:
            letters["too_late", rid] += copies
        else:
            expected.setdefault((key, start, "judge"), []).append(evaluation)
    phase3 += answers[answered_before:]  # the late timeouts' answers
    rng.shuffle(phase1)
    rng.shuffle(phase2)
    rng.shuffle(phase3)
    # An answer comes after its timeout was counted (phase 1, or earlier in phase 3).
    late_timeouts = {item[0] for kind, item in phase3 if kind == "call" and item[3][1:2] == TIMED_OUT}
    phase3.sort(
        key=lambda step: step[0] == "call" and step[1][3][1:2] == ANSWERED and step[1][0] in late_timeouts
    )
    # Far-future evaluations of no call move event time past every deadline at the end.
    end_at = BASE + 10 * WINDOW + EVALUATION_LATENESS + LATENESS + 4 * WINDOW
    closing = [("evaluation", _evaluation(f"tick-{n}", "acme", "judge", end_at, 0.0, None)) for n in range(3)]
    values: dict[tuple[Any, ...], dict[Any, list[LLMEvaluation]]] = {}
    moved: Counter[tuple[Any, ...]] = Counter()
    for (key, start, name), evaluations in expected.items():
        if key not in DIMENSION_KEYS:
            continue
        for evaluation in evaluations:
            rid = evaluation.request_id
            for dimension, value in zip(DIMENSIONS, final_values[rid], strict=True):
                values.setdefault((key, start, name, dimension), {}).setdefault(value, []).append(evaluation)
            if any(item[0] == rid for _, item in answers):
                moved[key, start, name, "finish_reason"] += 1
    return [*phase1, ("phase", None), *phase2, ("phase", None), *phase3, ("phase", None), *closing], {
        "rows": expected,
        "letters": letters,
        "values": values,
        "moved": moved,
    }


def _drive(
    steps: list[tuple[str, Any]], batch: int, rng: random.Random, snapshot_every: int = 0
) -> tuple[dict[tuple[Any, ...], Any], list[DeadLetter]]:
    """Rows by (key, start, name) - and one dimension's rows by (key, start, name,
    dimension) - as a sink judging by revision keeps them, and the dead letters."""
    directory = EvaluationJoin(WINDOW, GRACE, LATENESS, EVALUATION_LATENESS)
    windows = EvaluationWindows(WINDOW, GRACE, LATENESS, EVALUATION_LATENESS, VALUE_LIMIT)
    now = 0.0  # the wall clock stands still: event time comes from the data
    letters: list[DeadLetter] = []
    rows: dict[tuple[Any, ...], Any] = {}

    def feed(found: list[Matched | Moved | DeadLetter]) -> None:
        letters.extend(item for item in found if isinstance(item, DeadLetter))
        letters.extend(windows.on_matched([item for item in found if not isinstance(item, DeadLetter)], now))
        for item in windows.on_time(now):
            row = item.row
            key: tuple[Any, ...] = (
                (row.tenant_id, row.route, row.model),
                int(row.window_start.timestamp()),
                row.name,
            )
            if isinstance(item, EvaluationDimensionEmission):
                key = (*key, item.row.dimension)
            if key not in rows or rows[key].row.revision <= row.revision:
                rows[key] = item

    offset = 0
    pending: list[tuple[str, Any]] = []
    steps_done = 0

    def flush() -> None:
        nonlocal offset
        calls = [item for kind, item in pending if kind == "call"]
        evaluations = [item for kind, item in pending if kind == "evaluation"]
        # Within a batch, calls and evaluations come in either order.
        parts: list[Any] = []
        if calls:
            # Known half a window after they started.
            times = [c[2] + WINDOW / 2 for c in calls]
            rids, keys, starts, dimensions = (list(column) for column in zip(*calls, strict=True))
            parts.append(CountedCalls(rids, keys, starts, times, dimensions))
        if evaluations:
            parts.append(_run(evaluations, offset))
            offset += len(evaluations)
        rng.shuffle(parts)
        for part in parts:
            if isinstance(part, CountedCalls):
                feed(directory.on_counted(part, now))
            else:
                feed(directory.on_runs([part], now))
        feed(list(directory.on_time(now)))
        pending.clear()

    for kind, item in steps:
        if kind == "phase":
            flush()
            continue
        pending.append((kind, item))
        if len(pending) >= batch:
            flush()
        steps_done += 1
        if snapshot_every and steps_done % snapshot_every == 0:
            flush()
            directory.seal()
            directory = pickle.loads(pickle.dumps(directory))
            windows = pickle.loads(pickle.dumps(windows))
    flush()
    return rows, letters


def _check(rows: dict[tuple[Any, ...], Any], letters: list[DeadLetter], expected: dict[str, Any]) -> None:
    wanted = expected["rows"]
    assert {key for key in rows if len(key) == 3} == set(wanted)
    for key, evaluations in wanted.items():
        row = rows[key].row
        _check_row(row, evaluations, key)
        assert row.revision == len(evaluations)
    _check_values(rows, expected)
    got = Counter((letter.reason, _rid(letter)) for letter in letters)
    got_without_ticks = Counter({k: v for k, v in got.items() if not k[1].startswith("tick-")})
    assert got_without_ticks == expected["letters"]


def _check_row(row: Any, evaluations: list[LLMEvaluation], key: Any) -> None:
    scores = sorted(e.score for e in evaluations if e.score is not None)
    labels = Counter(e.label for e in evaluations if e.label is not None)
    assert (row.evaluations, row.scores) == (len(evaluations), len(scores)), key
    assert row.labels == dict(labels), key
    if scores:
        assert math.isclose(row.score_avg, math.fsum(scores) / len(scores), rel_tol=1e-12, abs_tol=1e-12)
        assert (row.score_min, row.score_max) == (scores[0], scores[-1])
        for q, value in ((0.5, row.score_p50), (0.9, row.score_p90)):
            low, high = _nearest_ranks(scores, q, 1)
            assert low <= value <= high, (key, q, value, scores)
    else:
        assert row.score_avg is None and row.score_p50 is None


def _check_values(rows: dict[tuple[Any, ...], Any], expected: dict[str, Any]) -> None:
    """Each dimension's rows: the VALUE_LIMIT most evaluated values (ties: no value first,
    then by value) apart, the rest under "(other)", each value as the call finally has it."""
    wanted = expected["values"]
    assert {key for key in rows if len(key) == 4} == set(wanted)
    for key, by_value in wanted.items():
        emitted = rows[key]
        ordered = sorted(
            (value for value in by_value if value != "(other)"),
            key=lambda value: (-len(by_value[value]), value is not None, value or ""),
        )
        apart = ordered[:VALUE_LIMIT]
        merged = [e for value, found in by_value.items() if value not in apart for e in found]
        want = [(value, by_value[value]) for value in apart] + ([("(other)", merged)] if merged else [])
        assert [row.value for row in emitted.rows] == [value for value, _ in want], key
        total = sum(len(found) for found in by_value.values())
        for row, (_, evaluations) in zip(emitted.rows, want, strict=True):
            _check_row(row, evaluations, key)
            assert row.dimension == key[3]
            assert row.revision == total + expected["moved"][key], key


def _nearest_ranks(ordered: list[float], q: float, slack: int) -> tuple[float, float]:
    rank = q * (len(ordered) - 1)
    return (
        ordered[max(0, math.floor(rank) - slack)],
        ordered[min(len(ordered) - 1, math.ceil(rank) + slack)],
    )


def _rid(letter: DeadLetter) -> str:
    return json.loads(letter.payload or "{}")["request_id"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rows_and_dead_letters_are_the_same_in_any_order_and_batching(seed: int) -> None:
    steps, expected = _scenario(seed)
    rng = random.Random(seed * 7919)
    for batch in (1, 7, 200):
        rows, letters = _drive(steps, batch, rng)
        _check(rows, letters, expected)


def test_a_restored_state_gives_the_same_rows() -> None:
    steps, expected = _scenario(11)
    rows, letters = _drive(steps, 13, random.Random(5), snapshot_every=40)
    _check(rows, letters, expected)


def test_the_right_tenants_evaluation_counts_after_another_tenants_was_refused() -> None:
    directory = EvaluationJoin(WINDOW, GRACE, LATENESS, EVALUATION_LATENESS)
    start = int(BASE)
    wrong = _evaluation("r1", "initech", "judge", BASE + 70, 1.0, None)
    right = _evaluation("r1", "acme", "judge", BASE + 70, 2.0, None)
    assert directory.on_runs([_run([wrong, right], 0)], 0.0) == []  # both wait for the call
    found = directory.on_counted(CountedCalls(["r1"], [KEYS[0]], [start], [start + 30.0], [""]), 0.0)
    assert [type(item).__name__ for item in found] == ["DeadLetter", "Matched"]
    assert isinstance(found[0], DeadLetter) and found[0].reason == "invalid"
    assert "initech" in found[0].error and "acme" not in found[0].error  # the call's tenant stays unnamed
    assert isinstance(found[1], Matched) and found[1].evaluation.score == 2.0
    # The same (request_id, tenant, name, evaluator) again is ignored; another evaluator is not.
    assert directory.on_runs([_run([right], 2)], 0.0) == []
    other = _evaluation("r1", "acme", "judge", BASE + 70, 3.0, None, evaluator="gpt-judge")
    assert [type(item).__name__ for item in directory.on_runs([_run([other], 3)], 0.0)] == ["Matched"]


def test_score_folding_does_not_depend_on_order_beyond_the_exact_values() -> None:
    rng = random.Random(3)
    values = [rng.choice([rng.uniform(-100, 100), 0.0, -0.0, 1e-300, -1e300, 0.1]) for _ in range(3000)]

    def fold(order: list[float]) -> Any:
        stats = EvaluationStats()
        for value in order:
            stats.add(_evaluation("r", "t", "n", BASE, value, None))
        return emission(KEYS[0], int(BASE), WINDOW, "n", stats)

    first = fold(values)
    shuffled = list(values)
    rng.shuffle(shuffled)
    again = fold(shuffled)
    assert first == again
    assert first.row.score_avg == pytest.approx(math.fsum(values) / len(values), rel=1e-15, abs=1e-290)
    assert first.score_sum == math.fsum(values)  # exact sum, rounded once
    low, high = _nearest_ranks(sorted(values), 0.9, 30)  # beyond 850 values: 1 % of the ranks
    assert low - 0.003 * abs(low) <= first.row.score_p90 <= high + 0.003 * abs(high)


def test_score_buckets_keep_sign_and_order() -> None:
    values = [-1e300, -5.0, -1e-300, 0.0, 1e-300, 0.5, 3.0, 1e300]
    buckets = [score_bucket(v) for v in values]
    assert sorted(buckets, key=bucket_score) == buckets
    for value in values:
        assert bucket_score(score_bucket(value)) == pytest.approx(value, rel=0.002)


def test_wakeups_are_wall_clock_times_even_for_a_backlog_of_old_events() -> None:
    directory = EvaluationJoin(WINDOW, GRACE, LATENESS, EVALUATION_LATENESS)
    windows = EvaluationWindows(WINDOW, GRACE, LATENESS, EVALUATION_LATENESS)
    now = BASE + 10 * 86400.0  # read ten days after it was made
    waiting = _evaluation("r1", "acme", "judge", BASE + 5, 1.0, None)
    assert directory.on_runs([_run([waiting], 0)], now) == []
    # Event time idles with the wall clock from here: the orphan is due when its deadline is.
    assert directory.next_wakeup() == pytest.approx(
        now + directory.orphan_after(waiting) - (BASE + 5), abs=0.01
    )
    found = directory.on_counted(CountedCalls(["r1"], [KEYS[0]], [int(BASE)], [BASE + 1], [""]), now)
    assert windows.on_matched([item for item in found if isinstance(item, Matched)], now) == []
    assert windows.on_time(now) == []
    # The row is due at the window's end + grace, in event time: that far from now.
    assert windows.next_wakeup() == pytest.approx(now + (BASE + WINDOW + GRACE) - (BASE + 5), abs=0.01)
    restored = pickle.loads(pickle.dumps(windows))
    assert restored.next_wakeup() == 0.0  # unknown until it looks at the clock again


def test_calls_alone_move_the_directorys_event_time_and_expire() -> None:
    """Without a single evaluation, counted calls still seal on schedule and are forgotten
    once kept long enough."""
    directory = EvaluationJoin(WINDOW, GRACE, LATENESS, EVALUATION_LATENESS)
    kept = 2 * WINDOW + EVALUATION_LATENESS + LATENESS + GRACE
    for step in range(40):  # 100 calls every 100 s of event time: 4,000 s in all
        at = BASE + 100 * step
        start = int(at // WINDOW * WINDOW)
        rids = [f"c-{step}-{n}" for n in range(100)]
        directory.on_counted(CountedCalls(rids, [KEYS[0]] * 100, [start] * 100, [at] * 100, [""] * 100), 0.0)
    assert directory.watermark.settled == BASE + 3900
    within = 100 * math.ceil(kept / 100)  # the calls not expired yet
    assert within <= directory.remembered() <= within * 1.3, directory.remembered()
