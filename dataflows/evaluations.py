"""Evaluations (docs/evaluations.md): scores and labels joined to the calls they are about, per window.

Two states, each driven by the Bytewax wiring in :mod:`dataflows.operators`:

- :class:`EvaluationJoin`, one per join shard of request ids, is the call
  directory. The windows tell it every call they count (:class:`CountedCalls`:
  request id, key and window start), and it remembers each one until
  ``EVALUATION_LATENESS_SECONDS`` after its window ended, compactly and with its
  sealed parts in Postgres (a :class:`~dataflows.remembered.Remembered` whose
  "tenant" is the call's key and whose expiry encodes its window start: 20 bytes a
  call). An evaluation arriving for a known call goes on at once, with the call's
  key and window; one arriving first waits for its call.
- :class:`EvaluationWindows`, one per window shard of keys, folds them per
  ``(window start, key, name)`` and emits the rows.

Rules (event-time facts, so that neither arrival order nor a replay changes them):

- An evaluation counts toward its call's key and window once the call is counted,
  whichever arrives first, if its timestamp is at most ``EVALUATION_LATENESS_SECONDS``
  after the call's window end; later, it is ``too_late``.
- The call is found by ``request_id`` among the calls of the evaluation's tenant;
  a call of another tenant makes the evaluation ``invalid`` (without naming the
  other tenant), and never stops the right tenant's evaluations from counting.
- An evaluation whose call is not counted waits until event time passes the end of
  the window holding its own timestamp + ``LATENESS_SECONDS`` + one window + grace:
  by then any call requested no later than the evaluation was counted or was too
  late for its own window. Then it is ``orphan_evaluation``.
- The same ``(request_id, tenant, name, evaluator)`` again is ignored: the first
  one that counts or waits wins (a repeat of a dead-lettered one is judged anew).
- A window's evaluation row is first emitted once event time passes its end +
  grace, and again whenever evaluations were folded in since. Its ``revision`` is
  the number of evaluations it holds: a function of its content alone, so the
  sinks keep the row holding them all. Window state is kept until event time
  passes its end + ``EVALUATION_LATENESS_SECONDS`` + ``LATENESS_SECONDS``; an
  evaluation for a window already forgotten is ``too_late``.

Scores are summed exactly (as integers in units of 2^-1074, the smallest float),
kept as values up to :data:`~dataflows.aggregate.EXACT_UP_TO` a row and as
buckets 0.2 % wide beyond, as latencies are: the digest and the percentiles do not
depend on the order evaluations were folded in.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from fractions import Fraction
from itertools import repeat
from typing import NamedTuple

from fastdigest import TDigest
from msgspec import Struct, field

from dataflows.aggregate import EXACT_UP_TO, ZERO_BUCKET, bucket_latency, latency_bucket, new_digest
from dataflows.batches import EventRun, SourceRef
from dataflows.clock import Watermark
from dataflows.dimensions import Value, from_response, ranked
from dataflows.join import WAKEUP_MARGIN
from dataflows.remembered import Remembered, SegmentStore
from dataflows.shards import WindowKey
from schemas.deadletter import DeadLetter, Reason
from schemas.dimensions import DEFAULT_VALUES, OTHER
from schemas.events import LLMEvaluation, encoder
from schemas.rows import EvaluationDimensionRow, EvaluationRow, top_labels

# A key as the directory holds it (Remembered's "tenant"): its parts joined by a
# character no identifier may hold.
_SEPARATOR = "\x1f"
# Sums of scores are exact integers in units of the smallest positive float.
_SCORE_UNIT = 2**1074
# Beyond EXACT_UP_TO scores, a score counts in a bucket signed as the score, offset so
# that no bucket of a nonzero score is 0 (latency_bucket is above -400,000 for floats).
_BUCKET_OFFSET = 1_000_000


class CountedCalls(NamedTuple):
    """Calls the windows counted, for the call directory: ``request_ids[i]`` counted in the
    window of ``keys[i]`` that starts at ``starts[i]``, known at event time ``times[i]``,
    with its values of the window's dimensions ``dimensions[i]`` (:func:`dimension_text`).

    An entry whose dimensions are :data:`ANSWERED` is no new call: a timed-out call
    replaced by its answer, which moved it to its own ``finish_reason``."""

    request_ids: list[str]
    keys: list[WindowKey]
    starts: list[int]
    times: list[float]
    dimensions: list[str]

    @classmethod
    def empty(cls) -> CountedCalls:
        return cls([], [], [], [], [])

    def add(self, request_id: str, key: WindowKey, start: int, time: float, dimensions: str) -> None:
        self.request_ids.append(request_id)
        self.keys.append(key)
        self.starts.append(start)
        self.times.append(time)
        self.dimensions.append(dimensions)


class Matched(NamedTuple):
    """An evaluation and the window of its call, with the call's values of the window's
    dimensions (:func:`dimension_text`), for the evaluation windows."""

    key: WindowKey
    start: int
    evaluation: LLMEvaluation
    source: SourceRef
    dimensions: str = ""


class Moved(NamedTuple):
    """A timed-out call of window ``start`` of ``key`` was answered: under ``finish_reason``
    its evaluations move from no value to the answer's (``dimensions``)."""

    key: WindowKey
    start: int
    request_id: str
    dimensions: str


