"""The broker and PostgreSQL the tests run against: the launchers of :mod:`deploy.stack`, the
same as ``just up`` uses; the partitions of the tests' topics; a new database on a server; and
signals to a whole Postgres server (SIGSTOP freezes it)."""

from __future__ import annotations

import contextlib
import itertools
import signal

import psutil
import psycopg

from deploy.stack import Broker, Postgres

__all__ = ["TEST_PARTITIONS", "Broker", "Postgres", "empty_database", "signal_postgres"]

TEST_PARTITIONS = 3


_database_numbers = itertools.count()


def empty_database(server: Postgres) -> str:
    """A new database on ``server``, without any table."""
    name = f"test_{next(_database_numbers)}"
    admin = server.dsn.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.dsn.rsplit("/", 1)[0] + f"/{name}"


def signal_postgres(server: Postgres, signum: signal.Signals) -> None:
    """The postmaster and every backend: SIGSTOP freezes the whole server, queries included."""
    main = psutil.Process(server.pid)
    for process in [main, *main.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)
