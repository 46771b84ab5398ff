"""What could not be counted, and why: the value of every ``llm.deadletter`` record."""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct

Reason = Literal["invalid", "orphan_response", "orphan_evaluation", "too_late"]


class DeadLetter(Struct, kw_only=True, omit_defaults=True):
    reason: Reason
    source_topic: str | None
    partition: int | None
    offset: int | None
    error: str
    # The original record, decoded as text where it is UTF-8, so a reader can replay it.
    payload: str | None
    # The Kafka key of the record read from an input topic (its request id, as the ingestion
    # API writes it), for a record that could not be read: the dead letter's own key when the
    # payload names no request id, e.g. base64 of a value that is not UTF-8
    # (dataflows.sinks.deadletter_message). Never in the value: encode_bounded leaves it out.
    source_key: bytes | None = None


deadletter_encoder = msgspec.json.Encoder()
deadletter_decoder = msgspec.json.Decoder(DeadLetter)

# The largest record a producer sends with librdkafka's default ``message.max.bytes``:
# key + value + 36 bytes of framing must fit in 1,000,000 (measured: a 999,964-byte
# value without key is sent, one byte more is refused locally with MSG_SIZE_TOO_LARGE).
# It is the limit that bites: Kafka brokers default to 1,048,588 bytes, and Tansu took
# a 60 MB record from a producer whose own limit was raised.
MESSAGE_MAX_BYTES = 1_000_000
# A dead letter's key is a request id: at most 128 characters, so 512 bytes in UTF-8.
KEY_MAX_BYTES = 512
# The value's share, leaving the key its room and the framing more than it needs.
DEADLETTER_MAX_BYTES = MESSAGE_MAX_BYTES - KEY_MAX_BYTES - 1024
# An error message is a line, not a payload (msgspec quotes a bad tag value whole).
ERROR_MAX_CHARS = 2000
# The smallest limit :func:`encode_bounded` can keep: a letter with its error cut and
# no payload left, every character of it escaped to six bytes, topic name and all.
MIN_DEADLETTER_BYTES = 16 * 1024


def _cut_error(error: str) -> str:
    if len(error) <= ERROR_MAX_CHARS:
        return error
    return f"{error[:ERROR_MAX_CHARS]}… (error cut to {ERROR_MAX_CHARS} of {len(error)} characters)"


def encode_bounded(letter: DeadLetter, max_bytes: int = DEADLETTER_MAX_BYTES) -> bytes:
    """``letter`` as JSON in at most ``max_bytes``: a payload too long keeps its start, and
    ``error`` says how much of it was kept. Reason and coordinates are never touched, so
    the record can still be found at its source.

    The JSON of a payload can be six times its length (a control character becomes
    ``\\u0001``), so the cut is found on the encoded size, not guessed from the text's.
    """
    if max_bytes < MIN_DEADLETTER_BYTES:
        raise ValueError(f"max_bytes must be at least {MIN_DEADLETTER_BYTES}, not {max_bytes}")
    if letter.source_key is not None:
        letter = msgspec.structs.replace(letter, source_key=None)  # the record's key, not its value
    encoded = deadletter_encoder.encode(letter)
    if len(encoded) <= max_bytes:
        return encoded
    error = _cut_error(letter.error)
    encoded = deadletter_encoder.encode(msgspec.structs.replace(letter, error=error))
    payload = letter.payload
    if len(encoded) <= max_bytes or payload is None:
        return encoded

    def cut(kept: int) -> bytes:
        note = (
            f"{error} (payload truncated to its first {kept} of {len(payload)} characters "
            f"to fit the {max_bytes}-byte limit of a dead letter)"
        )
        return deadletter_encoder.encode(msgspec.structs.replace(letter, error=note, payload=payload[:kept]))

    # The longest prefix that fits, by bisection: each character takes 1 to 6 bytes.
    low, high = 0, min(len(payload), max_bytes)
    best = cut(0)
    while low < high:
        middle = (low + high + 1) // 2
        candidate = cut(middle)
        if len(candidate) <= max_bytes:
            low, best = middle, candidate
        else:
            high = middle - 1
    return best
