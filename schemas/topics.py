"""The Kafka topics, created when missing."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

REQUESTS = "llm.requests"
RESPONSES = "llm.responses"
METRICS = "llm.metrics"
DEADLETTER = "llm.deadletter"
# Rows per dimension value (SPEC §8), apart from llm.metrics so that its readers keep
# one row per window and key.
DIMENSION_METRICS = "llm.dimension-metrics"
# Scores and labels about calls (SPEC §9), keyed by the call's request_id.
EVALUATIONS = "llm.evaluations"
# Their rows per window, key and evaluation name (SPEC §9).
EVALUATION_METRICS = "llm.evaluation-metrics"
# And per dimension value (SPEC §8): one record per window, key, name and dimension.
EVALUATION_DIMENSION_METRICS = "llm.evaluation-dimension-metrics"
ALL_TOPICS: tuple[str, ...] = (
    REQUESTS,
    RESPONSES,
    EVALUATIONS,
    METRICS,
    DIMENSION_METRICS,
    EVALUATION_METRICS,
    EVALUATION_DIMENSION_METRICS,
    DEADLETTER,
)


def ensure_topics(brokers: str, partitions: int, *, timeout: float = 10.0) -> None:
    """Create each missing topic with ``partitions`` partitions; existing ones are left as they are."""
    admin = AdminClient({"bootstrap.servers": brokers})
    existing = admin.list_topics(timeout=timeout).topics
    missing = [
        NewTopic(name, num_partitions=partitions, replication_factor=1)
        for name in ALL_TOPICS
        if name not in existing
    ]
    if not missing:
        return
    for name, future in admin.create_topics(missing, operation_timeout=timeout).items():
        try:
            future.result(timeout)
        except KafkaException as error:
            # Another service may have created it between the listing and now.
            if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"could not create topic {name}: {error}") from error
