"""The query string of ``GET /v1/metrics``, parsed into a :class:`MetricsQuery` or rejected.

Every rejection is an :class:`InvalidParameter` whose message starts with the
parameter's name, so a 400 tells the caller exactly what to fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from schemas.dimensions import VALUE_MAX_CHARS, InvalidDimension, check_name

DEFAULT_LIMIT = 60
MAX_LIMIT = 1000

BUCKETS: dict[str, int] = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "1d": 86400}
DIMENSIONS: tuple[str, ...] = ("route", "model")

PARAMETERS: tuple[str, ...] = (
    "tenant_id",
    "route",
    "model",
    "from",
    "to",
    "limit",
    "bucket",
    "group_by",
    "dimension",
    "value",
)

_Timestamp = Annotated[datetime, Meta(tz=True)]
_DIGITS = re.compile(r"[0-9]+")
# Tenant ids never hold control characters (as in events); no stored text holds NUL.
_TENANT_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")
_NAME_FORBIDDEN = re.compile(r"\x00")
# A '+' in a query string decodes to a space; the offset then reads " hh:mm".
_SPACE_OFFSET = re.compile(r".*[0-9] [0-9]{2}:[0-9]{2}$")


class InvalidParameter(ValueError):
    """One bad parameter; the message names it first (``from: ...``)."""


class MetricsQuery(Struct, frozen=True, kw_only=True):
    tenant_id: str
    route: str | None = None
    model: str | None = None
    start: datetime | None = None  # ``from``, inclusive
    end: datetime | None = None  # ``to``, exclusive
    limit: int = DEFAULT_LIMIT
    # Seconds per roll-up bucket; None keeps each window as its own bucket.
    bucket_seconds: int | None = None
    # The dimensions kept; those left out are merged across and reported as null.
    group_by: tuple[str, ...] = DIMENSIONS
    # A dimension (docs/dimensions.md): its rows, one per value, instead of the main rows.
    dimension: str | None = None
    # Whether to keep one value only: ``value``, or the calls without one when None.
    by_value: bool = False
    value: str | None = None

    @property
    def is_rollup(self) -> bool:
        """Whether rows must be merged; a plain query reads stored rows as they are."""
        return self.bucket_seconds is not None or self.group_by != DIMENSIONS


def _single(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidParameter(f"{name}: given {len(values)} times, expected once")
    return values[0]


def _name(
    params: Mapping[str, Sequence[str]], name: str, max_length: int, forbidden: re.Pattern[str]
) -> str | None:
    value = _single(params, name)
    if value is None:
        return None
    if not value:
        raise InvalidParameter(f"{name}: must not be empty")
    if len(value) > max_length:
        raise InvalidParameter(f"{name}: longer than {max_length} characters")
    if forbidden.search(value):
        raise InvalidParameter(f"{name}: contains a control character")
    return value


def parse_timestamp(name: str, text: str) -> datetime:
    """RFC 3339 with an offset (``Z`` or ``±hh:mm``), as every StreamLens timestamp."""
    try:
        return msgspec.convert(text, _Timestamp)
    except msgspec.ValidationError as error:
        hint = ""
        if _SPACE_OFFSET.fullmatch(text):
            hint = " (a '+' in a query string must be written %2B)"
        elif "timezone" in str(error):
            hint = " (add an offset such as Z or +02:00)"
        raise InvalidParameter(
            f"{name}: {text!r} is not an RFC 3339 timestamp with an offset{hint}"
        ) from None


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= MAX_LIMIT:
        raise InvalidParameter(f"limit: {text!r} is not a whole number from 1 to {MAX_LIMIT}")
    return int(text)


def _bucket(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return BUCKETS[text]
    except KeyError:
        raise InvalidParameter(f"bucket: {text!r} is not one of {', '.join(BUCKETS)}") from None


def _group_by(text: str | None) -> tuple[str, ...]:
    if text is None:
        return DIMENSIONS
    # An empty value is the empty subset: one row per bucket for the whole tenant.
    names = text.split(",") if text else []
    unknown = [name for name in names if name not in DIMENSIONS]
    if unknown:
        raise InvalidParameter(f"group_by: {', '.join(map(repr, unknown))} not among {', '.join(DIMENSIONS)}")
    if len(set(names)) != len(names):
        raise InvalidParameter(f"group_by: {text!r} names a dimension twice")
    return tuple(name for name in DIMENSIONS if name in names)


def _dimension(text: str | None) -> str | None:
    if text is None:
        return None
    if not text:
        raise InvalidParameter("dimension: must not be empty")
    try:
        return check_name(text)
    except InvalidDimension as error:
        raise InvalidParameter(f"dimension: {error}") from None


def _value(text: str, dimension: str | None) -> str | None:
    if dimension is None:
        raise InvalidParameter("value: needs dimension (the dimension whose value to keep)")
    # Empty: the calls without a value, the rows whose value is null.
    if not text:
        return None
    if len(text) > VALUE_MAX_CHARS:
        raise InvalidParameter(f"value: longer than {VALUE_MAX_CHARS} characters, as no stored value is")
    # Stored values hold U+FFFD where calls had control characters, so these match nothing.
    if _TENANT_FORBIDDEN.search(text):
        raise InvalidParameter("value: contains a control character, as no stored value does")
    return text


def parse_query(params: Mapping[str, Sequence[str]]) -> MetricsQuery:
    """Validate every parameter; raise :class:`InvalidParameter` for the first bad one.

    ``params`` maps each name to all its values, as ``QueryParams.multi_items`` gives.
    """
    # Reject names we do not know: a typo such as ``modle`` would otherwise
    # silently widen the query to every model.
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise InvalidParameter(
            f"{unknown[0]}: unknown parameter"
            + (f" (also {', '.join(unknown[1:])})" if unknown[1:] else "")
            + f"; expected {', '.join(PARAMETERS)}"
        )
    tenant_id = _name(params, "tenant_id", 128, _TENANT_FORBIDDEN)
    if tenant_id is None:
        raise InvalidParameter("tenant_id: required")
    start_text = _single(params, "from")
    end_text = _single(params, "to")
    start = None if start_text is None else parse_timestamp("from", start_text)
    end = None if end_text is None else parse_timestamp("to", end_text)
    if start is not None and end is not None and start >= end:
        raise InvalidParameter(f"from: {start_text!r} is not before to ({end_text!r})")
    dimension = _dimension(_single(params, "dimension"))
    value_text = _single(params, "value")
    value = None if value_text is None else _value(value_text, dimension)
    return MetricsQuery(
        tenant_id=tenant_id,
        route=_name(params, "route", 255, _NAME_FORBIDDEN),
        model=_name(params, "model", 255, _NAME_FORBIDDEN),
        start=start,
        end=end,
        limit=_limit(_single(params, "limit")),
        bucket_seconds=_bucket(_single(params, "bucket")),
        group_by=_group_by(_single(params, "group_by")),
        dimension=dimension,
        by_value=value_text is not None,
        value=value,
    )


def multi_dict(items: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """``[(name, value), ...]`` to ``{name: [value, ...]}``, keeping repeats visible."""
    params: dict[str, list[str]] = {}
    for name, value in items:
        params.setdefault(name, []).append(value)
    return params
