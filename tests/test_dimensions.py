"""Dimensions (docs/dimensions.md): names, values, which values keep rows, and which setting a window gets.

The dataflow's own rows are checked end to end, with kill -9, in ``test_crash.py``;
the differential test (``test_batch_engine.py``) holds the batch folding to the
per-call one. Here: the pure rules, each against values written out by hand, and
the recorded boundary against a real Postgres.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable

import msgspec
import psycopg
import pytest

from dataflows.dimension_settings import PostgresPlan, plan_for
from dataflows.dimensions import StaticPlan, names_at, ranked, reader
from schemas.config import ConfigError, load
from schemas.dimensions import OTHER, InvalidDimension, check_name, check_names, parse_list, value_text
from schemas.events import LLMRequest, LLMResponse, request_decoder
from schemas.tenant_settings import (
    History,
    changes,
    decide,
    first_boundary_after,
    record_default,
    set_dimensions,
)


def test_values_are_written_as_text() -> None:
    assert value_text("SE") == "SE"
    assert value_text("") == ""
    assert value_text(True) == "true" and value_text(False) == "false"
    assert value_text(3) == "3" and value_text(2.5) == "2.5" and value_text(-0.125) == "-0.125"
    assert value_text(2**70) == "1180591620717411303424"
    assert value_text(None) is None
    assert value_text("x" * 300) == "x" * 128
    assert value_text("tab\there\x00\x7f") == "tab\ufffdhere\ufffd\ufffd"
    assert value_text("ünïcødé ✓") == "ünïcødé ✓"


def test_metadata_values_of_every_kind_reach_the_dimension() -> None:
    request = request_decoder.decode(
        msgspec.json.encode(
            {
                "request_id": "r",
                "tenant_id": "t",
                "route": "/",
                "model": "m",
                "timestamp": "2026-01-01T00:00:00Z",
                "provider": "openai",
                "user_id_hash": "u1",
                "metadata": {
                    "n": 7,
                    "f": 0.5,
                    "b": True,
                    "z": None,
                    "long": "é" * 200,
                    "service.name": "api",
                },
            }
        )
    )
    response = LLMResponse(request_id="r", timestamp=request.timestamp, finish_reason="stop")
    read = {
        name: reader(name)(request, response)
        for name in (
            "metadata.n",
            "metadata.f",
            "metadata.b",
            "metadata.z",
            "metadata.long",
            "metadata.missing",
            "metadata.service.name",
            "provider",
            "user",
            "finish_reason",
        )
    }
    assert read == {
        "metadata.n": "7",
        "metadata.f": "0.5",
        "metadata.b": "true",
        "metadata.z": None,
        "metadata.long": "é" * 128,
        "metadata.missing": None,
        "metadata.service.name": "api",
        "provider": "openai",
        "user": "u1",
        "finish_reason": "stop",
    }
    assert reader("finish_reason")(request, None) is None  # a timeout has no response
    bare = LLMRequest(request_id="r", tenant_id="t", route="/", model="m", timestamp=request.timestamp)
    assert [reader(name)(bare, None) for name in ("metadata.n", "provider", "user")] == [None] * 3


def test_nested_metadata_is_refused_at_decoding() -> None:
    for nested in ({"a": {"b": 1}}, {"a": [1, 2]}):
        with pytest.raises(msgspec.ValidationError, match=r"\$\.metadata"):
            request_decoder.decode(
                msgspec.json.encode(
                    {
                        "request_id": "r",
                        "tenant_id": "t",
                        "route": "/",
                        "model": "m",
                        "timestamp": "2026-01-01T00:00:00Z",
                        "metadata": nested,
                    }
                )
            )


@pytest.mark.parametrize(
    ("names", "problem"),
    [
        (["country"], "'country' is not a dimension"),
        (["metadata."], "names a key"),
        (["metadata.a\x01b"], "control characters"),
        (["metadata." + "k" * 129], "1-128 characters"),
        (["provider", "provider"], "'provider' is given twice"),
        (["user", "provider", "finish_reason", "metadata.a", "metadata.b"], "at most 4"),
    ],
)
def test_bad_dimension_names_are_refused_naming_the_problem(names: list[str], problem: str) -> None:
    with pytest.raises(InvalidDimension, match=problem):
        check_names(names)


def test_good_names_and_the_environment_list() -> None:
    assert check_names(["metadata.service.name", "provider", "finish_reason", "user"]) == (
        "metadata.service.name",
        "provider",
        "finish_reason",
        "user",
    )
    assert check_name("metadata.ü") == "metadata.ü"
    assert parse_list(" metadata.country , user,") == ("metadata.country", "user")
    assert parse_list("") == ()
    assert load({"DIMENSIONS": "metadata.country,user", "DIMENSION_VALUES": "5"}).dimensions == (
        "metadata.country",
        "user",
    )
    with pytest.raises(ConfigError, match=r"DIMENSIONS.*'nope' is not a dimension"):
        load({"DIMENSIONS": "nope"})
    with pytest.raises(ConfigError, match="DIMENSION_VALUES"):
        load({"DIMENSION_VALUES": "0"})


def test_the_values_with_most_calls_keep_rows_ties_by_value_none_first() -> None:
    counts = [("b", 3), ("a", 3), (None, 3), ("c", 5), ("d", 1), (OTHER, 9)]
    assert ranked(counts, 3) == (["c", None, "a"], ["b", "d", OTHER])
    assert ranked(counts, 10) == (["c", None, "a", "b", "d"], [OTHER])
    assert ranked([("x", 1)], 1) == (["x"], [])
    # Any order of the same counts: the same choice.
    rng = random.Random(3)
    for _ in range(20):
        shuffled = counts[:]
        rng.shuffle(shuffled)
        assert ranked(shuffled, 3) == (["c", None, "a"], ["b", "d", OTHER])


def test_a_change_applies_from_its_boundary_on() -> None:
    history = [(120.0, ("provider",)), (300.0, ())]
    default = ("user",)
    assert [names_at(history, default, start) for start in (0, 60, 120, 180, 240, 300, 360)] == [
        ("user",),
        ("user",),
        ("provider",),
        ("provider",),
        ("provider",),
        (),
        (),
    ]
    assert names_at(None, default, 1e9) == default
    assert StaticPlan(default, {"t": history}).names("t", 180) == ("provider",)
    assert StaticPlan(default, {"t": history}).names("other", 180) == default


def _horizon(dsn: str, tenant: str) -> float:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM decided_through)::float8 FROM dimension_horizons WHERE tenant_id = %s",
            (tenant,),
        ).fetchone()
    assert row is not None
    return float(row[0])


def test_a_change_lands_after_every_window_the_dataflow_decided(postgres_dsn: str) -> None:
    now = time.time()
    plan = PostgresPlan(postgres_dsn, ("user",), 60)
    # The dataflow opens windows 5 minutes ahead (clients' clocks may run ahead): a change
    # made now cannot apply to them any more.
    ahead = (now // 60 + 5) * 60
    plan.prepare({"acme": ahead})
    assert plan.names("acme", ahead) == ("user",)
    assert _horizon(postgres_dsn, "acme") == ahead
    with psycopg.connect(postgres_dsn) as conn:
        change = set_dimensions(conn, "acme", ("provider",), 60)
        other = set_dimensions(conn, "globex", ("provider",), 60)
    assert change.effective_from.timestamp() == ahead + 60
    # Where the dataflow decided nothing, the next boundary after now.
    assert now < other.effective_from.timestamp() <= now + 60
    assert other.effective_from.timestamp() % 60 == 0
    # Windows already decided keep their setting; the next one takes the change.
    assert plan.names("acme", ahead) == ("user",)
    plan.prepare({"acme": ahead + 60})
    assert plan.names("acme", ahead) == ("user",)
    assert plan.names("acme", ahead + 60) == ("provider",)
    # Another process, or a replay from scratch, decides every window alike.
    fresh = PostgresPlan(postgres_dsn, ("user",), 60)
    fresh.prepare({"acme": ahead + 60})
    assert [fresh.names("acme", start) for start in (ahead, ahead + 60)] == [("user",), ("provider",)]
    assert first_boundary_after(119.5, 60) == 120 and first_boundary_after(120, 60) == 180


def _race(
    dsn: str,
    decided: Callable[[psycopg.Connection, float], History],
    change: Callable[[psycopg.Connection, int], object],
) -> list[tuple[float, History]]:
    """40 changes from one connection while horizons rise from another: each decision's
    horizon and what ``decided`` read in it."""
    start = (time.time() // 60 + 2) * 60
    decisions: list[tuple[float, History]] = []
    stop = threading.Event()

    def dataflow() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            through = start
            while not stop.is_set():
                decisions.append((through, decided(conn, through)))
                through += 60 * random.choice([0, 1])

    thread = threading.Thread(target=dataflow)
    thread.start()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for number in range(40):
                change(conn, number)
    finally:
        stop.set()
        thread.join()
    assert len(decisions) > 10
    return decisions


def _kept_up_to_horizons(decisions: list[tuple[float, History]], final: History) -> None:
    """Every decision saw, up to its horizon, exactly the changes kept in the end."""
    assert len(final) > 1
    for through, seen in decisions:
        assert [c for c in seen if c[0] <= through] == [c for c in final if c[0] <= through], through


def test_a_change_racing_the_dataflow_never_lands_on_a_decided_window(postgres_dsn: str) -> None:
    """Changes and horizon raises from two connections at once: whatever the interleaving,
    every window the dataflow decided got the setting it will have for good: the changes
    stored in the end that apply up to a horizon are exactly those the raise returned."""
    decisions = _race(
        postgres_dsn,
        lambda conn, through: decide(conn, {"acme": through}).histories["acme"],
        lambda conn, number: set_dimensions(conn, "acme", (f"metadata.k{number}",), 60),
    )
    with psycopg.connect(postgres_dsn) as conn:
        final = [(c.effective_from.timestamp(), tuple(c.dimensions)) for c in changes(conn, "acme")]
    _kept_up_to_horizons(decisions, final)


def test_dimensions_is_recorded_and_another_value_applies_after_every_decided_window(
    postgres_dsn: str,
) -> None:
    now = time.time()
    ahead = (now // 60 + 5) * 60
    first = PostgresPlan(postgres_dsn, ("user",), 60)
    first.prepare({"acme": ahead})
    # The first value recorded is what ran before: it applies from the beginning.
    assert [first.names(tenant, start) for tenant, start in (("acme", ahead), ("globex", 0.0))] == [
        ("user",),
        ("user",),
    ]
    # A restart with another DIMENSIONS: a replay of the decided window keeps the old
    # value, for every tenant, and the next boundary after every horizon takes the new one.
    second = PostgresPlan(postgres_dsn, ("provider",), 60)
    second.prepare({"acme": ahead, "globex": ahead})
    assert second.names("acme", ahead) == second.names("globex", ahead) == ("user",)
    second.prepare({"acme": ahead + 60, "globex": ahead + 60})
    assert second.names("acme", ahead + 60) == second.names("globex", ahead + 60) == ("provider",)
    # A tenant's own setting still wins, and a restart with the same value records nothing.
    with psycopg.connect(postgres_dsn) as conn:
        set_dimensions(conn, "acme", ("finish_reason",), 60)
        assert record_default(conn, ("provider",), 60) is None
        recorded = conn.execute(
            "SELECT extract(epoch FROM effective_from)::float8, dimensions FROM default_dimensions "
            "ORDER BY effective_from"
        ).fetchall()
    assert recorded == [(-math.inf, ["user"]), (ahead + 60, ["provider"])]
    third = PostgresPlan(postgres_dsn, ("provider",), 60)
    third.prepare({"acme": ahead + 120})
    assert third.names("acme", ahead + 120) == ("finish_reason",)
    assert third.names("acme", ahead) == ("user",)


def test_a_new_dimensions_value_racing_the_dataflow_never_lands_on_a_decided_window(
    postgres_dsn: str,
) -> None:
    """As for a tenant's change: restarts recording other values while horizons rise, for
    several tenants, from another connection."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        record_default(conn, (), 60)
    decisions = _race(
        postgres_dsn,
        lambda conn, through: decide(conn, {random.choice(["acme", "globex", "initech"]): through}).default,
        lambda conn, number: record_default(conn, (f"metadata.k{number % 3}",), 60),
    )
    with psycopg.connect(postgres_dsn) as conn:
        final = decide(conn, {}).default
    _kept_up_to_horizons(decisions, final)


def test_each_thread_has_its_own_plan(postgres_dsn: str) -> None:
    mine = plan_for(postgres_dsn, (), 60)
    assert plan_for(postgres_dsn, (), 60) is mine
    theirs: list[PostgresPlan] = []
    thread = threading.Thread(target=lambda: theirs.append(plan_for(postgres_dsn, (), 60)))
    thread.start()
    thread.join()
    assert theirs[0] is not mine
