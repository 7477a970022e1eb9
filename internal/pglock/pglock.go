// Package pglock runs work that one process at a time may do in a
// database, under a transaction-scoped advisory lock.
package pglock

import (
	"context"

	"github.com/jackc/pgx/v5"
)

// Beginner starts transactions: a pool, a pooled connection or a connection.
type Beginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// TryTx runs fn in a transaction that holds the advisory lock (class, key)
// and waits at most lockTimeout (a Postgres interval, e.g. "5s") for any
// other lock. If another transaction holds the advisory lock, it runs
// nothing and returns false. The lock is taken in a statement of its own,
// so fn's statements take their snapshots with it held and see what the
// previous holder committed.
func TryTx(ctx context.Context, db Beginner, class, key int32, lockTimeout string, fn func(pgx.Tx) error) (bool, error) {
	got := false
	err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		var timeout string
		if err := tx.QueryRow(ctx, `SELECT set_config('lock_timeout', $3, true), pg_try_advisory_xact_lock($1, $2)`,
			class, key, lockTimeout).Scan(&timeout, &got); err != nil || !got {
			return err
		}
		return fn(tx)
	})
	return got, err
}
