"""When an alert rule fires and resolves (docs/alerts.md, docs/alerts.md): the rules, on figures.

A rule is judged window by window (``WINDOW_SECONDS``). A window's **value** is the
rule's metric over the windows of its span ending with it — ``span_seconds`` —
merged as the query API's roll-ups merge them: counts and sums added, rates from the
sums, averages weighted, percentiles from the merged latency digests. A window
**breaches** when that span holds at least ``min_calls`` calls (``scores`` for a
``score_avg:`` rule) and the value compares with the threshold as ``op`` says.

- A rule **fires** at the window that completes ``for_windows`` consecutive breaching
  windows, and **resolves** at the first window after that does not breach. With
  ``repeat_seconds``, a firing rule is told again (``firing``, a reminder) at a
  breaching window at least that long after the last time it was told.
- A **budget** (``period``) adds its metric up over the UTC day or month of the
  window; it fires once a period, at the first evaluation where the sum reaches the
  threshold.
- Windows are judged again whenever a row of theirs is revised, so a late call that
  pushes a closed window over the threshold fires the rule then. What was told is
  never taken back: transitions are judged only after the last one told.
- A rule judges only windows that start at or after the window it was created in.

Each transition's id is derived from what it is (rule, state, window, and for a
budget its period), so judging the same windows again gives the same ids: the
idempotency key a webhook receiver sees.

Pure rules: no Bytewax, Kafka or Postgres here.
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import NamedTuple

from fastdigest import TDigest, merge_all

from schemas.alerts import AlertRule, evaluation_name

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
# Transition ids: uuid5 in a namespace of their own.
_NAMESPACE = uuid.UUID("5b0e4f3c-6c1e-4f4e-9d63-0a3c2e7b9a11")
_PERCENTILES = {"p50_latency_ms": 0.5, "p95_latency_ms": 0.95, "p99_latency_ms": 0.99}


class Figures(NamedTuple):
    """What the rows a rule covers hold for one window, added up across keys."""

    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    estimated_cost_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_sum: float = 0.0  # avg_time_to_first_token_ms × ttft_count, summed
    ttft_count: int = 0
    digests: tuple[bytes, ...] = ()  # the rows' latency digests
    score_sum: float = 0.0
    scores: int = 0

    def plus(self, other: Figures) -> Figures:
        return Figures(
            *(a + b for a, b in zip(self[:8], other[:8], strict=True)),
            self.digests + other.digests,
            self.score_sum + other.score_sum,
            self.scores + other.scores,
        )


class RowKey(NamedTuple):
    """What a stored row is of, as rules filter on it (None where its table has no such column)."""

    route: str
    model: str
    name: str | None
    dimension: str | None
    value: str | None


def takes_key(
    rule: AlertRule, route: str | None, model: str | None, name: str | None, dimension: str | None
) -> bool:
    """Whether rows of this key, evaluation name and dimension may be the rule's: its route,
    model, evaluation name and dimension, whatever the dimension's value."""
    wanted = evaluation_name(rule.metric)
    return (
        (rule.route is None or route == rule.route)
        and (rule.model is None or model == rule.model)
        and (wanted is None or name == wanted)
        and (rule.dimension is None or dimension == rule.dimension)
    )


def filters_in(rule: AlertRule, key: RowKey) -> bool:
    """Whether a row of the rule's table is one of the rule's: its route, model, evaluation
    name and dimension value."""
    return takes_key(rule, key.route, key.model, key.name, key.dimension) and (
        rule.dimension is None or key.value == rule.value
    )


def figures_by_window(rule: AlertRule, rows: Iterable[tuple[RowKey, int, Figures]]) -> dict[int, Figures]:
    """The rule's rows among ``rows`` (of its table), added up per window start."""
    out: dict[int, Figures] = {}
    for key, window, figures in rows:
        if filters_in(rule, key):
            found = out.get(window)
            out[window] = figures if found is None else found.plus(figures)
    return out


def value_of(metric: str, figures: Figures) -> tuple[float | None, int]:
    """The metric of merged figures (None when it has no value, as a rate of no calls),
    and the count ``min_calls`` is held against."""
    if evaluation_name(metric) is not None:
        return (figures.score_sum / figures.scores if figures.scores else None), figures.scores
    calls = figures.calls
    if metric in ("calls", "errors", "timeouts", "prompt_tokens", "completion_tokens", "estimated_cost_usd"):
        return float(getattr(figures, metric)), calls
    if metric == "error_rate":
        return (figures.errors / calls if calls else None), calls
    if metric == "timeout_rate":
        return (figures.timeouts / calls if calls else None), calls
    if metric == "avg_time_to_first_token_ms":
        return (figures.ttft_sum / figures.ttft_count if figures.ttft_count else None), calls
    if metric in _PERCENTILES:
        if not figures.digests:
            return None, calls
        digest = merge_all([TDigest.from_bytes(blob) for blob in figures.digests])
        return digest.quantile(_PERCENTILES[metric]), calls
    raise ValueError(f"unknown metric {metric!r}")


