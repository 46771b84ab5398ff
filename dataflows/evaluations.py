"""Evaluations (SPEC §9): scores and labels joined to the calls they are about, per window.

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
from collections.abc import Callable
from datetime import UTC, datetime
from fractions import Fraction
from itertools import repeat
from typing import NamedTuple

from fastdigest import TDigest
from msgspec import Struct, field

from dataflows.aggregate import EXACT_UP_TO, ZERO_BUCKET, bucket_latency, latency_bucket, new_digest
from dataflows.batches import EventRun, SourceRef
from dataflows.clock import Watermark
from dataflows.join import WAKEUP_MARGIN
from dataflows.remembered import Remembered, SegmentStore
from dataflows.shards import WindowKey
from schemas.deadletter import DeadLetter, Reason
from schemas.events import LLMEvaluation, encoder
from schemas.metrics import EvaluationRow, top_labels

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
    window of ``keys[i]`` that starts at ``starts[i]``, known at event time ``times[i]``."""

    request_ids: list[str]
    keys: list[WindowKey]
    starts: list[int]
    times: list[float]

    @classmethod
    def empty(cls) -> CountedCalls:
        return cls([], [], [], [])


class Matched(NamedTuple):
    """An evaluation and the window of its call, for the evaluation windows."""

    key: WindowKey
    start: int
    evaluation: LLMEvaluation
    source: SourceRef


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
        self._calls = Remembered()  # request id -> (window start + keep, key text)
        self._repeats = Remembered()  # _repeat_key -> (until when, "")
        # request id -> evaluations waiting for their call, each with its deadline
        self._waiting: dict[str, list[tuple[float, LLMEvaluation, SourceRef]]] = {}
        # Wall clock minus event time at the last look; not snapshotted (unknown until then).
        self._offset: float | None = None

    # -- calls --------------------------------------------------------------------

    def on_counted(self, counted: CountedCalls, now: float) -> list[Matched | DeadLetter]:
        """Remember the calls the windows counted; the evaluations that waited for them go on."""
        keep = self.keep
        calls = self._calls
        if counted.times:
            # Calls move event time too: without evaluations it would stand still, and
            # nothing would ever be sealed on schedule or expire.
            self.watermark.observe(max(counted.times), now)
            self._offset = now - self.watermark.settled
        out: list[Matched | DeadLetter] = []
        waiting = self._waiting
        for rid, key, start in zip(counted.request_ids, counted.keys, counted.starts, strict=True):
            calls.add(rid, start + keep, key_text(key))
            held = waiting.pop(rid, None)
            if held is not None:
                for _, evaluation, source in held:
                    out.extend(self._judge(evaluation, source, key, start, record=False))
        self._maintain(self.watermark.current(now))
        return out

    def _maintain(self, event_time: float) -> None:
        """Seal what is due; nothing before event time is known (every seal would be due)."""
        if event_time > -math.inf:
            self._calls.maintain(event_time)
            self._repeats.maintain(event_time)

    # -- evaluations --------------------------------------------------------------

    def on_runs(self, runs: list[EventRun], now: float) -> list[Matched | DeadLetter]:
        """Add runs of evaluations, in order: those whose call is known go on, the others
        wait for it. Repeats are ignored."""
        out: list[Matched | DeadLetter] = []
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
        self, evaluation: LLMEvaluation, source: SourceRef, out: list[Matched | DeadLetter]
    ) -> None:
        repeat_key = _repeat_key(evaluation)
        if self._repeats.get(repeat_key, -math.inf) is not None:
            return
        rid = evaluation.request_id
        found = self._calls.get(rid, -math.inf)
        if found is None:
            # Repeats wait too: which of them counts, if any, is known once the call is.
            self._waiting.setdefault(rid, []).append((self.orphan_after(evaluation), evaluation, source))
            return
        until, key = found
        out.extend(self._judge(evaluation, source, key_of(key), int(until) - self.keep, record=True))

    def _judge(
        self, evaluation: LLMEvaluation, source: SourceRef, key: WindowKey, start: int, record: bool
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
        return [Matched(key, start, evaluation, source)]

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
        self._repeats.attach(store, lambda key: "evaluated/" + shard_of(key.split(_SEPARATOR, 1)[0]))

    def needs_store(self) -> bool:
        return self._calls.needs_store() or self._repeats.needs_store()

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_offset": None}

    def seal(self) -> None:
        """Before a snapshot: seal what changed since the last one into segments."""
        event_time = self.watermark.settled
        self._calls.seal(event_time, snapshot=True)
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
    key: WindowKey, start: int, window: int, name: str, stats: EvaluationStats
) -> EvaluationEmission:
    """The row of one window, key and name."""
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
        revision=stats.evaluations,
    )
    return EvaluationEmission(row, stats.score_sum(), packed)


class EvaluationWindows:
    """The evaluation rows of one window shard: ``(window start, key, name)`` → stats."""

    def __init__(
        self, window_seconds: int, grace_seconds: int, lateness_seconds: int, evaluation_lateness_seconds: int
    ) -> None:
        self.window = int(window_seconds)
        self.grace = int(grace_seconds)
        # Window state is kept this long after the window's end.
        self.kept = int(evaluation_lateness_seconds) + int(lateness_seconds)
        self.watermark = Watermark()
        self._rows: dict[int, dict[tuple[WindowKey, str], EvaluationStats]] = {}
        self._unsent: set[int] = set()  # window starts with rows to emit
        self._offset: float | None = None  # as EvaluationJoin's

    def on_matched(self, matched: list[Matched], now: float) -> list[DeadLetter]:
        """Fold evaluations into their rows; those for a window already forgotten are
        ``too_late``."""
        watermark = self.watermark
        letters: list[DeadLetter] = []
        for key, start, evaluation, source in matched:
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
            self._unsent.add(start)
        return letters

    def on_time(self, now: float) -> list[EvaluationEmission]:
        """Rows due now (their window's end + grace passed, with evaluations not emitted);
        forgets windows past their end + the lateness of evaluations."""
        event_time = self.watermark.current(now)
        self._offset = now - event_time
        window = self.window
        out: list[EvaluationEmission] = []
        for start in sorted(self._unsent):
            if start + window + self.grace > event_time:
                break
            self._unsent.discard(start)
            for (key, name), stats in self._rows[start].items():
                if stats.unsent:
                    stats.unsent = False
                    out.append(emission(key, start, window, name, stats))
        for start in [start for start in self._rows if start + window + self.kept < event_time]:
            if start not in self._unsent:
                del self._rows[start]
        return out

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
