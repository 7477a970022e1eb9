-- Rebalancing: shard weights, a record of every rebalance and of each move
-- within it (the mover's durable state, from which any instance resumes
-- after a crash), and the executor's term, which fences the writes of an
-- executor that lost its lock without noticing.

-- +goose Up
-- A bigger box gets proportionally more partitions: weight N puts N
-- members on the ring.
ALTER TABLE shards ADD COLUMN weight integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 64);

-- Names the cluster's replication slots apart from another cluster's on the
-- same PostgreSQL server (slots are server-wide; publications and
-- subscriptions belong to one database).
ALTER TABLE cluster ADD COLUMN slot_prefix text NOT NULL
    DEFAULT 'sg' || substr(md5(random()::text), 1, 8) CHECK (slot_prefix ~ '^sg[0-9a-f]{8}$');

CREATE TABLE rebalances (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    state            text NOT NULL DEFAULT 'running'
                     CHECK (state IN ('running', 'done', 'failed', 'cancelled')),
    cancel_requested boolean NOT NULL DEFAULT false,
    max_parallel     integer NOT NULL CHECK (max_parallel BETWEEN 1 AND 64),
    freeze_budget_ms integer NOT NULL CHECK (freeze_budget_ms BETWEEN 1 AND 60000),
    -- The topology version the plan was made from.
    planned_version  bigint NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    error            text
);
-- One rebalance at a time.
CREATE UNIQUE INDEX rebalances_one_running ON rebalances ((true)) WHERE state = 'running';

-- One move carries a batch of partitions from one source to one target.
CREATE TABLE moves (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rebalance_id   bigint NOT NULL REFERENCES rebalances (id),
    source         text NOT NULL,
    target         text NOT NULL CHECK (target <> source),
    partitions     integer[] NOT NULL CHECK (cardinality(partitions) > 0),
    state          text NOT NULL DEFAULT 'planned' CHECK (state IN (
                       'planned', 'copying', 'catching_up', 'verified', 'frozen', 'cut_over',
                       'cleaned_up', 'rolling_back', 'failed', 'cancelled')),
    rows_total     bigint NOT NULL DEFAULT 0,
    bytes_total    bigint NOT NULL DEFAULT 0,
    rows_copied    bigint NOT NULL DEFAULT 0,
    attempts       integer NOT NULL DEFAULT 0,
    freezes        integer NOT NULL DEFAULT 0,
    last_freeze_ms double precision,
    max_freeze_ms  double precision,
    verified_rows  bigint,
    last_error     text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);
CREATE INDEX moves_rebalance ON moves (rebalance_id);

-- The executor's term: taking the executor lock bumps it, and every write
-- of move state checks it, so a deposed executor's late writes fail.
CREATE TABLE mover_term (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    term        bigint NOT NULL,
    holder      text NOT NULL,
    acquired_at timestamptz NOT NULL
);
INSERT INTO mover_term (id, term, holder, acquired_at) VALUES (true, 0, '', now());

-- +goose Down
DROP TABLE mover_term;
DROP TABLE moves;
DROP TABLE rebalances;
ALTER TABLE cluster DROP COLUMN slot_prefix;
ALTER TABLE shards DROP COLUMN weight;
