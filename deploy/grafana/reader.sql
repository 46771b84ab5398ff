-- The role Grafana reads StreamLens with: llm_metrics only, read only. Applied
-- after schemas/llm_metrics.sql, by the Compose file's grafana-reader; idempotent.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'grafana_reader') THEN
        CREATE ROLE grafana_reader LOGIN PASSWORD 'grafana_reader';
    END IF;
END
$$;
GRANT SELECT ON llm_metrics TO grafana_reader;
