"""Recovery state belongs to the broker it was made on.

Bytewax's recovery partitions hold Kafka offsets. Resumed against another
broker (another cluster, topics deleted and created again, a memory broker
restarted empty) they would skip records or read them again without a word. So
the recovery directory records whom it belongs to, in ``broker.json``: the
cluster id and the topic ids of the input topics, as the broker reports them in
its metadata. Every start compares them with the broker it is about to read.

A directory made before that file existed is judged by its offsets instead: the
record just before each stored offset must exist on the broker. (Its high
watermark cannot decide this: the local broker's is wrong.)

The state is split into shards by a hash of each request id and window key
(:mod:`dataflows.shards`); resumed with another count, an id would look for its
state in the wrong shard. So ``shards.json`` records the count the directory was
made with, and every start uses it.
"""

from __future__ import annotations

import json
import pickle
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from confluent_kafka import Consumer, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient

from dataflows.shards import LEGACY_COUNT

IDENTITY_FILE = "broker.json"
SHARDS_FILE = "shards.json"
INPUT_STEP = "streamlens_metrics.read"
METADATA_TIMEOUT = 10.0
# How long a record known to exist may take to arrive when read back.
READ_BACK_TIMEOUT = 5.0

Identity = dict[str, object]  # {"cluster_id": str, "topic_ids": {topic: id}}


def broker_identity(brokers: str, topics: Iterable[str]) -> Identity:
    """The cluster id and the ids of ``topics`` on the broker at ``brokers``."""
    admin = AdminClient({"bootstrap.servers": brokers})
    cluster_id = admin.list_topics(timeout=METADATA_TIMEOUT).cluster_id
    described = admin.describe_topics(TopicCollection(sorted(topics)))
    topic_ids = {name: str(future.result(METADATA_TIMEOUT).topic_id) for name, future in described.items()}
    return {"cluster_id": cluster_id, "topic_ids": topic_ids}


def stored_offsets(directory: Path) -> dict[tuple[str, int], int]:
    """The highest offset each input partition has in the recovery partitions."""
    offsets: dict[tuple[str, int], int] = {}
    for part in sorted(directory.glob("part-*.sqlite3")):
        with sqlite3.connect(part) as conn:
            rows = conn.execute(
                "SELECT state_key, ser_change FROM snaps WHERE step_id = ? AND ser_change IS NOT NULL",
                (INPUT_STEP,),
            ).fetchall()
        for state_key, change in rows:
            index, topic = str(state_key).split("-", 1)
            offset = pickle.loads(change)
            if isinstance(offset, int):
                key = (topic, int(index))
                offsets[key] = max(offset, offsets.get(key, 0))
    return offsets


def missing_records(brokers: str, offsets: dict[tuple[str, int], int]) -> list[tuple[str, int, int]]:
    """(topic, partition, offset) of each stored offset whose previous record the broker lacks."""
    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": "streamlens-recovery-check",
            "enable.auto.commit": "false",
            "enable.partition.eof": "false",
        }
    )
    missing = []
    try:
        for (topic, partition), offset in sorted(offsets.items()):
            if offset <= 0:
                continue
            consumer.assign([TopicPartition(topic, partition, offset - 1)])
            deadline = time.monotonic() + READ_BACK_TIMEOUT
            found = False
            while not found and time.monotonic() < deadline:
                message = consumer.poll(0.2)
                found = message is not None and message.error() is None and message.offset() == offset - 1
            if not found:
                missing.append((topic, partition, offset))
    finally:
        consumer.close()
    return missing


def record_identity(directory: Path, identity: Identity) -> None:
    (directory / IDENTITY_FILE).write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")


def record_shards(directory: Path, count: int) -> None:
    """Record how many shards the state in ``directory`` is split into."""
    (directory / SHARDS_FILE).write_text(json.dumps({"state_shards": count}) + "\n")


def recorded_shards(directory: Path) -> int:
    """How many shards the state in ``directory`` is split into: as recorded, or, for a
    directory made before the count was recorded, the count every state had then."""
    path = directory / SHARDS_FILE
    if not path.exists():
        return LEGACY_COUNT
    return int(json.loads(path.read_text())["state_shards"])


def mismatch(directory: Path, brokers: str, topics: Iterable[str]) -> str | None:
    """Why the recovery state in ``directory`` must not be resumed against ``brokers``; None
    when it belongs there. Records the broker's identity when the directory has none yet."""
    topics = sorted(topics)
    current = broker_identity(brokers, topics)
    path = directory / IDENTITY_FILE
    if path.exists():
        recorded = json.loads(path.read_text())
        if recorded.get("cluster_id") != current["cluster_id"]:
            return (
                f"it was made on broker cluster {recorded.get('cluster_id')!r}, but {brokers} is "
                f"cluster {current['cluster_id']!r}"
            )
        then: dict[str, str] = recorded.get("topic_ids") or {}
        now = current["topic_ids"]
        changed = sorted(name for name in then if name in now and then[name] != now[name])
        if changed:
            return (
                f"the topics {', '.join(changed)} on {brokers} are not the ones it was made on "
                f"(topic ids {then} then, {now} now): they were deleted and created again"
            )
        if set(now) - set(then):
            # An input the state did not read before (llm.evaluations, for state made before
            # evaluations): it holds no offset of it, so it reads it from the beginning.
            record_identity(directory, {**recorded, "topic_ids": {**then, **now}})
        return None
    missing = missing_records(brokers, stored_offsets(directory))
    if missing:
        topic, partition, offset = missing[0]
        return (
            f"it resumes {topic}[{partition}] at offset {offset}, but {brokers} holds no record "
            f"at offset {offset - 1} there ({len(missing)} partition(s) like this)"
        )
    record_identity(directory, current)
    return None
