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

// The sweeper's advisory lock, taken per transaction with
// pg_try_advisory_xact_lock(sweepLockClass, sweepLockKey). Advisory locks
// belong to one database, so it admits one sweeper per shard. The
// two-integer form keeps it apart from goose's migration lock (a single
// bigint key), and the class from the outbox relay's (0x53470001, in
// package events).
const (
	sweepLockClass int32 = 0x53470002 // "SG" + 2
	sweepLockKey   int32 = 1
)

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
// Fencing: like every write it holds FOR SHARE on the ownership rows of the
// partitions it deletes from, so a mover's freeze (FOR UPDATE) waits for it
// to commit. Unlike a write it does not wait for one: SKIP LOCKED passes over
// a partition whose ownership row is being changed (and a row updated since
// the snapshot is rechecked, so one frozen meanwhile is excluded), and over
// session rows a Touch, Revoke or DeleteUser holds, which either revive the
// session or delete it themselves (with their own event, so no session gets
// two). Row locks that SKIP LOCKED takes before skipping a join row stay
// held until commit; they only ever guard expired sessions.
//
// Deadlocks: every outbox insert takes its partition's outbox_clock row lock
// (BEFORE INSERT trigger, shard migrations 00002/00003) until commit, and a
// batch spans many partitions, so the sweep holds several clocks while it
// may wait for the next. A deadlock needs a holder of that next clock to be
// waiting, in turn, for something the sweep holds. It cannot: after the
// clock a write locks nothing the sweep holds (writes lock ownership and
// data rows first; the trigger's tombstone lookups take no locks; a delete
// upserts its own key's tombstone after its outbox insert, and the sweep
// never touches tombstones), and writers insert events of one partition
// only. The others that hold several clocks, another sweep (the advisory
// lock keeps it out) and the tombstone pruner, take them in partition order
// too, so they queue behind each other rather than deadlock. The sweep
// itself takes
// every other lock without waiting (SKIP LOCKED), and all of them before its
// first outbox insert: the insert's sort reads every delete first (as in
// deleteUserSQL), then takes the clocks in partition order. So writers of a
// swept partition wait at most for the rest of the batch and its commit,
// and the sweep waits only for writers that are about to commit, or for a
// prune batch.
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
	_, err = pglock.TryTx(ctx, c, sweepLockClass, sweepLockKey, sweepLockTimeout, func(tx pgx.Tx) error {
		return tx.QueryRow(ctx, sweepSessionsSQL, limit).Scan(&n)
	})
	if err != nil {
		return 0, s.wrap("sweep sessions", err)
	}
	return n, nil
}
