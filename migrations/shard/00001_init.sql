-- One shard's schema. Every table holding user data leads its primary key
-- with `partition`: a partition moves with logical replication filtered on
-- `partition`, which Postgres allows for UPDATE/DELETE only when the filter
-- column is in the replica identity; it also makes per-partition copy and
-- checksum a range scan.

-- +goose Up
-- Which partitions this shard serves. Reads need owned or frozen; writes need
-- owned and hold FOR SHARE on the row for their transaction, so the mover's
-- FOR UPDATE (to freeze) waits for in-flight writes and then blocks new ones.
CREATE TABLE ownership (
    partition  integer PRIMARY KEY CHECK (partition >= 0),
    state      text NOT NULL CHECK (state IN ('owned', 'frozen', 'moved')),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    partition  integer NOT NULL,
    user_id    text NOT NULL,
    profile    jsonb NOT NULL,
    version    bigint NOT NULL CHECK (version > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partition, user_id)
);

-- Tokens are never stored: only their SHA-256.
CREATE TABLE sessions (
    partition  integer NOT NULL,
    token_hash bytea NOT NULL CHECK (length(token_hash) = 32),
    user_id    text NOT NULL,
    data       jsonb NOT NULL,
    expires_at timestamptz NOT NULL,
    version    bigint NOT NULL CHECK (version > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partition, token_hash)
);
CREATE INDEX sessions_user ON sessions (partition, user_id);

CREATE TABLE items (
    partition  integer NOT NULL,
    user_id    text NOT NULL,
    collection text NOT NULL,
    key        text COLLATE "C" NOT NULL, -- byte order: stable paging and prefix ranges
    value      jsonb NOT NULL,
    version    bigint NOT NULL CHECK (version > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partition, user_id, collection, key)
);

-- One row per change, written in the same transaction as the change.
-- xid lets the relay publish in commit order rather than seq order.
CREATE TABLE outbox (
    partition    integer NOT NULL,
    seq          bigint GENERATED ALWAYS AS IDENTITY,
    event_id     uuid NOT NULL DEFAULT gen_random_uuid(),
    user_id      text NOT NULL,
    entity       text NOT NULL CHECK (entity IN ('user', 'session', 'item')),
    key          text NOT NULL,
    op           text NOT NULL CHECK (op IN ('upsert', 'delete')),
    version      bigint NOT NULL,
    payload      jsonb,
    committed_at timestamptz NOT NULL DEFAULT now(),
    xid          xid8 NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (partition, seq)
);
CREATE INDEX outbox_seq ON outbox (seq);

-- +goose Down
DROP TABLE outbox;
DROP TABLE items;
DROP TABLE sessions;
DROP TABLE users;
DROP TABLE ownership;
