package shards

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/shardgate/shardgate/internal/versioning"
)

// Conditional writes (PutUser, PutItem, DeleteUser, DeleteItem) run one
// statement that returns three columns: whether the partition is owned,
// the version it wrote (NULL if it wrote nothing), and the row's version in
// the statement's snapshot (NULL if absent), which the main query reads
// without seeing the statement's own changes. The last one is what a
// conflict reports as Current.

func checkExpected(expected *int64) error {
	if expected != nil && *expected < 0 {
		return fmt.Errorf("expected version %d is negative", *expected)
	}
	return nil
}

// refused builds the error of a fenced write that wrote nothing although the
// partition is owned. before is the row's version in the statement's
// snapshot. When before agrees with expected, another transaction changed
// the row after the snapshot was taken (the write waited for its lock and
// found a newer row); reread, run with args, fetches the version it left.
func refused(ctx context.Context, c querier, expected *int64, before pgtype.Int8, isDelete bool, reread string, args ...any) error {
	var cur int64
	if before.Valid {
		cur = before.Int64
	}
	switch {
	case expected == nil:
		// Only an unconditional delete gets here: the row is gone.
		return versioning.ErrNotFound
	case isDelete && *expected == 0 && cur == 0:
		return versioning.ErrNotFound
	}
	if cur == *expected {
		var v int64
		err := c.QueryRow(ctx, reread, args...).Scan(&v)
		switch {
		case err == nil:
			cur = v
		case errors.Is(err, pgx.ErrNoRows):
			cur = 0
		}
		// Any other error leaves the snapshot's version: the write was
		// refused either way, and Current is informational.
	}
	return &versioning.ConflictError{Expected: *expected, Current: cur}
}

// querier runs one query: a pool or one of its connections.
type querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// readable reports whether a partition in state may serve reads.
func readable(state string) bool {
	return state == string(Owned) || state == string(Frozen)
}

// fencedRead turns the outcome of a fenced read (ownership row LEFT JOIN the
// data row) into its error: no ownership row or an unreadable state is
// ErrWrongShard, checked before a missing data row (versioning.ErrNotFound).
func (s *Shard) fencedRead(op string, partition int32, err error, state string, found bool) error {
	switch {
	case errors.Is(err, pgx.ErrNoRows), err == nil && !readable(state):
		return s.wrap(op, wrongShard(partition))
	case err != nil:
		return s.wrap(op, err)
	case !found:
		return s.wrap(op, versioning.ErrNotFound)
	}
	return nil
}
