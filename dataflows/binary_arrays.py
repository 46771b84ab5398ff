"""One-dimensional Postgres arrays in the binary format the server reads without parsing.

The packed dimension rows (schemas/dimensions.sql) hold about 20 arrays each. Sent as
text, every number was written by Python and parsed again by Postgres; in binary,
numbers are copied as they are. Many arrays of a type are built at once, their values
given concatenated with the length of each array, so that the work is a few array
operations per batch rather than per array. The format is ``array_recv``'s: a header
(dimensions, whether any element is NULL, the element type, then length and lower
bound per dimension), then per element its length in bytes (-1 for NULL) and its
bytes, all integers big-endian.
"""

from __future__ import annotations

import struct
from itertools import chain

import numpy as np

# Element types, and the array types holding them.
INT8, FLOAT8, TEXT, BYTEA = 20, 701, 25, 17
ARRAY_OF = {INT8: 1016, FLOAT8: 1022, TEXT: 1009, BYTEA: 1001}

_HEADER = struct.Struct(">iiiii")  # one dimension: ndim, has NULLs, element type, length, lower bound
_EMPTY = struct.Struct(">iii")  # no dimension: ndim 0, no NULLs, element type
_LENGTH = struct.Struct(">i")
_NULL = _LENGTH.pack(-1)


def _header(element: int, count: int, nulls: bool) -> bytes:
    if not count:
        return _EMPTY.pack(0, 0, element)
    return _HEADER.pack(1, int(nulls), element, count, 1)


def int8_arrays(values: list[int], counts: list[int]) -> list[bytes]:
    """``bigint[]`` arrays: the first ``counts[0]`` of ``values``, then the next ``counts[1]`` …
    (each value must fit in 64 bits, as a bigint must)."""
    return _fixed(INT8, np.array(values, dtype=">i8"), None, counts)


def float8_arrays(values: list[float] | list[float | None], counts: list[int]) -> list[bytes]:
    """``double precision[]`` arrays, as :func:`int8_arrays`; None is NULL (no value is NaN)."""
    numbers = np.array(values, dtype=">f8")  # None becomes NaN
    return _fixed(FLOAT8, numbers, np.isnan(numbers), counts)


def text_arrays(values: list[str | None], counts: list[int]) -> list[bytes]:
    """``text[]`` arrays, as :func:`int8_arrays`; None is NULL."""
    return _varying(TEXT, [None if value is None else value.encode() for value in values], counts)


def bytea_arrays(values: list[bytes] | list[bytes | None], counts: list[int]) -> list[bytes]:
    """``bytea[]`` arrays, as :func:`int8_arrays`; None is NULL."""
    return _varying(BYTEA, values, counts)


def _bounds(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.array(counts, dtype=np.int64)
    ends = np.cumsum(sizes)
    return ends - sizes, ends


def _fixed(element: int, numbers: np.ndarray, null: np.ndarray | None, counts: list[int]) -> list[bytes]:
    """Arrays of 8-byte elements (``numbers``, big-endian); ``null`` marks NULL elements."""
    total = len(numbers)
    records = np.empty(total, dtype=[("length", ">i4"), ("value", numbers.dtype)])
    records["length"] = 8
    records["value"] = numbers
    firsts, ends = _bounds(counts)
    if null is None or not null.any():
        data = records.tobytes()
        nulls = [False] * len(counts)
        offsets = np.arange(total + 1) * 12
    else:
        records["length"][null] = -1
        keep = np.ones((total, 12), dtype=bool)
        keep[null, 4:] = False  # a NULL has a length and no bytes
        data = records.view(np.uint8).reshape(total, 12)[keep].tobytes()
        offsets = np.concatenate([[0], np.cumsum(np.where(null, 4, 12))])
        nulled = np.concatenate([[0], np.cumsum(null)])
        nulls = (nulled[ends] > nulled[firsts]).tolist()
    pieces = zip(offsets[firsts].tolist(), offsets[ends].tolist(), counts, nulls, strict=True)
    return [_header(element, count, has_null) + data[low:high] for low, high, count, has_null in pieces]


def _varying(element: int, values: list[bytes] | list[bytes | None], counts: list[int]) -> list[bytes]:
    pack = _LENGTH.pack
    arrays = []
    first = 0
    for count in counts:
        part = values[first : first + count]
        first += count
        nulls = None in part
        data = b"".join(
            chain.from_iterable(
                (_NULL, b"") if value is None else (pack(len(value)), value) for value in part
            )
        )
        arrays.append(_header(element, count, nulls) + data)
    return arrays