# A counted call's values of its window's dimensions, as text kept after its key in the
# call directory: the call's state, then each dimension's name and value. No name or
# value holds a control character (schemas.dimensions), so these separate them.
_DIMENSION = "\x1e"
_VALUE = "\x1d"
_NO_VALUE = "\x1c"
# The call's state: counted as it is; a timeout (no finish_reason yet, its answer may
# still replace it); a timeout replaced by its answer.
COUNTED, TIMED_OUT, ANSWERED = "c", "t", "a"


class CallDimensions(NamedTuple):
    state: str
    names: tuple[str, ...]
    values: tuple[Value, ...]


def dimension_text(state: str, names: tuple[str, ...], values: list[Value]) -> str:
    """The text of a call's values ``values`` of dimensions ``names``; "" without any."""
    if not names:
        return ""
    return (
        _DIMENSION
        + state
        + "".join(
            f"{_DIMENSION}{name}{_VALUE}{_NO_VALUE if value is None else value}"
            for name, value in zip(names, values, strict=True)
        )
    )


def call_dimensions(text: str) -> CallDimensions:
    """What :func:`dimension_text` wrote."""
    if not text:
        return CallDimensions(COUNTED, (), ())
    state, *pairs = text[1:].split(_DIMENSION)
    names: list[str] = []
    values: list[Value] = []
    for pair in pairs:
        name, value = pair.split(_VALUE)
        names.append(name)
        values.append(None if value == _NO_VALUE else value)
    return CallDimensions(state, tuple(names), tuple(values))


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def evaluation_letter(evaluation: LLMEvaluation, source: SourceRef, reason: Reason, error: str) -> DeadLetter:
    """A dead letter holding the evaluation as its record."""
    return DeadLetter(
        reason=reason,
        source_topic=source.topic,
        partition=source.partition,
        offset=source.offset,
        error=error,
        payload=encoder.encode(evaluation).decode(),
    )


def key_text(key: WindowKey) -> str:
    return _SEPARATOR.join(key)


def key_of(text: str) -> WindowKey:
    tenant_id, route, model = text.split(_SEPARATOR)
    return tenant_id, route, model


def call_of(text: str) -> tuple[WindowKey, str]:
    """A call as the directory keeps it: its key, and its :func:`dimension_text`."""
    at = text.find(_DIMENSION)
    return (key_of(text), "") if at < 0 else (key_of(text[:at]), text[at:])


def _repeat_key(evaluation: LLMEvaluation) -> str:
    # The request id first: the segments of these keys are named after its join shard.
    return _SEPARATOR.join(
        (evaluation.request_id, evaluation.tenant_id, evaluation.name, evaluation.evaluator or "")
    )


