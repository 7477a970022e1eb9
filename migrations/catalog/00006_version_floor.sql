-- The config twin of shard migration 00006: config tombstones may now be
-- pruned (catalog.PruneConfigTombstones), so config gets one version floor,
-- on config_outbox_clock. Pruning raises it to at least the largest version
-- it pruned; a value created without a tombstone starts above it
-- (greatest(tombstone, floor) + 1). A create computed from a floor that
-- rose after its statement's snapshot is refused and run again
-- (shards.RetryBelowTombstone). The check is an AFTER INSERT trigger on
-- config, so it applies to created values only (an update continues from
-- its live row, which may lie below the floor) and runs after the
-- statement's outbox insert took the config clock, which a pruner holds
-- until it commits.

-- +goose Up
-- Lock in the writers' order (the tables their statement names first, the
-- clock later, in the outbox trigger), so migrating a live catalog waits
-- for config writers instead of deadlocking with them.
LOCK TABLE config, config_tombstones IN SHARE ROW EXCLUSIVE MODE;
ALTER TABLE config_outbox_clock ADD COLUMN version_floor bigint NOT NULL DEFAULT 0;
-- The pruner finds the oldest tombstones by it.
CREATE INDEX config_tombstones_deleted ON config_tombstones (deleted_at);

-- +goose StatementBegin
CREATE FUNCTION config_created_above_floor() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    vfloor bigint;
BEGIN
    SELECT version_floor INTO vfloor FROM config_outbox_clock;
    IF NEW.version <= vfloor THEN
        RAISE EXCEPTION 'config %/% created at version %, not above the config version floor %',
            NEW.namespace, NEW.key, NEW.version, vfloor
            USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN NULL;
END
$$;
-- +goose StatementEnd
CREATE TRIGGER config_above_floor AFTER INSERT ON config
    FOR EACH ROW EXECUTE FUNCTION config_created_above_floor();

-- +goose Down
DROP TRIGGER config_above_floor ON config;
DROP FUNCTION config_created_above_floor();
DROP INDEX config_tombstones_deleted;
ALTER TABLE config_outbox_clock DROP COLUMN version_floor;
