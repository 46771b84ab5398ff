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

-- The merged latency digest of one key's roll-up bucket (1h, 1d), kept by the
-- query API so a long range does not merge every window's digest on each read.
-- A cached digest is only ever used when the bucket's windows are exactly what
-- they were when it was merged: the query API compares `windows`, `revisions`
-- and `updates` with the same aggregates over the windows it reads. Rows of
-- llm_metrics are never deleted, and every write to one sets `updated_at` to
-- its transaction's time and never lowers `revision`, so any change to a
-- bucket's windows changes at least one of them.
CREATE TABLE IF NOT EXISTS llm_metrics_rollup_digests (
    tenant_id      text        NOT NULL,
    route          text        NOT NULL,
    model          text        NOT NULL,
    bucket_seconds integer     NOT NULL,
    bucket_start   timestamptz NOT NULL,
    -- count(*), sum(revision) and sum(extract(epoch FROM updated_at)) of the windows merged.
    windows        bigint      NOT NULL,
    revisions      bigint      NOT NULL,
    updates        numeric     NOT NULL,
    -- fastdigest to_bytes of the merged digests; null when no window had one.
    digest         bytea,
    merged_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, route, model, bucket_seconds, bucket_start),
    CHECK (bucket_seconds > 0),
    CHECK (windows > 0)
);
