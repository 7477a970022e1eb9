package shards

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/internal/pglock"
	"github.com/shardgate/shardgate/internal/versioning"
)

// prunePartitionsSQL picks the owned partitions holding the oldest
// tombstones deleted before now() - $1 µs (at most $2 tombstones' worth),
// holds FOR SHARE on their ownership rows, and locks their outbox clocks,
// creating a missing clock row at tick 0 (so the partition's first event
// still gets tick 1). It returns the partitions it locked.
//
// Locks, in this order:
//   - ownership rows, FOR SHARE SKIP LOCKED, like the session sweeper: a
//     partition being frozen is passed over (this round), and one frozen or
//     moved since the snapshot is rechecked and excluded. A mover's freeze
//     waits for the prune to commit.
//   - the clocks, in partition order (the insert's sort reads every
//     ownership row first). This is the prune's only wait.
//
// Why the clocks come before any tombstone lock: the package doc
// ("Outbox clocks and lock order").
const prunePartitionsSQL = `
WITH old AS (
    (SELECT t.partition, t.deleted_at FROM user_tombstones AS t
     JOIN ownership AS o ON o.partition = t.partition AND o.state = 'owned'
     WHERE t.deleted_at < now() - $1::bigint * interval '1 microsecond'
     ORDER BY t.deleted_at LIMIT $2)
    UNION ALL
    (SELECT t.partition, t.deleted_at FROM item_tombstones AS t
     JOIN ownership AS o ON o.partition = t.partition AND o.state = 'owned'
     WHERE t.deleted_at < now() - $1::bigint * interval '1 microsecond'
     ORDER BY t.deleted_at LIMIT $2)
), own AS (
    SELECT o.partition FROM ownership AS o
    WHERE o.state = 'owned'
      AND o.partition IN (SELECT partition FROM (SELECT partition FROM old ORDER BY deleted_at LIMIT $2) AS f)
    FOR SHARE SKIP LOCKED
), clk AS (
    INSERT INTO outbox_clock AS c (partition, tick)
    SELECT partition, 0 FROM own ORDER BY partition
    ON CONFLICT (partition) DO UPDATE SET tick = c.tick
    RETURNING c.partition
)
SELECT coalesce(array_agg(partition), '{}') FROM clk`

// pruneUserTombstonesSQL and pruneItemTombstonesSQL delete up to $3
// tombstones deleted before now() - $2 µs in the partitions $1 (whose
// clocks the transaction holds), oldest first, and raise each partition's
// version floor to at least the largest version pruned there. They never
// wait: SKIP LOCKED passes over a tombstone a delete is rewriting (it gets a
// fresh deleted_at anyway), and the clock rows are already the prune's. The
// statement's snapshot is taken after the clocks were locked, so it sees
// every delete those partitions committed before.
const (
	pruneUserTombstonesSQL = `
WITH del AS (
    DELETE FROM user_tombstones AS t USING (
        SELECT partition, user_id FROM user_tombstones
        WHERE partition = ANY($1) AND deleted_at < now() - $2::bigint * interval '1 microsecond'
        ORDER BY deleted_at LIMIT $3
        FOR UPDATE SKIP LOCKED
    ) AS c
    WHERE t.partition = c.partition AND t.user_id = c.user_id
    RETURNING t.partition, t.version
), fl AS (
    UPDATE outbox_clock AS c SET version_floor = greatest(c.version_floor, d.version)
    FROM (SELECT partition, max(version) AS version FROM del GROUP BY partition) AS d
    WHERE c.partition = d.partition
)
SELECT count(*) FROM del`

	pruneItemTombstonesSQL = `
WITH del AS (
    DELETE FROM item_tombstones AS t USING (
        SELECT partition, user_id, collection, key FROM item_tombstones
        WHERE partition = ANY($1) AND deleted_at < now() - $2::bigint * interval '1 microsecond'
        ORDER BY deleted_at LIMIT $3
        FOR UPDATE SKIP LOCKED
    ) AS c
    WHERE t.partition = c.partition AND t.user_id = c.user_id
      AND t.collection = c.collection AND t.key = c.key
    RETURNING t.partition, t.version
), fl AS (
    UPDATE outbox_clock AS c SET version_floor = greatest(c.version_floor, d.version)
    FROM (SELECT partition, max(version) AS version FROM del GROUP BY partition) AS d
    WHERE c.partition = d.partition
)
SELECT count(*) FROM del`
)

// PruneTombstones deletes up to limit (1..MaxPruneLimit; see
// versioning.DefaultPruneLimit) user and item tombstones written more than olderThan
// ago (by the database's clock), in partitions this shard owns, and returns
// how many it deleted. In the same transaction it raises each affected
// partition's version floor to at least the largest version it pruned
// there, so a key created again after its tombstone is gone still gets a
// version above every one it had (the create statements and shard
// migration 00006 see to that). Frozen and moved partitions are left alone.
// One prune runs per shard at a time: while another holds the shard's prune
// lock it returns 0 at once. Fewer than limit means nothing more was ready.
//
// Writers of the partitions it prunes wait for its commit (it holds their
// outbox clocks), as they do for the session sweeper.
func (s *Shard) PruneTombstones(ctx context.Context, olderThan time.Duration, limit int) (n int, err error) {
	if limit < 1 || limit > versioning.MaxPruneLimit {
		return 0, s.wrap("prune tombstones", fmt.Errorf("limit %d outside 1..%d", limit, versioning.MaxPruneLimit))
	}
	if olderThan < 0 {
		return 0, s.wrap("prune tombstones", fmt.Errorf("negative age %v", olderThan))
	}
	age := olderThan.Microseconds()
	c, err := s.acquire(ctx)
	if err != nil {
		return 0, s.wrap("prune tombstones", err)
	}
	defer c.Release()
	// Separate statements, so each snapshot is taken after the locks before
	// it are held: after the clocks it sees what those partitions' writers
	// committed.
	_, err = pglock.TryTx(ctx, c, pglock.ClassMaintenance, pglock.KeyPrune, sweepLockTimeout, func(tx pgx.Tx) error {
		if err := customPlans(ctx, tx); err != nil {
			return err
		}
		var parts []int32
		if err := tx.QueryRow(ctx, prunePartitionsSQL, age, limit).Scan(&parts); err != nil {
			return err
		}
		if len(parts) == 0 {
			return nil
		}
		var users, items int
		if err := tx.QueryRow(ctx, pruneUserTombstonesSQL, parts, age, limit).Scan(&users); err != nil {
			return err
		}
		if users < limit {
			if err := tx.QueryRow(ctx, pruneItemTombstonesSQL, parts, age, limit-users).Scan(&items); err != nil {
				return err
			}
		}
		n = users + items
		return nil
	})
	if err != nil {
		return 0, s.wrap("prune tombstones", err)
	}
	return n, nil
}
