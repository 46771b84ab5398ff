-- StreamLens API keys (docs/api.md). Applied at start-up by every service, by
-- `python -m api.keys` and by the Compose file's Postgres init; idempotent.
--
-- A key is `sl_<key_id>_<secret>`. Only its SHA-256 is stored: the secret has 256
-- random bits, so a fast hash cannot be brute-forced and a slow KDF would only add
-- latency to every uncached request. key_prefix (`sl_<key_id>`) is not secret: it
-- names the key in listings and revocation and is how a presented key is looked up.

CREATE TABLE IF NOT EXISTS api_keys (
    key_hash    bytea       PRIMARY KEY,
    key_prefix  text        NOT NULL UNIQUE,
    tenant_id   text        NOT NULL,
    scope       text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CHECK (octet_length(key_hash) = 32),
    CHECK (key_prefix ~ '^sl_[a-z0-9]{8}$'),
    CONSTRAINT api_keys_scope_known CHECK (scope IN ('ingest', 'read', 'manage')),
    CHECK (revoked_at IS NULL OR revoked_at >= created_at)
);

-- Tables made before the manage scope have api_keys_scope_check, Postgres's name for
-- the unnamed CHECK (scope IN ('ingest', 'read')); api_keys_scope_known replaces it.
-- The table is altered only while that is still to do: ALTER TABLE locks out every
-- key lookup while it waits and runs, and this file runs at every start-up.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT FROM pg_constraint
        WHERE conrelid = 'api_keys'::regclass AND conname = 'api_keys_scope_known'
    ) THEN
        ALTER TABLE api_keys DROP CONSTRAINT IF EXISTS api_keys_scope_check;
        ALTER TABLE api_keys
            ADD CONSTRAINT api_keys_scope_known CHECK (scope IN ('ingest', 'read', 'manage'));
    END IF;
END
$$;

CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant_id, created_at);
