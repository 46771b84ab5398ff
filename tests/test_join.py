"""The join's rules, driven directly (no Kafka): pairing, timeouts, orphans, duplicates."""

from __future__ import annotations

import pickle
import tracemalloc
from datetime import UTC, datetime, timedelta

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.join import Call, JoinShard, SourceRef
from dataflows.pending import Pending
from schemas.deadletter import DeadLetter
from schemas.events import LLMRequest, LLMResponse, MetadataValue, request_decoder, response_decoder

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
NOW = 1_900_000_000.0  # wall clock, independent of event time
TIMEOUT = 300
DEDUPE = 3600
WINDOW = 60
LATENESS = 600
REQUESTS = "llm.requests"
RESPONSES = "llm.responses"


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, UTC)


def request(
    rid: str,
    seconds: float,
    *,
    tenant_id: str = "acme",
    route: str = "/chat",
    model: str = "gpt-4o",
    prompt_tokens: int = 100,
    provider: str | None = None,
    user_id_hash: str | None = None,
    metadata: dict[str, MetadataValue] | None = None,
) -> LLMRequest:
    return LLMRequest(
        request_id=rid,
        timestamp=at(seconds),
        tenant_id=tenant_id,
        route=route,
        model=model,
        prompt_tokens=prompt_tokens,
        provider=provider,
        user_id_hash=user_id_hash,
        metadata=metadata,
    )


def response(
    rid: str,
    seconds: float,
    *,
    tenant_id: str | None = None,
    latency_ms: float | None = None,
    completion_tokens: int = 20,
    cache_read_tokens: int = 0,
    reasoning_tokens: int = 0,
    time_to_first_token_ms: float | None = None,
    finish_reason: str | None = None,
    error: str | None = None,
) -> LLMResponse:
    return LLMResponse(
        request_id=rid,
        timestamp=at(seconds),
        tenant_id=tenant_id,
        latency_ms=latency_ms,
        completion_tokens=completion_tokens,
        cache_read_tokens=cache_read_tokens,
        reasoning_tokens=reasoning_tokens,
        time_to_first_token_ms=time_to_first_token_ms,
        finish_reason=finish_reason,
        error=error,
    )


def feed(
    join: JoinShard, events: list[LLMRequest | LLMResponse], now: float = NOW
) -> list[Call | DeadLetter]:
    out: list[Call | DeadLetter] = []
    for offset, event in enumerate(events):
        topic = REQUESTS if isinstance(event, LLMRequest) else RESPONSES
        out += join.on_event(event, SourceRef(topic, 0, offset), now)
    return out


def outcome(item: Call | DeadLetter) -> tuple[str, str]:
    """(kind, request_id): 'answered', 'timeout', or the dead letter's reason."""
    if isinstance(item, Call):
        return ("answered" if item.response is not None else "timeout", item.request.request_id)
    assert item.payload is not None
    return (item.reason, msgspec.json.decode(item.payload)["request_id"])


def call_of(item: Call | DeadLetter) -> Call:
    """``item``, which the test expects to be a counted call."""
    assert isinstance(item, Call), item
    return item


def answer_of(item: Call | DeadLetter) -> LLMResponse:
    """The response of ``item``, which the test expects to be an answered call."""
    answer = call_of(item).response
    assert answer is not None, item
    return answer


def letter_of(item: Call | DeadLetter) -> DeadLetter:
    """``item``, which the test expects to be a dead letter."""
    assert isinstance(item, DeadLetter), item
    return item


def payload_of(item: Call | DeadLetter) -> str:
    """The original record carried by ``item``, which the test expects to be a dead letter."""
    payload = letter_of(item).payload
    assert payload is not None, item
    return payload


def drain(join: JoinShard, after: float = 10 * DEDUPE) -> list[Call | DeadLetter]:
    """Let event time run ``after`` seconds of wall clock past NOW."""
    return join.on_time(NOW + after)


def test_request_then_response_pairs_into_one_call() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    assert join.on_event(request("a", 0), SourceRef(REQUESTS, 1, 7), NOW) == []
    out = join.on_event(response("a", 2.5), SourceRef(RESPONSES, 2, 9), NOW)
    assert len(out) == 1
    call = out[0]
    assert isinstance(call, Call)
    assert call.response is not None
    assert call.request.request_id == call.response.request_id == "a"
    assert call.source == SourceRef(RESPONSES, 2, 9)  # the record that completed it
    assert call.completed_at == T0 + 2.5
    assert drain(join) == []  # nothing else ever comes of it


def test_response_before_request_pairs_the_same() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    assert join.on_event(response("a", 2.5), SourceRef(RESPONSES, 0, 1), NOW) == []
    out = join.on_event(request("a", 0), SourceRef(REQUESTS, 0, 4), NOW)
    assert [outcome(item) for item in out] == [("answered", "a")]
    call = call_of(out[0])
    assert call.source == SourceRef(REQUESTS, 0, 4)
    assert call.completed_at == T0 + 2.5


