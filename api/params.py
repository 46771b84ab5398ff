"""The query string of ``GET /v1/metrics``, parsed into a :class:`MetricsQuery` or rejected.

Every rejection is an :class:`InvalidParameter` whose message starts with the
parameter's name, so a 400 tells the caller exactly what to fix.

:class:`MetricsParameters` declares the parameters for the OpenAPI document
(:mod:`api.openapi`); their limits are the ``Meta`` of the types of :mod:`schemas` it
names, which :func:`check_text` reads, so the document and the checks cannot differ.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from schemas.dimensions import DimensionName, InvalidDimension, StoredValue, check_name
from schemas.events import Identifier, StoredName, Timestamp

DEFAULT_LIMIT = 60
MAX_LIMIT = 1000
Limit = Annotated[int, Meta(ge=1, le=MAX_LIMIT)]

BUCKETS: dict[str, int] = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "1d": 86400}
DIMENSIONS: tuple[str, ...] = ("route", "model")


class MetricsParameters(Struct, kw_only=True, rename={"start": "from", "end": "to"}):
    """The query string of ``GET /v1/metrics`` as the OpenAPI document shows it, in order: each
    field's type has the limits :func:`parse_query` checks and the parameter's description.
    Never decoded: :func:`parse_query` answers what is wrong, naming the parameter."""

    tenant_id: Annotated[Identifier, Meta(description="The tenant whose metrics to read.")]
    route: Annotated[StoredName, Meta(description="Only this route (exact match).")] | UnsetType = UNSET
    model: Annotated[StoredName, Meta(description="Only this model (exact match).")] | UnsetType = UNSET
    start: (
        Annotated[
            Timestamp,
            Meta(description="Windows starting at or after this time (RFC 3339 with an offset; inclusive)."),
        ]
        | UnsetType
    ) = UNSET
    end: (
        Annotated[
            Timestamp,
            Meta(
                description="Windows starting before this time (RFC 3339 with an "
                "offset; exclusive). Must be after `from`."
            ),
        ]
        | UnsetType
    ) = UNSET
    limit: Annotated[Limit, Meta(description="Most rows (or buckets) to return; newest first.")] = (
        DEFAULT_LIMIT
    )
    bucket: (
        Annotated[
            str,
            Meta(
                description="Merge windows into epoch-aligned buckets of this "
                "size: sums summed, averages weighted, percentiles from the "
                "merged t-digests, revision the highest of the windows.",
                extra_json_schema={"enum": list(BUCKETS)},
            ),
        ]
        | UnsetType
    ) = UNSET
    group_by: Annotated[
        str,
        Meta(
            description="Comma-separated subset of route,model to keep "
            "(default both); dimensions left out are merged across and "
            "reported as null. Empty: one row per bucket for the tenant."
        ),
    ] = ",".join(DIMENSIONS)
    dimension: (
        Annotated[
            DimensionName,
            Meta(
                description="One of the tenant's dimensions (`metadata.<key>`, `provider`, "
                "`finish_reason`, `user`; its own setting, past ones included, or the "
                "`DIMENSIONS` default): its rows instead of the main rows, one per window, "
                "key and value, each with `dimension` and `value` (`DimensionRow`). "
                "`bucket` and `group_by` merge them within each value."
            ),
        ]
        | UnsetType
    ) = UNSET
    value: (
        Annotated[
            StoredValue,
            Meta(
                description="With `dimension`: only the rows of this value (`(other)`: the values "
                "merged beyond each window's most frequent). Empty (`value=`): the calls "
                "without a value, whose rows have value null."
            ),
        ]
        | UnsetType
    ) = UNSET


PARAMETERS: tuple[str, ...] = tuple(field.encode_name for field in msgspec.structs.fields(MetricsParameters))

_DIGITS = re.compile(r"[0-9]+")
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


def _constraint(kind: Any, name: str) -> Any:
    """The constraint ``name`` (``max_length``, ``pattern``, ``le``, ...) of ``kind``, an
    ``Annotated`` type whose ``Meta`` may be nested (the outermost wins); None if it has none."""
    found = [getattr(meta, name) for meta in getattr(kind, "__metadata__", ()) if isinstance(meta, Meta)]
    return next((value for value in reversed(found) if value is not None), None)


def check_text(name: str, text: str, kind: Any, unlike: str = "") -> str:
    """``text`` when ``kind`` (an ``Annotated`` ``str`` of :mod:`schemas`) allows it, else an
    :class:`InvalidParameter` naming ``name``; ``unlike`` says what no such text is (``"name"``:
    ", as no name is"). The patterns of those types refuse control characters (all, or NUL)."""
    min_length = _constraint(kind, "min_length") or 0
    max_length = _constraint(kind, "max_length")
    pattern = _constraint(kind, "pattern")
    is_not, does_not = (f", as no {unlike} is", f", as no {unlike} does") if unlike else ("", "")
    if len(text) < min_length:
        short = "must not be empty" if min_length == 1 else f"shorter than {min_length} characters"
        raise InvalidParameter(f"{name}: {short}")
    if max_length is not None and len(text) > max_length:
        raise InvalidParameter(f"{name}: longer than {max_length} characters{is_not}")
    if pattern is not None and not re.search(pattern, text):
        raise InvalidParameter(f"{name}: contains a control character{does_not}")
    return text


def _name(params: Mapping[str, Sequence[str]], name: str, kind: Any) -> str | None:
    value = _single(params, name)
    return None if value is None else check_text(name, value, kind)


def parse_timestamp(name: str, text: str) -> datetime:
    """RFC 3339 with an offset (``Z`` or ``±hh:mm``), as every StreamLens timestamp."""
    try:
        return msgspec.convert(text, Timestamp)
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
    least, most = _constraint(Limit, "ge"), _constraint(Limit, "le")
    if not _DIGITS.fullmatch(text) or not least <= int(text) <= most:
        raise InvalidParameter(f"limit: {text!r} is not a whole number from {least} to {most}")
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
    # Stored values hold U+FFFD where calls had control characters, so these match nothing.
    return check_text("value", text, StoredValue, "stored value")


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
    tenant_id = _name(params, "tenant_id", Identifier)
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
        route=_name(params, "route", StoredName),
        model=_name(params, "model", StoredName),
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
