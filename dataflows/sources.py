"""Reading ``llm.requests`` and ``llm.responses``: raw records in, decoded events or dead letters out.

Each record keeps its coordinates (topic, partition, offset) as a
:class:`~dataflows.join.SourceRef`, so whatever cannot be counted can be traced
back to the record that caused it.
"""

from __future__ import annotations

import base64
import logging

import msgspec
from bytewax.connectors.kafka import KafkaError, KafkaSourceMessage
from confluent_kafka import OFFSET_BEGINNING

from dataflows.join import SourceRef
from schemas.deadletter import DeadLetter
from schemas.events import LLMRequest, LLMResponse, request_decoder, response_decoder
from schemas.topics import REQUESTS, RESPONSES

logger = logging.getLogger("streamlens.dataflow")

# Where a partition starts when recovery holds no offset for it yet: the whole topic.
# Once a snapshot exists, Bytewax resumes from the offset stored in it instead.
STARTING_OFFSET = OFFSET_BEGINNING

# Records per partition per poll. Larger batches amortise the per-batch cost of
# every downstream step; 1,000 is Bytewax's default.
BATCH_SIZE = 1000

_DECODERS: dict[str, msgspec.json.Decoder] = {
    REQUESTS: request_decoder,
    RESPONSES: response_decoder,
}

Decoded = tuple[LLMRequest | LLMResponse, SourceRef]


def payload_text(value: bytes | None) -> tuple[str | None, bool]:
    """The record as text for the dead-letter topic, and whether it had to be base64-encoded.

    UTF-8 records are kept as they are, so they can be replayed; anything else is
    base64 (the error line says so), so no byte is lost.
    """
    if value is None:
        return None, False
    try:
        return value.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(value).decode("ascii"), True


def invalid(topic: str | None, partition: int | None, offset: int | None,
            value: bytes | None, error: str) -> DeadLetter:
    """The dead letter of a record that could not be read or decoded."""
    payload, encoded = payload_text(value)
    if encoded:
        error = f"{error} (payload is not UTF-8; it is shown base64-encoded)"
    return DeadLetter(reason="invalid", source_topic=topic, partition=partition,
                      offset=offset, error=error, payload=payload)


def decode(msg: KafkaSourceMessage) -> Decoded | DeadLetter:
    """One record → the event it holds with where it came from, or a dead letter saying why not."""
    topic = msg.topic or ""
    source = SourceRef(topic, msg.partition or 0, msg.offset or 0)
    value = msg.value
    if value is None:
        return invalid(topic, source.partition, source.offset, None,
                       "empty record (no value)")
    decoder = _DECODERS.get(topic)
    if decoder is None:
        return invalid(topic, source.partition, source.offset, value,
                       f"record from unexpected topic {topic!r}")
    try:
        return decoder.decode(value), source
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as error:
        # msgspec's message names the field (``... - at `$.timestamp```).
        return invalid(topic, source.partition, source.offset, value, str(error))


def broker_error(err: KafkaError) -> DeadLetter:
    """A consumer error the source reported instead of a record.

    Bytewax hands these over on their own stream and drops the record attached to
    them from the normal one; dead-lettering it (and logging it loudly) keeps it
    visible. A broker that goes away entirely surfaces here too, as transport
    errors, while librdkafka keeps reconnecting.
    """
    msg = err.msg
    logger.error("kafka consumer error on %s[%s]@%s: %s",
                 msg.topic, msg.partition, msg.offset, err.err)
    return invalid(msg.topic, msg.partition, msg.offset, msg.value,
                   f"kafka consumer error: {err.err}")