def test_request_without_response_times_out_once_event_time_passes_the_timeout() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    feed(join, [request("a", 0)])
    # Event time exactly at request + timeout: not passed yet.
    feed(join, [request("clock", TIMEOUT)])
    assert join.on_time(NOW) == []
    feed(join, [request("clock2", TIMEOUT + 0.5)])
    out = join.on_time(NOW)
    assert [outcome(item) for item in out] == [("timeout", "a")]
    call = out[0]
    assert isinstance(call, Call)
    assert call.response is None
    assert call.source == SourceRef(REQUESTS, 0, 0)
    assert call.completed_at == T0 + TIMEOUT


def test_a_response_exactly_at_the_timeout_still_pairs() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    out = feed(join, [request("a", 0), response("a", TIMEOUT)])
    assert [outcome(item) for item in out] == [("answered", "a")]


def test_quiet_time_advances_event_time_with_the_wall_clock() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    feed(join, [request("a", 0)], now=NOW)
    wakeup = join.next_wakeup()
    assert wakeup is not None
    # The deadline is T0 + 300; event time reaches it 300 s of wall clock after NOW.
    assert NOW + TIMEOUT < wakeup <= NOW + TIMEOUT + 1.01
    assert join.on_time(NOW + TIMEOUT - 1) == []
    assert [outcome(item) for item in join.on_time(wakeup)] == [("timeout", "a")]


def test_response_without_request_becomes_an_orphan_dead_letter() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    lone = response("lost", 10, error="boom")
    join.on_event(lone, SourceRef(RESPONSES, 2, 41), NOW)
    # Its window [0, 60) takes late calls until event time 660, a request with it:
    # event time is at 10 + the wall-clock time since.
    assert join.on_time(NOW + TIMEOUT + 1) == []  # the old deadline, response + timeout
    assert join.on_time(NOW + 650) == []  # exactly 660: not passed
    out = join.on_time(NOW + 650.5)
    assert len(out) == 1
    letter = out[0]
    assert isinstance(letter, DeadLetter)
    assert letter.reason == "orphan_response"
    assert (letter.source_topic, letter.partition, letter.offset) == (RESPONSES, 2, 41)
    assert "no request" in letter.error and "LATENESS_SECONDS (600 s)" in letter.error
    assert letter.payload is not None
    assert response_decoder.decode(letter.payload) == lone


def test_a_response_too_far_from_its_request_reports_both() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    out = feed(join, [request("a", 0), response("a", TIMEOUT + 1)])
    # Both sides known and too far apart: the response at once, the request at its deadline.
    assert [outcome(item) for item in out] == [("orphan_response", "a")]
    assert "301 s earlier" in letter_of(out[0]).error
    assert [outcome(item) for item in drain(join)] == [("timeout", "a")]


def test_a_response_from_another_tenant_never_pairs() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    out = feed(join, [request("a", 0, tenant_id="acme"), response("a", 1, tenant_id="evil")])
    assert [outcome(item) for item in out] == [("orphan_response", "a")]  # at once
    letter = out[0]
    assert isinstance(letter, DeadLetter)
    assert "tenant mismatch" in letter.error and "'evil'" in letter.error and "'acme'" in letter.error
    assert (letter.source_topic, letter.offset) == (RESPONSES, 1)
    assert [outcome(item) for item in drain(join)] == [("timeout", "a")]


def test_another_tenants_response_before_the_request_does_not_take_the_real_ones_place() -> None:
    for order in (
        ["evil", "request", "real"],
        ["evil", "real", "request"],
        ["real", "evil", "request"],
    ):
        events: dict[str, LLMRequest | LLMResponse] = {
            "evil": response("a", 1, tenant_id="evil", completion_tokens=666),
            "request": request("a", 0, tenant_id="acme"),
            "real": response("a", 2, tenant_id="acme", completion_tokens=7),
        }
        join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
        out = feed(join, [events[name] for name in order]) + drain(join)
        assert sorted(outcome(item) for item in out) == [("answered", "a"), ("orphan_response", "a")], order
        call = next(item for item in out if isinstance(item, Call))
        assert call.response is not None and call.response.completion_tokens == 7
        letter = next(item for item in out if isinstance(item, DeadLetter))
        assert "tenant mismatch" in letter.error and "'evil'" in letter.error
        assert response_decoder.decode(payload_of(letter)) == events["evil"]
        assert len(join) == 0


def test_another_tenants_response_after_the_request_is_dead_lettered_and_the_real_one_still_pairs() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    out = feed(join, [request("a", 0, tenant_id="acme"), response("a", 1, tenant_id="evil")])
    assert [outcome(item) for item in out] == [("orphan_response", "a")]
    out = feed(join, [response("a", 2, tenant_id="acme", completion_tokens=7)])
    assert [outcome(item) for item in out] == [("answered", "a")]
    assert answer_of(out[0]).completion_tokens == 7
    assert drain(join) == []
    assert join.duplicates == 0


