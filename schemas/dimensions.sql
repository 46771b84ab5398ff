-- Dimensions (docs/dimensions.md): each tenant's settings, when they apply, and the rows per
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

-- The dataflow's DIMENSIONS (the setting of tenants without one of their own), as
-- it changed between starts: each value applies to windows starting at or after
-- effective_from, chosen as for a tenant's change but after every tenant's horizon,
-- so that a replay after a restart with another DIMENSIONS gives the same rows. The
-- first one recorded applies from '-infinity': it is what ran before it was recorded.
CREATE TABLE IF NOT EXISTS default_dimensions (
    effective_from  timestamptz PRIMARY KEY,
    dimensions      text[]      NOT NULL,
    requested_at    timestamptz NOT NULL DEFAULT now(),
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

-- The rows per dimension value (docs/dimensions.md), kept packed: one row per window, key and
-- dimension, holding its values' columns as arrays (index i of every array is one
-- value), and read one row per value through the view llm_dimension_metrics. A
-- window emits up to 4 × 51 values: a row each would cost Postgres (and the
-- dataflow waiting on it) several times the work of the calls themselves, while
-- a packed row is written, replaced and removed whole, so that a value merged into
-- '(other)' by a revision leaves nothing behind. "values": NULL for calls without
-- a value, '(other)' for the values merged beyond the window's most frequent.
-- revision is the window's.
CREATE TABLE IF NOT EXISTS llm_dimension_windows (
    tenant_id                   text        NOT NULL,
    route                       text        NOT NULL,
    model                       text        NOT NULL,
    window_start                timestamptz NOT NULL,
    window_end                  timestamptz NOT NULL,
    dimension                   text        NOT NULL,
    revision                    integer     NOT NULL,
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    "values"                    text[]      NOT NULL,
    requests                    bigint[]    NOT NULL,
    errors                      bigint[]    NOT NULL,
    timeouts                    bigint[]    NOT NULL,
    avg_latency_ms              double precision[] NOT NULL,
    p50_latency_ms              double precision[] NOT NULL,
    p95_latency_ms              double precision[] NOT NULL,
    p99_latency_ms              double precision[] NOT NULL,
    avg_time_to_first_token_ms  double precision[] NOT NULL,
    ttft_count                  bigint[]    NOT NULL,
    prompt_tokens               bigint[]    NOT NULL,
    completion_tokens           bigint[]    NOT NULL,
    cache_read_tokens           bigint[]    NOT NULL,
    reasoning_tokens            bigint[]    NOT NULL,
    avg_prompt_tokens           double precision[] NOT NULL,
    avg_completion_tokens       double precision[] NOT NULL,
    estimated_cost_usd          double precision[] NOT NULL,
    unpriced_requests           bigint[]    NOT NULL,
    latency_digest              bytea[]     NOT NULL,
    -- The query API reads one tenant's dimension over a time range.
    PRIMARY KEY (tenant_id, dimension, window_start, route, model),
    CHECK (window_end > window_start),
    CHECK (revision >= 1),
    CHECK (cardinality("values") >= 1)
);

-- One row per window, key, dimension and value: every column of llm_metrics, plus
-- the dimension and the value. By subscript, not unnest: the API's year-long roll-up
-- of a dimension of 5 values read in 0.63 s this way, 1.74 s through unnest (a
-- per-value table: 0.67 s). Created only when missing: replacing it would lock out
-- its readers at every service's start.
DO $$
BEGIN
IF to_regclass('llm_dimension_metrics') IS NULL THEN
CREATE VIEW llm_dimension_metrics AS
SELECT w.tenant_id, w.route, w.model, w.window_start, w.window_end, w.dimension, w."values"[i] AS value,
       w.requests[i] AS requests,
       w.errors[i] AS errors,
       w.timeouts[i] AS timeouts,
       w.avg_latency_ms[i] AS avg_latency_ms,
       w.p50_latency_ms[i] AS p50_latency_ms,
       w.p95_latency_ms[i] AS p95_latency_ms,
       w.p99_latency_ms[i] AS p99_latency_ms,
       w.avg_time_to_first_token_ms[i] AS avg_time_to_first_token_ms,
       w.ttft_count[i] AS ttft_count,
       w.prompt_tokens[i] AS prompt_tokens,
       w.completion_tokens[i] AS completion_tokens,
       w.cache_read_tokens[i] AS cache_read_tokens,
       w.reasoning_tokens[i] AS reasoning_tokens,
       w.avg_prompt_tokens[i] AS avg_prompt_tokens,
       w.avg_completion_tokens[i] AS avg_completion_tokens,
       w.estimated_cost_usd[i] AS estimated_cost_usd,
       w.unpriced_requests[i] AS unpriced_requests,
       w.latency_digest[i] AS latency_digest,
       w.revision, w.updated_at
FROM llm_dimension_windows w CROSS JOIN LATERAL generate_subscripts(w."values", 1) AS i;
END IF;
END
$$;