class EvaluationJoin:
    """The call directory of one join shard, and the evaluations waiting for their call.

    ``now`` is wall-clock Unix seconds; event time is a :class:`~dataflows.clock.Watermark`
    of the evaluations' timestamps, idling forward with the wall clock.
    """

    def __init__(
        self, window_seconds: int, grace_seconds: int, lateness_seconds: int, evaluation_lateness_seconds: int
    ) -> None:
        self.window = int(window_seconds)
        self.grace = int(grace_seconds)
        self.lateness = int(lateness_seconds)
        self.evaluation_lateness = int(evaluation_lateness_seconds)
        # A call is remembered until this long after its window started; fixed for the
        # life of the state, since the window start is read back from it.
        self.keep = 2 * self.window + self.evaluation_lateness + self.lateness + self.grace
        self.watermark = Watermark()
        self._calls = Remembered()  # request id -> (window start + keep, key and dimension text)
        # Timed-out calls answered since: request id -> the same, with the answer's values.
        self._answered = Remembered()
        self._repeats = Remembered()  # _repeat_key -> (until when, "")
        # request id -> evaluations waiting for their call, each with its deadline
        self._waiting: dict[str, list[tuple[float, LLMEvaluation, SourceRef]]] = {}
        # Wall clock minus event time at the last look; not snapshotted (unknown until then).
        self._offset: float | None = None

    # -- calls --------------------------------------------------------------------

    def on_counted(self, counted: CountedCalls, now: float) -> list[Matched | Moved | DeadLetter]:
        """Remember the calls the windows counted; the evaluations that waited for them go on.
        A timed-out call answered since is remembered with its answer's values, and its
        evaluations told to move."""
        keep = self.keep
        calls = self._calls
        if counted.times:
            # Calls move event time too: without evaluations it would stand still, and
            # nothing would ever be sealed on schedule or expire.
            self.watermark.observe(max(counted.times), now)
            self._offset = now - self.watermark.settled
        out: list[Matched | Moved | DeadLetter] = []
        waiting = self._waiting
        # One text per key and dimension values, not one per call: the calls of a window
        # share it, and its hash is computed once when the calls are sealed.
        texts: dict[tuple[WindowKey, str], str] = {}
        for rid, key, start, dimensions in zip(
            counted.request_ids, counted.keys, counted.starts, counted.dimensions, strict=True
        ):
            text = texts.get((key, dimensions))
            if text is None:
                text = texts[key, dimensions] = key_text(key) + dimensions
            if dimensions and dimensions[1] == ANSWERED:
                self._answered.add(rid, start + keep, text)
                out.append(Moved(key, start, rid, dimensions))
                continue
            calls.add(rid, start + keep, text)
            held = waiting.pop(rid, None)
            if held is not None:
                for _, evaluation, source in held:
                    out.extend(self._judge(evaluation, source, key, start, dimensions, record=False))
        self._maintain(self.watermark.current(now))
        return out

    def _maintain(self, event_time: float) -> None:
        """Seal what is due; nothing before event time is known (every seal would be due)."""
        if event_time > -math.inf:
            self._calls.maintain(event_time)
            self._answered.maintain(event_time)
            self._repeats.maintain(event_time)

    # -- evaluations --------------------------------------------------------------

    def on_runs(self, runs: list[EventRun], now: float) -> list[Matched | Moved | DeadLetter]:
        """Add runs of evaluations, in order: those whose call is known go on, the others
        wait for it. Repeats are ignored."""
        out: list[Matched | Moved | DeadLetter] = []
        watermark = self.watermark
        for run in runs:
            for index, item in enumerate(run.events):
                evaluation = item
                assert isinstance(evaluation, LLMEvaluation)
                watermark.observe(run.times[index], now)
                self._on_evaluation(evaluation, run.source(index), out)
        self._offset = now - watermark.settled
        self._maintain(watermark.settled)
        return out

    def _on_evaluation(
        self, evaluation: LLMEvaluation, source: SourceRef, out: list[Matched | Moved | DeadLetter]
    ) -> None:
        repeat_key = _repeat_key(evaluation)
        if self._repeats.get(repeat_key, -math.inf) is not None:
            return
        rid = evaluation.request_id
        found = self._answered.get(rid, -math.inf) or self._calls.get(rid, -math.inf)
        if found is None:
            # Repeats wait too: which of them counts, if any, is known once the call is.
            self._waiting.setdefault(rid, []).append((self.orphan_after(evaluation), evaluation, source))
            return
        until, text = found
        key, dimensions = call_of(text)
        out.extend(self._judge(evaluation, source, key, int(until) - self.keep, dimensions, record=True))

    def _judge(
        self,
        evaluation: LLMEvaluation,
        source: SourceRef,
        key: WindowKey,
        start: int,
        dimensions: str,
        record: bool,
    ) -> list[Matched | DeadLetter]:
        """The evaluation, its call known: counted, too late, or another tenant's."""
        if key[0] != evaluation.tenant_id:
            return [
                evaluation_letter(
                    evaluation,
                    source,
                    "invalid",
                    f"evaluation {evaluation.name!r} names request_id {evaluation.request_id!r}, a call "
                    f"of another tenant than {evaluation.tenant_id!r} - at `$.request_id`",
                )
            ]
        end = start + self.window
        timestamp = evaluation.timestamp.timestamp()
        if timestamp > end + self.evaluation_lateness:
            return [
                evaluation_letter(
                    evaluation,
                    source,
                    "too_late",
                    f"evaluation {evaluation.name!r} of call {evaluation.request_id!r} was made at "
                    f"{_iso(timestamp)}, after {_iso(end + self.evaluation_lateness)}: its call's window "
                    f"[{_iso(start)}, {_iso(end)}) takes evaluations until EVALUATION_LATENESS_SECONDS "
                    f"({self.evaluation_lateness}) after its end",
                )
            ]
        repeat_key = _repeat_key(evaluation)
        # One that waited was not looked up among the repeats: a copy may have counted.
        if not record and self._repeats.get(repeat_key, -math.inf) is not None:
            return []
        self._repeats.add(repeat_key, start + self.keep, "")
        return [Matched(key, start, evaluation, source, dimensions)]

    def orphan_after(self, evaluation: LLMEvaluation) -> float:
        """When an evaluation still without its call becomes an orphan (event time)."""
        timestamp = evaluation.timestamp.timestamp()
        end = (math.floor(timestamp / self.window) + 1) * self.window
        return end + self.lateness + self.window + self.grace

    def on_time(self, now: float) -> list[DeadLetter]:
        """The waiting evaluations whose deadline event time passed: orphans."""
        event_time = self.watermark.current(now)
        self._offset = now - event_time
        out: list[DeadLetter] = []
        for rid in [rid for rid, held in self._waiting.items() if held[0][0] < event_time]:
            held = self._waiting.pop(rid)
            keep = [item for item in held if item[0] >= event_time]
            for deadline, evaluation, source in held:
                if deadline < event_time:
                    out.append(
                        evaluation_letter(
                            evaluation,
                            source,
                            "orphan_evaluation",
                            f"no call {rid!r} was counted by {_iso(deadline)} (event time), when no call "
                            f"requested before the evaluation could still be",
                        )
                    )
            if keep:
                self._waiting[rid] = keep
        self._maintain(event_time)
        return out

    def next_wakeup(self) -> float | None:
        """Wall-clock Unix seconds at which a waiting evaluation may become an orphan; None
        when none waits, "now" (0.0) while the relation of event time to the wall clock is
        unknown (after a restore)."""
        if not self._waiting:
            return None
        if self._offset is None:
            return 0.0
        return min(held[0][0] for held in self._waiting.values()) + self._offset + WAKEUP_MARGIN

    # -- state --------------------------------------------------------------------

    def attach(self, store: SegmentStore, shard_of: Callable[[str], str]) -> None:
        """Keep the sealed calls and repeats in ``store``, named after the join shard
        (``shard_of`` a request id) with a prefix of their own."""
        self._calls.attach(store, lambda rid: "calls/" + shard_of(rid))
        self._answered.attach(store, lambda rid: "answered/" + shard_of(rid))
        self._repeats.attach(store, lambda key: "evaluated/" + shard_of(key.split(_SEPARATOR, 1)[0]))

    def needs_store(self) -> bool:
        return self._calls.needs_store() or self._answered.needs_store() or self._repeats.needs_store()

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_offset": None}

    def __setstate__(self, state: dict[str, object]) -> None:
        state.setdefault("_answered", Remembered())  # snapshots made before dimensions
        self.__dict__.update(state)

    def seal(self) -> None:
        """Before a snapshot: seal what changed since the last one into segments."""
        event_time = self.watermark.settled
        self._calls.seal(event_time, snapshot=True)
        self._answered.seal(event_time, snapshot=True)
        self._repeats.seal(event_time, snapshot=True)

    def remembered(self) -> int:
        """Calls remembered (recent and sealed)."""
        return len(self._calls)

    def waiting(self) -> int:
        return sum(len(held) for held in self._waiting.values())


