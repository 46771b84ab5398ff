"""What could not be counted, and why: the value of every ``llm.deadletter`` record."""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct

Reason = Literal["invalid", "orphan_response", "too_late"]


class DeadLetter(Struct, kw_only=True):
    reason: Reason
    source_topic: str | None
    partition: int | None
    offset: int | None
    error: str
    # The original record, decoded as text where it is UTF-8, so a reader can replay it.
    payload: str | None


deadletter_encoder = msgspec.json.Encoder()
deadletter_decoder = msgspec.json.Decoder(DeadLetter)
