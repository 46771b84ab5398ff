-- Ingestion quotas and usage (docs/quotas.md, schemas/quotas.py). Idempotent.

-- A tenant's own limits (`just quota TENANT RATE BURST`); tenants without a row have
-- INGEST_RATE / INGEST_BURST. A rate of 0 is no limit.
CREATE TABLE IF NOT EXISTS tenant_quotas (
    tenant_id          text             PRIMARY KEY,
    events_per_second  double precision NOT NULL CHECK (events_per_second >= 0),
    burst              bigint           NOT NULL CHECK (burst >= 0),
    updated_at         timestamptz      NOT NULL DEFAULT now()
);

-- The token bucket every ingestion process of a deployment takes from: the events it
-- held at `at`. Made full on first use.
CREATE TABLE IF NOT EXISTS quota_buckets (
    tenant_id  text             PRIMARY KEY,
    tokens     double precision NOT NULL,
    at         timestamptz      NOT NULL
);

-- Take up to `want` events from a tenant's bucket, but only if it holds `need`: what was
-- granted (0 or between need and want) and, when refused, how many it was short. The
-- bucket fills at `rate` events a second up to `capacity` between calls.
CREATE OR REPLACE FUNCTION quota_lease(
    p_tenant text, p_rate double precision, p_capacity double precision,
    p_need double precision, p_want double precision,
    OUT granted double precision, OUT short double precision
) LANGUAGE plpgsql AS $$
DECLARE
    moment timestamptz := clock_timestamp();
    held double precision;
    since timestamptz;
BEGIN
    INSERT INTO quota_buckets (tenant_id, tokens, at) VALUES (p_tenant, p_capacity, moment)
        ON CONFLICT (tenant_id) DO NOTHING;
    SELECT tokens, at INTO held, since FROM quota_buckets WHERE tenant_id = p_tenant FOR UPDATE;
    held := least(p_capacity, held + p_rate * greatest(0, extract(epoch FROM moment - since)));
    IF held >= p_need THEN
        granted := least(held, p_want);
        short := 0;
    ELSE
        granted := 0;
        short := p_need - held;
    END IF;
    UPDATE quota_buckets SET tokens = held - granted, at = moment WHERE tenant_id = p_tenant;
END $$;

-- Events each tenant sent per UTC day: accepted, and refused by its quota. Each
-- ingestion process adds what it counted every few seconds.
CREATE TABLE IF NOT EXISTS ingestion_usage (
    tenant_id  text   NOT NULL,
    day        date   NOT NULL,
    accepted   bigint NOT NULL DEFAULT 0,
    refused    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, day)
);
