-- Imports from one unsharded PostgreSQL (package importer): the import's
-- state and replication objects on the source, and per mapped table the
-- bulk phase's checkpoint and the follow phase's progress, so a killed
-- import continues where it stopped.

-- +goose Up
CREATE TABLE imports (
    name              text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_]{0,30}$'),
    state             text NOT NULL DEFAULT 'bulk'
                      CHECK (state IN ('bulk', 'following', 'cut_over', 'cancelled')),
    -- The mapping's SHA-256: a resumed import must use the same mapping.
    mapping_hash      text NOT NULL,
    -- The source (system identifier and database), never its DSN.
    source_id         text NOT NULL,
    -- Publication and logical replication slot on the source, and the LSN
    -- the slot was created at (the bulk snapshot's): NULL until it exists.
    publication       text NOT NULL,
    slot              text NOT NULL,
    start_lsn         text,
    -- Follow progress: the last source LSN applied and confirmed, when.
    applied_lsn       text,
    applied_at        timestamptz,
    events            boolean NOT NULL DEFAULT false,
    cutover_requested boolean NOT NULL DEFAULT false,
    error             text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE import_tables (
    import        text NOT NULL REFERENCES imports (name) ON DELETE CASCADE,
    name          text NOT NULL,
    position      integer NOT NULL,
    total_rows    bigint NOT NULL DEFAULT 0,
    -- Bulk: every source row up to last_key (the key columns as text) is
    -- written; done once the table is copied.
    last_key      text[],
    rows_copied   bigint NOT NULL DEFAULT 0,
    rows_rejected bigint NOT NULL DEFAULT 0,
    done          boolean NOT NULL DEFAULT false,
    -- Follow: changes applied, and the oldest change received but not yet
    -- applied (NULL when none is pending).
    inserts       bigint NOT NULL DEFAULT 0,
    updates       bigint NOT NULL DEFAULT 0,
    deletes       bigint NOT NULL DEFAULT 0,
    pending_since timestamptz,
    pending_lsn   text,
    PRIMARY KEY (import, name)
);

-- +goose Down
DROP TABLE import_tables;
DROP TABLE imports;
