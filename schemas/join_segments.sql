-- The join's remembered request ids, sealed (see dataflows/remembered.py): the
-- dataflow's snapshots name these rows instead of holding the ids. Written and
-- deleted by the dataflow only; every statement is idempotent.

CREATE TABLE IF NOT EXISTS join_segments (
    shard    text             NOT NULL,
    number   bigint           NOT NULL,
    until    double precision NOT NULL,  -- the latest expiry in it, event time (Unix s)
    digests  bytea            NOT NULL,  -- int64 little-endian, sorted
    expiry   bytea            NOT NULL,  -- float64 little-endian, Unix seconds
    tenant   bytea            NOT NULL,  -- uint32 little-endian, indexes tenants
    tenants  text[]           NOT NULL,
    written  timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (shard, number)
);
