"""Run the metrics dataflow with recovery: ``python -m dataflows.run --recovery-dir DIR``.

On first use the recovery directory is created and initialised (what
``python -m bytewax.recovery DIR N`` does); afterwards every start resumes from
the last snapshot, so a killed dataflow picks up where it stopped and counts
nothing twice. ``--processes N`` starts N cooperating Bytewax processes on this
machine (``-i``/``-a`` on free ports), each with ``--workers`` worker threads;
workers share the GIL, so scale with processes.

The recovery directory holds Kafka offsets, which mean something only on the
broker they were read from: it records that broker's cluster id and topic ids
(:mod:`dataflows.recovery`), and a start against another broker, or topics
created anew, is refused with one line saying so. ``--reset`` wipes the
directory and starts afresh from the beginning of the topics.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bytewax.recovery import init_db_dir

from dataflows import recovery
from dataflows.shards import default_count
from schemas.config import load_or_exit
from schemas.database import ensure_schema
from schemas.logs import configure_logging
from schemas.network import free_port
from schemas.topics import EVALUATIONS, REQUESTS, RESPONSES, ensure_topics

logger = logging.getLogger("streamlens.dataflow")

FLOW = "dataflows.metrics:flow"
INPUTS = (REQUESTS, RESPONSES, EVALUATIONS)
STOP_TIMEOUT = 10.0


def prepare_recovery(directory: Path, partitions: int, *, reset: bool = False) -> bool:
    """Create and initialise the recovery partitions unless they exist (wipe them first on
    reset); True when they were made just now."""
    if reset and directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Initialising twice fails inside Bytewax: an existing set is resumed from as it is.
    if any(directory.glob("part-*.sqlite3")):
        return False
    init_db_dir(directory, partitions)
    return True


def shard_count(directory: Path, made: bool, setting: int | None, workers: int) -> int:
    """How many shards the state in ``directory`` is split into. A directory ``made``
    just now takes ``setting``, or the default for ``workers``, and records it; any other
    keeps the count it recorded, whatever the setting says now (a warning says so)."""
    if made:
        recovery.record_shards(directory, setting or default_count(workers))
    count = recovery.recorded_shards(directory)
    if setting is not None and setting != count:
        logger.warning(
            "recovery: STATE_SHARDS=%d ignored: the state in %s is split into %d shards "
            "and keeps that count until --reset",
            setting,
            directory,
            count,
        )
    return count


def commands(
    recovery_dir: Path, processes: int, workers: int, snapshot_interval: int, backup_interval: int
) -> list[list[str]]:
    """The ``bytewax.run`` command line of each process."""
    base = [
        sys.executable,
        "-m",
        "bytewax.run",
        FLOW,
        "-r",
        str(recovery_dir),
        "-s",
        str(snapshot_interval),
        "-b",
        str(backup_interval),
        "-w",
        str(workers),
    ]
    if processes == 1:
        return [base]
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
    return [[*base, "-i", str(index), "-a", addresses] for index in range(processes)]


def _die_with_parent() -> None:
    # A runner killed with SIGKILL cannot stop its children; the kernel does it instead.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def supervise(argvs: list[list[str]], metrics_port: int, shards: int) -> int:
    """Run the processes until one ends or a stop signal arrives; stop the rest; its exit code.

    Process ``i`` serves its Prometheus metrics on ``metrics_port + i``; every process
    splits its state into ``shards``.
    """
    children = [
        subprocess.Popen(
            argv,
            preexec_fn=_die_with_parent,
            env={**os.environ, "METRICS_PORT": str(metrics_port + index), "STATE_SHARDS": str(shards)},
        )
        for index, argv in enumerate(argvs)
    ]
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    while not stopping:
        ended = [child for child in children if child.poll() is not None]
        if ended:
            code = ended[0].returncode
            break
        time.sleep(0.2)
    for child in children:
        if child.poll() is None:
            # The signal the runner was sent (SIGINT when one ended): each process stops
            # cleanly on either (dataflows.stopping) and logs which one it was sent.
            child.send_signal(stopping[0] if stopping else signal.SIGINT)
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return code if not stopping else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataflows.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recovery-dir",
        type=Path,
        required=True,
        help="where snapshots and Kafka offsets are kept (created when missing)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=int(os.environ.get("PROCESSES", "1")),
        help="Bytewax processes on this machine (default: $PROCESSES or 1)",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker threads per process")
    parser.add_argument(
        "--snapshot-interval",
        type=int,
        default=10,
        help="seconds between snapshots; a restart replays at most this much",
    )
    parser.add_argument(
        "--backup-interval",
        type=int,
        default=0,
        help="seconds to keep older snapshots (for backups of the directory)",
    )
    parser.add_argument(
        "--reset",
        action="store_true",
        help="wipe the recovery directory first and read the topics from the "
        "beginning (a start refuses recovery state of another broker)",
    )
    args = parser.parse_args(argv)
    if args.processes < 1 or args.workers < 1 or args.snapshot_interval < 1:
        parser.error("--processes, --workers and --snapshot-interval must be at least 1")

    settings = load_or_exit()
    configure_logging(settings.log_format)
    ensure_topics(settings.kafka_brokers, settings.topic_partitions)
    ensure_schema(settings.postgres_dsn)
    recovery_dir = args.recovery_dir.resolve()
    workers = args.processes * args.workers
    made = prepare_recovery(recovery_dir, workers, reset=args.reset)
    if made:
        recovery.record_identity(recovery_dir, recovery.broker_identity(settings.kafka_brokers, INPUTS))
        logger.info("recovery: new state in %s, reading the topics from the beginning", recovery_dir)
    else:
        why = recovery.mismatch(recovery_dir, settings.kafka_brokers, INPUTS)
        if why is not None:
            logger.error(
                "recovery: refusing to resume from %s: %s. Start with --reset to drop it "
                "and read the topics from the beginning.",
                recovery_dir,
                why,
            )
            return 2
        logger.info("recovery: resuming from %s", recovery_dir)
    shards = shard_count(recovery_dir, made, settings.state_shards, workers)
    return supervise(
        commands(recovery_dir, args.processes, args.workers, args.snapshot_interval, args.backup_interval),
        settings.metrics_port,
        shards,
    )


if __name__ == "__main__":
    sys.exit(main())
