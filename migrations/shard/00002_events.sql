-- Change events: a per-partition commit clock for the outbox, a wake-up
-- notification for the relay, and tombstones that keep versions rising
-- across delete and recreate.

-- +goose Up
-- The last tick given out per partition. A BEFORE INSERT trigger on outbox
-- takes this row's lock and holds it until the writing transaction ends, so
-- within a partition ticks are handed out in commit order and, among
-- committed rows, without gaps (a rolled-back tick is handed out again).
-- xid order is not commit order (xids are assigned at the first write, and a
-- transaction may wait on a row lock after that), which is why the relay
-- orders by tick. The row moves with its partition.
CREATE TABLE outbox_clock (
    partition integer PRIMARY KEY CHECK (partition >= 0),
    tick      bigint NOT NULL CHECK (tick > 0)
);

ALTER TABLE outbox ADD COLUMN tick bigint;
-- Rows written before this migration: number them in (xid, seq) order; they
-- were committed long before, so any order per partition is a valid history.
UPDATE outbox AS o SET tick = n.tick
FROM (SELECT partition, seq, row_number() OVER (PARTITION BY partition ORDER BY xid, seq) AS tick FROM outbox) AS n
WHERE o.partition = n.partition AND o.seq = n.seq;
INSERT INTO outbox_clock (partition, tick)
SELECT partition, max(tick) FROM outbox GROUP BY partition;
ALTER TABLE outbox ALTER COLUMN tick SET NOT NULL;
CREATE UNIQUE INDEX outbox_tick ON outbox (partition, tick);

-- +goose StatementBegin
CREATE FUNCTION outbox_tick() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox_clock AS c (partition, tick) VALUES (NEW.partition, 1)
    ON CONFLICT (partition) DO UPDATE SET tick = c.tick + 1
    RETURNING c.tick INTO NEW.tick;
    RETURN NEW;
END
$$;
-- +goose StatementEnd
CREATE TRIGGER outbox_tick BEFORE INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_tick();

-- One notification per writing statement, delivered at commit.
-- +goose StatementBegin
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('shardgate_outbox', '');
    RETURN NULL;
END
$$;
-- +goose StatementEnd
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- The version of the delete of a key that has no live row; a recreate
-- continues after it. Written by the deleting statement.
CREATE TABLE user_tombstones (
    partition  integer NOT NULL,
    user_id    text NOT NULL,
    version    bigint NOT NULL CHECK (version > 0),
    deleted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partition, user_id)
);

CREATE TABLE item_tombstones (
    partition  integer NOT NULL,
    user_id    text NOT NULL,
    collection text NOT NULL,
    key        text COLLATE "C" NOT NULL,
    version    bigint NOT NULL CHECK (version > 0),
    deleted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partition, user_id, collection, key)
);

-- +goose Down
DROP TABLE item_tombstones;
DROP TABLE user_tombstones;
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION outbox_notify();
DROP TRIGGER outbox_tick ON outbox;
DROP FUNCTION outbox_tick();
DROP INDEX outbox_tick;
ALTER TABLE outbox DROP COLUMN tick;
DROP TABLE outbox_clock;
