"""The Postgres schema, created when missing from the SQL files that also seed containers."""

from __future__ import annotations

from importlib.resources import files

import psycopg

# Each file stands alone (no cross-references), so a container init may run them in any order.
SCHEMA_FILES: tuple[str, ...] = (
    "llm_metrics.sql",
    "api_keys.sql",
    "join_segments.sql",
    "dimensions.sql",
    "evaluations.sql",
    "alerts.sql",
    "quotas.sql",
    "retention.sql",
)
SCHEMA_SQL: str = "\n".join(files("schemas").joinpath(name).read_text() for name in SCHEMA_FILES)


# libpq's connect timeout (whole seconds) for the schema's connection.
CONNECT_TIMEOUT_SECONDS = 10


def ensure_schema(dsn: str) -> None:
    """Create tables and indexes that are missing. Safe to run from several services at once."""
    # CREATE ... IF NOT EXISTS still races on the catalog; a lock serialises starters. A server
    # that accepts TCP but never answers (frozen) fails the connection as a stopped one does.
    with (
        psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS) as conn,
        conn.transaction(),
    ):
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('streamlens.schema'))")
        conn.execute(SCHEMA_SQL)


def tenants_sql(table: str) -> str:
    """The tenants having rows in ``table``: a loose scan of an index leading with
    ``tenant_id`` (one probe a tenant), not a scan of the table."""
    return f"""
        WITH RECURSIVE tenants AS (
            (SELECT tenant_id FROM {table} ORDER BY tenant_id LIMIT 1)
            UNION ALL
            SELECT (SELECT t.tenant_id FROM {table} AS t WHERE t.tenant_id > s.tenant_id
                    ORDER BY t.tenant_id LIMIT 1)
            FROM tenants AS s WHERE s.tenant_id IS NOT NULL
        )
        SELECT tenant_id FROM tenants WHERE tenant_id IS NOT NULL"""
