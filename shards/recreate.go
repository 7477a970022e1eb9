package shards

import (
	"errors"

	"github.com/jackc/pgx/v5/pgconn"
)

// belowTombstoneCode is the SQLSTATE the outbox triggers raise (shard
// migration 00003, catalog 00004) when a write's version is not above its
// key's tombstone.
const belowTombstoneCode = "40001" // serialization_failure

// RetryBelowTombstone runs a put statement again when the outbox trigger
// refused it for a version not above the key's tombstone. That happens only
// when a delete of the key committed after the statement took its snapshot
// (it computed the recreated version without the delete's tombstone); run
// again, the statement sees the tombstone and continues after it. The
// refused statement rolled back whole, so running it again is safe; a
// second refusal needs another delete in between, so a few tries suffice.
// The catalog's config writes use it too.
func RetryBelowTombstone(put func() error) error {
	var err error
	for range 3 {
		if err = put(); !isBelowTombstone(err) {
			return err
		}
	}
	return err
}

func isBelowTombstone(err error) bool {
	var pg *pgconn.PgError
	return errors.As(err, &pg) && pg.Code == belowTombstoneCode
}
