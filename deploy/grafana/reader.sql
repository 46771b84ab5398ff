-- The role Grafana reads StreamLens with: the metrics rows (llm_metrics, the view
-- llm_dimension_metrics, llm_evaluation_metrics and the view
-- llm_evaluation_dimension_metrics) only, read only. Applied after the schema files, by the Compose file's grafana-reader; idempotent.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'grafana_reader') THEN
        CREATE ROLE grafana_reader LOGIN PASSWORD 'grafana_reader';
    END IF;
END
$$;
GRANT SELECT ON llm_metrics TO grafana_reader;
GRANT SELECT ON llm_dimension_metrics TO grafana_reader;
GRANT SELECT ON llm_evaluation_metrics TO grafana_reader;
GRANT SELECT ON llm_evaluation_dimension_metrics TO grafana_reader;
