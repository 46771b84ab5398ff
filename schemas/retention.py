"""Retention (docs/retention.md): windows older than ``RETENTION_DAYS`` deleted, their roll-ups kept.

One run, :func:`run`, does three things in order, each safe to interrupt:

1. **Seal.** Every hourly and daily part (:mod:`schemas.rollups`) of the time about
   to be retired is checked against its windows' fingerprint and merged again where
   it differs (windows written around the dataflow's sink, or before parts were
   kept). Nothing is deleted yet.
2. **Move the horizon** (``retention_horizon``, one row) to the start of the UTC
   day ``RETENTION_DAYS`` ago, in its own transaction. From then on the query API
   answers that time from the sealed parts only, so it makes no difference to an
   answer whether a window there is deleted yet.
3. **Delete** the windows before the horizon, and the parts older than
   ``ROLLUP_RETENTION_DAYS``, in batches of :data:`BATCH_ROWS` rows, each its own
   short transaction (row locks on what it deletes, nothing else): the query API
   and the sink never wait long. A crash in the middle loses at most one batch's
   transaction; the next run finds the horizon moved and goes on deleting.
   Dimension and evaluation rows keep no parts: each hour of them before the
   horizon is replaced by one row of that hour, in a transaction per few hours
   (:mod:`schemas.dimension_retention`, :mod:`schemas.evaluation_retention`), and
   those hour rows are deleted after ``ROLLUP_RETENTION_DAYS`` like the parts.

Runs take a session advisory lock: with several hosts running it, one works and
the others skip the run. ``just retention`` (``python -m schemas.retention``) runs
it once; with ``--every SECONDS`` it runs on that timer until stopped (``just demo``
and the Compose file's ``retention`` service run it hourly).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from schemas import rollups
from schemas.config import Settings, load_or_exit
from schemas.database import ensure_schema, tenants_sql
from schemas.dimension_retention import retire_dimensions
from schemas.evaluation_retention import retire_evaluations
from schemas.logs import configure_logging

logger = logging.getLogger("streamlens.retention")

BATCH_ROWS = 2_000
# Parts merged again per transaction while sealing.
SEAL_PARTS = 200
INTERVAL_SECONDS = 3600
_LOCK = "SELECT pg_try_advisory_lock(hashtext('streamlens.retention'))"
_UNLOCK = "SELECT pg_advisory_unlock(hashtext('streamlens.retention'))"


@dataclass
class Report:
    """What one run did."""

    horizon: datetime | None = None
    parts_sealed: int = 0
    windows_deleted: int = 0
    dimension_rows_retired: int = 0
    evaluation_rows_retired: int = 0
    parts_deleted: int = 0
    batches: int = 0
    skipped: bool = False


def horizon_for(now: datetime, days: int) -> datetime:
    """The start of the UTC day ``days`` before ``now``: whole days, so hourly and daily
    buckets are each wholly before or after it."""
    return rollups.floor_to(now - timedelta(days=days), rollups.DAY_SECONDS)


# Parts between the old horizon and the new one that differ from their windows (or are missing).
_STALE_SQL = """
    SELECT tenant_id, route, model, date_bin(%(bucket)s, window_start, timestamptz 'epoch') AS bucket_start,
        count(*) AS windows, sum(revision) AS revisions, sum(updated_at - timestamptz 'epoch') AS updates
    FROM llm_metrics WHERE window_start >= %(since)s AND window_start < %(until)s
    GROUP BY 1, 2, 3, 4
    EXCEPT
    SELECT tenant_id, route, model, bucket_start, windows, revisions, updates
    FROM llm_metrics_rollups
    WHERE bucket_seconds = %(seconds)s AND bucket_start >= %(since)s AND bucket_start < %(until)s
    ORDER BY 1, 2, 3, 4"""

# Parts whose windows are all gone (deleted by hand): sealed, they would answer for them.
_ORPHANS_SQL = """
    DELETE FROM llm_metrics_rollups AS r
    WHERE r.bucket_start >= %(since)s AND r.bucket_start < %(until)s AND NOT EXISTS (
        SELECT 1 FROM llm_metrics AS w
        WHERE w.tenant_id = r.tenant_id AND w.route = r.route AND w.model = r.model
          AND w.window_start >= r.bucket_start
          AND w.window_start < r.bucket_start + make_interval(secs => r.bucket_seconds))"""
_DELETE_WINDOWS_SQL = """
    DELETE FROM llm_metrics WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM llm_metrics WHERE tenant_id = %(tenant)s AND window_start < %(before)s
        LIMIT %(rows)s))"""
_DELETE_PARTS_SQL = """
    DELETE FROM llm_metrics_rollups WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM llm_metrics_rollups WHERE tenant_id = %(tenant)s AND bucket_start < %(before)s
        LIMIT %(rows)s))"""
# Hour rows of dimensions and evaluations, by the table's window_start.
_DELETE_HOURS_SQL = {
    table: f"""
    DELETE FROM {table} WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM {table} WHERE tenant_id = %(tenant)s AND window_start < %(before)s
        LIMIT %(rows)s))"""
    for table in ("llm_dimension_windows", "llm_evaluation_metrics", "llm_evaluation_dimension_windows")
}


def _current_horizon(conn: psycopg.Connection[Any]) -> tuple[datetime, datetime]:
    """The horizon, and how far dimension and evaluation rows are retired into hours."""
    found = conn.execute("SELECT windows_before, retired_before FROM retention_horizon").fetchone()
    return (rollups.NO_HORIZON, rollups.NO_HORIZON) if found is None else (found[0], found[1])


def _stale(conn: psycopg.Connection[Any], since: datetime, until: datetime) -> list[rollups.PartKey]:
    """The hours to merge again so that every part in ``[since, until)`` matches its windows:
    a stale hour's own, every hour of a stale day."""
    stale: list[rollups.PartKey] = []
    for seconds in rollups.KEPT_BUCKETS:
        rows = conn.execute(
            _STALE_SQL,
            {"bucket": timedelta(seconds=seconds), "seconds": seconds, "since": since, "until": until},
        ).fetchall()
        stale += [
            (tenant, route, model, start + timedelta(hours=hour))
            for tenant, route, model, start, *_ in rows
            for hour in range(seconds // rollups.HOUR_SECONDS)
        ]
    return stale


def seal(conn: psycopg.Connection[Any], since: datetime, until: datetime) -> int:
    """Merge again every hourly and daily part in ``[since, until)`` that differs from its
    windows, and forget those without windows; how many parts were merged. Repeats until
    none differs (writers may still be writing there)."""
    sealed = 0
    while True:
        with conn.transaction():
            conn.execute(_ORPHANS_SQL, {"since": since, "until": until})
        stale = _stale(conn, since, until)
        if not stale:
            return sealed
        for first in range(0, len(stale), SEAL_PARTS):
            with conn.transaction(), conn.cursor() as cursor:
                sealed += rollups.keep(cursor, stale[first : first + SEAL_PARTS], rollups.horizon(cursor))


def move_horizon(conn: psycopg.Connection[Any], since: datetime, until: datetime) -> int:
    """Move the horizon to ``until``, with every part before it checked once more while no
    writer is writing: the horizon row locked for update waits for those that read it (they
    lock it for share) and holds off the next. How many parts were merged then."""
    with conn.transaction(), conn.cursor() as cursor:
        cursor.execute("SELECT windows_before FROM retention_horizon FOR UPDATE")
        cursor.execute(_ORPHANS_SQL, {"since": since, "until": until})
        stale = _stale(conn, since, until)
        sealed = rollups.keep(cursor, stale, since) if stale else 0
        cursor.execute("UPDATE retention_horizon SET windows_before = %s, moved_at = now()", (until,))
    return sealed


def _delete_in_batches(
    conn: psycopg.Connection[Any],
    tenants: list[str],
    sql: str,
    before: datetime,
    report: Report,
    pause: Callable[[], None],
) -> int:
    deleted = 0
    for tenant in tenants:
        while True:
            with conn.transaction():
                count = conn.execute(sql, {"tenant": tenant, "before": before, "rows": BATCH_ROWS}).rowcount
            report.batches += 1
            deleted += count
            if count < BATCH_ROWS:
                break
            pause()
    return deleted


def run(
    dsn: str,
    settings: Settings,
    now: datetime | None = None,
    pause: Callable[[], None] = lambda: time.sleep(0.01),
) -> Report:
    """One retention run (see the module); ``pause`` between batches leaves the database
    to the others."""
    now = datetime.now(UTC) if now is None else now
    report = Report()
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        locked = conn.execute(_LOCK).fetchone()
        if locked is None or not locked[0]:
            report.skipped = True
            return report
        try:
            target = horizon_for(now, settings.retention_days)
            current, retired = _current_horizon(conn)
            if current < target:
                report.parts_sealed = seal(conn, current, target)
                report.parts_sealed += move_horizon(conn, current, target)
                current = target
            report.horizon = current
            tenants = [row[0] for row in conn.execute(tenants_sql("llm_metrics"))]
            report.windows_deleted = _delete_in_batches(
                conn, tenants, _DELETE_WINDOWS_SQL, current, report, pause
            )
            if retired < current:
                report.dimension_rows_retired = retire_dimensions(conn, retired, current, pause)
                report.evaluation_rows_retired = retire_evaluations(conn, retired, current, pause)
                with conn.transaction():
                    conn.execute("UPDATE retention_horizon SET retired_before = %s", (current,))
            oldest = horizon_for(now, settings.rollup_retention_days)
            tenants = [row[0] for row in conn.execute(tenants_sql("llm_metrics_rollups"))]
            report.parts_deleted = _delete_in_batches(conn, tenants, _DELETE_PARTS_SQL, oldest, report, pause)
            for table, sql in _DELETE_HOURS_SQL.items():
                tenants = [row[0] for row in conn.execute(tenants_sql(table))]
                report.parts_deleted += _delete_in_batches(conn, tenants, sql, oldest, report, pause)
        finally:
            conn.execute(_UNLOCK)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="just retention", description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, metavar="SECONDS", help="run on this timer until stopped")
    every = parser.parse_args(argv).every
    settings = load_or_exit()
    configure_logging(settings.log_format)
    ensure_schema(settings.postgres_dsn)
    # SIGTERM (a supervisor, the demo) and SIGINT end the timer between runs, exit status 0.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.is_set():
        try:
            report = run(settings.postgres_dsn, settings)
        except psycopg.OperationalError as error:
            if every is None:
                raise
            logger.warning("retention run failed, trying again in %g s: %s", every, error)
        else:
            if report.skipped:
                logger.info("another process is running retention; nothing done")
            else:
                logger.info(
                    "retention: windows before %s answered from roll-ups; %d parts sealed, %d windows"
                    " deleted, %d dimension and %d evaluation rows retired into hours, %d parts and hour"
                    " rows deleted in %d batches",
                    report.horizon,
                    report.parts_sealed,
                    report.windows_deleted,
                    report.dimension_rows_retired,
                    report.evaluation_rows_retired,
                    report.parts_deleted,
                    report.batches,
                )
        if every is None:
            return
        stop.wait(every)


if __name__ == "__main__":
    main()
