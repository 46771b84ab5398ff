-- Dimensions (SPEC §8): each tenant's settings, when they apply, and the rows per
-- dimension value. Applied at start-up by every service and by the Compose file's
-- Postgres init; every statement is idempotent.

-- One row per change of a tenant's dimensions: the setting applies to windows
-- starting at or after effective_from, until the next change's effective_from.
-- effective_from is chosen when the change is made (see dimension_horizons) and
-- never changes, so every replay of the dataflow applies the same setting to
-- the same windows.
CREATE TABLE IF NOT EXISTS tenant_dimensions (
    tenant_id       text        NOT NULL,
    effective_from  timestamptz NOT NULL,
    dimensions      text[]      NOT NULL,
    requested_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, effective_from),
    CHECK (cardinality(dimensions) <= 4)
);

-- Per tenant, the latest window start for which the dataflow has decided which
-- setting applies. The dataflow raises it (and reads the settings) in one
-- transaction before it opens a later window; a change locks the same row and
-- takes effect from the first window boundary after both the time it is made and
-- this horizon. So no window is ever opened under a setting a change could still
-- replace, whichever comes first, in any process.
CREATE TABLE IF NOT EXISTS dimension_horizons (
    tenant_id        text        PRIMARY KEY,
    decided_through  timestamptz NOT NULL
);

-- One row per window, key, dimension and value: every column of llm_metrics, plus
-- the dimension and the value (null: calls without one; '(other)': the values
-- beyond the window's DIMENSION_VALUES most frequent, merged). revision is the
-- row's own: the value's content version, or the window's revision for
-- '(other)'. window_revision is the revision of the window emission that last
-- wrote the row: a later emission deletes the rows of values it no longer holds
-- (dropped into '(other)') whose window_revision is lower than its own.
CREATE TABLE IF NOT EXISTS llm_dimension_metrics (
    tenant_id                  text        NOT NULL,
    route                      text        NOT NULL,
    model                      text        NOT NULL,
    window_start               timestamptz NOT NULL,
    window_end                 timestamptz NOT NULL,
    dimension                  text        NOT NULL,
    value                      text,
    requests                   bigint      NOT NULL,
    errors                     bigint      NOT NULL,
    timeouts                   bigint      NOT NULL,
    avg_latency_ms             double precision,
    p50_latency_ms             double precision,
    p95_latency_ms             double precision,
    p99_latency_ms             double precision,
    avg_time_to_first_token_ms double precision,
    ttft_count                 bigint      NOT NULL DEFAULT 0,
    prompt_tokens              bigint      NOT NULL,
    completion_tokens          bigint      NOT NULL,
    cache_read_tokens          bigint      NOT NULL,
    reasoning_tokens           bigint      NOT NULL,
    avg_prompt_tokens          double precision,
    avg_completion_tokens      double precision,
    estimated_cost_usd         double precision NOT NULL,
    unpriced_requests          bigint      NOT NULL,
    latency_digest             bytea,
    revision                   integer     NOT NULL,
    window_revision            integer     NOT NULL,
    updated_at                 timestamptz NOT NULL DEFAULT now(),
    CHECK (window_end > window_start),
    CHECK (revision >= 1)
);

-- The key; a null value is one value, not many.
CREATE UNIQUE INDEX IF NOT EXISTS llm_dimension_metrics_key
    ON llm_dimension_metrics (tenant_id, route, model, window_start, dimension, value) NULLS NOT DISTINCT;

-- The query API reads one tenant's dimension over a time range, newest first.
CREATE INDEX IF NOT EXISTS llm_dimension_metrics_tenant_window
    ON llm_dimension_metrics (tenant_id, dimension, window_start DESC);
