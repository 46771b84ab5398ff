"""The environment every StreamLens service reads (README.md), with its defaults.

A bad value stops start-up with one line that names the variable and the form
it expects; :func:`load_or_exit` is what entry points call.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from msgspec import Struct

from schemas.dimensions import DEFAULT_VALUES, InvalidDimension, parse_list
from schemas.logs import LOG_FORMATS
from schemas.webhooks import NOTHING_ALLOWED, AllowList, parse_allow

DEFAULT_KAFKA_BROKERS = "127.0.0.1:9092"
DEFAULT_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/streamlens"


class ConfigError(ValueError):
    """One bad variable; the message is the whole line shown to the operator."""


class Settings(Struct, frozen=True, kw_only=True):
    kafka_brokers: str = DEFAULT_KAFKA_BROKERS
    postgres_dsn: str = DEFAULT_POSTGRES_DSN
    # None: each service's own port (ingestion 8080, query API 8081).
    http_port: int | None = None
    window_seconds: int = 60
    grace_seconds: int = 10
    lateness_seconds: int = 600
    join_timeout_seconds: int = 300
    dedupe_seconds: int = 3600
    topic_partitions: int = 3
    prices_file: Path | None = None
    auth: bool = True
    # How far in event time an input partition may be read past the slowest one;
    # None: half the grace period or the join timeout, whichever is smaller, at least 1 s.
    read_ahead_seconds: float | None = None
    log_format: str = "text"  # or "json" (schemas.logs)
    # The dataflow's Prometheus port; with several processes, process i serves port + i.
    metrics_port: int = 9464
    # Shards of the dataflow's state (join and windows); None: 8 per worker (dataflows.shards).
    # Fixed for the life of a recovery directory, which records it.
    state_shards: int | None = None
    # Dimensions (docs/dimensions.md) of tenants without a setting of their own, and how many
    # values a window keeps per key and dimension before merging the rest into "(other)".
    dimensions: tuple[str, ...] = ()
    dimension_values: int = DEFAULT_VALUES
    # How long after a call's window ended an evaluation of the call still counts (docs/evaluations.md).
    evaluation_lateness_seconds: int = 86400
    # Non-public hosts and networks alert webhooks may reach all the same (docs/alerts.md).
    alert_webhook_allow: AllowList = NOTHING_ALLOWED
    # Ingestion quotas of tenants without their own (docs/quotas.md): events a second (0: none)
    # and how many may come at once.
    ingest_rate: float = 0.0
    ingest_burst: int = 0
    # Retention (docs/retention.md): windows kept this many days, their hourly and daily roll-ups this many.
    retention_days: int = 30
    rollup_retention_days: int = 400


def _integer(minimum: int, maximum: int | None = None) -> tuple[Callable[[str], int], str]:
    form = (
        f"a whole number ≥ {minimum}" if maximum is None else (f"a whole number from {minimum} to {maximum}")
    )

    def parse(text: str) -> int:
        value = int(text.strip())
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError
        return value

    return parse, form


def _positive_number(text: str) -> float:
    value = float(text.strip())
    if not value > 0 or value == float("inf"):
        raise ValueError
    return value


def _rate(text: str) -> float:
    value = float(text.strip())
    if not 0 <= value < float("inf"):
        raise ValueError
    return value


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in LOG_FORMATS:
        raise ValueError
    return value


def _nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError
    return text.strip()


def _existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError
    return path


def _dimensions(text: str) -> tuple[str, ...]:
    try:
        return parse_list(text)
    except InvalidDimension as error:
        raise ValueError(str(error)) from None


_SWITCH = {
    "on": True,
    "true": True,
    "1": True,
    "yes": True,
    "off": False,
    "false": False,
    "0": False,
    "no": False,
}


def _switch(text: str) -> bool:
    return _SWITCH[text.strip().lower()]


# variable -> (field, parser, expected form)
_VARIABLES: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "KAFKA_BROKERS": ("kafka_brokers", _nonempty, "host:port[,host:port…]"),
    "POSTGRES_DSN": ("postgres_dsn", _nonempty, "a libpq connection string or URI"),
    "HTTP_PORT": ("http_port", *_integer(1, 65535)),
    "WINDOW_SECONDS": ("window_seconds", *_integer(1)),
    "GRACE_SECONDS": ("grace_seconds", *_integer(0)),
    "LATENESS_SECONDS": ("lateness_seconds", *_integer(0)),
    "JOIN_TIMEOUT_SECONDS": ("join_timeout_seconds", *_integer(1)),
    "DEDUPE_SECONDS": ("dedupe_seconds", *_integer(0)),
    "TOPIC_PARTITIONS": ("topic_partitions", *_integer(1, 10000)),
    "PRICES_FILE": ("prices_file", _existing_file, "the path of an existing JSON file"),
    "AUTH": ("auth", _switch, "on or off"),
    "READ_AHEAD_SECONDS": ("read_ahead_seconds", _positive_number, "a number of seconds > 0"),
    "LOG_FORMAT": ("log_format", _log_format, "text or json"),
    "METRICS_PORT": ("metrics_port", *_integer(1, 65535)),
    "STATE_SHARDS": ("state_shards", *_integer(1, 4096)),
    "DIMENSIONS": (
        "dimensions",
        _dimensions,
        "comma-separated dimensions, at most 4 of metadata.<key>, provider, finish_reason, user",
    ),
    "DIMENSION_VALUES": ("dimension_values", *_integer(1, 10000)),
    "EVALUATION_LATENESS_SECONDS": ("evaluation_lateness_seconds", *_integer(0, 366 * 86400)),
    "INGEST_RATE": ("ingest_rate", _rate, "events a second, a number ≥ 0 (0: no limit)"),
    "INGEST_BURST": ("ingest_burst", *_integer(0)),
    "RETENTION_DAYS": ("retention_days", *_integer(2, 36500)),
    "ROLLUP_RETENTION_DAYS": ("rollup_retention_days", *_integer(2, 36500)),
    "ALERT_WEBHOOK_ALLOW": (
        "alert_webhook_allow",
        parse_allow,
        "comma-separated host names, addresses or CIDRs (such as 127.0.0.0/8)",
    ),
}


# Variables whose parser says which item is wrong.
_EXPLAINED = ("DIMENSIONS", "ALERT_WEBHOOK_ALLOW")


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the settings; raise :class:`ConfigError` naming the first bad variable."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for variable, (field, parse, form) in _VARIABLES.items():
        raw = environ.get(variable)
        if raw is None or raw == "":
            continue
        try:
            values[field] = parse(raw)
        except (ValueError, KeyError) as error:
            explained = isinstance(error, ValueError) and variable in _EXPLAINED
            why = f" ({error})" if explained else ""
            raise ConfigError(f"invalid configuration: {variable}={raw!r}, expected {form}{why}") from None
    settings = Settings(**values)
    if settings.lateness_seconds < settings.join_timeout_seconds:
        # A timed-out call becomes known only at request time + the timeout: a
        # shorter lateness would dead-letter every timeout as too_late.
        raise ConfigError(
            f"invalid configuration: LATENESS_SECONDS={str(settings.lateness_seconds)!r} is below "
            f"JOIN_TIMEOUT_SECONDS={str(settings.join_timeout_seconds)!r}, expected "
            f"LATENESS_SECONDS ≥ JOIN_TIMEOUT_SECONDS (a timed-out call is only known once its "
            f"timeout has passed)"
        )
    if settings.rollup_retention_days < settings.retention_days:
        raise ConfigError(
            f"invalid configuration: ROLLUP_RETENTION_DAYS={str(settings.rollup_retention_days)!r} is "
            f"below RETENTION_DAYS={str(settings.retention_days)!r}, expected ROLLUP_RETENTION_DAYS ≥ "
            f"RETENTION_DAYS (roll-ups answer for the windows deleted)"
        )
    late = max(settings.lateness_seconds, settings.evaluation_lateness_seconds)
    if settings.retention_days * 86400 <= late + 86400:
        # Windows still revised must not be deleted: their parts are sealed.
        raise ConfigError(
            f"invalid configuration: RETENTION_DAYS={str(settings.retention_days)!r} keeps windows no longer "
            f"than they may still change, expected more than a day beyond LATENESS_SECONDS and "
            f"EVALUATION_LATENESS_SECONDS ({late} s)"
        )
    return settings


def load_or_exit(environ: Mapping[str, str] | None = None) -> Settings:
    """For entry points: a bad value ends the process with one line, not a traceback."""
    try:
        return load(environ)
    except ConfigError as error:
        print(f"streamlens: {error}", file=sys.stderr)
        raise SystemExit(2) from None
