-- The config twin of shard migration 00003: a value recreated while a
-- delete of it commits must still continue after the delete's version. The
-- trigger runs once the writer holds the config clock, which a concurrent
-- delete holds until it commits, and its query sees that delete's
-- tombstone; a version not above it is refused, and the writer runs the
-- write again (shards.RetryBelowTombstone).

-- +goose Up
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION config_outbox_tick() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    deleted bigint;
BEGIN
    UPDATE config_outbox_clock SET tick = tick + 1 RETURNING tick INTO NEW.tick;
    IF NEW.op = 'upsert' THEN
        SELECT version INTO deleted FROM config_tombstones
        WHERE namespace = NEW.namespace AND key = NEW.key;
        IF NEW.version <= deleted THEN
            RAISE EXCEPTION 'config %/%: version % is not above its delete''s %', NEW.namespace, NEW.key, NEW.version, deleted
                USING ERRCODE = 'serialization_failure';
        END IF;
    END IF;
    RETURN NEW;
END
$$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION config_outbox_tick() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE config_outbox_clock SET tick = tick + 1 RETURNING tick INTO NEW.tick;
    RETURN NEW;
END
$$;
-- +goose StatementEnd
