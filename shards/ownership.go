package shards

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// OwnershipState is a partition's state on a shard. A partition moves
// owned → frozen → moved on its source shard.
//
// The mover must mark the source moved before the target becomes owned. A
// frozen source still serves reads, so a target that takes writes while its
// source is frozen would let a router with a stale map read a value older
// than an acknowledged write. In the gap between the two steps both shards
// answer ErrWrongShard and callers retry for a moment.
type OwnershipState string

const (
	// Owned: the shard serves reads and writes for the partition.
	Owned OwnershipState = "owned"
	// Frozen: a move is finishing; reads are served, writes get ErrWrongShard.
	Frozen OwnershipState = "frozen"
	// Moved: the partition lives elsewhere; reads and writes get ErrWrongShard.
	Moved OwnershipState = "moved"
)

func (st OwnershipState) valid() bool {
	return st == Owned || st == Frozen || st == Moved
}

// Duplicates are removed because ON CONFLICT DO UPDATE may not touch a row
// twice in one statement.
const setOwnershipSQL = `
INSERT INTO ownership (partition, state)
SELECT DISTINCT p, $2::text FROM unnest($1::integer[]) AS p
ON CONFLICT (partition) DO UPDATE
    SET state = EXCLUDED.state, updated_at = now()`

// SetOwnership sets the state of every partition in partitions, adding rows
// for partitions the shard did not list, in one statement. It takes the
// ownership rows' locks like any update, so it waits for in-flight writes.
func (s *Shard) SetOwnership(ctx context.Context, partitions []int32, state OwnershipState) error {
	if !state.valid() {
		return s.wrap("set ownership", fmt.Errorf("invalid state %q", state))
	}
	for _, p := range partitions {
		if p < 0 {
			return s.wrap("set ownership", fmt.Errorf("invalid partition %d", p))
		}
	}
	if len(partitions) == 0 {
		return nil
	}
	c, err := s.acquire(ctx)
	if err != nil {
		return s.wrap("set ownership", err)
	}
	defer c.Release()
	if _, err := c.Exec(ctx, setOwnershipSQL, partitions, string(state)); err != nil {
		return s.wrap("set ownership", err)
	}
	return nil
}

const ownershipSQL = `SELECT partition, state FROM ownership`

// Ownership returns the state of every partition the shard lists.
func (s *Shard) Ownership(ctx context.Context) (map[int32]OwnershipState, error) {
	c, err := s.acquire(ctx)
	if err != nil {
		return nil, s.wrap("ownership", err)
	}
	defer c.Release()
	rows, err := c.Query(ctx, ownershipSQL)
	if err != nil {
		return nil, s.wrap("ownership", err)
	}
	defer rows.Close()
	out := make(map[int32]OwnershipState)
	var (
		p     int32
		state string
	)
	for rows.Next() {
		if err := rows.Scan(&p, &state); err != nil {
			return nil, s.wrap("ownership", err)
		}
		out[p] = OwnershipState(state)
	}
	if err := rows.Err(); err != nil {
		return nil, s.wrap("ownership", err)
	}
	return out, nil
}

// ResetOwnership makes the ownership table say exactly "owned: partitions",
// removing every other row, in one transaction. Cluster creation uses it to
// undo what an interrupted earlier attempt with another shard set left.
func (s *Shard) ResetOwnership(ctx context.Context, partitions []int32) error {
	for _, p := range partitions {
		if p < 0 {
			return s.wrap("reset ownership", fmt.Errorf("invalid partition %d", p))
		}
	}
	if partitions == nil {
		partitions = []int32{} // NULL would match no row in <> ALL
	}
	c, err := s.acquire(ctx)
	if err != nil {
		return s.wrap("reset ownership", err)
	}
	defer c.Release()
	err = pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `DELETE FROM ownership WHERE partition <> ALL($1::integer[])`, partitions); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, setOwnershipSQL, partitions, string(Owned))
		return err
	})
	if err != nil {
		return s.wrap("reset ownership", err)
	}
	return nil
}
