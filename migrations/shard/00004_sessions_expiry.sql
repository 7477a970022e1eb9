-- An index on sessions (expires_at), so the sweeper
-- (shards.SweepExpiredSessions) finds expired sessions, oldest first, with a
-- range scan instead of reading the whole table.
--
-- The table is largest exactly where this index is needed most (nothing
-- deleted expired sessions before), and a plain CREATE INDEX would block
-- every session write for the whole build. So it is built CONCURRENTLY,
-- which cannot run inside a transaction: this migration runs outside one
-- (goose runs each statement alone, on the connection that holds its
-- migration lock; MigrateAll and migrations.Up need nothing else). A build
-- that fails or is interrupted leaves an INVALID index behind and goose
-- does not record the version, so Up first drops any such leftover and then
-- builds it again. The build waits for transactions already running on the
-- shard, so against a live shard it takes as long as its longest one.
-- +goose NO TRANSACTION

-- +goose Up
DROP INDEX CONCURRENTLY IF EXISTS sessions_expires;
CREATE INDEX CONCURRENTLY sessions_expires ON sessions (expires_at);

-- +goose Down
DROP INDEX CONCURRENTLY IF EXISTS sessions_expires;
