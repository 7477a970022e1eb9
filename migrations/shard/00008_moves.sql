-- What a partition move needs on a shard.
--
-- A move streams the partition's rows, outbox included, to the target with
-- logical replication. The outbox's seq comes from each shard's own
-- identity sequence, so a copied row's seq could collide with one the
-- target hands out later; the move therefore leaves seq out (the target
-- assigns its own) and identifies outbox rows by (partition, tick), which
-- is unique and moves with the partition. A row-filtered publication needs
-- the filter column in the replica identity, and a column list must cover
-- it: hence the replica identity on that index.
--
-- A marker row written on the source during a freeze and seen on the
-- target proves the target has applied everything before it.

-- +goose Up
ALTER TABLE outbox REPLICA IDENTITY USING INDEX outbox_tick;

CREATE TABLE move_markers (
    move_id    bigint NOT NULL,
    token      text NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (move_id, token)
);

-- +goose Down
DROP TABLE move_markers;
ALTER TABLE outbox REPLICA IDENTITY DEFAULT;
