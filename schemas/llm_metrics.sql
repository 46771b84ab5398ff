-- StreamLens Postgres schema. Applied at start-up by every service and by the
-- Compose file's Postgres init; every statement is idempotent.

CREATE TABLE IF NOT EXISTS llm_metrics (
    tenant_id                  text        NOT NULL,
    route                      text        NOT NULL,
    model                      text        NOT NULL,
    window_start               timestamptz NOT NULL,
    window_end                 timestamptz NOT NULL,
    requests                   bigint      NOT NULL,
    errors                     bigint      NOT NULL,
    timeouts                   bigint      NOT NULL,
    avg_latency_ms             double precision,
    p50_latency_ms             double precision,
    p95_latency_ms             double precision,
    p99_latency_ms             double precision,
    avg_time_to_first_token_ms double precision,
    -- How many answered calls reported time-to-first-token, so roll-ups can weight
    -- avg_time_to_first_token_ms exactly (the other averages weigh by requests - timeouts).
    ttft_count                 bigint      NOT NULL DEFAULT 0,
    prompt_tokens              bigint      NOT NULL,
    completion_tokens          bigint      NOT NULL,
    cache_read_tokens          bigint      NOT NULL,
    reasoning_tokens           bigint      NOT NULL,
    avg_prompt_tokens          double precision,
    avg_completion_tokens      double precision,
    estimated_cost_usd         double precision NOT NULL,
    unpriced_requests          bigint      NOT NULL,
    -- The window's latency t-digest (fastdigest to_bytes), for merging windows later.
    latency_digest             bytea,
    revision                   integer     NOT NULL,
    updated_at                 timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, route, model, window_start),
    CHECK (window_end > window_start),
    CHECK (revision >= 1)
);

-- The query API filters one tenant over a time range, newest first, with and
-- without route and model; the primary key serves route+model lookups, this
-- one serves the tenant-wide ranges and roll-ups.
CREATE INDEX IF NOT EXISTS llm_metrics_tenant_window
    ON llm_metrics (tenant_id, window_start DESC);

CREATE INDEX IF NOT EXISTS llm_metrics_tenant_model_window
    ON llm_metrics (tenant_id, model, window_start DESC);
