"""The local stack and the real parts: a broker and Postgres that answer, and leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

from deploy.stack import Broker
from schemas import topics
from tests.support.topics import records_on

ROOT = Path(__file__).resolve().parent.parent


def _stack(action: str, local: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BROKERS", "POSTGRES_DSN")}
    return subprocess.run(
        [sys.executable, "-m", "deploy.stack", action, "--local", str(local)],
        cwd=ROOT,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _processes_under(local: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(local) in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def _broker_processes(port: str) -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["cmdline", "status"])
        if f"127.0.0.1:{port}" in " ".join(p.info["cmdline"] or [])
        and p.info["status"] != psutil.STATUS_ZOMBIE
    ]


def test_up_twice_then_down_leaves_no_process(tmp_path: Path):
    local = tmp_path / "local"
    first = _stack("up", local)
    assert first.returncode == 0, first.stderr
    env = dict(line.split("=", 1) for line in (local / "env").read_text().splitlines())
    assert set(env) == {"KAFKA_BROKERS", "POSTGRES_DSN"}
    broker_port = env["KAFKA_BROKERS"].rsplit(":", 1)[1]

    second = _stack("up", local)
    assert second.returncode == 0, second.stderr
    assert (local / "env").read_text().splitlines() == [f"{k}={v}" for k, v in env.items()]
    assert len(_broker_processes(broker_port)) == 1  # reused, not started twice

    from confluent_kafka.admin import AdminClient

    listed = AdminClient({"bootstrap.servers": env["KAFKA_BROKERS"]}).list_topics(timeout=10)
    for name in topics.ALL_TOPICS:
        assert len(listed.topics[name].partitions) == 3
    with psycopg.connect(env["POSTGRES_DSN"]) as conn:
        assert conn.execute("SELECT to_regclass('llm_metrics')").fetchone()[0] == "llm_metrics"

    down = _stack("down", local)
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 10
    while (_processes_under(local) or _broker_processes(broker_port)) and (time.monotonic() < deadline):
        time.sleep(0.1)
    assert _processes_under(local) == []
    assert _broker_processes(broker_port) == []
    assert not (local / "env").exists()


def test_up_with_given_addresses_starts_nothing(tmp_path: Path, broker: Broker, postgres_dsn: str):
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE llm_metrics")
    local = tmp_path / "local"
    result = _stack("up", local, KAFKA_BROKERS=broker.address, POSTGRES_DSN=postgres_dsn)
    assert result.returncode == 0, result.stderr
    assert (local / "env").read_text() == (f"KAFKA_BROKERS={broker.address}\nPOSTGRES_DSN={postgres_dsn}\n")
    assert not (local / "broker").exists() and not (local / "postgres").exists()
    with psycopg.connect(postgres_dsn) as conn:  # the schema was ensured
        assert conn.execute("SELECT to_regclass('llm_metrics')").fetchone()[0] == "llm_metrics"


def test_up_with_only_postgres_given_starts_only_a_broker(tmp_path: Path, postgres_dsn: str):
    local = tmp_path / "local"
    result = _stack("up", local, POSTGRES_DSN=postgres_dsn)
    assert result.returncode == 0, result.stderr
    env = dict(line.split("=", 1) for line in (local / "env").read_text().splitlines())
    assert env["POSTGRES_DSN"] == postgres_dsn
    broker_port = env["KAFKA_BROKERS"].rsplit(":", 1)[1]
    assert len(_broker_processes(broker_port)) == 1
    assert not (local / "postgres").exists()
    assert _stack("down", local).returncode == 0
    deadline = time.monotonic() + 10
    while _broker_processes(broker_port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _broker_processes(broker_port) == []
    with psycopg.connect(postgres_dsn) as conn:  # the given Postgres is left running
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_bad_configuration_stops_up_with_one_line(tmp_path: Path):
    result = _stack("up", tmp_path / "local", TOPIC_PARTITIONS="0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "streamlens: invalid configuration: TOPIC_PARTITIONS='0', expected a whole number from 1 to 10000"
    ]


def test_broker_round_trip(broker: Broker):
    producer = Producer({"bootstrap.servers": broker.address, "enable.idempotence": True, "acks": "all"})
    sent = {f"key-{i}".encode(): f"value-{i}".encode() for i in range(500)}
    for key, value in sent.items():
        producer.produce(topics.REQUESTS, key=key, value=value)
    assert producer.flush(15) == 0

    consumer = Consumer(
        {"bootstrap.servers": broker.address, "group.id": "test", "enable.auto.commit": False}
    )
    partitions = [TopicPartition(topics.REQUESTS, p, 0) for p in range(3)]
    consumer.assign(partitions)
    received = {}
    deadline = time.monotonic() + 15
    while len(received) < len(sent) and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and message.error() is None:
            received[message.key()] = message.value()
    consumer.close()
    assert received == sent


def test_reading_a_topic_back_gets_the_whole_of_its_last_batches(broker: Broker):
    """``records_on``, which the dataflow tests read every output with, reads each partition to
    its end: also when the partition's last record batch holds many records, for which this
    broker's high watermark (ListOffsets) stands short of the end."""
    producer = Producer({"bootstrap.servers": broker.address, "linger.ms": 50, "acks": "all"})
    sent: dict[tuple[int, bytes], bytes] = {}
    # Partition 0 in batches of 1, 1, 5 and 20 records, partition 1 in one of 1,500 (more than
    # one consume() call returns), partition 2 empty.
    for partition, sizes in ((0, (1, 1, 5, 20)), (1, (1500,))):
        for size in sizes:
            for _ in range(size):
                key = f"key-{partition}-{len(sent)}".encode()
                sent[partition, key] = f"value-{len(sent)}".encode()
                producer.produce(topics.DEADLETTER, key=key, value=sent[partition, key], partition=partition)
            assert producer.flush(15) == 0
    consumer = Consumer({"bootstrap.servers": broker.address, "group.id": "test"})
    highs = [
        consumer.get_watermark_offsets(TopicPartition(topics.DEADLETTER, p), timeout=10)[1] for p in (0, 1)
    ]
    consumer.close()
    print(f"high watermarks {highs} for {[27, 1500]} records")

    records = records_on(broker.address, topics.DEADLETTER)

    assert sorted((partition, offset) for _, _, partition, offset in records) == sorted(
        [(0, offset) for offset in range(27)] + [(1, offset) for offset in range(1500)]
    )
    assert {(partition, key): value for key, value, partition, _ in records} == sent


