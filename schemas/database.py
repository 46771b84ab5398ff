"""The Postgres schema, created when missing from the one SQL file that also seeds containers."""

from __future__ import annotations

from importlib.resources import files

import psycopg

SCHEMA_SQL: str = files("schemas").joinpath("llm_metrics.sql").read_text()


def ensure_schema(dsn: str) -> None:
    """Create tables and indexes that are missing. Safe to run from several services at once."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        # CREATE ... IF NOT EXISTS still races on the catalog; a lock serialises starters.
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('streamlens.schema'))")
            conn.execute(SCHEMA_SQL)
