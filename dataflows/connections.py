"""The processor's Postgres connections, with timeouts: a server that stops answering fails as
one that stopped does, so the outage is logged and waited out (docs/operations.md).

A stopped server refuses connections and breaks the ones open: the writers notice at once,
log the outage and retry (:class:`dataflows.sinks.OutageBackoff`). A frozen one (SIGSTOP, a
hung host, a network that drops everything) neither refuses nor breaks anything: its kernel
still completes TCP handshakes and acknowledges what is sent, or nothing arrives at all, and
without a timeout a connection waits for ever, silently. Every connection the processor
opens (:func:`connect`: the rows and evaluation sinks, the part keeper's thread, the join's
segments, the tenants' settings) therefore has

- libpq's ``connect_timeout`` (:data:`CONNECT_TIMEOUT_SECONDS`);
- TCP keepalives and ``tcp_user_timeout``, which drop a connection whose peer acknowledges
  nothing, busy or idle, as a dead host or network does not;
- a server-side ``statement_timeout`` (:data:`STATEMENT_TIMEOUT_SECONDS`), for a server that
  answers but is stuck (a lock, a disk);
- an answer timeout on the client (:data:`ANSWER_TIMEOUT_SECONDS`): a wait for the server
  longer than that breaks the connection (:class:`NoAnswer`). Nothing else notices a frozen
  server: its kernel keeps acknowledging, and its own statement timeout is frozen with it.

Either timeout fails the transaction like a lost connection: the writer drops the connection
(the server rolls the transaction back; one whose COMMIT the server had already received may
commit, as with a server that stops then: every write is idempotent), logs the outage once
when it starts and once when it ends, and retries. So a write that merely takes longer than
the timeouts cannot be retried for ever, each timeout doubles the next attempt's timeouts
(:class:`Patience`), up to :data:`MAX_PATIENCE` times, back to 1 after a success (the
connection made with them then dropped for one with the usual timeouts).
DSN parameters of the same names win over these (and libpq's ``PGCONNECT_TIMEOUT`` and
``PGOPTIONS``, which a parameter given would otherwise replace).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

# A server answers a connection within milliseconds: 5 s (libpq counts whole seconds, each
# address of the host in turn) is a frozen or unreachable one, not a slow one.
CONNECT_TIMEOUT_SECONDS = 5
# The longest any one statement may run on the server. The heaviest the processor makes,
# measured here on a local server: the rows sink's upsert of a batch, 1.2 s for 50,000 window
# rows in one pipeline (a batch holds the rows one activation emits); a segment of
# the join's remembered ids, 0.4 s to write 1.5 million (30 MB: five minutes at 5,000 calls/s),
# 0.8 s to read three back on resume; a part keeper's merge of 500 hours (30,000 windows) 0.2 s.
# 10 s is 8 times the heaviest; one heavier still is retried with twice as long (Patience).
STATEMENT_TIMEOUT_SECONDS = 10
# How long the client waits for any answer of the server (a statement's result, a commit)
# before it takes the server for frozen: the statement timeout and 5 s, so that a server that
# answers cancels its own statement first and the client only acts on one that cannot.
ANSWER_TIMEOUT_SECONDS = STATEMENT_TIMEOUT_SECONDS + 5
# Keepalive probes after 10 s without traffic, every 5 s, 3 unanswered ones drop the
# connection: a dead host or network is noticed within 25 s on a connection waiting idle
# (the part keeper's, the tenants' settings'), rather than on its next statement; the probes
# also keep it open through firewalls and NAT that forget idle connections.
KEEPALIVES_IDLE_SECONDS = 10
KEEPALIVES_INTERVAL_SECONDS = 5
KEEPALIVES_COUNT = 3
# Data sent and not acknowledged for as long drops the connection, as the keepalives do an idle
# one (Linux applies it to keepalives too: the two agree). A frozen server's kernel still
# acknowledges: only the answer timeout notices that one.
TCP_USER_TIMEOUT_MS = (KEEPALIVES_IDLE_SECONDS + KEEPALIVES_INTERVAL_SECONDS * KEEPALIVES_COUNT) * 1000
# The timeouts grow to at most 16 times (160 s a statement) for a write that keeps timing out.
MAX_PATIENCE = 16
# How often the watchdog looks for waits past their time: the answer timeout's resolution.
WATCH_SECONDS = 0.5


class NoAnswer(psycopg.OperationalError):
    """The server did not answer within the answer timeout: the connection was broken."""


def is_timeout(error: BaseException) -> bool:
    """Whether ``error`` is one of the timeouts of a statement (the server's or the client's)."""
    return isinstance(error, (NoAnswer, psycopg.errors.QueryCanceled))


class Patience:
    """The factor of a writer's timeouts: doubled by each timeout, back to 1 by a success."""

    def __init__(self) -> None:
        self.factor = 1

    def failed(self, error: BaseException) -> None:
        if is_timeout(error):
            self.factor = min(MAX_PATIENCE, 2 * self.factor)

    def succeeded(self) -> bool:
        """Back to 1; whether the factor was raised, so that the connection made with the
        raised timeouts is to be dropped for one with the usual ones."""
        raised = self.factor > 1
        self.factor = 1
        return raised


