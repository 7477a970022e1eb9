-- Tombstones may now be pruned (shards.PruneTombstones), so a key deleted
-- long ago may have none left. To keep its versions rising when it is
-- created again, each partition gets a version floor: pruning raises it to
-- at least the largest version it pruned, and a create of a key without a
-- tombstone starts above it (the create statements compute
-- greatest(tombstone, floor) + 1). The floor lives on the partition's
-- outbox_clock row, which moves with the partition anyway and whose lock
-- orders the pruner against the partition's writers.
--
-- A create whose statement took its snapshot before a prune (or before a
-- delete whose tombstone was then pruned) committed computed its version
-- from a floor that has since risen. It is refused here and run again
-- (shards.RetryBelowTombstone), as shard migration 00003 does for a
-- tombstone. The check runs only for rows a statement inserted: an update
-- of a live row continues from that row, which may lie below a floor that
-- rose after it was created, and must not be refused. The outbox trigger
-- cannot tell the two apart (the statement's own users/items write is
-- already visible to it either way), so this is an AFTER INSERT trigger on
-- the data tables: it fires only for inserted rows, and at the end of the
-- writing statement, after its outbox insert took the partition's clock,
-- which a concurrent pruner holds until it commits. Its query takes a fresh
-- snapshot (plpgsql, READ COMMITTED), so it sees that pruner's floor.

-- +goose Up
-- Writers lock users and items when their statement starts and the clock
-- table later, in the outbox trigger. Take the locks in that order, so
-- migrating a live shard waits for its writers instead of deadlocking with
-- them (ALTER TABLE outbox_clock first, then CREATE TRIGGER on users, did).
LOCK TABLE users, items IN SHARE ROW EXCLUSIVE MODE;
ALTER TABLE outbox_clock ADD COLUMN version_floor bigint NOT NULL DEFAULT 0;
-- A pruner may raise the floor of a partition that has no clock row yet; it
-- creates the row at tick 0, so the partition's first event still gets 1.
ALTER TABLE outbox_clock DROP CONSTRAINT outbox_clock_tick_check;
ALTER TABLE outbox_clock ADD CONSTRAINT outbox_clock_tick_check CHECK (tick >= 0);

-- +goose StatementBegin
CREATE FUNCTION created_above_floor() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    vfloor bigint;
BEGIN
    SELECT version_floor INTO vfloor FROM outbox_clock WHERE partition = NEW.partition;
    IF NEW.version <= vfloor THEN
        RAISE EXCEPTION '% row created at version % in partition %, not above its version floor %',
            TG_TABLE_NAME, NEW.version, NEW.partition, vfloor
            USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN NULL;
END
$$;
-- +goose StatementEnd
CREATE TRIGGER users_above_floor AFTER INSERT ON users
    FOR EACH ROW EXECUTE FUNCTION created_above_floor();
CREATE TRIGGER items_above_floor AFTER INSERT ON items
    FOR EACH ROW EXECUTE FUNCTION created_above_floor();

-- +goose Down
DROP TRIGGER items_above_floor ON items;
DROP TRIGGER users_above_floor ON users;
DROP FUNCTION created_above_floor();
-- Rows a pruner created carry nothing but a floor.
DELETE FROM outbox_clock WHERE tick = 0;
ALTER TABLE outbox_clock DROP CONSTRAINT outbox_clock_tick_check;
ALTER TABLE outbox_clock ADD CONSTRAINT outbox_clock_tick_check CHECK (tick > 0);
ALTER TABLE outbox_clock DROP COLUMN version_floor;
