"""Dimensions (docs/dimensions.md): what a tenant may slice its calls by, and how a value is written.

A dimension is named ``metadata.<key>`` (a key of the request's ``metadata``;
the key may itself hold dots, as OTLP attribute names do), ``provider``,
``finish_reason`` or ``user`` (the request's ``user_id_hash``). A tenant has at
most :data:`MAX_DIMENSIONS`.

A call's value for a dimension is text of at most :data:`VALUE_MAX_CHARS`
characters, or None when the call does not carry it (:func:`value_text`):
strings as they are, cut to the limit, with control characters (which Postgres
text, Kafka keys and log lines handle badly; NUL not at all) each replaced by
U+FFFD; ``true``/``false`` for booleans; numbers as JSON writes them (``3``,
``2.5``); a JSON ``null`` is no value.

Pure rules: no Bytewax, Kafka or Postgres here.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from schemas.events import IDENTIFIER_MAX_CHARS, NO_CONTROL_PATTERN, MetadataValue

MAX_DIMENSIONS = 4
VALUE_MAX_CHARS = 128
# The row that holds the values beyond a window's DIMENSION_VALUES most frequent.
OTHER = "(other)"
DEFAULT_VALUES = 50

METADATA_PREFIX = "metadata."
FIXED: tuple[str, ...] = ("provider", "finish_reason", "user")
# A metadata key named in a dimension: what an Identifier allows (1-IDENTIFIER_MAX_CHARS
# characters, no control characters), since it becomes part of row keys and Kafka keys.
_KEY = re.compile(NO_CONTROL_PATTERN)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REPLACEMENT = "\ufffd"

DimensionName = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=len(METADATA_PREFIX) + IDENTIFIER_MAX_CHARS,
        description="`metadata.<key>`, `provider`, `finish_reason` or `user`",
    ),
]
# A tenant's dimensions; no name twice (:func:`check_names`).
DimensionNames = Annotated[
    list[DimensionName], Meta(max_length=MAX_DIMENSIONS, extra_json_schema={"uniqueItems": True})
]
# A value as rows hold it (:func:`value_text`): what the query API may be asked for.
StoredValue = Annotated[str, Meta(max_length=VALUE_MAX_CHARS, pattern=NO_CONTROL_PATTERN)]


class DimensionSetting(Struct, forbid_unknown_fields=True):
    """The body of ``PUT /v1/tenants/{tenant_id}/dimensions``, and what ``GET`` returns in it."""

    dimensions: DimensionNames


class InvalidDimension(ValueError):
    """A dimension name or list that breaks a rule; the message names it."""


def check_name(name: str) -> str:
    """``name`` when it is a dimension a tenant may configure; :class:`InvalidDimension` if not."""
    if name in FIXED:
        return name
    if name.startswith(METADATA_PREFIX):
        key = name[len(METADATA_PREFIX) :]
        if not key:
            raise InvalidDimension(f"{name!r}: a metadata dimension names a key, as in 'metadata.country'")
        if len(key) > IDENTIFIER_MAX_CHARS or not _KEY.match(key):
            raise InvalidDimension(
                f"{name[:160]!r}: a metadata key is 1-{IDENTIFIER_MAX_CHARS} characters"
                " without control characters"
            )
        return name
    raise InvalidDimension(
        f"{name[:160]!r} is not a dimension: expected 'metadata.<key>', {', '.join(map(repr, FIXED))}"
    )


def check_names(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A tenant's dimension list, checked: known names, no repeats, at most :data:`MAX_DIMENSIONS`."""
    if len(names) > MAX_DIMENSIONS:
        raise InvalidDimension(f"{len(names)} dimensions given: a tenant has at most {MAX_DIMENSIONS}")
    seen: set[str] = set()
    for name in names:
        check_name(name)
        if name in seen:
            raise InvalidDimension(f"{name!r} is given twice")
        seen.add(name)
    return tuple(names)


def parse_list(text: str) -> tuple[str, ...]:
    """``DIMENSIONS``: comma-separated names (blank: none), checked as :func:`check_names`."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    return check_names(names)


_json = msgspec.json.Encoder()


def value_text(value: MetadataValue | object) -> str | None:
    """A call's value for a dimension, as rows hold it (see the module's docstring)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float):
        text = _json.encode(value).decode()
    else:  # not a valid metadata value (§1 refuses objects and arrays); kept readable all the same
        text = _json.encode(value).decode() if isinstance(value, list | dict) else str(value)
    if len(text) > VALUE_MAX_CHARS:
        text = text[:VALUE_MAX_CHARS]
    if not (text.isascii() and text.isprintable()) and _CONTROL.search(text):
        text = _CONTROL.sub(_REPLACEMENT, text)
    return text
