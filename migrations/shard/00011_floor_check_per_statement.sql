-- The version-floor check of shard migration 00006, once per statement
-- instead of once per row. A bulk import batch inserts thousands of rows
-- in one statement, and one plpgsql call per row was about a third of its
-- time; an AFTER INSERT statement trigger with a transition table checks
-- all of a statement's inserted rows with one query.
--
-- The guarantee is 00006's, unchanged: the transition table holds only the
-- rows the statement inserted (rows an INSERT ... ON CONFLICT DO UPDATE
-- updated go to UPDATE's transition table, not this one), so an update of
-- a live row below the floor still passes; the trigger fires at the end of
-- the writing statement, after the row-level triggers and so after its
-- outbox insert took the partition's clock; and its query takes a fresh
-- snapshot (plpgsql, READ COMMITTED), so it sees a concurrent pruner's
-- floor once that pruner committed. A refused statement fails whole with
-- serialization_failure, which the writers retry
-- (shards.RetryBelowTombstone).

-- +goose Up
-- Lock order as in 00006: the data tables first, as writers do.
LOCK TABLE users, items IN SHARE ROW EXCLUSIVE MODE;
DROP TRIGGER users_above_floor ON users;
DROP TRIGGER items_above_floor ON items;

-- +goose StatementBegin
CREATE FUNCTION created_rows_above_floor() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT n.partition, n.version, c.version_floor INTO bad
    FROM created AS n JOIN outbox_clock AS c ON c.partition = n.partition
    WHERE n.version <= c.version_floor
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION '% row created at version % in partition %, not above its version floor %',
            TG_TABLE_NAME, bad.version, bad.partition, bad.version_floor
            USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN NULL;
END
$$;
-- +goose StatementEnd
CREATE TRIGGER users_above_floor AFTER INSERT ON users
    REFERENCING NEW TABLE AS created
    FOR EACH STATEMENT EXECUTE FUNCTION created_rows_above_floor();
CREATE TRIGGER items_above_floor AFTER INSERT ON items
    REFERENCING NEW TABLE AS created
    FOR EACH STATEMENT EXECUTE FUNCTION created_rows_above_floor();

-- +goose Down
LOCK TABLE users, items IN SHARE ROW EXCLUSIVE MODE;
DROP TRIGGER users_above_floor ON users;
DROP TRIGGER items_above_floor ON items;
DROP FUNCTION created_rows_above_floor();
CREATE TRIGGER users_above_floor AFTER INSERT ON users
    FOR EACH ROW EXECUTE FUNCTION created_above_floor();
CREATE TRIGGER items_above_floor AFTER INSERT ON items
    FOR EACH ROW EXECUTE FUNCTION created_above_floor();