def test_another_tenants_response_after_the_call_is_counted_is_dead_lettered_not_ignored() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    assert len(feed(join, [request("a", 0), response("a", 1, tenant_id="acme")])) == 1
    out = feed(
        join,
        [
            response("a", 1, tenant_id="evil"),
            response("a", 1, tenant_id="acme"),  # the tenant's own repeat
            response("a", 1, tenant_id="evil"),  # a repeat of the one dead-lettered
        ],
    )
    assert [outcome(item) for item in out] == [("orphan_response", "a")]
    assert "tenant mismatch" in letter_of(out[0]).error
    assert join.duplicates == 2

    # Timed out: another tenant's response does not use up the conversion of the
    # timeout by the real late response.
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    feed(join, [request("b", 0), request("clock", TIMEOUT + 5)])
    assert [outcome(item) for item in join.on_time(NOW)] == [("timeout", "b")]
    out = feed(join, [response("b", 20, tenant_id="evil"), response("b", 20, tenant_id="acme")])
    assert [outcome(item) for item in out] == [("orphan_response", "b"), ("answered", "b")]
    assert "tenant mismatch" in letter_of(out[0]).error
    assert call_of(out[1]).replaces_timeout and answer_of(out[1]).tenant_id == "acme"


def test_other_tenants_responses_around_a_too_far_pair_are_dead_lettered_and_state_empties() -> None:
    # DEDUPE_SECONDS 0: the timed-out id is still remembered until its window
    # stops taking late calls (660), past timeout + max(timeout, dedupe) (600).
    join = JoinShard(TIMEOUT, 0, WINDOW, LATENESS)
    out = feed(join, [request("a", 0), response("a", TIMEOUT + 1)])
    assert [outcome(item) for item in out] == [("orphan_response", "a")]
    assert "301 s earlier" in letter_of(out[0]).error
    # The request waits for its deadline: another tenant's response is no repeat.
    out = feed(join, [response("a", TIMEOUT + 1, tenant_id="evil")])
    assert [outcome(item) for item in out] == [("orphan_response", "a")]
    assert "tenant mismatch" in letter_of(out[0]).error
    feed(join, [request("clock", TIMEOUT + 2)])
    assert [outcome(item) for item in join.on_time(NOW)] == [("timeout", "a")]
    # Counted now: a third tenant is dead-lettered, the repeats are ignored.
    out = feed(
        join,
        [
            response("a", TIMEOUT + 3, tenant_id="other"),
            response("a", TIMEOUT + 3, tenant_id="evil"),
            response("a", 20),  # no conversion: the first response of its own was too far
            request("a", 0),
        ],
    )
    assert [outcome(item) for item in out] == [("orphan_response", "a")]
    assert "'other'" in letter_of(out[0]).error
    assert join.duplicates == 3
    feed(join, [request("clock2", 655)])
    join.on_time(NOW)
    assert feed(join, [request("a", 0)]) == []  # event time 655: still remembered
    assert join.duplicates == 4
    out = [item for item in drain(join) if outcome(item)[1] == "a"]
    assert out == []
    assert len(join) == 0 and vars(join)["_mismatched"] == {}


def test_responses_of_several_tenants_waiting_for_the_request_expire_on_their_own_deadlines() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    feed(
        join,
        [
            response("a", 1, tenant_id="x"),  # window [0, 60): orphan after 660
            response("a", 65, tenant_id="y"),  # window [60, 120): orphan after 720
            response("a", 66, tenant_id="y"),  # a repeat of y's
        ],
    )
    assert join.duplicates == 1
    feed(join, [request("clock", 700)])
    out = join.on_time(NOW)
    assert [outcome(item) for item in out] == [("orphan_response", "a")]
    assert response_decoder.decode(payload_of(out[0])).tenant_id == "x"
    out = [item for item in drain(join) if outcome(item)[1] == "a"]
    assert [outcome(item) for item in out] == [("orphan_response", "a")]
    assert response_decoder.decode(payload_of(out[0])).tenant_id == "y"
    assert len(join) == 0


def test_a_response_stamped_with_the_same_tenant_pairs() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    out = feed(join, [response("a", 1, tenant_id="acme"), request("a", 0, tenant_id="acme")])
    assert [outcome(item) for item in out] == [("answered", "a")]


def test_before_counting_the_first_request_and_first_response_win() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    out = feed(
        join,
        [
            request("a", 0, prompt_tokens=1),
            request("a", 0, prompt_tokens=2),  # ignored
        ],
    )
    assert out == []
    out = feed(join, [response("a", 1, completion_tokens=5)])
    assert len(out) == 1
    assert call_of(out[0]).request.prompt_tokens == 1

    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    out = feed(
        join,
        [
            response("b", 1, completion_tokens=5),
            response("b", 1, completion_tokens=6),  # ignored
            request("b", 0),
        ],
    )
    assert [outcome(item) for item in out] == [("answered", "b")]
    assert answer_of(out[0]).completion_tokens == 5
    assert join.duplicates == 1
    assert drain(join) == []


def test_after_counting_repeats_are_ignored_until_dedupe_expires() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    assert len(feed(join, [request("a", 0), response("a", 1)])) == 1
    assert feed(join, [request("a", 0), response("a", 1), response("a", 2)]) == []
    assert join.duplicates == 3
    # Counted at event time 1 (its response): still remembered just before 1 + DEDUPE ...
    feed(join, [request("clock", DEDUPE + 0.5)])
    assert join.on_time(NOW) == []
    assert feed(join, [request("a", 0)]) == []
    assert join.duplicates == 4
    # ... forgotten once event time passes it: the same id is a new call again.
    feed(join, [request("clock2", DEDUPE + 2)])
    join.on_time(NOW)
    out = feed(join, [request("a", DEDUPE + 3), response("a", DEDUPE + 4)])
    assert [outcome(item) for item in out] == [("answered", "a")]


