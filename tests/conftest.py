"""Real parts for the tests: a Tansu broker and a PostgreSQL server, started here.

Both come from the same :mod:`deploy.stack` code as ``just up``. The Postgres
server is shared by the session and each test gets a fresh database; the broker
starts in milliseconds, so each test that needs one gets its own, empty, with
the topics created. What tests share besides fixtures is in :mod:`tests.support`.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from api.query import create_app
from schemas.config import Settings
from schemas.database import ensure_schema
from schemas.topics import ensure_topics
from tests.support.stacks import TEST_PARTITIONS, Broker, Postgres, empty_database, signal_postgres


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    server = Postgres(tmp_path_factory.mktemp("postgres")).start()
    yield server
    server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: Postgres) -> str:
    """A new, empty database with the StreamLens schema, on the session's server."""
    dsn = empty_database(postgres_server)
    ensure_schema(dsn)
    return dsn


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of this test's own, with the four topics, stopped afterwards."""
    server = Broker(tmp_path / "broker").start()
    ensure_topics(server.address, TEST_PARTITIONS)
    yield server
    server.stop()


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[Postgres]:
    """A Postgres of this test's own, so freezing it leaves the session's server alone."""
    server = Postgres(tmp_path / "postgres").start()
    yield server
    signal_postgres(server, signal.SIGCONT)
    server.stop()


@pytest.fixture
def client_for() -> Iterator[Any]:
    """Start the app against a database; stopped after the test."""
    clients: list[TestClient] = []

    def start(dsn: str) -> TestClient:
        # Keys and tenants are tested through this app in test_auth.py.
        client = TestClient(create_app(Settings(postgres_dsn=dsn, auth=False)))
        client.__enter__()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)
