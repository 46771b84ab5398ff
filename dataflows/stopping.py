"""Stopping cleanly on SIGTERM or SIGINT.

Bytewax turns SIGINT into a ``KeyboardInterrupt`` raised wherever the worker is,
which ends the process with a traceback and without a final snapshot. Instead,
the signal only marks the dataflow as stopping: each input partition then ends
its input at its next poll, Bytewax closes the last epoch, writes what it holds
and takes its snapshot, and the process exits 0. Records not handed over yet
are read again on the next start, from the snapshot's offsets.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

logger = logging.getLogger("streamlens.dataflow")

STOPPING = threading.Event()


def _stop(signum: int, _frame: FrameType | None) -> None:
    if not STOPPING.is_set():
        logger.warning(
            "%s: stopping after the current batch, with a final snapshot", signal.Signals(signum).name
        )
    STOPPING.set()


def install() -> None:
    """Make SIGTERM and SIGINT stop the dataflow cleanly (call from the main thread)."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
