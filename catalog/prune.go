package catalog

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/internal/pglock"
	"github.com/shardgate/shardgate/internal/versioning"
)

// pruneLockTimeout bounds the pruner's one wait, for the config clock,
// which config writers hold only from their outbox insert to their commit.
const pruneLockTimeout = "5s"

const (
	configTombstonesOldSQL = `
SELECT EXISTS (SELECT 1 FROM config_tombstones WHERE deleted_at < now() - $1::bigint * interval '1 microsecond')`

	// The config clock: its holder is the only one writing config events, a
	// config delete writes its tombstone after taking it (see
	// shards.PruneTombstones for why that puts the clock first here), and a
	// create refused by the floor it raises runs again.
	lockConfigClockSQL = `SELECT 1 FROM config_outbox_clock FOR UPDATE`

	// pruneConfigTombstonesSQL deletes up to $2 config tombstones deleted
	// before now() - $1 µs, oldest first, passing over any a delete is
	// rewriting, and raises the config version floor to at least the
	// largest version it deleted.
	pruneConfigTombstonesSQL = `
WITH del AS (
    DELETE FROM config_tombstones AS t USING (
        SELECT namespace, key FROM config_tombstones
        WHERE deleted_at < now() - $1::bigint * interval '1 microsecond'
        ORDER BY deleted_at LIMIT $2
        FOR UPDATE SKIP LOCKED
    ) AS c
    WHERE t.namespace = c.namespace AND t.key = c.key
    RETURNING t.version
), fl AS (
    UPDATE config_outbox_clock SET version_floor = greatest(version_floor, (SELECT max(version) FROM del))
    WHERE EXISTS (SELECT 1 FROM del)
)
SELECT count(*) FROM del`
)

// PruneConfigTombstones deletes up to limit (1..versioning.MaxPruneLimit)
// config tombstones written more than olderThan ago (by the database's
// clock) and returns how many it deleted. In the same transaction it raises
// the config version floor to at least the largest version it pruned, so a
// value set again after its tombstone is gone still gets a version above
// every one it had (catalog migration 00006). One prune runs per catalog at
// a time: while another holds the lock it returns 0 at once. Config writes
// wait for its commit once it found something to prune. Fewer than limit
// means nothing more was ready.
func (c *Catalog) PruneConfigTombstones(ctx context.Context, olderThan time.Duration, limit int) (n int, err error) {
	if limit < 1 || limit > versioning.MaxPruneLimit {
		return 0, fmt.Errorf("prune config tombstones: limit %d outside 1..%d", limit, versioning.MaxPruneLimit)
	}
	if olderThan < 0 {
		return 0, fmt.Errorf("prune config tombstones: negative age %v", olderThan)
	}
	age := olderThan.Microseconds()
	// One statement per step, so each snapshot is taken after the locks
	// before it are held.
	_, err = pglock.TryTx(ctx, c.pool, pglock.ClassMaintenance, pglock.KeyPrune, pruneLockTimeout, func(tx pgx.Tx) error {
		var some bool
		// Most rounds find nothing: they leave the clock, and config
		// writers, alone.
		if err := tx.QueryRow(ctx, configTombstonesOldSQL, age).Scan(&some); err != nil || !some {
			return err
		}
		if _, err := tx.Exec(ctx, lockConfigClockSQL); err != nil {
			return err
		}
		return tx.QueryRow(ctx, pruneConfigTombstonesSQL, age, limit).Scan(&n)
	})
	if err != nil {
		return 0, fmt.Errorf("prune config tombstones: %w", err)
	}
	return n, nil
}
