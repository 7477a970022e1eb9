-- The catalog: the cluster's shape, its shards, the actual partition → shard
-- map, a topology version that routers watch, and global config.

-- +goose Up
CREATE TABLE cluster (
    id                 boolean PRIMARY KEY DEFAULT true CHECK (id), -- a single row
    partition_count    integer NOT NULL CHECK (partition_count > 0),
    replication_factor integer NOT NULL CHECK (replication_factor >= 2),
    load               double precision NOT NULL CHECK (load > 1),
    created_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shards (
    name       text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    -- May reference environment variables (${VAR}) instead of holding secrets.
    dsn        text NOT NULL,
    state      text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining')),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The actual map. Routers route by it; the ring only proposes a target map.
CREATE TABLE partitions (
    partition integer PRIMARY KEY CHECK (partition >= 0),
    shard     text NOT NULL REFERENCES shards (name)
);
CREATE INDEX partitions_shard ON partitions (shard);

CREATE TABLE topology (
    id      boolean PRIMARY KEY DEFAULT true CHECK (id),
    version bigint NOT NULL
);
INSERT INTO topology (id, version) VALUES (true, 0);

-- Any change to shards or partitions bumps the version and tells every
-- listening router (the notification is delivered at commit).
-- +goose StatementBegin
CREATE FUNCTION bump_topology() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v bigint;
BEGIN
    UPDATE topology SET version = version + 1 RETURNING version INTO v;
    PERFORM pg_notify('shardgate_topology', v::text);
    RETURN NULL;
END
$$;
-- +goose StatementEnd
CREATE TRIGGER shards_topology AFTER INSERT OR UPDATE OR DELETE ON shards
    FOR EACH STATEMENT EXECUTE FUNCTION bump_topology();
CREATE TRIGGER partitions_topology AFTER INSERT OR UPDATE OR DELETE ON partitions
    FOR EACH STATEMENT EXECUTE FUNCTION bump_topology();

CREATE TABLE config (
    namespace  text NOT NULL,
    key        text COLLATE "C" NOT NULL,
    value      jsonb NOT NULL,
    version    bigint NOT NULL CHECK (version > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, key)
);

-- Config changes, written in the same transaction as the change.
CREATE TABLE config_outbox (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid NOT NULL DEFAULT gen_random_uuid(),
    namespace    text NOT NULL,
    key          text NOT NULL,
    op           text NOT NULL CHECK (op IN ('upsert', 'delete')),
    version      bigint NOT NULL,
    payload      jsonb,
    committed_at timestamptz NOT NULL DEFAULT now(),
    xid          xid8 NOT NULL DEFAULT pg_current_xact_id()
);

-- +goose Down
DROP TABLE config_outbox;
DROP TABLE config;
DROP TABLE partitions;
DROP TABLE shards;
DROP FUNCTION bump_topology();
DROP TABLE topology;
DROP TABLE cluster;