def test_a_timed_out_call_is_remembered_for_dedupe_after_it_timed_out() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    feed(join, [request("a", 0), request("clock", TIMEOUT + 1)])
    assert [outcome(item) for item in join.on_time(NOW)] == [("timeout", "a")]
    # Counted at event time TIMEOUT: a repeat just before TIMEOUT + DEDUPE is still ignored.
    feed(join, [request("clock2", TIMEOUT + DEDUPE - 1)])
    join.on_time(NOW)
    assert feed(join, [request("a", 0)]) == []
    assert join.duplicates == 1


def test_timed_out_call_first_late_response_converts_it_then_repeats_are_ignored() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    feed(join, [request("a", 0), request("clock", TIMEOUT + 5)])
    assert [outcome(item) for item in join.on_time(NOW)] == [("timeout", "a")]
    out = feed(join, [response("a", 20, completion_tokens=9)])
    assert [outcome(item) for item in out] == [("answered", "a")]
    assert call_of(out[0]).replaces_timeout
    out = feed(join, [response("a", 20), response("a", 21, completion_tokens=1), request("a", 0)])
    assert out == []
    assert join.duplicates == 3
    assert [outcome(item) for item in drain(join)] == [("timeout", "clock")]
    assert len(join) == 0


# -- provisional timeouts ------------------------------------------------------


def timed_out_join(rid: str = "a", seconds: float = 0, clock: float = TIMEOUT + 5) -> JoinShard:
    """A join whose request ``rid`` at ``seconds`` was reported as timed out, with
    event time at ``clock``."""
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    feed(join, [request(rid, seconds), request("clock", clock)])
    assert [outcome(item) for item in join.on_time(NOW)] == [("timeout", rid)]
    return join


def test_a_late_response_turns_the_timeout_into_the_answered_call() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    original = request("a", 0, prompt_tokens=40)
    join.on_event(original, SourceRef(REQUESTS, 1, 3), NOW)
    feed(join, [request("clock", TIMEOUT + 5)])
    (timeout,) = join.on_time(NOW)
    assert isinstance(timeout, Call) and timeout.response is None and not timeout.replaces_timeout
    assert timeout.completed_at == T0 + TIMEOUT
    late = response("a", 20, completion_tokens=9, latency_ms=20_000.0)
    out = join.on_event(late, SourceRef(RESPONSES, 2, 8), NOW)
    assert len(out) == 1
    call = out[0]
    assert isinstance(call, Call)
    assert call.replaces_timeout
    assert call.request == original and call.response == late
    assert call.source == SourceRef(RESPONSES, 2, 8)
    assert call.completed_at == T0 + 20  # the later of its two timestamps
    assert join.duplicates == 0
    # Nothing else comes of "a": no orphan, no second timeout.
    assert [outcome(item) for item in drain(join)] == [("timeout", "clock")]
    assert len(join) == 0


def test_a_response_exactly_at_the_timeout_converts_and_one_beyond_it_is_an_orphan() -> None:
    join = timed_out_join()
    out = feed(join, [response("a", TIMEOUT)])
    assert [outcome(item) for item in out] == [("answered", "a")]
    assert call_of(out[0]).replaces_timeout

    join = timed_out_join()
    far = response("a", TIMEOUT + 0.5)
    out = feed(join, [far])
    assert [outcome(item) for item in out] == [("orphan_response", "a")]
    letter = letter_of(out[0])
    assert "300.5 s earlier" in letter.error and "JOIN_TIMEOUT_SECONDS" in letter.error
    assert response_decoder.decode(payload_of(out[0])) == far
    # The first response won: one in range after it is a repeat, the timeout stands.
    assert feed(join, [response("a", 20)]) == []
    assert join.duplicates == 1
    assert [outcome(item) for item in drain(join)] == [("timeout", "clock")]


def test_a_timeout_converts_until_its_window_stops_taking_late_calls_then_responses_are_too_late() -> None:
    # Request at 59.5: window [0, 60), late calls until 60 + 600 = 660.
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    assert join.convertible_until(T0 + 59.5) == T0 + 660
    assert join.convertible_until(T0 + 60) == T0 + 720

    join = timed_out_join(seconds=59.5, clock=660)  # exactly 660: not passed
    out = feed(join, [response("a", 70)])
    assert [outcome(item) for item in out] == [("answered", "a")]
    assert call_of(out[0]).replaces_timeout

    join = timed_out_join(seconds=59.5, clock=660.5)
    late = response("a", 70)
    out = join.on_event(late, SourceRef(RESPONSES, 1, 77), NOW)
    assert len(out) == 1
    letter = out[0]
    assert isinstance(letter, DeadLetter)
    assert letter.reason == "too_late"
    assert (letter.source_topic, letter.partition, letter.offset) == (RESPONSES, 1, 77)
    assert "2026-01-01T00:00:00+00:00" in letter.error and "2026-01-01T00:11:00+00:00" in letter.error
    assert "LATENESS_SECONDS 600" in letter.error
    assert response_decoder.decode(payload_of(letter)) == late
    # Its repeats are ignored, like any repeat of a counted call.
    assert feed(join, [response("a", 70), request("a", 59.5)]) == []
    assert join.duplicates == 2
    drain(join)
    assert len(join) == 0