def connect(dsn: str, patience: int = 1, **kwargs: Any) -> GuardedConnection:
    """An autocommit connection to ``dsn`` with the module's timeouts, ``patience`` times the
    statement and answer timeouts; ``kwargs`` go to :func:`psycopg.connect`."""
    given = conninfo_to_dict(dsn)
    defaults: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "keepalives": 1,
        "keepalives_idle": KEEPALIVES_IDLE_SECONDS,
        "keepalives_interval": KEEPALIVES_INTERVAL_SECONDS,
        "keepalives_count": KEEPALIVES_COUNT,
        "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
    }
    params = {name: value for name, value in defaults.items() if name not in given}
    if os.environ.get("PGCONNECT_TIMEOUT"):
        params.pop("connect_timeout", None)
    # The DSN's own options come after: a statement_timeout of its own wins.
    options = f"-c statement_timeout={STATEMENT_TIMEOUT_SECONDS * patience * 1000}"
    theirs = given.get("options") or os.environ.get("PGOPTIONS")
    params["options"] = f"{options} {theirs}" if theirs else options
    conn = GuardedConnection.connect(dsn, autocommit=True, **params, **kwargs)
    conn.answer_seconds = ANSWER_TIMEOUT_SECONDS * patience
    return conn


class GuardedConnection(psycopg.Connection[Any]):
    """A connection whose every wait for the server (psycopg waits in :meth:`wait` for each
    statement, result, commit and rollback) is broken after :attr:`answer_seconds`."""

    answer_seconds: float = ANSWER_TIMEOUT_SECONDS

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        armed = _WATCHDOG.arm(self, self.answer_seconds)
        try:
            return super().wait(*args, **kwargs)
        except psycopg.OperationalError as error:
            if armed.fired:
                raise NoAnswer(
                    f"no answer from postgres in {self.answer_seconds:g} s (frozen, or the network "
                    "lost?): connection dropped"
                ) from error
            raise
        finally:
            _WATCHDOG.disarm(armed)


class _Armed:
    __slots__ = ("conn", "deadline", "fired")

    def __init__(self, conn: psycopg.Connection[Any], deadline: float) -> None:
        self.conn = conn
        self.deadline = deadline
        self.fired = False


class _Watchdog:
    """One thread per process breaking the connections whose wait outlasted its deadline.

    Breaking is ``shutdown()`` of the connection's socket (a duplicate of its descriptor, so
    the descriptor stays the connection's): the waiting thread wakes up to a closed connection
    and psycopg raises. It happens under the lock that :meth:`disarm` takes, so the connection
    is still waiting, and its descriptor still its own, when it is broken.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: set[_Armed] = set()
        self._thread: threading.Thread | None = None

    def arm(self, conn: psycopg.Connection[Any], seconds: float) -> _Armed:
        armed = _Armed(conn, time.monotonic() + seconds)
        with self._lock:
            self._armed.add(armed)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="postgres-watchdog", daemon=True)
                self._thread.start()
        return armed

    def disarm(self, armed: _Armed) -> None:
        with self._lock:
            self._armed.discard(armed)

    def _run(self) -> None:
        while True:
            time.sleep(WATCH_SECONDS)
            now = time.monotonic()
            with self._lock:
                for armed in [armed for armed in self._armed if armed.deadline <= now]:
                    self._armed.discard(armed)
                    armed.fired = True
                    _break(armed.conn)


def _break(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(OSError, psycopg.Error):
        duplicate = os.dup(conn.pgconn.socket)
        try:
            sock = socket.socket(fileno=duplicate)
        except OSError:
            os.close(duplicate)
            raise
        with sock:
            sock.shutdown(socket.SHUT_RDWR)


_WATCHDOG = _Watchdog()
