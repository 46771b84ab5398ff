-- Retention (SPEC §11). Windows of llm_metrics older than `windows_before` are
-- answered from their kept hourly and daily parts only, and deleted in small
-- batches. The horizon is moved first, in its own transaction, and only after
-- every part before it matches its windows: a crash in the middle of deleting
-- leaves a horizon that already covers what is half deleted.
CREATE TABLE IF NOT EXISTS retention_horizon (
    only_row        boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    windows_before  timestamptz NOT NULL,
    moved_at        timestamptz NOT NULL DEFAULT now()
);