def test_a_waiting_response_is_an_orphan_only_once_its_window_stops_taking_late_calls() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    assert join.orphan_after(T0 + 59.5) == T0 + 660
    assert join.orphan_after(T0 + 60) == T0 + 720

    # Event time exactly 660: a request for it still pairs (and did not time out: it
    # is new, its own deadline is ahead).
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    feed(join, [response("a", 59.5), request("clock", 660)])
    assert join.on_time(NOW) == []
    out = feed(join, [request("a", 50)])
    assert [outcome(item) for item in out] == [("answered", "a")]
    assert not call_of(out[0]).replaces_timeout

    # Just past it: the response is an orphan, and the request that comes after
    # waits on its own and times out.
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    feed(join, [response("a", 59.5), request("clock", 660.5)])
    assert [outcome(item) for item in join.on_time(NOW)] == [("orphan_response", "a")]
    assert feed(join, [request("a", 50)]) == []
    assert sorted(outcome(item) for item in drain(join)) == [("timeout", "a"), ("timeout", "clock")]


def test_a_snapshot_keeps_a_timed_out_request_convertible_until_its_deadline() -> None:
    join = timed_out_join(seconds=10, clock=TIMEOUT + 15)
    snapshot = pickle.dumps(join)

    restored = pickle.loads(snapshot)
    assert vars(restored)["_timed_out"] == {"a": T0 + 10}
    assert restored.on_time(NOW) == []
    out = feed(restored, [response("a", 12, completion_tokens=3)])
    assert [outcome(item) for item in out] == [("answered", "a")]
    assert call_of(out[0]).replaces_timeout and answer_of(out[0]).completion_tokens == 3
    assert out == feed(join, [response("a", 12, completion_tokens=3)])

    # The deadline came back with it: past 660, the request is gone and the
    # response too late.
    restored = pickle.loads(snapshot)
    feed(restored, [request("clock2", 661)])
    restored.on_time(NOW)
    assert "a" not in vars(restored)["_pending"]
    assert [outcome(item) for item in feed(restored, [response("a", 12)])] == [("too_late", "a")]


def test_a_snapshot_of_an_older_release_with_positional_tuples_still_restores() -> None:
    # Waiting entries of every kind: a response before its request, two tenants'
    # responses (a stray), and a timed-out request kept for its response.
    join = timed_out_join(seconds=10, clock=TIMEOUT + 15)
    feed(join, [response("b", 20), response("c", 21), response("c", 21.5, tenant_id="other")])
    state = join.__getstate__()
    entries = state["_pending"]
    assert isinstance(entries, list)
    assert any(not isinstance(kept, bytes) and kept.strays for _, kept in entries)
    # What releases before PendingSnapshot wrote: the rid, then the fields in order.
    state["_pending"] = [
        item if isinstance(item[1], bytes) else (item[0], *msgspec.structs.astuple(item[1]))
        for item in entries
    ]
    legacy = pickle.loads(pickle.dumps(state))
    restored = JoinShard.__new__(JoinShard)
    restored.__setstate__(legacy)
    current = pickle.loads(pickle.dumps(join))
    assert vars(restored)["_pending"] == vars(current)["_pending"] == vars(join)["_pending"]
    events = [request("b", 19), request("c", 20), response("a", 12)]
    assert feed(restored, events) == feed(current, events)


def test_cache_reads_beyond_the_prompt_are_clamped_and_counted() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    out = feed(join, [request("a", 0, prompt_tokens=50), response("a", 1, cache_read_tokens=80)])
    call = out[0]
    assert isinstance(call, Call) and call.response is not None
    assert call.response.cache_read_tokens == 50
    assert join.cache_reads_clamped == 1
    out = feed(join, [request("b", 0, prompt_tokens=50), response("b", 1, cache_read_tokens=50)])
    assert answer_of(out[0]).cache_read_tokens == 50
    assert join.cache_reads_clamped == 1


def test_state_is_empty_once_every_deadline_passed() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    feed(
        join,
        [
            request("paired", 0),
            response("paired", 1),
            request("timeout", 5),
            response("orphan", 7),
            request("far", 0),
            response("far", TIMEOUT + 50),
            request("late", 3),
        ],
    )
    assert len(join) == 5
    drain(join, after=DEDUPE / 2)  # the counted ids are still remembered
    feed(join, [response("late", 4)], now=NOW + DEDUPE / 2)
    assert len(join) == 4  # paired, timeout, far, late: counted, within dedupe
    drain(join)
    assert len(join) == 0
    assert join.next_wakeup() is None
    assert vars(join)["_buckets"] == {} and vars(join)["_bucket_heap"] == []


def test_next_wakeup_is_none_when_empty_and_due_after_a_restore() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    assert join.next_wakeup() is None
    feed(join, [request("a", 0)])
    restored = pickle.loads(pickle.dumps(join))
    assert restored.next_wakeup() == 0.0  # unknown offset: run on_time now
    assert restored.on_time(NOW) == []
    wakeup = restored.next_wakeup()
    assert wakeup is not None and NOW + TIMEOUT < wakeup <= NOW + TIMEOUT + 1.01


# -- any arrival order ---------------------------------------------------------


