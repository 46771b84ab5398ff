-- Retention (docs/retention.md). Windows of llm_metrics older than `windows_before` are
-- answered from their kept hourly and daily parts only, and deleted in small
-- batches. The horizon is moved first, in its own transaction, and only after
-- every part before it matches its windows: a crash in the middle of deleting
-- leaves a horizon that already covers what is half deleted.
CREATE TABLE IF NOT EXISTS retention_horizon (
    only_row        boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    windows_before  timestamptz NOT NULL,
    -- How far dimension and evaluation rows are retired into hour rows (catches up with
    -- windows_before at the end of each run; a run killed before goes on from here).
    retired_before  timestamptz NOT NULL DEFAULT '0001-01-02 00:00:00+00',
    moved_at        timestamptz NOT NULL DEFAULT now()
);
-- Always one row: writers lock it for share (schemas/rollups.py), retention for update.
INSERT INTO retention_horizon (windows_before) VALUES ('0001-01-02 00:00:00+00') ON CONFLICT (only_row) DO NOTHING;
