"""Real parts for the tests: a Tansu broker and a PostgreSQL server, started here.

Both come from the same :mod:`deploy.stack` code as ``just up``. The Postgres
server is shared by the session and each test gets a fresh database; the broker
starts in milliseconds, so each test that needs one gets its own, empty, with
the topics created.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from deploy.stack import Broker, Postgres
from schemas.database import ensure_schema
from schemas.topics import ensure_topics

TEST_PARTITIONS = 3


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    server = Postgres(tmp_path_factory.mktemp("postgres")).start()
    yield server
    server.stop()


_database_numbers = itertools.count()


def empty_database(server: Postgres) -> str:
    """A new database on ``server``, without any table."""
    name = f"test_{next(_database_numbers)}"
    admin = server.dsn.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.dsn.rsplit("/", 1)[0] + f"/{name}"


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


def signal_postgres(server: Postgres, signum: signal.Signals) -> None:
    """The postmaster and every backend: SIGSTOP freezes the whole server, queries included."""
    main = psutil.Process(server.pid)
    for process in [main, *main.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)
