"""Configuration (§6): defaults, parsing, and one clear line for a bad value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from schemas import config


def test_defaults():
    settings = config.load({})
    assert (settings.window_seconds, settings.grace_seconds, settings.lateness_seconds) == (60, 10, 600)
    assert (settings.join_timeout_seconds, settings.dedupe_seconds) == (300, 3600)
    assert settings.topic_partitions == 3
    assert settings.auth is True
    assert settings.prices_file is None
    assert settings.http_port is None


def test_values_are_parsed(tmp_path: Path):
    prices = tmp_path / "prices.json"
    prices.write_text("{}")
    settings = config.load(
        {
            "KAFKA_BROKERS": "a:1,b:2",
            "POSTGRES_DSN": "postgresql://x/y",
            "HTTP_PORT": "9000",
            "WINDOW_SECONDS": " 30 ",
            "GRACE_SECONDS": "0",
            "LATENESS_SECONDS": "5",
            "JOIN_TIMEOUT_SECONDS": "5",
            "DEDUPE_SECONDS": "7",
            "TOPIC_PARTITIONS": "12",
            "PRICES_FILE": str(prices),
            "AUTH": "off",
            "READ_AHEAD_SECONDS": "2.5",
        }
    )
    assert settings.kafka_brokers == "a:1,b:2"
    assert settings.http_port == 9000
    assert settings.window_seconds == 30
    assert settings.grace_seconds == 0
    assert (settings.lateness_seconds, settings.join_timeout_seconds, settings.dedupe_seconds) == (5, 5, 7)
    assert settings.topic_partitions == 12
    assert settings.prices_file == prices
    assert settings.auth is False
    assert settings.read_ahead_seconds == 2.5


def test_empty_value_means_default():
    assert config.load({"WINDOW_SECONDS": ""}).window_seconds == 60


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WINDOW_SECONDS", "abc"),
        ("WINDOW_SECONDS", "0"),
        ("WINDOW_SECONDS", "1.5"),
        ("GRACE_SECONDS", "-1"),
        ("TOPIC_PARTITIONS", "0"),
        ("HTTP_PORT", "70000"),
        ("JOIN_TIMEOUT_SECONDS", "0"),
        ("AUTH", "maybe"),
        ("PRICES_FILE", "/no/such/file.json"),
        ("KAFKA_BROKERS", "   "),
        ("READ_AHEAD_SECONDS", "0"),
        ("READ_AHEAD_SECONDS", "inf"),
        ("READ_AHEAD_SECONDS", "nan"),
        ("RETENTION_DAYS", "1"),
        ("ROLLUP_RETENTION_DAYS", "ten"),
    ],
)
def test_bad_values_name_the_variable_and_the_form(variable, value):
    with pytest.raises(config.ConfigError) as error:
        config.load({variable: value})
    message = str(error.value)
    assert variable in message and repr(value) in message and "expected" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("environ", "shown"),
    [
        ({"LATENESS_SECONDS": "299"}, ("'299'", "'300'")),
        ({"JOIN_TIMEOUT_SECONDS": "601"}, ("'600'", "'601'")),
        ({"LATENESS_SECONDS": "0", "JOIN_TIMEOUT_SECONDS": "1"}, ("'0'", "'1'")),
    ],
)
def test_lateness_shorter_than_the_join_timeout_is_refused(environ, shown):
    # A timeout is known at request time + the timeout: with less lateness
    # every timed-out call would be dead-lettered as too_late.
    with pytest.raises(config.ConfigError) as error:
        config.load(environ)
    message = str(error.value)
    lateness, timeout = shown
    assert f"LATENESS_SECONDS={lateness}" in message and f"JOIN_TIMEOUT_SECONDS={timeout}" in message
    assert "expected LATENESS_SECONDS ≥ JOIN_TIMEOUT_SECONDS" in message
    assert "\n" not in message


def test_lateness_equal_to_the_join_timeout_is_accepted():
    settings = config.load({"LATENESS_SECONDS": "300", "JOIN_TIMEOUT_SECONDS": "300"})
    assert settings.lateness_seconds == settings.join_timeout_seconds == 300


def test_retention_is_read_and_checked_against_what_it_must_outlive():
    settings = config.load({"RETENTION_DAYS": "7", "ROLLUP_RETENTION_DAYS": "90"})
    assert (settings.retention_days, settings.rollup_retention_days) == (7, 90)
    assert (config.load({}).retention_days, config.load({}).rollup_retention_days) == (30, 400)
    with pytest.raises(config.ConfigError, match="ROLLUP_RETENTION_DAYS='20' is below RETENTION_DAYS='30'"):
        config.load({"ROLLUP_RETENTION_DAYS": "20"})
    # Windows still revised by late evaluations (a day by default) must not be deleted.
    with pytest.raises(config.ConfigError, match="RETENTION_DAYS='2' keeps windows no longer"):
        config.load({"RETENTION_DAYS": "2"})
    assert config.load({"RETENTION_DAYS": "2", "EVALUATION_LATENESS_SECONDS": "3600"}).retention_days == 2


def test_entry_point_refuses_lateness_below_the_timeout_in_one_line():
    env = {**os.environ, "LATENESS_SECONDS": "10", "JOIN_TIMEOUT_SECONDS": "20"}
    result = subprocess.run(
        [sys.executable, "-c", "from schemas.config import load_or_exit; load_or_exit()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamlens: invalid configuration: LATENESS_SECONDS='10'")
    assert "Traceback" not in result.stderr


def test_entry_point_prints_one_line_and_no_traceback():
    env = {**os.environ, "WINDOW_SECONDS": "abc"}
    result = subprocess.run(
        [sys.executable, "-c", "from schemas.config import load_or_exit; load_or_exit()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["streamlens: invalid configuration: WINDOW_SECONDS='abc', expected a whole number ≥ 1"]
    assert "Traceback" not in result.stderr
