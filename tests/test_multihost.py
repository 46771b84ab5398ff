"""Two dataflow processes on two hosts, across a network rather than loopback.

The hosts are two network namespaces this test creates, joined by a veth pair
(the Bytewax processes talk to each other over it, each at its own address).
The broker and Postgres run in the test's own namespace, the services host,
which each namespace reaches over a veth link of its own. Each process is
started as a user would start it on its host: ``python -m bytewax.run
dataflows.metrics:flow -i I -a "A:PORT;B:PORT" -r DIR``, where DIR holds the one
recovery partition of ``python -m bytewax.recovery … 2`` that belongs to it. The
whole data set of ``tests.support.dataflow`` then gives exactly its expected rows.

Needs root (to create namespaces) and ``ip`` from iproute2.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from schemas.database import ensure_schema
from schemas.topics import ensure_topics
from tests.support import dataflow as h
from tests.support.stacks import TEST_PARTITIONS, Broker, Postgres

pytestmark = pytest.mark.slow

# Each namespace has a port space of its own: both processes listen on the same port.
WORKER_PORT = 2101
REPO = Path(__file__).resolve().parent.parent


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Hosts:
    """Two hosts (namespaces) and the address of the services host."""

    namespaces: tuple[str, str]
    addresses: tuple[str, str]  # each host's address on the link between them
    services: str  # the test's own namespace, as both hosts reach it


@contextmanager
def two_hosts() -> Iterator[Hosts]:
    if shutil.which("ip") is None:
        pytest.fail("`ip` is missing: install iproute2 (apt-get install iproute2) to run this test")
    if os.geteuid() != 0:
        pytest.fail("creating network namespaces needs root")
    tag = os.getpid() % 100_000
    # 10.213.X.0/24: the link between the hosts; X+1 and X+2: each host's link to the services.
    subnet = 3 * (tag % 80)
    a, b = f"sl{tag}a", f"sl{tag}b"
    link, to_a, to_b = (f"10.213.{subnet + offset}" for offset in range(3))
    try:
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        for namespace in (a, b):
            _ip("-n", namespace, "link", "set", "lo", "up")
        # The veth pair joining the two hosts.
        _ip("link", "add", f"{a}b", "type", "veth", "peer", "name", f"{b}a")
        for namespace, device, address in ((a, f"{a}b", f"{link}.1"), (b, f"{b}a", f"{link}.2")):
            _ip("link", "set", device, "netns", namespace)
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            _ip("-n", namespace, "link", "set", device, "up")
        # Each host's link to the services host (this namespace).
        for namespace, subnet_of in ((a, to_a), (b, to_b)):
            inside, outside = f"{namespace}s", f"{namespace}r"
            _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            _ip("link", "set", inside, "netns", namespace)
            _ip("-n", namespace, "addr", "add", f"{subnet_of}.1/24", "dev", inside)
            _ip("-n", namespace, "link", "set", inside, "up")
            _ip("addr", "add", f"{subnet_of}.254/24", "dev", outside)
            _ip("link", "set", outside, "up")
        # The services listen on host A's side; host B gets there over its own link.
        _ip("-n", b, "route", "add", f"{to_a}.0/24", "via", f"{to_b}.254")
        yield Hosts((a, b), (f"{link}.1", f"{link}.2"), f"{to_a}.254")
    finally:
        for namespace in (a, b):
            with suppress(RuntimeError):
                _ip("netns", "del", namespace)
            # Deleting a namespace deletes its veth ends, and so their peers here.
            with suppress(RuntimeError):
                _ip("link", "del", f"{namespace}r")


@dataclass
class HostProcessors(h.Processor):
    """One ``bytewax.run`` process per host, each with its own recovery partition."""

    hosts: Hosts | None = None
    processes_by_host: list[subprocess.Popen] = field(default_factory=list)

    def start(self) -> HostProcessors:
        assert self.hosts is not None
        staging = self.recovery_dir / "initial"
        staging.mkdir(parents=True)
        subprocess.run([sys.executable, "-m", "bytewax.recovery", str(staging), "2"], check=True)
        addresses = ";".join(f"{address}:{WORKER_PORT}" for address in self.hosts.addresses)
        for index, namespace in enumerate(self.hosts.namespaces):
            own = self.recovery_dir / f"host-{index}"
            own.mkdir()
            # Partition I lives on host I only: the hosts share no directory.
            (staging / f"part-{index}.sqlite3").rename(own / f"part-{index}.sqlite3")
            log = open(self.log.with_suffix(f".{index}.log"), "ab")  # noqa: SIM115 - the child keeps it
            self.processes_by_host.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        namespace,
                        sys.executable,
                        "-m",
                        "bytewax.run",
                        "dataflows.metrics:flow",
                        "-w",
                        "1",
                        "-s",
                        "10",
                        "-b",
                        "0",
                        "-r",
                        str(own),
                        "-i",
                        str(index),
                        "-a",
                        addresses,
                    ],
                    env=self.env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=REPO,
                )
            )
        return self

    def log_tail(self) -> str:
        return "\n".join(
            self.log.with_suffix(f".{index}.log").read_text(errors="replace")[-2000:]
            for index in range(len(self.processes_by_host))
        )

    def check_alive(self) -> None:
        assert all(process.poll() is None for process in self.processes_by_host), (
            f"a dataflow process exited:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        for process in self.processes_by_host:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes_by_host:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_two_processes_on_two_hosts_give_the_rows_of_the_data(tmp_path: Path) -> None:
    with two_hosts() as hosts:
        broker = Broker(tmp_path / "broker", host=hosts.services).start()
        postgres: Postgres | None = None
        processor: HostProcessors | None = None
        try:
            postgres = Postgres(
                tmp_path / "postgres", host=hosts.services, trusted_network="10.213.0.0/16"
            ).start()
            ensure_topics(broker.address, TEST_PARTITIONS)
            ensure_schema(postgres.dsn)
            data = h.generate()
            processor = HostProcessors(
                broker.address,
                postgres.dsn,
                tmp_path / "recovery",
                h.write_prices(tmp_path / "prices.json"),
                tmp_path / "dataflow.log",
                processes=2,
                hosts=hosts,
            ).start()
            scenario = h.Scenario(data, processor, broker.address, postgres.dsn)
            scenario.run()
            h.check_rows(h.postgres_rows(postgres.dsn), h.expected_rows(data))
            h.check_rows(h.latest_metrics(broker.address), h.expected_rows(data))
            h.check_dead_letters(data, h.dead_letters(broker.address), scenario.markers, exact=True)
            # Both processes held state: each host's partition has snapshots of its own.
            for index in range(2):
                assert h.snapshotted_steps(tmp_path / "recovery" / f"host-{index}"), (
                    f"host {index} snapshotted nothing"
                )
        finally:
            if processor is not None:
                processor.stop()
            broker.stop()
            if postgres is not None:
                postgres.stop()