def scenario(wide: bool) -> tuple[list[LLMRequest | LLMResponse], set[tuple[str, str]]]:
    """A small event set and its expected outcomes, worked out from the rules.

    ``wide`` adds pairs a whole timeout apart: their timestamps move event time
    past other requests' deadlines, so they can only be shuffled freely when
    nothing expires until the end.
    """
    events: list[LLMRequest | LLMResponse] = [
        request("ok", 0),
        response("ok", 3),
        request("ok-dup", 1),
        request("ok-dup", 1),
        response("ok-dup", 4),
        response("ok-dup", 4),
        request("skew", 10),
        response("skew", 9),  # response stamped before: still pairs
        request("silent", 5),
        response("orphan", 6),
        request("tenant", 8, tenant_id="acme"),
        response("tenant", 9, tenant_id="other"),
        # Another tenant's response, then the right one: whichever comes first,
        # the right one pairs and the other is dead-lettered.
        request("stolen", 8, tenant_id="acme"),
        response("stolen", 9, tenant_id="other"),
        response("stolen", 9, tenant_id="other"),
        response("stolen", 9.5, tenant_id="acme"),
        response("stolen", 9.5, tenant_id="acme"),
    ]
    expected = {
        ("answered", "ok"),
        ("answered", "ok-dup"),
        ("answered", "skew"),
        ("timeout", "silent"),
        ("orphan_response", "orphan"),
        ("timeout", "tenant"),
        ("orphan_response", "tenant"),
        ("answered", "stolen"),
        ("orphan_response", "stolen"),
    }
    if wide:
        events += [
            request("slow", 2),
            response("slow", 2 + TIMEOUT),  # exactly at the timeout
            request("far", 0),
            response("far", TIMEOUT + 0.5),
        ]
        expected |= {("answered", "slow"), ("timeout", "far"), ("orphan_response", "far")}
    return events, expected


def check_order(
    events: list[LLMRequest | LLMResponse], expected: set[tuple[str, str]], order: list[int], tick: bool
) -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    out: list[Call | DeadLetter] = []
    for position, index in enumerate(order):
        event = events[index]
        topic = REQUESTS if isinstance(event, LLMRequest) else RESPONSES
        out += join.on_event(event, SourceRef(topic, 0, position), NOW)
        if tick:
            out += join.on_time(NOW)
    out += drain(join)
    outcomes = [outcome(item) for item in out]
    assert len(outcomes) == len(set(outcomes)), "something was reported twice"
    assert set(outcomes) == expected
    assert len(join) == 0 and vars(join)["_mismatched"] == {}


@settings(max_examples=100, deadline=None)
@given(st.permutations(range(len(scenario(wide=True)[0]))))
def test_the_outcome_does_not_depend_on_arrival_order(order: list[int]) -> None:
    check_order(*scenario(wide=True), order, tick=False)


@settings(max_examples=100, deadline=None)
@given(st.permutations(range(len(scenario(wide=False)[0]))))
def test_the_outcome_does_not_depend_on_arrival_order_with_expiry_checks_between(
    order: list[int],
) -> None:
    check_order(*scenario(wide=False), order, tick=True)


# -- snapshots -----------------------------------------------------------------


def timeline() -> list[tuple[LLMRequest | LLMResponse | None, float]]:
    """Events and on_time calls (None) with their wall clock, across every kind of expiry."""
    steps: list[tuple[LLMRequest | LLMResponse | None, float]] = []
    for index in range(40):
        seconds = index * 20.0
        rid = f"r{index}"
        steps.append((request(rid, seconds), NOW + seconds))
        if index % 5 == 1:
            steps.append((response(f"orphan{index}", seconds), NOW + seconds))
        if index % 4 != 0:
            steps.append((response(rid, seconds + 1 + index), NOW + seconds))
        if index % 3 == 0:
            steps.append((request(rid, seconds), NOW + seconds))  # duplicate
        steps.append((None, NOW + seconds + 1))
    steps.append((None, NOW + 5000))
    return steps


def run(
    steps: list[tuple[LLMRequest | LLMResponse | None, float]], snapshot_every: int | None
) -> list[tuple[str, str, float | None]]:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    out: list[tuple[str, str, float | None]] = []

    def record(items: list[Call | DeadLetter]) -> None:
        for item in items:
            out.append((*outcome(item), item.completed_at if isinstance(item, Call) else None))

    for position, (event, now) in enumerate(steps):
        if event is None:
            record(join.on_time(now))
            continue
        topic = REQUESTS if isinstance(event, LLMRequest) else RESPONSES
        record(join.on_event(event, SourceRef(topic, 0, position), now))
        if snapshot_every and position % snapshot_every == 0:
            # Only event time is snapshotted: resume at the instant of the
            # snapshot, as a restart resumes from the end of an epoch.
            join = pickle.loads(pickle.dumps(join))
            record(join.on_time(now))
    return out


def test_pickling_mid_stream_gives_the_same_outputs() -> None:
    steps = timeline()
    uninterrupted = run(steps, snapshot_every=None)
    assert {kind for kind, _, _ in uninterrupted} == {"answered", "timeout", "orphan_response"}
    # The extra on_time at each restore may report an expiry a few events earlier:
    # the same outputs, possibly interleaved differently.
    for every in (7, 3):
        resumed = run(steps, snapshot_every=every)
        assert sorted(resumed) == sorted(uninterrupted)


