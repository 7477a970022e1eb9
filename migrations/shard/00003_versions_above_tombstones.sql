-- A recreate must continue after the delete's version even when the delete
-- commits while the recreating statement runs: that statement computed its
-- version from a snapshot taken before the delete's tombstone existed.
-- The outbox trigger runs after the writer holds the partition's clock,
-- which a concurrent delete of the same partition holds until it commits;
-- its query takes a fresh snapshot (plpgsql, READ COMMITTED), so it sees
-- that tombstone and refuses a version not above it. The writer runs the
-- statement again (shards.RetryBelowTombstone).

-- +goose Up
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION outbox_tick() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    deleted bigint;
BEGIN
    INSERT INTO outbox_clock AS c (partition, tick) VALUES (NEW.partition, 1)
    ON CONFLICT (partition) DO UPDATE SET tick = c.tick + 1
    RETURNING c.tick INTO NEW.tick;
    IF NEW.op = 'upsert' AND NEW.entity = 'user' THEN
        SELECT version INTO deleted FROM user_tombstones
        WHERE partition = NEW.partition AND user_id = NEW.user_id;
    ELSIF NEW.op = 'upsert' AND NEW.entity = 'item' THEN
        -- Collections never contain '/': the key is collection/key.
        SELECT version INTO deleted FROM item_tombstones
        WHERE partition = NEW.partition AND user_id = NEW.user_id
          AND collection = split_part(NEW.key, '/', 1)
          AND key = substr(NEW.key, strpos(NEW.key, '/') + 1);
    END IF;
    IF NEW.version <= deleted THEN
        RAISE EXCEPTION '% %: version % is not above its delete''s %', NEW.entity, NEW.key, NEW.version, deleted
            USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN NEW;
END
$$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION outbox_tick() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox_clock AS c (partition, tick) VALUES (NEW.partition, 1)
    ON CONFLICT (partition) DO UPDATE SET tick = c.tick + 1
    RETURNING c.tick INTO NEW.tick;
    RETURN NEW;
END
$$;
-- +goose StatementEnd