def breaches(rule: AlertRule, value: float | None, count: int) -> bool:
    return value is not None and count >= rule.min_calls and _COMPARE[rule.op](value, rule.threshold)


class RuleState(NamedTuple):
    """What was told of a rule: whether it is firing, the window of its last transition,
    the window it was last told firing at, and (budgets) the period it fired in."""

    firing: bool = False
    since: int | None = None
    told: int | None = None
    period: str | None = None


class Transition(NamedTuple):
    id: str
    state: str  # firing | resolved
    window_start: int
    window_end: int
    value: float | None
    reminder: bool = False


def transition_id(rule_id: str, state: str, window_start: int, detail: str = "") -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{rule_id}|{state}|{window_start}|{detail}"))


def first_window(rule: AlertRule, window_seconds: int) -> int:
    """The first window a rule judges: the one it was created in."""
    created = int(rule.created_at.timestamp())
    return created - created % window_seconds


def judge(
    rule: AlertRule,
    state: RuleState,
    figures: Mapping[int, Figures],
    changed: Iterable[int],
    latest: int,
    window_seconds: int,
) -> tuple[list[Transition], RuleState]:
    """The transitions of a span rule once windows ``changed`` (window starts) were written,
    ``latest`` being the latest window any covered row is known for; ``figures`` holds
    every window from ``for_windows`` + span before the earliest changed one to ``latest``."""
    assert rule.span_seconds is not None
    changed = sorted(changed)
    if not changed:
        return [], state
    start = max(changed[0], first_window(rule, window_seconds))
    span = rule.span_seconds // window_seconds
    # Windows before ``start`` count only toward the streak of consecutive breaches.
    streak = 0
    out: list[Transition] = []
    firing, since, told = state.firing, state.since, state.told
    first = start - (rule.for_windows - 1) * window_seconds
    for window in range(first, latest + window_seconds, window_seconds):
        merged = Figures()
        for part in range(window - (span - 1) * window_seconds, window + window_seconds, window_seconds):
            found = figures.get(part)
            if found is not None:
                merged = merged.plus(found)
        value, count = value_of(rule.metric, merged)
        breach = breaches(rule, value, count)
        streak = streak + 1 if breach else 0
        if window < start or (since is not None and window <= since):
            continue
        end = window + window_seconds
        if not firing and streak >= rule.for_windows:
            out.append(Transition(transition_id(rule.id, "firing", window), "firing", window, end, value))
            firing, since, told = True, window, window
        elif firing and not breach:
            out.append(Transition(transition_id(rule.id, "resolved", window), "resolved", window, end, value))
            firing, since = False, window
        elif (
            firing
            and breach
            and rule.repeat_seconds is not None
            and told is not None
            and window - told >= rule.repeat_seconds
        ):
            out.append(
                Transition(
                    transition_id(rule.id, "firing", window, "reminder"), "firing", window, end, value, True
                )
            )
            told = window
    return out, RuleState(firing, since, told, state.period)


def period_of(period: str, window_start: int) -> tuple[str, int, int]:
    """The UTC day or month holding a window: its name and its bounds (Unix seconds)."""
    moment = datetime.fromtimestamp(window_start, UTC)
    if period == "day":
        begin = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        name = begin.strftime("%Y-%m-%d")
        end = begin.timestamp() + 86_400
    else:
        begin = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        name = begin.strftime("%Y-%m")
        following = (
            begin.replace(year=begin.year + 1, month=1)
            if begin.month == 12
            else begin.replace(month=begin.month + 1)
        )
        end = following.timestamp()
    return name, int(begin.timestamp()), int(end)


def judge_budget(
    rule: AlertRule, state: RuleState, total: Figures, window: int, window_seconds: int
) -> tuple[list[Transition], RuleState]:
    """A budget once a covered row of ``window`` was written: ``total`` the figures of the
    period holding it, from its start to the window's end."""
    assert rule.period is not None
    name, _, _ = period_of(rule.period, window)
    if state.period == name or window < first_window(rule, window_seconds):
        return [], state
    value, count = value_of(rule.metric, total)
    if not breaches(rule, value, count):
        return [], state
    key = transition_id(rule.id, "firing", window, f"period {name}")
    transition = Transition(key, "firing", window, window + window_seconds, value)
    return [transition], RuleState(True, window, window, name)
