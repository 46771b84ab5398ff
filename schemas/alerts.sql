-- Alert rules and budgets (docs/alerts.md), one row per rule: its fields as the API took them
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

-- What each rule was last told as (dataflows/alerting.py): firing or not, the window of
-- its last transition, the window it was last told firing at, and the period a budget
-- fired in. Written by the alert service with the transitions, in one transaction.
CREATE TABLE IF NOT EXISTS alert_states (
    rule_id     text        PRIMARY KEY,
    firing      boolean     NOT NULL DEFAULT false,
    since       timestamptz,
    told        timestamptz,
    period      text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Every transition, stored before it is delivered: body is what is POSTed, id its
-- Idempotency-Key (derived from the rule, state and window, so judging again gives
-- the same). delivery: pending (attempts so far, the next at next_attempt_at),
-- delivered, failed (retried past ALERT_RETRY_HOURS, or refused as a target), or
-- cancelled (the rule was deleted).
CREATE TABLE IF NOT EXISTS alert_transitions (
    id               text        PRIMARY KEY,
    rule_id          text        NOT NULL,
    tenant_id        text        NOT NULL,
    state            text        NOT NULL,
    window_start     timestamptz NOT NULL,
    window_end       timestamptz NOT NULL,
    body             jsonb       NOT NULL,
    webhook_url      text        NOT NULL,
    at               timestamptz NOT NULL DEFAULT now(),
    delivery         text        NOT NULL DEFAULT 'pending',
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    last_error       text
);

CREATE INDEX IF NOT EXISTS alert_transitions_due
    ON alert_transitions (next_attempt_at) WHERE delivery = 'pending';
CREATE INDEX IF NOT EXISTS alert_transitions_rule ON alert_transitions (rule_id, at DESC);

-- How far the alert service has read each partition of the topics it reads: stored in
-- the transaction that stores what reading up to there gave, so a crash repeats
-- nothing and loses nothing.
CREATE TABLE IF NOT EXISTS alert_offsets (
    topic        text    NOT NULL,
    partition    integer NOT NULL,
    next_offset  bigint  NOT NULL,
    PRIMARY KEY (topic, partition)
);
