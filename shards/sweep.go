package shards

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/internal/pglock"
)

// DefaultSweepLimit is the batch size SweepExpiredSessions is meant to run
// with: big enough to keep up, small enough that the partitions' outbox
// clocks it holds until commit (see sweepSessionsSQL) are not held long.
const DefaultSweepLimit = 1000

// MaxSweepLimit caps one SweepExpiredSessions batch.
const MaxSweepLimit = 10000

// sweepLockTimeout bounds the sweep's waits for the partitions' outbox
// clocks (its only waits, see sweepSessionsSQL). While it waits it holds
// the clocks of the partitions it already inserted into, and their writers
// queue behind it; clocks are held by statements about to commit, or by a
// tombstone prune batch until it commits (PruneTombstones), so this is a
// backstop, not something a healthy shard reaches.
const sweepLockTimeout = "5s"

// sweepSessionsSQL deletes up to $1 expired sessions of owned partitions,
// oldest expiry first, with a delete event each (as revokeSessionSQL writes
// them: key = hex token hash, version one past the row's, NULL payload).
//
// Like every write it holds FOR SHARE on the ownership rows of the
// partitions it deletes from, but never waits for one (SKIP LOCKED); its
// lock order is in the package doc ("Outbox clocks and lock order").
const sweepSessionsSQL = `
WITH cand AS (
    SELECT s.partition, s.token_hash
    FROM sessions AS s
    JOIN ownership AS o ON o.partition = s.partition AND o.state = 'owned'
    WHERE s.expires_at <= now()
    ORDER BY s.expires_at
    LIMIT $1
    FOR UPDATE OF s SKIP LOCKED
    FOR SHARE OF o SKIP LOCKED
), del AS (
    DELETE FROM sessions AS s USING cand
    WHERE s.partition = cand.partition AND s.token_hash = cand.token_hash
    RETURNING s.partition, s.user_id, s.token_hash, s.version
), ev AS (
    INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
    SELECT partition, user_id, 'session', encode(token_hash, 'hex'), 'delete', version + 1, NULL::jsonb
    FROM del ORDER BY partition, token_hash
)
SELECT count(*) FROM del`

// SweepExpiredSessions deletes up to limit (1..MaxSweepLimit; see
// DefaultSweepLimit) sessions that have expired by the database's clock, in
// partitions this shard owns, with a delete event for each, and returns how
// many it deleted. Partitions that are frozen or moved, and sessions that
// another transaction holds, are left alone. One sweep runs per shard at a
// time: while another holds the shard's sweep lock it returns 0 at once
// without deleting anything. Fewer than limit means nothing more was ready
// to sweep.
func (s *Shard) SweepExpiredSessions(ctx context.Context, limit int) (n int, err error) {
	if limit < 1 || limit > MaxSweepLimit {
		return 0, s.wrap("sweep sessions", fmt.Errorf("limit %d outside 1..%d", limit, MaxSweepLimit))
	}
	c, err := s.acquire(ctx)
	if err != nil {
		return 0, s.wrap("sweep sessions", err)
	}
	defer c.Release()
	_, err = pglock.TryTx(ctx, c, pglock.ClassMaintenance, pglock.KeySweep, sweepLockTimeout, func(tx pgx.Tx) error {
		if err := customPlans(ctx, tx); err != nil {
			return err
		}
		return tx.QueryRow(ctx, sweepSessionsSQL, limit).Scan(&n)
	})
	if err != nil {
		return 0, s.wrap("sweep sessions", err)
	}
	return n, nil
}

// customPlans lets the transaction's statements be planned for their
// parameters: the pool forces generic plans (see Open), which suit the
// request path's key lookups, but the batch jobs' ranges and LIMIT $n do
// better with the planner seeing the values. Once a batch, not per call.
func customPlans(ctx context.Context, tx pgx.Tx) error {
	_, err := tx.Exec(ctx, `SET LOCAL plan_cache_mode = auto`)
	return err
}
