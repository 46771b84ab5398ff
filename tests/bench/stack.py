"""A broker and a Postgres of a benchmark's own, in a temporary directory."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from schemas.database import ensure_schema
from schemas.topics import ensure_topics
from tests.support.stacks import TEST_PARTITIONS, Broker, Postgres


@contextmanager
def local_stack(prefix: str, partitions: int = TEST_PARTITIONS) -> Iterator[tuple[Path, Broker, Postgres]]:
    """(work directory, broker, Postgres), topics and schema made; all gone afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as directory:
        work = Path(directory)
        broker = Broker(work / "broker").start()
        postgres = Postgres(work / "postgres").start()
        try:
            ensure_topics(broker.address, partitions)
            ensure_schema(postgres.dsn)
            yield work, broker, postgres
        finally:
            broker.stop()
            postgres.stop()
