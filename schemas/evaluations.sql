-- Evaluation rows (docs/evaluations.md): per window, key and evaluation name, the scores and
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
    -- {label: count}: the 20 most frequent, the rest under "(other)" (an hour row that
    -- retention left holds its windows' labels added up, all of them).
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

-- The evaluation rows per dimension value (docs/dimensions.md, docs/evaluations.md), packed as llm_dimension_windows
-- is: one row per window, key, name and dimension, each value's columns at the same
-- index of the arrays ("values": NULL for calls without a value, '(other)' for the
-- values merged beyond the DIMENSION_VALUES most evaluated), replaced whole by a later
-- revision (the row's evaluations, plus those of timed-out calls moved to their
-- answer's finish_reason). Read one row per value through the view below.
CREATE TABLE IF NOT EXISTS llm_evaluation_dimension_windows (
    tenant_id     text               NOT NULL,
    route         text               NOT NULL,
    model         text               NOT NULL,
    window_start  timestamptz        NOT NULL,
    window_end    timestamptz        NOT NULL,
    name          text               NOT NULL,
    dimension     text               NOT NULL,
    revision      integer            NOT NULL,
    updated_at    timestamptz        NOT NULL DEFAULT now(),
    "values"      text[]             NOT NULL,
    evaluations   bigint[]           NOT NULL,
    scores        bigint[]           NOT NULL,
    score_sum     double precision[] NOT NULL,
    score_avg     double precision[] NOT NULL,
    score_min     double precision[] NOT NULL,
    score_max     double precision[] NOT NULL,
    score_p50     double precision[] NOT NULL,
    score_p90     double precision[] NOT NULL,
    labels        jsonb              NOT NULL,  -- an array: each value's {label: count}
    score_digest  bytea[]            NOT NULL,
    PRIMARY KEY (tenant_id, dimension, window_start, route, model, name),
    CHECK (window_end > window_start),
    CHECK (revision >= 1)
);

CREATE OR REPLACE VIEW llm_evaluation_dimension_metrics AS
SELECT w.tenant_id, w.route, w.model, w.window_start, w.window_end, w.name, w.dimension,
       v.value, v.evaluations, v.scores, v.score_sum, v.score_avg, v.score_min, v.score_max,
       v.score_p50, v.score_p90, w.labels -> (v.place - 1)::int AS labels, v.score_digest,
       w.revision
FROM llm_evaluation_dimension_windows AS w
CROSS JOIN LATERAL unnest(w."values", w.evaluations, w.scores, w.score_sum, w.score_avg,
                          w.score_min, w.score_max, w.score_p50, w.score_p90, w.score_digest)
    WITH ORDINALITY AS v(value, evaluations, scores, score_sum, score_avg, score_min, score_max,
                         score_p50, score_p90, score_digest, place);
