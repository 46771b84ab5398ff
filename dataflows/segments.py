"""Sealed segments of the join's remembered request ids, kept in Postgres.

The join's snapshots name segments by ``(shard, number)`` instead of holding
their ids (see :mod:`dataflows.remembered`): a segment is written once, when it
is sealed, read back when a shard resumes, and deleted once nothing can resume
into it. Rows live in ``join_segments`` (``schemas/join_segments.sql``), in the
same database as the metrics, which every process of a dataflow reaches, on
whatever host a shard resumes.

A failed write is not retried here: the ids stay in the shard's recent ids,
which the next snapshot then holds, and the next seal writes them. After a write
that failed slowly (a timeout: the server does not answer), the thread's writes
fail at once for :data:`WRITE_PAUSE_SECONDS`, so that such a server costs a
snapshot one timeout, not one a shard. A failed read on resume is retried until
Postgres is back, since the shard cannot go on without its ids. Connections have
the processor's timeouts (:mod:`dataflows.connections`).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import psycopg

from dataflows import connections
from dataflows.remembered import Segment
from dataflows.sinks import MAX_PAUSE, OutageBackoff

SAVE_SQL = (
    "INSERT INTO join_segments (shard, number, until, digests, expiry, tenant, tenants)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (shard, number) DO UPDATE SET"
    " until = EXCLUDED.until, digests = EXCLUDED.digests, expiry = EXCLUDED.expiry,"
    " tenant = EXCLUDED.tenant, tenants = EXCLUDED.tenants, written = now()"
)
LOAD_SQL = (
    "SELECT number, digests, expiry, tenant, tenants FROM join_segments"
    " WHERE shard = %s AND number >= %s AND number < %s ORDER BY number"
)


# A write failing after this long timed out (a refused connection fails in milliseconds):
# the thread's writes then fail at once for as long as a retry pauses at most.
SLOW_FAILURE_SECONDS = 1.0
WRITE_PAUSE_SECONDS = MAX_PAUSE


class MissingSegments(RuntimeError):
    """A resumed shard's segments are not all in Postgres (another database, or deleted)."""


class PostgresSegments:
    """:class:`dataflows.remembered.SegmentStore` over Postgres: one connection per
    worker thread, opened on first use."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._local = threading.local()
        # Writes are not waited for (see above); reads on resume are.
        self._writes = OutageBackoff("postgres (join segments)", sleep=lambda _: None)
        self._reads = OutageBackoff("postgres (join segments)")

    def _patience(self) -> connections.Patience:
        patience: connections.Patience | None = getattr(self._local, "patience", None)
        if patience is None:
            patience = self._local.patience = connections.Patience()
        return patience

    def _connection(self) -> psycopg.Connection:
        conn: psycopg.Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = connections.connect(self.dsn, self._patience().factor)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn: psycopg.Connection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _write(self, statements: list[tuple[str, tuple[object, ...]]]) -> bool:
        """Run ``statements`` in one transaction; False (reported, not retried) on failure,
        and at once within WRITE_PAUSE_SECONDS of a write of the thread that timed out."""
        started = time.monotonic()
        if started < getattr(self._local, "write_again_at", 0.0):
            return False
        try:
            conn = self._connection()
            with conn.transaction():
                for sql, params in statements:
                    conn.execute(sql, params)
        except psycopg.Error as error:
            self._drop_connection()
            self._patience().failed(error)
            now = time.monotonic()
            if now - started >= SLOW_FAILURE_SECONDS:
                self._local.write_again_at = now + WRITE_PAUSE_SECONDS
            self._writes.failed(error, started)
            return False
        if self._patience().succeeded():
            self._drop_connection()
        self._writes.succeeded()
        return True

    def save(self, shard: str, number: int, segment: Segment) -> bool:
        statements: list[tuple[str, tuple[object, ...]]] = []
        if number == 0:
            # A shard starting afresh: whatever a crashed start left is no one's.
            statements.append(("DELETE FROM join_segments WHERE shard = %s", (shard,)))
        statements.append(
            (
                SAVE_SQL,
                (
                    shard,
                    number,
                    segment.until(),
                    segment.digests.astype("<i8").tobytes(),
                    segment.expiry.astype("<f8").tobytes(),
                    segment.tenant.astype("<u4").tobytes(),
                    segment.tenants,
                ),
            )
        )
        return self._write(statements)

    def forget(self, shard: str, below: int, from_: int | None = None) -> bool:
        # A failed delete is left for a later call: it deletes everything below its bound too.
        return self._write(
            [
                (
                    "DELETE FROM join_segments WHERE shard = %s AND (number < %s OR number >= %s)",
                    (shard, below, from_ if from_ is not None else 2**63 - 1),
                )
            ]
        )

    def load(self, shard: str, low: int, high: int) -> list[Segment]:
        while True:
            started = time.monotonic()
            try:
                rows = self._connection().execute(LOAD_SQL, (shard, low, high)).fetchall()
                break
            except psycopg.Error as error:
                self._drop_connection()
                self._patience().failed(error)
                self._reads.failed(error, started)
        if self._patience().succeeded():
            self._drop_connection()
        self._reads.succeeded()
        numbers = [row[0] for row in rows]
        if numbers != list(range(low, high)):
            missing = sorted(set(range(low, high)) - set(numbers))
            raise MissingSegments(
                f"join shard {shard}: segments {missing[:5]}{'…' if len(missing) > 5 else ''} of its "
                f"remembered request ids are not in join_segments: the recovery state belongs to "
                f"another database (or was copied without it); start afresh with --reset"
            )
        return [
            Segment(
                np.frombuffer(digests, "<i8").astype(np.int64),
                np.frombuffer(expiry, "<f8").astype(np.float64),
                np.frombuffer(tenant, "<u4").astype(np.uint32),
                list(tenants),
            )
            for _, digests, expiry, tenant, tenants in rows
        ]