def test_postgres_round_trip(postgres_dsn: str):
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute(
            """INSERT INTO llm_metrics (tenant_id, route, model, window_start, window_end,
                   requests, errors, timeouts, prompt_tokens, completion_tokens,
                   cache_read_tokens, reasoning_tokens, estimated_cost_usd, unpriced_requests,
                   revision, latency_digest)
               VALUES ('t', '/r', 'm', '2026-01-01T00:00:00+02:00', '2026-01-01T00:01:00+02:00',
                   3, 1, 0, 10, 20, 0, 0, 0.5, 0, 1, '\\x0102')"""
        )
        row = conn.execute(
            "SELECT window_start AT TIME ZONE 'UTC', requests, latency_digest FROM llm_metrics"
        ).fetchone()
    assert str(row[0]) == "2025-12-31 22:00:00"
    assert row[1:] == (3, b"\x01\x02")


def _retention(address: str, names: list[str]) -> dict[str, dict[str, str]]:
    admin = AdminClient({"bootstrap.servers": address})
    described = admin.describe_configs([ConfigResource(ResourceType.TOPIC, name) for name in names])
    return {
        resource.name: {
            key: entry.value
            for key, entry in future.result(10).items()
            if key in ("cleanup.policy", "retention.ms")
        }
        for resource, future in described.items()
    }


def test_the_row_and_dead_letter_topics_keep_30_days_and_the_rows_compacted(broker: Broker):
    """Made so by ensure_topics (`just up`, every service's start), and set again on a topic
    whose settings were changed since."""
    thirty_days = str(30 * 86_400 * 1000)
    wanted = {
        **{
            name: {"cleanup.policy": "compact,delete", "retention.ms": thirty_days}
            for name in topics.ROW_TOPICS
        },
        topics.DEADLETTER: {"cleanup.policy": "delete", "retention.ms": thirty_days},
    }
    names = list(wanted)
    assert _retention(broker.address, names) == wanted
    admin = AdminClient({"bootstrap.servers": broker.address})
    changed = ConfigResource(
        ResourceType.TOPIC,
        topics.METRICS,
        incremental_configs=[
            ConfigEntry("retention.ms", "1000", incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in admin.incremental_alter_configs([changed]).values():
        future.result(10)
    assert _retention(broker.address, [topics.METRICS])[topics.METRICS]["retention.ms"] == "1000"
    topics.ensure_topics(broker.address, 1)
    assert _retention(broker.address, names) == wanted
