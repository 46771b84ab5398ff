-- Alert rules and budgets (SPEC §10), one row per rule: its fields as the API took them
-- (without the secret) and the webhook secret apart, which signs deliveries and is never
-- returned. Written by the query API; read by it and by the alert service. Idempotent.
CREATE TABLE IF NOT EXISTS alert_rules (
    id              text        PRIMARY KEY,
    tenant_id       text        NOT NULL,
    rule            jsonb       NOT NULL,
    webhook_secret  text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS alert_rules_tenant ON alert_rules (tenant_id, created_at, id);
