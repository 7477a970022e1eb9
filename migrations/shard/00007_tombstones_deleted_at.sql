-- Indexes on the tombstones' deleted_at, so the pruner
-- (shards.PruneTombstones) finds the oldest tombstones with a range scan
-- instead of reading tables that grew, unpruned, with every delete.
--
-- Built CONCURRENTLY for the reason shard migration 00004 gives: a plain
-- CREATE INDEX would block every delete (each writes a tombstone) for the
-- whole build. So this migration runs outside a transaction, and Up first
-- drops what an interrupted build left behind (an INVALID index).
-- +goose NO TRANSACTION

-- +goose Up
DROP INDEX CONCURRENTLY IF EXISTS user_tombstones_deleted;
CREATE INDEX CONCURRENTLY user_tombstones_deleted ON user_tombstones (deleted_at);
DROP INDEX CONCURRENTLY IF EXISTS item_tombstones_deleted;
CREATE INDEX CONCURRENTLY item_tombstones_deleted ON item_tombstones (deleted_at);

-- +goose Down
DROP INDEX CONCURRENTLY IF EXISTS item_tombstones_deleted;
DROP INDEX CONCURRENTLY IF EXISTS user_tombstones_deleted;