# -- memory ------------------------------------------------------------------


def test_in_flight_requests_cost_well_under_a_kibibyte_each() -> None:
    """1,000,000 in-flight requests must fit in 1 GiB: under 1,073 bytes each."""
    sample = 5_000
    payloads = [
        msgspec.json.encode(
            {
                "type": "request",
                "request_id": f"req-{index:08d}-{index * 7919:012x}",
                "tenant_id": f"tenant-{index % 10}",
                "route": f"/v1/chat/route-{index % 30}",
                "model": "gpt-4o-mini",
                "provider": "openai",
                "prompt_tokens": index % 4000,
                "timestamp": at(index / 100).isoformat(),
                "user_id_hash": f"u{index:016x}",
            }
        )
        for index in range(sample)
    ]
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for offset, payload in enumerate(payloads):
            join.on_event(request_decoder.decode(payload), SourceRef(REQUESTS, 0, offset), NOW)
        per_request = (tracemalloc.get_traced_memory()[0] - before) / sample
    finally:
        tracemalloc.stop()
    print(f"join: {per_request:.0f} bytes per in-flight request")
    assert len(join) == sample
    assert per_request < 800
    assert len(pickle.dumps(join)) / sample < 200


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=0, max_value=2 * TIMEOUT),
    st.lists(
        st.tuples(
            st.sampled_from("abcdef"),
            st.booleans(),
            st.floats(min_value=0, max_value=3 * TIMEOUT),
            st.sampled_from([None, "acme", "evil"]),  # a response's tenant
        ),
        max_size=30,
    ),
    st.lists(st.floats(min_value=0, max_value=0.999), min_size=1, max_size=8),
)
def test_any_dedupe_setting_keeps_every_request_accounted_for(
    dedupe: int, events: list[tuple[str, bool, float, str | None]], fractions: list[float]
) -> None:
    """With DEDUPE_SECONDS at, below or above the timeout, and expiry checked at
    arbitrary points inside a second, each first request is counted exactly once and
    the state empties."""
    join = JoinShard(TIMEOUT, dedupe, WINDOW, LATENESS)
    out: list[Call | DeadLetter] = []
    for position, (rid, is_request, seconds, tenant) in enumerate(sorted(events, key=lambda e: e[2])):
        event = request(rid, seconds) if is_request else response(rid, seconds, tenant_id=tenant)
        out += join.on_event(event, SourceRef(REQUESTS if is_request else RESPONSES, 0, position), NOW)
        out += join.on_time(NOW + fractions[position % len(fractions)])
    out += drain(join, after=10 * (TIMEOUT + dedupe + 10))
    assert len(join) == 0 and join.next_wakeup() is None and vars(join)["_mismatched"] == {}
    calls = [item for item in out if isinstance(item, Call)]
    assert all(call.response is None or call.response.tenant_id != "evil" for call in calls)
    requests_seen = {rid for rid, is_request, _, _ in events if is_request}
    # Every request id is counted at least once, and never twice at the same time.
    assert {call.request.request_id for call in calls} == requests_seen
    assert len({(c.request.request_id, c.request.timestamp) for c in calls}) == len(calls)


def test_expiry_inside_a_second_with_dedupe_no_longer_than_the_timeout() -> None:
    # Both deadlines fall in the same second; event time stops between them, and
    # the first request's dedupe record expires at once, into that same second.
    join = JoinShard(TIMEOUT, 0, WINDOW, LATENESS)
    feed(join, [request("a", 0.2), request("b", 0.8), request("clock", TIMEOUT + 0.5)])
    assert [outcome(item) for item in join.on_time(NOW)] == [("timeout", "a")]
    assert [outcome(item) for item in join.on_time(NOW + 0.5)] == [("timeout", "b")]
    drain(join)
    assert len(join) == 0 and join.next_wakeup() is None
    # Forgotten: the same ids are new calls again.
    out = feed(join, [request("a", 5000), response("a", 5001)])
    assert [outcome(item) for item in out] == [("answered", "a")]


