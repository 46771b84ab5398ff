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

-- Roll-ups read each key's windows' fingerprint (count, revision and updated_at
-- sums per bucket) from this index alone, without the wide rows and digests.
CREATE INDEX IF NOT EXISTS llm_metrics_key_window_fingerprint
    ON llm_metrics (tenant_id, route, model, window_start) INCLUDE (revision, updated_at);

-- One key's roll-up bucket (1h, 1d) merged: its sums, the totals and weights of
-- its averages and its merged latency digest, kept by the query API so a long
-- range neither rereads nor remerges every window on each read. A kept part is
-- only ever used while the bucket's windows have exactly the fingerprint it was
-- merged from (`windows`, `revisions`, `updates`, compared with the same
-- aggregates over the windows on each read). Rows of llm_metrics are never
-- deleted, and every write to one sets `updated_at` to its transaction's time
-- and never lowers `revision`, so any change to a bucket's windows changes the
-- fingerprint.
CREATE TABLE IF NOT EXISTS llm_metrics_rollups (
    tenant_id                         text        NOT NULL,
    route                             text        NOT NULL,
    model                             text        NOT NULL,
    bucket_seconds                    integer     NOT NULL,
    bucket_start                      timestamptz NOT NULL,
    -- count(*), sum(revision) and sum(updated_at - 'epoch') of the windows merged
    -- (an interval sum is exact to the microsecond, and cheaper than numeric).
    windows                           bigint      NOT NULL,
    revisions                         bigint      NOT NULL,
    updates                           interval    NOT NULL,
    window_end                        timestamptz NOT NULL,
    requests                          bigint      NOT NULL,
    errors                            bigint      NOT NULL,
    timeouts                          bigint      NOT NULL,
    prompt_tokens                     bigint      NOT NULL,
    completion_tokens                 bigint      NOT NULL,
    cache_read_tokens                 bigint      NOT NULL,
    reasoning_tokens                  bigint      NOT NULL,
    unpriced_requests                 bigint      NOT NULL,
    -- sum(average * weight) and sum(weight) over windows that have the average.
    avg_latency_ms_total              double precision,
    avg_latency_ms_weight             bigint,
    avg_time_to_first_token_ms_total  double precision,
    avg_time_to_first_token_ms_weight bigint,
    avg_prompt_tokens_total           double precision,
    avg_prompt_tokens_weight          bigint,
    avg_completion_tokens_total       double precision,
    avg_completion_tokens_weight      bigint,
    estimated_cost_usd                double precision NOT NULL,
    revision                          integer     NOT NULL,
    -- fastdigest to_bytes of the merged window digests (about 15 kB: compressing
    -- doubles gains little and costs more than it saves); null when no window had one.
    digest                            bytea STORAGE EXTERNAL,
    merged_at                         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, route, model, bucket_seconds, bucket_start),
    CHECK (bucket_seconds > 0),
    CHECK (windows > 0)
);
