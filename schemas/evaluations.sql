-- Evaluation rows (SPEC §9): per window, key and evaluation name, the scores and
-- labels of the evaluations counted toward the window's calls. Written by the
-- dataflow only, judged by revision (the number of evaluations counted), as
-- llm_metrics is; every statement is idempotent.

CREATE TABLE IF NOT EXISTS llm_evaluation_metrics (
    tenant_id     text             NOT NULL,
    route         text             NOT NULL,
    model         text             NOT NULL,
    window_start  timestamptz      NOT NULL,
    window_end    timestamptz      NOT NULL,
    name          text             NOT NULL,
    evaluations   bigint           NOT NULL,
    scores        bigint           NOT NULL,  -- how many of them had a score
    score_sum     double precision,           -- their exact sum, rounded once: roll-ups weigh by it
    score_avg     double precision,
    score_min     double precision,
    score_max     double precision,
    score_p50     double precision,
    score_p90     double precision,
    -- {label: count}: the 20 most frequent, the rest under "(other)".
    labels        jsonb            NOT NULL,
    -- The scores' t-digest (fastdigest to_bytes), for merging windows later.
    score_digest  bytea,
    revision      integer          NOT NULL,
    updated_at    timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, route, model, window_start, name),
    CHECK (window_end > window_start),
    CHECK (revision >= 1)
);

CREATE INDEX IF NOT EXISTS llm_evaluation_metrics_tenant_window
    ON llm_evaluation_metrics (tenant_id, window_start DESC);