# -- folding ---------------------------------------------------------------------------


def score_bucket(score: float) -> int:
    """The bucket a score counts in once a row holds more than EXACT_UP_TO: signed as the
    score, 0.2 % wide in magnitude."""
    if score == 0:
        return 0
    bucket = latency_bucket(abs(score)) + _BUCKET_OFFSET
    return bucket if score > 0 else -bucket


def bucket_score(bucket: int) -> float:
    """The score a bucket stands for."""
    if bucket == 0:
        return 0.0
    magnitude = bucket_latency(abs(bucket) - _BUCKET_OFFSET)
    return magnitude if bucket > 0 else -magnitude


assert latency_bucket(5e-324) + _BUCKET_OFFSET > 0 and ZERO_BUCKET + _BUCKET_OFFSET < 0


def _exact(score: float) -> int:
    numerator, denominator = score.as_integer_ratio()
    return numerator * (_SCORE_UNIT // denominator)


class EvaluationStats(Struct, gc=False):
    """What one row (window, key, name) holds of its evaluations."""

    evaluations: int = 0
    scores: int = 0
    score_units: int = 0  # the exact sum, in units of 2^-1074
    score_min: float | None = None
    score_max: float | None = None
    values: array[float] = field(default_factory=lambda: array("d"))
    buckets: dict[int, int] | None = None
    labels: dict[str, int] = field(default_factory=dict)
    unsent: bool = False

    def add(self, evaluation: LLMEvaluation) -> None:
        self.evaluations += 1
        self.unsent = True
        label = evaluation.label
        if label is not None:
            self.labels[label] = self.labels.get(label, 0) + 1
        score = evaluation.score
        if score is None:
            return
        score = float(score) + 0.0  # -0.0 and 0.0 are one score
        self.scores += 1
        self.score_units += _exact(score)
        if self.score_min is None or score < self.score_min:
            self.score_min = score
        if self.score_max is None or score > self.score_max:
            self.score_max = score
        buckets = self.buckets
        if buckets is None:
            self.values.append(score)
            if len(self.values) > EXACT_UP_TO:
                buckets = self.buckets = {}
                for value in self.values:
                    bucket = score_bucket(value)
                    buckets[bucket] = buckets.get(bucket, 0) + 1
                self.values = array("d")
        else:
            bucket = score_bucket(score)
            buckets[bucket] = buckets.get(bucket, 0) + 1

    @classmethod
    def merged(cls, parts: Iterable[EvaluationStats]) -> EvaluationStats:
        """A row holding what ``parts`` hold, as if their evaluations had been folded into it."""
        out = cls()
        values: list[float] = []
        buckets: dict[int, int] | None = None
        labels = out.labels
        for part in parts:
            out.evaluations += part.evaluations
            out.scores += part.scores
            out.score_units += part.score_units
            if part.score_min is not None and (out.score_min is None or part.score_min < out.score_min):
                out.score_min = part.score_min
            if part.score_max is not None and (out.score_max is None or part.score_max > out.score_max):
                out.score_max = part.score_max
            for label, count in part.labels.items():
                labels[label] = labels.get(label, 0) + count
            if part.buckets is None:
                values.extend(part.values)
            else:
                buckets = {} if buckets is None else buckets
                for bucket, count in part.buckets.items():
                    buckets[bucket] = buckets.get(bucket, 0) + count
        if buckets is None and len(values) <= EXACT_UP_TO:
            out.values = array("d", values)
        else:
            buckets = {} if buckets is None else buckets
            for value in values:
                bucket = score_bucket(value)
                buckets[bucket] = buckets.get(bucket, 0) + 1
            out.buckets = buckets
        return out

    def digest(self) -> TDigest:
        """The scores as a t-digest built in ascending order (order-independent)."""
        digest = new_digest()
        if self.buckets is None:
            if self.values:
                digest.batch_update(sorted(self.values))
            return digest
        ascending: list[float] = []
        for bucket in sorted(self.buckets, key=bucket_score):
            ascending.extend(repeat(bucket_score(bucket), self.buckets[bucket]))
        digest.batch_update(ascending)
        return digest

    def score_sum(self) -> float | None:
        return float(Fraction(self.score_units, _SCORE_UNIT)) if self.scores else None

    def kept_labels(self) -> dict[str, int]:
        """The most frequent labels, the rest under ``"(other)"``."""
        return top_labels(self.labels)


class EvaluationEmission(NamedTuple):
    """A row, and what Postgres keeps beside it (the exact sum, the digest)."""

    row: EvaluationRow
    score_sum: float | None
    digest: bytes | None


def emission(
    key: WindowKey, start: int, window: int, name: str, stats: EvaluationStats, revision: int | None = None
) -> EvaluationEmission:
    """The row of one window, key and name (``revision``: the count of its evaluations, unless
    given)."""
    scores = stats.scores
    if scores:
        digest = stats.digest()
        p50: float | None = digest.quantile(0.5)
        p90: float | None = digest.quantile(0.9)
        average: float | None = float(Fraction(stats.score_units, _SCORE_UNIT * scores))
        packed: bytes | None = digest.to_bytes()
    else:
        p50 = p90 = average = None
        packed = None
    row = EvaluationRow(
        tenant_id=key[0],
        route=key[1],
        model=key[2],
        window_start=datetime.fromtimestamp(start, UTC),
        window_end=datetime.fromtimestamp(start + window, UTC),
        name=name,
        evaluations=stats.evaluations,
        scores=scores,
        score_avg=average,
        score_min=stats.score_min,
        score_max=stats.score_max,
        score_p50=p50,
        score_p90=p90,
        labels=stats.kept_labels(),
        revision=stats.evaluations if revision is None else revision,
    )
    return EvaluationEmission(row, stats.score_sum(), packed)


class ValueStats(Struct, gc=False):
    """One dimension of one row (window, key, name): its values' rows."""

    values: dict[Value, EvaluationStats] = field(default_factory=dict)
    # Evaluations of timed-out calls, by request id, under a dimension read from the
    # response: under no value until their call is answered (Moved), then under its.
    held: dict[str, list[LLMEvaluation]] = field(default_factory=dict)
    # Evaluations of answered timeouts under their answer's value: the revision counts
    # them, so that the rows holding every move outrank those holding fewer.
    placed: int = 0
    unsent: bool = False

    def stats(self, value: Value) -> EvaluationStats:
        found = self.values.get(value)
        if found is None:
            found = self.values[value] = EvaluationStats()
        return found


class EvaluationDimensionEmission(NamedTuple):
    """One dimension's rows of one window, key and name, and what Postgres keeps beside each."""

    rows: list[EvaluationDimensionRow]
    score_sums: list[float | None]
    digests: list[bytes | None]

    @property
    def row(self) -> EvaluationDimensionRow:
        """The first row: what every row has in common (window, key, name, dimension, revision)."""
        return self.rows[0]


def dimension_emission(
    key: WindowKey,
    start: int,
    window: int,
    name: str,
    dimension: str,
    group: ValueStats,
    revision: int,
    limit: int,
) -> EvaluationDimensionEmission:
    """The rows of ``dimension`` (a row per value, the ``limit`` most evaluated, the rest in
    ``"(other)"``, as :func:`dataflows.dimensions.ranked` chooses)."""
    stats = dict(group.values)
    if group.held:
        held = EvaluationStats()
        for evaluations in group.held.values():
            for evaluation in evaluations:
                held.add(evaluation)
        stats[None] = EvaluationStats.merged([stats[None], held]) if None in stats else held
    own, merged = ranked(((value, row.evaluations) for value, row in stats.items()), limit)
    chosen: list[tuple[Value, EvaluationStats]] = [(value, stats[value]) for value in own]
    if merged:
        chosen.append((OTHER, EvaluationStats.merged(stats[value] for value in merged)))
    out = EvaluationDimensionEmission([], [], [])
    for value, row_stats in chosen:
        row, score_sum, digest = emission(key, start, window, name, row_stats, revision)
        out.rows.append(
            EvaluationDimensionRow(
                **{field_name: getattr(row, field_name) for field_name in row.__struct_fields__},
                dimension=dimension,
                value=value,
            )
        )
        out.score_sums.append(score_sum)
        out.digests.append(digest)
    return out


class EvaluationWindows:
    """The evaluation rows of one window shard: ``(window start, key, name)`` → stats, and
    per dimension of the window ``(window start, key, name, dimension)`` → its values'."""

    def __init__(
        self,
        window_seconds: int,
        grace_seconds: int,
        lateness_seconds: int,
        evaluation_lateness_seconds: int,
        value_limit: int = DEFAULT_VALUES,
    ) -> None:
        self.window = int(window_seconds)
        self.grace = int(grace_seconds)
        # Window state is kept this long after the window's end.
        self.kept = int(evaluation_lateness_seconds) + int(lateness_seconds)
        self.value_limit = value_limit  # values a dimension's rows keep apart (DIMENSION_VALUES)
        self.watermark = Watermark()
        self._rows: dict[int, dict[tuple[WindowKey, str], EvaluationStats]] = {}
        self._values: dict[int, dict[tuple[WindowKey, str, str], ValueStats]] = {}
        self._unsent: set[int] = set()  # window starts with rows to emit
        self._offset: float | None = None  # as EvaluationJoin's

    def on_matched(self, matched: list[Matched | Moved], now: float) -> list[DeadLetter]:
        """Fold evaluations into their rows; those for a window already forgotten are
        ``too_late``. A moved call's evaluations move to its answer's value."""
        watermark = self.watermark
        letters: list[DeadLetter] = []
        for item in matched:
            if type(item) is Moved:
                self._move(item)
                continue
            assert isinstance(item, Matched)
            key, start, evaluation, source, dimensions = item
            watermark.observe(max(evaluation.timestamp.timestamp(), float(start)), now)
            end = start + self.window
            if end + self.kept < watermark.settled:
                letters.append(
                    evaluation_letter(
                        evaluation,
                        source,
                        "too_late",
                        f"evaluation {evaluation.name!r} of call {evaluation.request_id!r}: the window "
                        f"[{_iso(start)}, {_iso(end)}) was closed for good at {_iso(end + self.kept)} "
                        f"(EVALUATION_LATENESS_SECONDS + LATENESS_SECONDS); event time was already "
                        f"{_iso(watermark.settled)}",
                    )
                )
                continue
            rows = self._rows.get(start)
            if rows is None:
                rows = self._rows[start] = {}
            stats = rows.get((key, evaluation.name))
            if stats is None:
                stats = rows[(key, evaluation.name)] = EvaluationStats()
            stats.add(evaluation)
            if dimensions:
                self._add_values(key, start, evaluation, call_dimensions(dimensions))
            self._unsent.add(start)
        return letters

    def _group(self, start: int, key: WindowKey, name: str, dimension: str) -> ValueStats:
        groups = self._values.get(start)
        if groups is None:
            groups = self._values[start] = {}
        group = groups.get((key, name, dimension))
        if group is None:
            group = groups[(key, name, dimension)] = ValueStats()
        return group

    def _add_values(
        self, key: WindowKey, start: int, evaluation: LLMEvaluation, call: CallDimensions
    ) -> None:
        """Fold an evaluation into its call's value of each dimension; under one read from the
        response, a timeout's is held until its call is answered."""
        for dimension, value in zip(call.names, call.values, strict=True):
            group = self._group(start, key, evaluation.name, dimension)
            group.unsent = True
            if from_response(dimension):
                if call.state == TIMED_OUT:
                    group.held.setdefault(evaluation.request_id, []).append(evaluation)
                    continue
                if call.state == ANSWERED:
                    group.placed += 1
            group.stats(value).add(evaluation)

    def _move(self, moved: Moved) -> None:
        """The evaluations held for a timed-out call, now answered, go under its answer's value."""
        groups = self._values.get(moved.start)
        if not groups:
            return
        call = call_dimensions(moved.dimensions)
        answers = {
            dimension: value
            for dimension, value in zip(call.names, call.values, strict=True)
            if from_response(dimension)
        }
        for (key, _, dimension), group in groups.items():
            if key != moved.key or dimension not in answers:
                continue
            held = group.held.pop(moved.request_id, None)
            if held:
                stats = group.stats(answers[dimension])
                for evaluation in held:
                    stats.add(evaluation)
                group.placed += len(held)
                group.unsent = True
                self._unsent.add(moved.start)

    def on_time(self, now: float) -> list[EvaluationEmission | EvaluationDimensionEmission]:
        """Rows due now (their window's end + grace passed, with evaluations not emitted);
        forgets windows past their end + the lateness of evaluations."""
        event_time = self.watermark.current(now)
        self._offset = now - event_time
        window = self.window
        out: list[EvaluationEmission | EvaluationDimensionEmission] = []
        for start in sorted(self._unsent):
            if start + window + self.grace > event_time:
                break
            self._unsent.discard(start)
            rows = self._rows[start]
            for (key, name), stats in rows.items():
                if stats.unsent:
                    stats.unsent = False
                    out.append(emission(key, start, window, name, stats))
            for (key, name, dimension), group in self._values.get(start, {}).items():
                if group.unsent:
                    group.unsent = False
                    revision = rows[(key, name)].evaluations + group.placed
                    out.append(
                        dimension_emission(
                            key, start, window, name, dimension, group, revision, self.value_limit
                        )
                    )
        for start in [start for start in self._rows if start + window + self.kept < event_time]:
            if start not in self._unsent:
                del self._rows[start]
                self._values.pop(start, None)
        return out

    def __setstate__(self, state: dict[str, object]) -> None:
        state.setdefault("_values", {})  # snapshots made before dimensions
        state.setdefault("value_limit", DEFAULT_VALUES)
        self.__dict__.update(state)

    def next_wakeup(self) -> float | None:
        """Wall-clock Unix seconds at which rows are due or a window is to be forgotten (as
        :meth:`EvaluationJoin.next_wakeup`)."""
        due = [start + self.window + self.kept for start in self._rows]
        due += [start + self.window + self.grace for start in self._unsent]
        if not due:
            return None
        if self._offset is None:
            return 0.0
        return min(due) + self._offset + WAKEUP_MARGIN

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_offset": None}

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._rows.values())