def test_a_snapshot_restores_every_kind_of_waiting_entry() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    full = request(
        "full",
        1.123456,
        provider="openai",
        user_id_hash="u1",
        metadata={"team": "search", "n": 3, "ok": True, "x": None},
    )
    lone = response(
        "lone",
        1.5,
        tenant_id="acme",
        latency_ms=12.5,
        completion_tokens=9,
        cache_read_tokens=2,
        reasoning_tokens=3,
        time_to_first_token_ms=4.25,
        finish_reason="stop",
        error="boom",
    )
    out = feed(
        join,
        [
            full,
            lone,
            response("tenants", 2.5, tenant_id="other"),  # both wait for the request
            response("tenants", 2.6, tenant_id="acme"),
            response("far", 2),  # unpairable: dead-lettered, its request waits
            request("far", 2 - TIMEOUT - 1),
            request("done", 0),
            request("clock", TIMEOUT + 0.5),
        ],
    )
    assert [outcome(item) for item in out] == [("orphan_response", "far")]
    # Before on_time: "far" is an unpaired request still waiting for its deadline.
    assert vars(join)["_pending"]["far"].unpaired is not None
    before = pickle.loads(pickle.dumps(join))
    assert vars(before)["_pending"] == vars(join)["_pending"]
    # Event time T0 + 300.5: "done" and "far" time out; "done" stays convertible.
    assert sorted(outcome(item) for item in join.on_time(NOW)) == [("timeout", "done"), ("timeout", "far")]
    assert vars(join)["_pending"]["done"].request_done
    assert "far" not in vars(join)["_pending"]
    restored = pickle.loads(pickle.dumps(join))
    for name in ("_pending", "_counted", "_timed_out", "_mismatched"):
        assert vars(restored)[name] == vars(join)[name], name
    assert restored.on_time(NOW) == []  # resumed at the instant of the snapshot
    converted = [feed(shard, [response("done", 3, completion_tokens=4)]) for shard in (join, restored)]
    assert converted[0] == converted[1]
    assert [outcome(item) for item in converted[1]] == [("answered", "done")]
    assert call_of(converted[1][0]).replaces_timeout
    original = drain(join)
    again = restored.on_time(NOW + 10 * DEDUPE)
    assert again == original
    assert call_of(next(c for c in again if outcome(c) == ("timeout", "full"))).request == full
    assert {outcome(item) for item in original} == {
        ("timeout", "full"),
        ("timeout", "clock"),
        ("orphan_response", "lone"),
        ("orphan_response", "tenants"),
    }
    tenants = [
        response_decoder.decode(payload_of(item)).tenant_id
        for item in original
        if outcome(item) == ("orphan_response", "tenants")
    ]
    # tenant_id is ``str | None``: key=str orders strings as usual, and a None could
    # not equal either name anyway.
    assert sorted(tenants, key=str) == ["acme", "other"]
    letter = next(item for item in original if outcome(item) == ("orphan_response", "lone"))
    assert response_decoder.decode(payload_of(letter)) == lone


def test_a_snapshot_keeps_timestamps_exact_to_the_microsecond_at_the_ends_of_time() -> None:
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    for rid, when in (
        ("first", datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC)),
        ("last", datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    ):
        event = LLMRequest(request_id=rid, tenant_id="t", route="/", model="m", timestamp=when)
        join.on_event(event, SourceRef(REQUESTS, 0, 0), NOW)
    restored = pickle.loads(pickle.dumps(join))
    assert vars(restored)["_pending"] == vars(join)["_pending"]
    for rid, when in (
        ("first", datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC)),
        ("last", datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    ):
        entry = restored._entry(rid)
        assert entry is not None and entry.request is not None
        assert entry.request.timestamp == when
        assert entry.request_ts == when.timestamp()


def test_a_waiting_request_comes_back_whole_from_its_packed_form() -> None:
    """Every field of a request waiting alone, and its source, survive the compact
    form it waits in; one that msgpack cannot hold (a 65-bit integer) waits unpacked."""
    join = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    sent = [
        LLMRequest(
            request_id="full",
            tenant_id="acme",
            route="/chat",
            model="gpt-4o",
            timestamp=datetime(2026, 1, 1, 0, 0, 1, 123457, tzinfo=UTC),
            prompt_tokens=77,
            provider="openai",
            user_id_hash="u1",
            metadata={"a": "x", "b": 1, "c": 0.5, "d": True, "e": None},
        ),
        LLMRequest(
            request_id="bare",
            tenant_id="acme",
            route="/",
            model="m",
            timestamp=datetime(2026, 1, 1, 0, 0, 2, tzinfo=UTC),
        ),
        LLMRequest(
            request_id="huge",
            tenant_id="acme",
            route="/",
            model="m",
            timestamp=datetime(2026, 1, 1, 0, 0, 3, tzinfo=UTC),
            metadata={"n": 2**64},
        ),
    ]
    for offset, request in enumerate(sent):
        join.on_event(request, SourceRef(REQUESTS, 2, 10**12 + offset), NOW)
    assert [type(join._pending[r.request_id]) for r in sent] == [bytes, bytes, Pending]
    restored = pickle.loads(pickle.dumps(join))
    for offset, request in enumerate(sent):
        response = LLMResponse(
            request_id=request.request_id,
            tenant_id="acme",
            timestamp=request.timestamp + timedelta(seconds=1),
            latency_ms=1000,
        )
        (call,) = restored.on_event(response, SourceRef(RESPONSES, 1, offset), NOW)
        assert isinstance(call, Call)
        assert call.request == request
        assert call.request.timestamp == request.timestamp
        assert call.completed_at == response.timestamp.timestamp()
    timed_out = JoinShard(TIMEOUT, DEDUPE, WINDOW, LATENESS)
    timed_out.on_event(sent[0], SourceRef(REQUESTS, 2, 10**12), NOW)
    later = LLMRequest(
        request_id="clock",
        tenant_id="acme",
        route="/",
        model="m",
        timestamp=sent[0].timestamp + timedelta(seconds=TIMEOUT + 1),
    )
    timed_out.on_event(later, SourceRef(REQUESTS, 0, 0), NOW)
    (timeout,) = [c for c in timed_out.on_time(NOW) if isinstance(c, Call)]
    assert timeout.request == sent[0] and timeout.response is None
    assert timeout.source == SourceRef(REQUESTS, 2, 10**12)
