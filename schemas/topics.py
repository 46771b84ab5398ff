"""The Kafka topics, created when missing, with what the broker keeps of them set."""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

logger = logging.getLogger("streamlens.topics")

REQUESTS = "llm.requests"
RESPONSES = "llm.responses"
METRICS = "llm.metrics"
DEADLETTER = "llm.deadletter"
# Rows per dimension value (docs/dimensions.md), apart from llm.metrics so that its readers keep
# one row per window and key.
DIMENSION_METRICS = "llm.dimension-metrics"
# Scores and labels about calls (docs/evaluations.md), keyed by the call's request_id.
EVALUATIONS = "llm.evaluations"
# Their rows per window, key and evaluation name (docs/evaluations.md).
EVALUATION_METRICS = "llm.evaluation-metrics"
# And per dimension value (docs/dimensions.md): one record per window, key, name and dimension.
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

ROW_TOPICS: tuple[str, ...] = (METRICS, DIMENSION_METRICS, EVALUATION_METRICS, EVALUATION_DIMENSION_METRICS)

_DAY_MS = 86_400_000
# What the broker keeps. The rows' topics are keyed by window (and dimension, name), so
# compaction keeps each one's latest revision, and windows older than 30 days go: Postgres
# holds the rows, the topics feed readers that follow them (the alert service). Dead
# letters are kept 30 days to be looked into. The event topics keep the broker's default
# (7 days for Kafka): the dataflow reads them within seconds, and a replay after a crash
# within minutes.
TOPIC_CONFIGS: dict[str, dict[str, str]] = {
    **{
        topic: {"cleanup.policy": "compact,delete", "retention.ms": str(30 * _DAY_MS)} for topic in ROW_TOPICS
    },
    DEADLETTER: {"cleanup.policy": "delete", "retention.ms": str(30 * _DAY_MS)},
}


def ensure_topics(brokers: str, partitions: int, *, timeout: float = 10.0) -> None:
    """Create each missing topic with ``partitions`` partitions and :data:`TOPIC_CONFIGS`; set
    those on existing topics where they differ (their partitions are left as they are)."""
    admin = AdminClient({"bootstrap.servers": brokers})
    existing = admin.list_topics(timeout=timeout).topics
    _set_configs(admin, [name for name in TOPIC_CONFIGS if name in existing], timeout)
    missing = [
        NewTopic(name, num_partitions=partitions, replication_factor=1, config=TOPIC_CONFIGS.get(name, {}))
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


def _set_configs(admin: AdminClient, topics: list[str], timeout: float) -> None:
    """Set :data:`TOPIC_CONFIGS` on existing topics where they differ. A broker that refuses
    leaves them as they were: said in the log, not a reason to stop."""
    if not topics:
        return
    try:
        described = admin.describe_configs([ConfigResource(ResourceType.TOPIC, name) for name in topics])
        changes = []
        for resource, future in described.items():
            found = future.result(timeout)
            wanted = TOPIC_CONFIGS[resource.name]
            entries = [
                ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)
                for key, value in wanted.items()
                if key not in found or found[key].value != value
            ]
            if entries:
                changes.append(ConfigResource(ResourceType.TOPIC, resource.name, incremental_configs=entries))
        if not changes:
            return
        for resource, future in admin.incremental_alter_configs(changes).items():
            future.result(timeout)
            logger.info(
                "topic %s: set %s",
                resource.name,
                ", ".join(f"{key}={value}" for key, value in TOPIC_CONFIGS[resource.name].items()),
            )
    except KafkaException as error:
        logger.warning("could not set the topics' retention (%s); they keep the broker's", error)
