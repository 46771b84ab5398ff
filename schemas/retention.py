"""Retention (SPEC §11): windows older than ``RETENTION_DAYS`` deleted, their roll-ups kept.

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
from schemas.database import ensure_schema
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

# Tenants with windows before a moment: a loose scan of the (tenant_id, window_start) index.
_TENANTS_SQL = """
    WITH RECURSIVE tenants AS (
        (SELECT tenant_id FROM llm_metrics ORDER BY tenant_id LIMIT 1)
        UNION ALL
        SELECT (SELECT m.tenant_id FROM llm_metrics AS m WHERE m.tenant_id > t.tenant_id
                ORDER BY m.tenant_id LIMIT 1)
        FROM tenants AS t WHERE t.tenant_id IS NOT NULL
    )
    SELECT tenant_id FROM tenants WHERE tenant_id IS NOT NULL"""
_DELETE_WINDOWS_SQL = """
    DELETE FROM llm_metrics WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM llm_metrics WHERE tenant_id = %(tenant)s AND window_start < %(before)s
        LIMIT %(rows)s))"""
_DELETE_PARTS_SQL = """
    DELETE FROM llm_metrics_rollups WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM llm_metrics_rollups WHERE tenant_id = %(tenant)s AND bucket_start < %(before)s
        LIMIT %(rows)s))"""
# Hour rows of dimensions and evaluations, by the table's window_start.
_DELETE_HOURS_SQL = tuple(
    f"""
    DELETE FROM {table} WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM {table} WHERE tenant_id = %(tenant)s AND window_start < %(before)s
        LIMIT %(rows)s))"""
    for table in ("llm_dimension_windows", "llm_evaluation_metrics", "llm_evaluation_dimension_windows")
)
_PART_TENANTS_SQL = "SELECT DISTINCT tenant_id FROM llm_metrics_rollups WHERE bucket_start < %(before)s"


def _current_horizon(conn: psycopg.Connection[Any]) -> datetime | None:
    found = conn.execute("SELECT windows_before FROM retention_horizon").fetchone()
    return None if found is None else found[0]


def seal(conn: psycopg.Connection[Any], since: datetime, until: datetime) -> int:
    """Merge again every hourly and daily part in ``[since, until)`` that differs from its
    windows; how many parts were merged. Repeats until none differs."""
    sealed = 0
    while True:
        stale: list[rollups.PartKey] = []
        for seconds in rollups.KEPT_BUCKETS:
            rows = conn.execute(
                _STALE_SQL,
                {"bucket": timedelta(seconds=seconds), "seconds": seconds, "since": since, "until": until},
            ).fetchall()
            hours = seconds // rollups.HOUR_SECONDS
            stale += [
                (tenant, route, model, start + timedelta(hours=hour))
                for tenant, route, model, start, *_ in rows
                for hour in range(hours)
            ]
        if not stale:
            return sealed
        for first in range(0, len(stale), SEAL_PARTS):
            with conn.transaction(), conn.cursor() as cursor:
                sealed += rollups.keep(cursor, stale[first : first + SEAL_PARTS])


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
            current = _current_horizon(conn)
            if current is None or current < target:
                since = current if current is not None else datetime.min.replace(tzinfo=UTC)
                report.parts_sealed = seal(conn, since, target)
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO retention_horizon (windows_before) VALUES (%s) ON CONFLICT (only_row)"
                        " DO UPDATE SET windows_before = EXCLUDED.windows_before, moved_at = now()",
                        (target,),
                    )
                current = target
            report.horizon = current
            tenants = [row[0] for row in conn.execute(_TENANTS_SQL)]
            report.windows_deleted = _delete_in_batches(
                conn, tenants, _DELETE_WINDOWS_SQL, current, report, pause
            )
            report.dimension_rows_retired = retire_dimensions(conn, current, pause)
            report.evaluation_rows_retired = retire_evaluations(conn, current, pause)
            oldest = horizon_for(now, settings.rollup_retention_days)
            part_tenants = [row[0] for row in conn.execute(_PART_TENANTS_SQL, {"before": oldest})]
            report.parts_deleted = _delete_in_batches(
                conn, part_tenants, _DELETE_PARTS_SQL, oldest, report, pause
            )
            for hours in _DELETE_HOURS_SQL:
                report.parts_deleted += _delete_in_batches(conn, part_tenants, hours, oldest, report, pause)
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
